# report: one self-contained HTML page per subject; cohort: one row per subject.
# Each rule passes every input it declares, and the command reads only those files.


rule report:
    input:
        summary=f"{SUBJECT_DIR}/summary.json",
        volumes=f"{SUBJECT_DIR}/volumes.tsv",
        longitudinal=f"{SUBJECT_DIR}/longitudinal.tsv",
        index_tsv=f"{SUBJECT_DIR}/index.tsv",
        problems_tsv=f"{SUBJECT_DIR}/problems.tsv",
        csa=f"{SUBJECT_DIR}/profile_csa.tsv",
        circumference=f"{SUBJECT_DIR}/circumference.tsv",
        # where each session's DICOM files are: read only with show_phi (name, ID, birth date)
        sessions_json=session_index,
        fluid=session_files(f"{SESSION_STEM}_fluid.nii.gz"),
        t1=session_files(f"{SESSION_STEM}_T1w.nii.gz"),
        dseg=session_files(f"{SESSION_STEM}_dseg.nii.gz"),
        xfm=followup_files(f"{SESSION_STEM}_xfm.json"),
        tfm=followup_files(f"{SESSION_STEM}_xfm.tfm"),
    output:
        report(
            f"{SUBJECT_DIR}/report.html",
            caption="../pipeline/report/captions/report.rst",
            category="Subject report",
        ),
    params:
        limbtrack=LIMBTRACK,
        phi="--show-phi" if config["show_phi"] else "",
    log:
        f"{SUBJECT_DIR}/logs/report.log",
    conda:
        "../environment.yml"
    group: "tables"
    threads: 1
    # Peak RSS grows with sessions x voxels: 261 MiB and 7 s CPU for 3 sessions of 320x320x40
    # (cohort_speed.py --realistic, 2026-11-26; 20 jobs), 520 MB for 2 of 512x384x60
    # (earlier); their line gives 3.3 GB for 3 sessions of 512x512x200: x 1.3 -> 4500 (was
    # 3000). More or larger sessions: --set-resources report:mem_mb=N.
    resources:
        mem_mb=4500,
        runtime=10,
    shell:
        "{params.limbtrack} report --summary {input.summary:q}"
        " --volumes {input.volumes:q} --longitudinal {input.longitudinal:q}"
        " --index {input.index_tsv:q} --problems {input.problems_tsv:q}"
        " --csa {input.csa:q} --circumference {input.circumference:q}"
        " --sessions-json {input.sessions_json:q}"
        " --fluid {input.fluid:q} --t1 {input.t1:q} --dseg {input.dseg:q}"
        " --xfm {input.xfm:q} --tfm {input.tfm:q}"
        " {params.phi} --out {output:q} > {log:q} 2>&1"


rule cohort:
    input:
        summaries=expand(f"{SUBJECT_DIR}/summary.json", subject=sorted(SUBJECTS)),
        longitudinal=expand(f"{SUBJECT_DIR}/longitudinal.tsv", subject=sorted(SUBJECTS)),
        reports=expand(f"{SUBJECT_DIR}/report.html", subject=sorted(SUBJECTS)),
    output:
        html=report(f"{RESULTS}/cohort.html", caption="../pipeline/report/captions/cohort.rst", category="Cohort"),
        tsv=f"{RESULTS}/cohort.tsv",
    params:
        limbtrack=LIMBTRACK,
    log:
        f"{RESULTS}/logs/cohort.log",
    conda:
        "../environment.yml"
    threads: 1
    # peak RSS 22 MiB, 0.1 s CPU for 20 subjects (cohort_speed.py --realistic): text only
    resources:
        mem_mb=500,
        runtime=5,
    shell:
        "{params.limbtrack} cohort --summaries {input.summaries:q}"
        " --longitudinal {input.longitudinal:q} --reports {input.reports:q}"
        " --out-html {output.html:q} --out-tsv {output.tsv:q} > {log:q} 2>&1"
