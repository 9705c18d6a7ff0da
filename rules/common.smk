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


def events_input(wildcards):
    """The subject's events file as an input (use with unpack): editing it re-runs the rules
    that read it, and nothing upstream."""
    events = SUBJECTS[wildcards.subject]["events"]
    return {"events": events} if events else {}


# Re-run triggers (pipeline.workflow.input_digest): what the index step reads is fingerprinted
# when the workflow is built; a session is re-converted only when its own entry or files change.


def index_inputs(wildcards):
    """A params of the index step: the listing (paths, sizes, times) of the study folder, or
    the sheet's rows and its images' sizes and times, and the series settings."""
    return input_digest(SUBJECTS[wildcards.subject], config["series"])


def session_index(wildcards):
    """The subject's sessions.json for convert, as ancient: re-indexing (a study added) does
    not re-convert the other sessions by itself; `session_entry` decides."""
    return ancient(checkpoints.index.get(subject=wildcards.subject).output.sessions_json)


def session_entry(wildcards):
    """A params of convert: the fingerprint of this session's entry in sessions.json."""
    sessions_json = checkpoints.index.get(subject=wildcards.subject).output.sessions_json
    return session_entry_digest(sessions_json, wildcards.session)


def index_command(wildcards, output):
    """Subcommand and arguments of the index step (DICOM folder or NIfTI sessions sheet)."""
    out_dir = os.path.dirname(output.index_tsv)
    return index_args(SUBJECTS[wildcards.subject], out_dir, config["series"],
                      config["show_phi"])


def convert_subcommand(wildcards):
    """Subcommand converting a session: DICOM series or NIfTI sheet images."""
    return convert_command(SUBJECTS[wildcards.subject])


def parent_of(key):
    """A params function: the folder of output `key` (derived, not hard-coded)."""

    def get(wildcards, output):
        return os.path.dirname(output[key])

    return get


def export_inputs(wildcards):
    """Per-session exports the config asks for (DICOM SEG/SR only for DICOM input)."""
    files = {"tables": session_files(f"{SESSION_STEM}_dseg.ctbl")(wildcards)}
    if config["export"]["dicom"] and is_dicom_input(SUBJECTS[wildcards.subject]):
        files["seg"] = session_files(f"{SESSION_STEM}_seg.dcm")(wildcards)
        files["sr"] = session_files(f"{SESSION_STEM}_sr.dcm")(wildcards)
    return files
