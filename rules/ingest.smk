# index (checkpoint: which sessions exist) -> convert_segment (one session's two series to
# NIfTI, then its label map).
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


rule convert_segment:
    # convert (the session's two series -> NIfTI + JSON sidecars), then segment (-> one label
    # map + QC) in one process (limbtrack steps, pipeline/steps.py): a chain, so one job costs
    # no parallelism; the imports are paid once and SLURM runs one Snakemake for it, not two.
    # Each step keeps its own log. A failed segment re-runs the convert (1-2 s) with it.
    input:
        sessions_json=session_index,
    output:
        t1=f"{SESSION_STEM}_T1w.nii.gz",
        fluid=f"{SESSION_STEM}_fluid.nii.gz",
        t1_json=f"{SESSION_STEM}_T1w.json",
        fluid_json=f"{SESSION_STEM}_fluid.json",
        dseg=f"{SESSION_STEM}_dseg.nii.gz",
        qc=f"{SESSION_STEM}_dseg.json",
    params:
        limbtrack=LIMBTRACK,
        subcommand=convert_subcommand,
        out_dir=parent_of("t1"),
        entry=session_entry,
        min_contact_mm=config["segment"]["min_fov_contact_mm"],
        settings=json.dumps(config["segment"]),
    log:
        convert=f"{SUBJECT_DIR}/logs/convert_ses-{{session}}.log",
        segment=f"{SUBJECT_DIR}/logs/segment_ses-{{session}}.log",
    conda:
        "../environment.yml"
    threads: 1
    # Peak RSS is segment's (benchmarks/cohort_speed.py --realistic, 2026-11-26): 556 MiB and
    # 22 s CPU at 320x320x40 (60 jobs); 1.05 GB at 512x384x60 (earlier); convert's 211 MiB
    # at 320x320x40 is freed before. Their line gives 3.4 GB at 512x512x200, the largest
    # study planned for: x 1.3 margin -> 5000. CPU x 13 there: 5 min; runtime: both steps'.
    resources:
        mem_mb=5000,
        runtime=50,
    shell:
        "{params.limbtrack} steps --log {log.convert:q} --log {log.segment:q} --"
        " {params.subcommand} --sessions-json {input.sessions_json:q}"
        " --session {wildcards.session} --subject {wildcards.subject}"
        " --out-dir {params.out_dir:q} --min-fov-contact-mm {params.min_contact_mm}"
        " :: segment --t1 {output.t1:q} --fluid {output.fluid:q}"
        " --out {output.dseg:q} --qc {output.qc:q} --settings-json {params.settings:q}"
