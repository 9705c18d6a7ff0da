# Results for other viewers (config export: viewers / dicom): label tables for ITK-SNAP and
# 3D Slicer, BIDS-like dataset_description.json, DICOM Segmentation and TID 1500 SR.


rule export_tables:
    input:
        dseg=f"{SESSION_STEM}_dseg.nii.gz",
    output:
        lookup=f"{SESSION_STEM}_dseg.tsv",
        itksnap=f"{SESSION_STEM}_dseg.itksnap.txt",
        ctbl=f"{SESSION_STEM}_dseg.ctbl",
    params:
        python=PYTHON,
        subject_dir=subject_dir_param,
    log:
        f"{SUBJECT_DIR}/logs/export_tables_ses-{{session}}.log",
    conda:
        "../environment.yml"
    threads: 1
    resources:
        mem_mb=1000,
        runtime=10,
    shell:
        "{params.python} -m pipeline.export.session --subject-dir {params.subject_dir:q}"
        " --subject {wildcards.subject} --session {wildcards.session} > {log:q} 2>&1"


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
        python=PYTHON,
        subject_dir=subject_dir_param,
    log:
        f"{SUBJECT_DIR}/logs/export_dicom_ses-{{session}}.log",
    conda:
        "../environment.yml"
    threads: 1
    resources:
        mem_mb=2000,
        runtime=10,
    shell:
        "{params.python} -m pipeline.export.session --subject-dir {params.subject_dir:q}"
        " --subject {wildcards.subject} --session {wildcards.session} --dicom --no-tables"
        " > {log:q} 2>&1"


rule export:
    input:
        unpack(export_inputs),
    output:
        description=f"{SUBJECT_DIR}/dataset_description.json",
        lookup=f"{SUBJECT_DIR}/dseg.tsv",
    params:
        python=PYTHON,
        subject_dir=parent_of("description"),
    log:
        f"{SUBJECT_DIR}/logs/export.log",
    conda:
        "../environment.yml"
    threads: 1
    resources:
        mem_mb=1000,
        runtime=10,
    shell:
        "{params.python} -m pipeline.export.session --subject-dir {params.subject_dir:q} --dataset"
        " > {log:q} 2>&1"


rule research_export:
    input:
        volumes=f"{SUBJECT_DIR}/volumes.tsv",
        longitudinal=f"{SUBJECT_DIR}/longitudinal.tsv",
        images=session_files(f"{SESSION_STEM}_fluid.nii.gz"),
        t1=session_files(f"{SESSION_STEM}_T1w.nii.gz"),
        dseg=session_files(f"{SESSION_STEM}_dseg.nii.gz"),
    output:
        directory(f"{SUBJECT_DIR}/research"),
    params:
        python=PYTHON,
        subject_dir=subject_dir_param,
    log:
        f"{SUBJECT_DIR}/logs/research_export.log",
    conda:
        "../environment.yml"
    threads: 1
    resources:
        mem_mb=1000,
        runtime=10,
    shell:
        "{params.python} -m pipeline.export.research --subject-dir {params.subject_dir:q}"
        " --subject {wildcards.subject} --out-dir {output:q} > {log:q} 2>&1"
