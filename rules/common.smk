# Input functions: subject parameters and the sessions found by the index checkpoint.
import os
import shlex



def subject_value(key):
    """An input/params function returning SUBJECTS[subject][key]."""

    def get(wildcards):
        return SUBJECTS[wildcards.subject][key]

    return get


def _sessions(wildcards):
    sessions_json = checkpoints.index.get(subject=wildcards.subject).output.sessions_json
    return session_labels(sessions_json)


def session_files(pattern):
    """An input function: `pattern` formatted for every session of the subject."""

    def get(wildcards):
        return [
            pattern.format(subject=wildcards.subject, session=s) for s in _sessions(wildcards)
        ]

    return get


def _baseline(wildcards):
    sessions_json = checkpoints.index.get(subject=wildcards.subject).output.sessions_json
    return baseline_session(sessions_json, SUBJECTS[wildcards.subject]["day0"])


def baseline_files(wildcards):
    """The baseline session's T1w image and label map (the registration's fixed images)."""
    stem = SESSION_STEM.format(subject=wildcards.subject, session=_baseline(wildcards))
    return {"fixed_image": f"{stem}_T1w.nii.gz", "fixed_labels": f"{stem}_dseg.nii.gz"}


def followup_files(pattern):
    """An input function: `pattern` for every session except the baseline."""

    def get(wildcards):
        base = _baseline(wildcards)
        return [
            pattern.format(subject=wildcards.subject, session=s)
            for s in _sessions(wildcards)
            if s != base
        ]

    return get


def baseline_label(wildcards):
    return _baseline(wildcards)


def registration_side(wildcards):
    return registration_reference(SUBJECTS[wildcards.subject]["affected_side"])


def events_arg(wildcards):
    events = SUBJECTS[wildcards.subject]["events"]
    return f"--events {shlex.quote(events)}" if events else ""


def index_command(wildcards, output):
    """Module and arguments of the index step (DICOM folder or NIfTI sessions sheet)."""
    out_dir = os.path.dirname(output.index_tsv)
    return index_args(SUBJECTS[wildcards.subject], out_dir, config["series"])


def convert_command(wildcards):
    """Module converting a session: DICOM series or NIfTI sheet images."""
    return convert_module(SUBJECTS[wildcards.subject])


def parent_of(key):
    """A params function: the folder of output `key` (derived, not hard-coded)."""

    def get(wildcards, output):
        return os.path.dirname(output[key])

    return get


def subject_dir_param(wildcards):
    return SUBJECT_DIR.format(subject=wildcards.subject)


def export_inputs(wildcards):
    """Per-session exports the config asks for (DICOM SEG/SR only for DICOM input)."""
    files = {"tables": session_files(f"{SESSION_STEM}_dseg.ctbl")(wildcards)}
    dicom_input = convert_module(SUBJECTS[wildcards.subject]) == "pipeline.convert"
    if config["export"]["dicom"] and dicom_input:
        files["seg"] = session_files(f"{SESSION_STEM}_seg.dcm")(wildcards)
        files["sr"] = session_files(f"{SESSION_STEM}_sr.dcm")(wildcards)
    return files
