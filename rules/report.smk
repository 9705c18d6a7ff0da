# report: one self-contained HTML page per subject


rule report:
    input:
        summary=f"{SUBJECT_DIR}/summary.json",
        volumes=f"{SUBJECT_DIR}/volumes.tsv",
        longitudinal=f"{SUBJECT_DIR}/longitudinal.tsv",
        index_tsv=f"{SUBJECT_DIR}/index.tsv",
        problems_tsv=f"{SUBJECT_DIR}/problems.tsv",
        side=f"{SUBJECT_DIR}/side.json",
        csa=f"{SUBJECT_DIR}/profile_csa.tsv",
        circumference=f"{SUBJECT_DIR}/circumference.tsv",
        images=session_files(f"{SESSION_STEM}_fluid.nii.gz"),
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
        python=PYTHON,
        subject_dir=parent_of(0),
        phi="--show-phi" if config["show_phi"] else "",
    log:
        f"{SUBJECT_DIR}/logs/report.log",
    conda:
        "../environment.yml"
    group: "tables"
    threads: 1
    # peak RSS 520 MB for 2 sessions of 512x384x60
    resources:
        mem_mb=3000,
        runtime=10,
    shell:
        "{params.python} -m pipeline.report.build --subject-dir {params.subject_dir:q} --out {output:q}"
        " > {log:q} 2>&1"


rule cohort:
    input:
        summaries=expand(f"{SUBJECT_DIR}/summary.json", subject=sorted(SUBJECTS)),
        longitudinal=expand(f"{SUBJECT_DIR}/longitudinal.tsv", subject=sorted(SUBJECTS)),
        reports=expand(f"{SUBJECT_DIR}/report.html", subject=sorted(SUBJECTS)),
    output:
        html=report(f"{RESULTS}/cohort.html", caption="../pipeline/report/captions/cohort.rst", category="Cohort"),
        tsv=f"{RESULTS}/cohort.tsv",
    params:
        python=PYTHON,
        subject_dirs=[f"{RESULTS}/{s}" for s in sorted(SUBJECTS)],
    log:
        f"{RESULTS}/logs/cohort.log",
    conda:
        "../environment.yml"
    threads: 1
    resources:
        mem_mb=500,
        runtime=5,
    shell:
        "{params.python} -m pipeline.report.cohort --subject-dirs {params.subject_dirs:q}"
        " --out-html {output.html:q} --out-tsv {output.tsv:q} > {log:q} 2>&1"
