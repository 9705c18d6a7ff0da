# index (checkpoint: which sessions exist) -> convert (one session's two series to NIfTI).
# The input is a DICOM study folder, or a NIfTI sessions sheet (.tsv); see pipeline.workflow.
# Re-runs: `inputs` fingerprints what the index reads (a study added, another folder, a sheet
# or image edited re-runs it); convert re-runs only for a session whose entry changed.


checkpoint index:
    output:
        index_tsv=f"{SUBJECT_DIR}/index.tsv",
        problems_tsv=f"{SUBJECT_DIR}/problems.tsv",
        sessions_json=f"{SUBJECT_DIR}/sessions.json",
        sessions_tsv=f"{SUBJECT_DIR}/sessions.tsv",
    params:
        limbtrack=LIMBTRACK,
        args=index_command,
        inputs=index_inputs,
    log:
        f"{SUBJECT_DIR}/logs/index.log",
    conda:
        "../environment.yml"
    threads: 1
    # peak RSS 58 MiB, with its 2 header-reading workers ~140 MiB, 1.3 s CPU (120 files;
    # cohort_speed.py --realistic, 2026-11-26); 60 MB at 320 files: headers only
    resources:
        mem_mb=1000,
        runtime=30,
    shell:
        "{params.limbtrack} {params.args} > {log:q} 2>&1"


rule convert:
    input:
        sessions_json=session_index,
    output:
        t1=f"{SESSION_STEM}_T1w.nii.gz",
        fluid=f"{SESSION_STEM}_fluid.nii.gz",
        t1_json=f"{SESSION_STEM}_T1w.json",
        fluid_json=f"{SESSION_STEM}_fluid.json",
    params:
        limbtrack=LIMBTRACK,
        subcommand=convert_subcommand,
        out_dir=parent_of("t1"),
        entry=session_entry,
        min_contact_mm=config["segment"]["min_fov_contact_mm"],
    log:
        f"{SUBJECT_DIR}/logs/convert_ses-{{session}}.log",
    conda:
        "../environment.yml"
    group: "session"
    threads: 1
    # peak RSS 211 MiB, 1.8 s CPU at 320x320x40 (cohort_speed.py --realistic, 2026-11-26;
    # 60 jobs), 280 MB at 512x384x60 (earlier): their line gives ~600 MB at 512x512x200
    resources:
        mem_mb=1000,
        runtime=20,
    shell:
        "{params.limbtrack} {params.subcommand} --sessions-json {input.sessions_json:q}"
        " --session {wildcards.session} --subject {wildcards.subject}"
        " --out-dir {params.out_dir:q} --min-fov-contact-mm {params.min_contact_mm}"
        " > {log:q} 2>&1"
