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


def events_arg(wildcards):
    events = SUBJECTS[wildcards.subject]["events"]
    return f"--events {shlex.quote(events)}" if events else ""


def series_args():
    """Command-line options for the series overrides that are set in the config."""
    args = []
    for flag, key in (("--anatomical-regex", "anatomical_regex"), ("--fluid-regex", "fluid_regex")):
        if config["series"][key]:
            args += [flag, shlex.quote(config["series"][key])]
    return " ".join(args)


def parent_of(key):
    """A params function: the folder of output `key` (derived, not hard-coded)."""

    def get(wildcards, output):
        return os.path.dirname(output[key])

    return get
