# segment (per session) -> measure (all sessions) -> longitudinal (pattern, summary)


rule segment:
    input:
        t1=f"{SESSION_STEM}_T1w.nii.gz",
        fluid=f"{SESSION_STEM}_fluid.nii.gz",
    output:
        dseg=f"{SESSION_STEM}_dseg.nii.gz",
        qc=f"{SESSION_STEM}_dseg.json",
    params:
        limbtrack=LIMBTRACK,
        settings=json.dumps(config["segment"]),
    log:
        f"{SUBJECT_DIR}/logs/segment_ses-{{session}}.log",
    conda:
        "../environment.yml"
    group: "session"
    threads: 1
    # Peak RSS (benchmarks/cohort_speed.py --realistic, 2026-11-26): 556 MiB and 22 s CPU at
    # 320x320x40 (60 jobs); 1.05 GB at 512x384x60 (earlier). Their line gives 3.4 GB at
    # 512x512x200, the largest study planned for: x 1.3 margin -> 5000. CPU x 13 there: 5 min.
    resources:
        mem_mb=5000,
        runtime=30,
    shell:
        "{params.limbtrack} segment --t1 {input.t1:q} --fluid {input.fluid:q}"
        " --out {output.dseg:q} --qc {output.qc:q} --settings-json {params.settings:q}"
        " > {log:q} 2>&1"


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


rule measure:
    input:
        sessions_json=f"{SUBJECT_DIR}/sessions.json",
        dseg=session_files(f"{SESSION_STEM}_dseg.nii.gz"),
        qc=session_files(f"{SESSION_STEM}_dseg.json"),
        xfm=followup_files(f"{SESSION_STEM}_xfm.json"),
        tfm=followup_files(f"{SESSION_STEM}_xfm.tfm"),
    output:
        volumes=f"{SUBJECT_DIR}/volumes.tsv",
        side=f"{SUBJECT_DIR}/side.json",
        csa=f"{SUBJECT_DIR}/profile_csa.tsv",
        circumference=f"{SUBJECT_DIR}/circumference.tsv",
    params:
        limbtrack=LIMBTRACK,
        day0=subject_value("day0"),
        affected_side=subject_value("affected_side"),
        baseline=baseline_label,
        repeatability=(f"--repeatability {config['repeatability_model']}"
                       if config.get("repeatability_model") else ""),
    log:
        f"{SUBJECT_DIR}/logs/measure.log",
    conda:
        "../environment.yml"
    group: "tables"
    threads: 1
    # Peak RSS grows with sessions x voxels: 216 MiB and 4 s CPU for 3 sessions of 320x320x40
    # (cohort_speed.py --realistic, 2026-11-26; 20 jobs), 390 MB for 2 of 512x384x60
    # (earlier); their line gives 2.2 GB for 3 sessions of 512x512x200: x 1.3 -> 3000 (was
    # 2000). More or larger sessions: --set-resources measure:mem_mb=N.
    resources:
        mem_mb=3000,
        runtime=10,
    shell:
        "{params.limbtrack} measure --subject {wildcards.subject} --day0 {params.day0}"
        " --affected-side {params.affected_side} --sessions-json {input.sessions_json:q}"
        " --dseg {input.dseg:q} --qc {input.qc:q} --xfm {input.xfm:q}"
        " --baseline {params.baseline} {params.repeatability}"
        " --out {output.volumes:q} --side-json {output.side:q}"
        " --csa {output.csa:q} --circumference {output.circumference:q} > {log:q} 2>&1"


rule longitudinal:
    input:
        unpack(events_input),
        volumes=f"{SUBJECT_DIR}/volumes.tsv",
        side=f"{SUBJECT_DIR}/side.json",
        sessions_json=f"{SUBJECT_DIR}/sessions.json",
        qc=session_files(f"{SESSION_STEM}_dseg.json"),
    output:
        longitudinal=f"{SUBJECT_DIR}/longitudinal.tsv",
        summary=f"{SUBJECT_DIR}/summary.json",
    params:
        limbtrack=LIMBTRACK,
        day0=subject_value("day0"),
        subject_dir=parent_of("summary"),
        events=events_arg,
        thresholds=json.dumps(config["response"]),
        settings=json.dumps({"series": config["series"], "segment": config["segment"]}),
    log:
        f"{SUBJECT_DIR}/logs/longitudinal.log",
    conda:
        "../environment.yml"
    group: "tables"
    threads: 1
    # peak RSS 36 MiB, 0.6 s CPU (3 sessions; cohort_speed.py --realistic): tables only
    resources:
        mem_mb=500,
        runtime=10,
    shell:
        "{params.limbtrack} longitudinal --subject {wildcards.subject} --day0 {params.day0}"
        " --subject-dir {params.subject_dir:q} --volumes {input.volumes:q}"
        " --side-json {input.side:q} --sessions-json {input.sessions_json:q}"
        " --qc {input.qc:q} {params.events} --thresholds-json {params.thresholds:q}"
        " --settings-json {params.settings:q}"
        " --out-tsv {output.longitudinal:q} --out-summary {output.summary:q} > {log:q} 2>&1"
