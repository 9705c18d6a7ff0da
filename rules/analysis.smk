# register (each follow-up to the baseline) -> measure_report (all sessions: volumes, then
# asymmetry, change and pattern, then the report)


rule register:
    input:
        unpack(baseline_files),
        moving_image=f"{SESSION_STEM}_T1w.nii.gz",
        moving_labels=f"{SESSION_STEM}_dseg.nii.gz",
    output:
        tfm=f"{SESSION_STEM}_xfm.tfm",
        json=f"{SESSION_STEM}_xfm.json",
    params:
        limbtrack=LIMBTRACK,
        reference=registration_side,
    log:
        f"{SUBJECT_DIR}/logs/register_ses-{{session}}.log",
    conda:
        "../environment.yml"
    threads: 1
    # Peak RSS (cohort_speed.py --realistic, 2026-11-26): 333 MiB and 4 s CPU at 320x320x40
    # (40 jobs); 0.72 GB and 3 min at 512x384x60 (0.5 mm; earlier). Their line gives 2.6 GB
    # at 512x512x200: x 1.3 margin -> 3500 (was 3000, 1.15 x).
    resources:
        mem_mb=3500,
        runtime=30,
    shell:
        "{params.limbtrack} register --fixed-image {input.fixed_image:q}"
        " --fixed-labels {input.fixed_labels:q} --moving-image {input.moving_image:q}"
        " --moving-labels {input.moving_labels:q} --reference {params.reference}"
        " --out-tfm {output.tfm:q} --out-json {output.json:q} > {log:q} 2>&1"


rule measure_report:
    # measure (volumes of every session), longitudinal (asymmetry, change, response pattern,
    # summary), then report (the HTML page) in one process (limbtrack steps,
    # pipeline/steps.py): a chain, so one job costs no parallelism; the imports are paid once
    # and SLURM runs one Snakemake for it, not three. Each step keeps its own log. Editing the
    # events file re-runs the three (measure: seconds).
    input:
        unpack(events_input),
        # sessions (measure, longitudinal); where each session's DICOM files are (report: read
        # only with show_phi, name, ID, birth date)
        sessions_json=f"{SUBJECT_DIR}/sessions.json",
        index_tsv=f"{SUBJECT_DIR}/index.tsv",
        problems_tsv=f"{SUBJECT_DIR}/problems.tsv",
        fluid=session_files(f"{SESSION_STEM}_fluid.nii.gz"),
        t1=session_files(f"{SESSION_STEM}_T1w.nii.gz"),
        dseg=session_files(f"{SESSION_STEM}_dseg.nii.gz"),
        qc=session_files(f"{SESSION_STEM}_dseg.json"),
        xfm=followup_files(f"{SESSION_STEM}_xfm.json"),
        tfm=followup_files(f"{SESSION_STEM}_xfm.tfm"),
    output:
        volumes=f"{SUBJECT_DIR}/volumes.tsv",
        side=f"{SUBJECT_DIR}/side.json",
        csa=f"{SUBJECT_DIR}/profile_csa.tsv",
        circumference=f"{SUBJECT_DIR}/circumference.tsv",
        longitudinal=f"{SUBJECT_DIR}/longitudinal.tsv",
        summary=f"{SUBJECT_DIR}/summary.json",
        report=report(
            f"{SUBJECT_DIR}/report.html",
            caption="../pipeline/report/captions/report.rst",
            category="Subject report",
        ),
    params:
        limbtrack=LIMBTRACK,
        day0=subject_value("day0"),
        affected_side=subject_value("affected_side"),
        baseline=baseline_label,
        repeatability=(f"--repeatability {config['repeatability_model']}"
                       if config.get("repeatability_model") else ""),
        subject_dir=parent_of("summary"),
        events=events_arg,
        thresholds=json.dumps(config["response"]),
        settings=json.dumps({"series": config["series"], "segment": config["segment"]}),
        phi="--show-phi" if config["show_phi"] else "",
    log:
        measure=f"{SUBJECT_DIR}/logs/measure.log",
        longitudinal=f"{SUBJECT_DIR}/logs/longitudinal.log",
        report=f"{SUBJECT_DIR}/logs/report.log",
    conda:
        "../environment.yml"
    threads: 1
    # Peak RSS grows with sessions x voxels; the report's is the largest: 261 MiB and 7 s CPU
    # for 3 sessions of 320x320x40 (measure 216 MiB, 4 s; longitudinal 36 MiB, 0.6 s;
    # cohort_speed.py --realistic, 2026-11-26; 20 jobs each), 520 MB for 2 of 512x384x60
    # (earlier); their line gives 3.3 GB for 3 sessions of 512x512x200: x 1.3 -> 4500. More or
    # larger sessions: --set-resources measure_report:mem_mb=N.
    resources:
        mem_mb=4500,
        runtime=30,
    shell:
        "{params.limbtrack} steps --log {log.measure:q} --log {log.longitudinal:q}"
        " --log {log.report:q} --"
        " measure --subject {wildcards.subject} --day0 {params.day0}"
        " --affected-side {params.affected_side} --sessions-json {input.sessions_json:q}"
        " --dseg {input.dseg:q} --qc {input.qc:q} --xfm {input.xfm:q}"
        " --baseline {params.baseline} {params.repeatability}"
        " --out {output.volumes:q} --side-json {output.side:q}"
        " --csa {output.csa:q} --circumference {output.circumference:q}"
        " :: longitudinal --subject {wildcards.subject} --day0 {params.day0}"
        " --subject-dir {params.subject_dir:q} --volumes {output.volumes:q}"
        " --side-json {output.side:q} --sessions-json {input.sessions_json:q}"
        " --qc {input.qc:q} {params.events} --thresholds-json {params.thresholds:q}"
        " --settings-json {params.settings:q}"
        " --out-tsv {output.longitudinal:q} --out-summary {output.summary:q}"
        " :: report --summary {output.summary:q}"
        " --volumes {output.volumes:q} --longitudinal {output.longitudinal:q}"
        " --index {input.index_tsv:q} --problems {input.problems_tsv:q}"
        " --csa {output.csa:q} --circumference {output.circumference:q}"
        " --sessions-json {input.sessions_json:q}"
        " --fluid {input.fluid:q} --t1 {input.t1:q} --dseg {input.dseg:q}"
        " --xfm {input.xfm:q} --tfm {input.tfm:q}"
        " {params.phi} --out {output.report:q}"
