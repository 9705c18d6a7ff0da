# Results for other viewers (config export: viewers / dicom): label tables for ITK-SNAP and
# 3D Slicer, BIDS-like dataset_description.json, DICOM Segmentation and TID 1500 SR; and the
# opt-in research export. Each command reads and writes exactly the files named here.


rule export_tables:
    input:
        dseg=f"{SESSION_STEM}_dseg.nii.gz",
    output:
        lookup=f"{SESSION_STEM}_dseg.tsv",
        itksnap=f"{SESSION_STEM}_dseg.itksnap.txt",
        ctbl=f"{SESSION_STEM}_dseg.ctbl",
    params:
        limbtrack=LIMBTRACK,
    log:
        f"{SUBJECT_DIR}/logs/export_tables_ses-{{session}}.log",
    conda:
        "../environment.yml"
    threads: 1
    resources:
        mem_mb=1000,
        runtime=10,
    shell:
        "{params.limbtrack} export tables --dseg {input.dseg:q} --lookup {output.lookup:q}"
        " --itksnap {output.itksnap:q} --ctbl {output.ctbl:q} > {log:q} 2>&1"


rule export_dicom:
    input:
        dseg=f"{SESSION_STEM}_dseg.nii.gz",
        fluid_json=f"{SESSION_STEM}_fluid.json",
        sessions_json=f"{SUBJECT_DIR}/sessions.json",
        volumes=f"{SUBJECT_DIR}/volumes.tsv",
    output:
        seg=f"{SESSION_STEM}_seg.dcm",
        sr=f"{SESSION_STEM}_sr.dcm",
    params:
        limbtrack=LIMBTRACK,
    log:
        f"{SUBJECT_DIR}/logs/export_dicom_ses-{{session}}.log",
    conda:
        "../environment.yml"
    threads: 1
    resources:
        mem_mb=2000,
        runtime=10,
    shell:
        "{params.limbtrack} export dicom --subject {wildcards.subject} --session {wildcards.session}"
        " --dseg {input.dseg:q} --fluid-json {input.fluid_json:q}"
        " --sessions-json {input.sessions_json:q} --volumes {input.volumes:q}"
        " --seg {output.seg:q} --sr {output.sr:q} > {log:q} 2>&1"


rule export:
    input:
        # Dependency markers only: the dataset files are written once every session's
        # exports exist; the command reads none of them.
        unpack(export_inputs),
    output:
        description=f"{SUBJECT_DIR}/dataset_description.json",
        lookup=f"{SUBJECT_DIR}/dseg.tsv",
    params:
        limbtrack=LIMBTRACK,
    log:
        f"{SUBJECT_DIR}/logs/export.log",
    conda:
        "../environment.yml"
    threads: 1
    resources:
        mem_mb=1000,
        runtime=10,
    shell:
        "{params.limbtrack} export dataset --description {output.description:q}"
        " --lookup {output.lookup:q} > {log:q} 2>&1"


rule research_export:
    input:
        volumes=f"{SUBJECT_DIR}/volumes.tsv",
        longitudinal=f"{SUBJECT_DIR}/longitudinal.tsv",
        t1=session_files(f"{SESSION_STEM}_T1w.nii.gz"),
        fluid=session_files(f"{SESSION_STEM}_fluid.nii.gz"),
        dseg=session_files(f"{SESSION_STEM}_dseg.nii.gz"),
    output:
        directory(f"{SUBJECT_DIR}/research"),
    params:
        limbtrack=LIMBTRACK,
    log:
        f"{SUBJECT_DIR}/logs/research_export.log",
    conda:
        "../environment.yml"
    threads: 1
    resources:
        mem_mb=1000,
        runtime=10,
    shell:
        "{params.limbtrack} research --subject {wildcards.subject} --volumes {input.volumes:q}"
        " --longitudinal {input.longitudinal:q} --t1w {input.t1:q} --fluid {input.fluid:q}"
        " --dseg {input.dseg:q} --out-dir {output:q} > {log:q} 2>&1"
