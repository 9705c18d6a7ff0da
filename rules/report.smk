# cohort: one row per subject (each subject's report.html: rule measure_report).
# Each rule passes every input it declares, and the command reads only those files.


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
