"""Unit tests of pipeline.workflow: subjects from the config or a subjects sheet, sessions."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipeline import cli
from pipeline.workflow import (
    INDEX_FIRST_ABOVE_SUBJECTS,
    ConfigError,
    baseline_session,
    convert_command,
    default_events,
    index_args,
    index_first_advice,
    index_targets,
    is_dicom_input,
    lift_default_submission_limit,
    limbtrack_command,
    load_subjects,
    session_labels,
)


@pytest.fixture(autouse=True)
def _in_tmp(tmp_path, monkeypatch):
    # relative paths (and Path("")) resolve inside tmp_path, never in the repository
    monkeypatch.chdir(tmp_path)


def study(tmp_path: Path, name: str = "study", events: bool = False) -> Path:
    d = tmp_path / name
    d.mkdir(exist_ok=True)
    if events:
        (d / "events.tsv").write_text("day\tlabel\n0\tinfusion\n")
    return d


def config(input_dir: Path | str, **over: str) -> dict[str, str]:
    c = {"subject": "demo", "input_dir": str(input_dir), "day0": "2024-03-01",
         "affected_side": "left", "events": "auto", "subjects_sheet": ""}
    c.update(over)
    return c


def sheet(tmp_path: Path, lines: list[str], name: str = "subjects.tsv") -> Path:
    p = tmp_path / name
    p.write_text("\n".join(lines) + "\n")
    return p


# ------------------------------------------------------------------ config mode


def test_config_single_subject_without_events(tmp_path):
    d = study(tmp_path)
    subjects = load_subjects(config(d))
    assert subjects == {"demo": {"subject": "demo", "input_dir": str(d), "day0": "2024-03-01",
                                 "affected_side": "left", "events": "", "patient": ""}}


def test_config_events_auto_picks_up_events_tsv(tmp_path):
    d = study(tmp_path, events=True)
    assert load_subjects(config(d))["demo"]["events"] == str(d / "events.tsv")
    # an empty events value means auto as well
    assert load_subjects(config(d, events=""))["demo"]["events"] == str(d / "events.tsv")


def test_config_explicit_events_file(tmp_path):
    d = study(tmp_path, events=True)
    other = tmp_path / "clinical.tsv"
    other.write_text("day\tlabel\n")
    assert load_subjects(config(d, events=str(other)))["demo"]["events"] == str(other)


def test_default_events(tmp_path):
    assert default_events(str(study(tmp_path, "a"))) == ""
    d = study(tmp_path, "b", events=True)
    assert default_events(str(d)) == str(d / "events.tsv")
    (tmp_path / "c" / "events.tsv").mkdir(parents=True)  # a folder is not an events file
    assert default_events(str(tmp_path / "c")) == ""


def test_config_values_are_stripped_and_stringified(tmp_path):
    d = study(tmp_path)
    subjects = load_subjects(config(f" {d} ", subject=" P01 ", affected_side="auto"))
    assert subjects["P01"]["input_dir"] == str(d)
    assert subjects["P01"]["affected_side"] == "auto"


# ------------------------------------------------------------------ config errors


@pytest.mark.parametrize("sid", ["../evil", "a/b", "sub-01", "P 1", "P_1", "", "P1.x"])
def test_bad_subject_id(tmp_path, sid):
    with pytest.raises(ConfigError, match="letters and digits only") as exc:
        load_subjects(config(study(tmp_path), subject=sid))
    assert str(exc.value).startswith("config: subject")


@pytest.mark.parametrize("day0", ["2024-13-01", "2024-02-30", "01/03/2024", "20240301",
                                  "2024-W09-5", "", "tomorrow"])
def test_bad_day0(tmp_path, day0):
    with pytest.raises(ConfigError, match=r"day0 .* is not a date YYYY-MM-DD"):
        load_subjects(config(study(tmp_path), day0=day0))


@pytest.mark.parametrize("side", ["both", "Left", "L", ""])
def test_bad_affected_side(tmp_path, side):
    with pytest.raises(ConfigError, match="affected_side of subject demo must be left, right"):
        load_subjects(config(study(tmp_path), affected_side=side))


def test_missing_input_dir(tmp_path):
    with pytest.raises(ConfigError, match=r"input_dir '.*nowhere' of subject demo is not a"):
        load_subjects(config(tmp_path / "nowhere"))


def test_input_dir_is_a_file(tmp_path):
    f = tmp_path / "file.dcm"
    f.write_bytes(b"")
    with pytest.raises(ConfigError, match="is not a folder"):
        load_subjects(config(f))


def test_empty_input_dir_is_not_the_current_folder(tmp_path):
    with pytest.raises(ConfigError, match="input_dir '' of subject demo is not a folder"):
        load_subjects(config(""))


def test_missing_events_file(tmp_path):
    with pytest.raises(ConfigError, match=r"events file '.*absent\.tsv' of subject demo does "
                                          "not exist"):
        load_subjects(config(study(tmp_path), events=str(tmp_path / "absent.tsv")))


# ------------------------------------------------------------------ subjects sheet


def test_sheet_subjects(tmp_path):
    a, b = study(tmp_path, "a", events=True), study(tmp_path, "b")
    ev = tmp_path / "b_events.tsv"
    ev.write_text("day\tlabel\n")
    p = sheet(tmp_path, ["subject\tinput_dir\tday0\taffected_side\tevents",
                         f"P01\t{a}\t2024-03-01\tleft\tauto",
                         f"P02\t{b}\t2023-11-20\tauto\t{ev}",
                         f"P03\t{b}\t2023-12-01\tright\t"])
    subjects = load_subjects({"subjects_sheet": str(p), "subject": "ignored",
                              "input_dir": "/nonexistent"})
    assert list(subjects) == ["P01", "P02", "P03"]
    assert subjects["P01"]["events"] == str(a / "events.tsv")
    assert subjects["P02"] == {"subject": "P02", "input_dir": str(b), "day0": "2023-11-20",
                               "affected_side": "auto", "events": str(ev), "patient": ""}
    assert subjects["P03"]["events"] == ""


def test_sheet_without_events_column(tmp_path):
    a = study(tmp_path, "a", events=True)
    p = sheet(tmp_path, ["subject\tinput_dir\tday0\taffected_side",
                         f"P01\t{a}\t2024-03-01\tleft"])
    assert load_subjects({"subjects_sheet": str(p)})["P01"]["events"] == str(a / "events.tsv")


def test_sheet_duplicate_subject(tmp_path):
    a = study(tmp_path, "a")
    p = sheet(tmp_path, ["subject\tinput_dir\tday0\taffected_side",
                         f"P01\t{a}\t2024-03-01\tleft", f"P01\t{a}\t2024-04-01\tright"])
    with pytest.raises(ConfigError, match=r"subjects\.tsv, subject row 2: subject P01 is "
                                          "listed twice"):
        load_subjects({"subjects_sheet": str(p)})


def test_sheet_error_names_the_row(tmp_path):
    a = study(tmp_path, "a")
    p = sheet(tmp_path, ["subject\tinput_dir\tday0\taffected_side",
                         f"P01\t{a}\t2024-03-01\tleft", f"P02\t{a}\t2024-03-01\tup"])
    with pytest.raises(ConfigError, match=r"subject row 2: affected_side of subject P02"):
        load_subjects({"subjects_sheet": str(p)})


def test_sheet_bad_subject_path_traversal(tmp_path):
    a = study(tmp_path, "a")
    p = sheet(tmp_path, ["subject\tinput_dir\tday0\taffected_side",
                         f"../P01\t{a}\t2024-03-01\tleft"])
    with pytest.raises(ConfigError, match=r"subject '\.\./P01' must be letters and digits"):
        load_subjects({"subjects_sheet": str(p)})


def test_sheet_missing_column(tmp_path):
    a = study(tmp_path, "a")
    p = sheet(tmp_path, ["subject\tinput_dir\taffected_side", f"P01\t{a}\tleft"])
    with pytest.raises(ConfigError, match="missing column.*day0"):
        load_subjects({"subjects_sheet": str(p)})


def test_sheet_empty_or_missing(tmp_path):
    p = sheet(tmp_path, ["subject\tinput_dir\tday0\taffected_side"])
    with pytest.raises(ConfigError, match="no subjects listed"):
        load_subjects({"subjects_sheet": str(p)})
    with pytest.raises(ConfigError, match="cannot be read"):
        load_subjects({"subjects_sheet": str(tmp_path / "absent.tsv")})


def test_config_error_is_a_value_error():
    assert issubclass(ConfigError, ValueError)


# ------------------------------------------------------------------ sessions


def test_session_labels(tmp_path):
    p = tmp_path / "sessions.json"
    p.write_text(json.dumps({"input_dir": "/x", "sessions": [
        {"session": "20240225", "study_date": "2024-02-25"},
        {"session": "20240304T101500", "study_date": "2024-03-04"}]}))
    assert session_labels(p) == ["20240225", "20240304T101500"]
    assert session_labels(str(p)) == ["20240225", "20240304T101500"]
    p.write_text(json.dumps({"sessions": []}))
    assert session_labels(p) == []


def test_patient_reaches_the_index_command(tmp_path):
    """Issue 17: the patient to use (config or the sheet's optional column) and show_phi
    reach the index step of a DICOM folder."""
    d = study(tmp_path)
    subjects = load_subjects({**config(d), "patient": "08415728afd9"})
    assert subjects["demo"]["patient"] == "08415728afd9"
    args = index_args(subjects["demo"], str(tmp_path / "out"), {}, show_phi=True)
    assert "--patient 08415728afd9" in args and args.endswith("--show-phi")
    assert "--patient" not in index_args({**subjects["demo"], "patient": ""}, "o", {})


def test_baseline_session_follows_the_baseline_rule(tmp_path):
    """The last session on or before day 0, else the first (pipeline.baseline), in date
    order whatever the order of sessions.json."""
    p = tmp_path / "sessions.json"
    p.write_text(json.dumps({"sessions": [
        {"session": "20240310", "study_date": "2024-03-10"},
        {"session": "20240220", "study_date": "2024-02-20"},
        {"session": "20240301T080000", "study_date": "2024-03-01"}]}))
    assert baseline_session(p, "2024-03-01") == "20240301T080000"
    assert baseline_session(p, "2024-02-29") == "20240220"
    assert baseline_session(p, "2024-01-01") == "20240220"
    assert baseline_session(p, "2024-12-31") == "20240310"
    p.write_text(json.dumps({"sessions": []}))
    with pytest.raises(ValueError, match="no sessions"):
        baseline_session(p, "2024-03-01")


# ------------------------------------------------------------------ commands of the rules


def test_rule_commands_are_limbtrack_subcommands(tmp_path):
    d = study(tmp_path)
    subject = load_subjects(config(d))["demo"]
    nifti = tmp_path / "sessions.tsv"
    nifti.write_text("subject\tstudy_date\trole\tpath\n")
    sheet_subject = {**subject, "input_dir": str(nifti)}
    assert is_dicom_input(subject) and not is_dicom_input(sheet_subject)
    for command in (index_args(subject, "o", {}), index_args(sheet_subject, "o", {}),
                    convert_command(subject), convert_command(sheet_subject)):
        assert command.split()[0] in cli.COMMANDS, command
    assert index_args(sheet_subject, "o", {}).startswith("nifti index --sheet ")
    assert convert_command(sheet_subject) == "nifti convert"
    assert index_args(subject, "o", {}).startswith("index --input-dir ")
    assert convert_command(subject) == "convert"


def test_limbtrack_command():
    assert limbtrack_command("/opt/my env/bin/python") == (
        "'/opt/my env/bin/python' -m pipeline.cli")
    # --use-conda: the environment's python, this folder's package
    assert limbtrack_command("/x/python", conda=True, package_dir="/repo dir") == (
        "PYTHONPATH='/repo dir' python -m pipeline.cli")


def test_default_submission_limit_is_lifted_a_chosen_one_kept():
    """The Snakefile's onstart drops Snakemake's default limit (its timers pile up), only it."""
    from types import SimpleNamespace

    from snakemake.scheduling.job_scheduler import JobRateLimiter
    from snakemake.settings.types import MaxJobsPerTimespan

    default = SimpleNamespace(
        job_rate_limiter=JobRateLimiter(MaxJobsPerTimespan.parse_choice("100/1s")))
    assert lift_default_submission_limit(default)
    assert default.job_rate_limiter is None
    chosen = SimpleNamespace(
        job_rate_limiter=JobRateLimiter(MaxJobsPerTimespan.parse_choice("10/1m")))
    assert not lift_default_submission_limit(chosen)
    assert chosen.job_rate_limiter is not None
    assert not lift_default_submission_limit(SimpleNamespace(job_rate_limiter=None))


def test_index_targets_are_every_subjects_sessions_json() -> None:
    assert index_targets("/r/", ["Q8", "P7"]) == ["/r/P7/sessions.json", "/r/Q8/sessions.json"]


def test_index_first_advice_only_for_many_subjects_run_past_their_index() -> None:
    limit = INDEX_FIRST_ABOVE_SUBJECTS
    assert index_first_advice(limit, {"all"}) == ""  # few enough
    assert index_first_advice(limit + 1, {"index_all"}) == ""  # the first pass itself
    assert index_first_advice(limit + 1, {"index"}) == ""  # sessions.json files as targets
    advice = index_first_advice(limit + 1, {"all"})
    assert advice.startswith(f"{limit + 1} subjects are not indexed yet")
    assert "target index_all" in advice and "limbtrack run --cohort" in advice
