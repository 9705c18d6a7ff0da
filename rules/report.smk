# report: one self-contained HTML page per subject


rule report:
    input:
        summary=f"{SUBJECT_DIR}/summary.json",
        volumes=f"{SUBJECT_DIR}/volumes.tsv",
        longitudinal=f"{SUBJECT_DIR}/longitudinal.tsv",
        index_tsv=f"{SUBJECT_DIR}/index.tsv",
        images=session_files(f"{SESSION_STEM}_fluid.nii.gz"),
        dseg=session_files(f"{SESSION_STEM}_dseg.nii.gz"),
    output:
        report(
            f"{SUBJECT_DIR}/report.html",
            caption="../report/report.rst",
            category="Subject report",
        ),
    params:
        python=PYTHON,
        subject_dir=parent_of(0),
    log:
        f"{SUBJECT_DIR}/logs/report.log",
    conda:
        "../environment.yml"
    threads: 1
    resources:
        mem_mb=2000,
        runtime=10,
    shell:
        "{params.python} -m pipeline.report --subject-dir {params.subject_dir:q} --out {output:q}"
        " > {log:q} 2>&1"
