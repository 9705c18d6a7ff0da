"""``limbtrack run`` (issue 15, point 1): progress from Snakemake's log records, arguments to
Snakemake config, the pseudonymous default subject ID, the one-line failure.

The whole command on the demo patient: tests/workflow/test_run_command.py.
"""

from __future__ import annotations

import io
import logging
from pathlib import Path
from typing import Any

import pytest
from dicom_factory import PATIENT_TAGS, write_series

from pipeline import run, workflow
from pipeline.io.identity import normalise_patient_id, patient_fingerprint
from pipeline.progress import (
    Failure,
    Progress,
    exception_reason,
    format_clock,
    format_duration,
    last_meaningful_line,
    step_label,
)

# ------------------------------------------------------------------------------------------
# progress
# ------------------------------------------------------------------------------------------


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def record(event: str | None = None, level: int = logging.INFO, msg: str = "",
           **fields: Any) -> logging.LogRecord:
    """A log record as Snakemake makes it (``extra`` fields on the record)."""
    rec = logging.LogRecord("snakemake.logging", level, __file__, 1, msg, None, None)
    if event is not None:
        rec.event = event
    for key, value in fields.items():
        setattr(rec, key, value)
    return rec


def job_info(jobid: int, rule: str, session: str | None = None) -> logging.LogRecord:
    wildcards = {"subject": "demo", **({"session": session} if session else {})}
    return record("job_info", jobid=jobid, rule_name=rule, wildcards=wildcards)


def line_progress(cores: int | None = 2) -> tuple[Progress, io.StringIO, FakeClock]:
    stream, clock = io.StringIO(), FakeClock()
    return Progress(stream, tty=False, cores=cores, clock=clock), stream, clock


def test_format_clock_and_duration() -> None:
    assert format_clock(0) == "0:00"
    assert format_clock(21.4) == "0:21"
    assert format_clock(725) == "12:05"
    assert format_clock(3723) == "1:02:03"
    assert format_duration(4.14) == "4.1 s"
    assert format_duration(65) == "1:05"


def test_step_label_names_rule_and_session() -> None:
    assert step_label("segment", {"subject": "demo", "session": "20240304"}) == \
        "segment ses-20240304"
    assert step_label("measure", {"subject": "demo"}) == "measure"
    assert step_label("measure", {"subject": "P7"}, with_subject=True) == "measure sub-P7"
    assert step_label("all", {}) == "all"


def test_line_mode_prints_a_line_per_step_start_and_finish() -> None:
    progress, stream, clock = line_progress()
    progress.handle(record("run_info", stats={"index": 1, "total": 5}))
    progress.handle(job_info(2, "index"))
    clock.now += 4.14
    progress.handle(record("job_finished", job_id=2))
    progress.handle(record("progress", done=1, total=19))
    progress.handle(job_info(7, "segment", "20240304"))
    lines = stream.getvalue().splitlines()
    assert lines[0] == "[0/5] index started  elapsed 0:00  estimating…"
    assert lines[1].startswith("[1/5] index done in 4.1 s  elapsed 0:04  ~")
    assert lines[2].startswith("[ 1/19] segment ses-20240304 started  elapsed 0:04  ~")
    assert "\r" not in stream.getvalue()


def test_estimate_is_the_mean_step_duration_times_the_steps_left_over_parallelism() -> None:
    progress, _, clock = line_progress(cores=2)
    progress.handle(record("progress", done=0, total=10))
    assert progress.remaining_s() is None  # "estimating…" until a step has finished
    progress.handle(job_info(1, "convert", "20240225"))
    progress.handle(job_info(2, "convert", "20240304"))
    clock.now += 10
    progress.handle(record("job_finished", job_id=1))
    progress.handle(record("job_finished", job_id=2))
    progress.handle(record("progress", done=2, total=10))
    # two 10-s steps in 10 s: two at once; 8 left -> 8 x 10 s / 2
    assert progress.remaining_s() == pytest.approx(40.0)
    assert "~0:40 left" in progress.status_line()


def test_estimate_parallelism_is_capped_by_the_cores_and_at_least_one() -> None:
    progress, _, clock = line_progress(cores=1)
    for jobid in (1, 2):
        progress.handle(job_info(jobid, "convert", f"2024030{jobid}"))
    clock.now += 10
    for jobid in (1, 2):
        progress.handle(record("job_finished", job_id=jobid))
    progress.handle(record("progress", done=2, total=4))
    assert progress.remaining_s() == pytest.approx(20.0)  # one core: 2 x 10 s
    progress, _, clock = line_progress(cores=4)
    progress.handle(job_info(1, "index"))
    clock.now += 2
    progress.handle(record("job_finished", job_id=1))
    clock.now += 8  # idle time: fewer than one step at once on average
    progress.handle(record("progress", done=1, total=3))
    assert progress.remaining_s() == pytest.approx(4.0)


def test_terminal_mode_rewrites_one_line_naming_the_running_steps() -> None:
    stream, clock = io.StringIO(), FakeClock()
    progress = Progress(stream, tty=True, cores=2, clock=clock, width=200)
    progress.handle(record("progress", done=6, total=19))
    progress.handle(job_info(7, "segment", "20240304"))
    progress.handle(job_info(8, "register", "20240307"))
    out = stream.getvalue()
    assert "\n" not in out
    last = out.split("\r\x1b[K")[-1]
    assert last == ("[ 6/19] segment ses-20240304, register ses-20240307  elapsed 0:00  "
                    "estimating…")
    clock.now += 5
    progress.handle(record("job_finished", job_id=7))
    last = stream.getvalue().split("\r\x1b[K")[-1]
    assert last.startswith("[ 7/19] register ses-20240307  elapsed 0:05  ~")
    clock.now += 1
    progress.stop()  # the line ends with what was done, for what follows
    assert stream.getvalue().endswith("\r\x1b[K[ 7/19] steps done  elapsed 0:06\n")


def test_terminal_line_is_cut_to_the_terminal_width() -> None:
    stream = io.StringIO()
    progress = Progress(stream, tty=True, clock=FakeClock(), width=30)
    progress.handle(job_info(7, "segment", "20240304"))
    last = stream.getvalue().split("\r\x1b[K")[-1]
    assert len(last) == 29 and last.endswith("…")


def test_last_meaningful_line_of_a_step_log(tmp_path: Path) -> None:
    log = tmp_path / "index.log"
    log.write_text("INFO 0 files\nERROR /data/p7: no DICOM image series found.\n\n")
    assert last_meaningful_line(log) == "/data/p7: no DICOM image series found."
    log.write_text("INFO reading\nTraceback (most recent call last):\n  File \"x.py\", "
                   "line 3, in <module>\nValueError: image and mask differ in size\n")
    assert last_meaningful_line(log) == "ValueError: image and mask differ in size"
    log.write_text("INFO reading\nKilled\n")
    assert last_meaningful_line(log) == "Killed"
    log.write_text("")
    assert last_meaningful_line(log) == ""
    assert last_meaningful_line(tmp_path / "missing.log") == ""


def test_exception_reason_skips_the_heading_and_the_traceback() -> None:
    message = ('ConfigError in file "/repo/Snakefile", line 49:\n'
               "config: day0 '2024-13-01' of subject P7 is not a date YYYY-MM-DD\n"
               '  File "/repo/Snakefile", line 49, in <module>\n')
    assert exception_reason(message) == \
        "config: day0 '2024-13-01' of subject P7 is not a date YYYY-MM-DD"
    assert exception_reason("WorkflowError:\nAt least one job did not complete "
                            "successfully.") == "At least one job did not complete successfully."


def test_failed_step_is_named_with_the_reason_from_its_log(tmp_path: Path) -> None:
    log = tmp_path / "logs" / "segment_ses-20240304.log"
    log.parent.mkdir()
    log.write_text("INFO N4\nERROR no limb found in the anatomical image\n")
    progress, stream, _ = line_progress()
    progress.handle(job_info(7, "segment", "20240304"))
    progress.handle(record("job_error", level=logging.ERROR, jobid=7, rule_name="segment",
                           log=[str(log)], msg="Error in rule segment, jobid: 7"))
    progress.handle(record("error", level=logging.ERROR,
                           msg="WorkflowError:\nAt least one job did not complete "
                               "successfully."))
    assert "segment ses-20240304 FAILED" in stream.getvalue()
    assert progress.failure() == Failure("segment ses-20240304",
                                         "no limb found in the anatomical image", str(log))
    lines = run.failure_lines(progress, "")
    assert lines[0] == ("limbtrack run: step segment ses-20240304 failed: no limb found in "
                        "the anatomical image")
    assert lines[1] == f"  step log: {log}"


def test_failed_step_of_a_chain_names_the_log_that_states_the_error(tmp_path: Path) -> None:
    """convert_segment keeps a log per step (limbtrack steps): the reason and the log shown are
    the failed step's, not the first log's."""
    logs = tmp_path / "logs"
    logs.mkdir()
    convert = logs / "convert_ses-20240304.log"
    segment = logs / "segment_ses-20240304.log"
    convert.write_text("INFO session 20240304: T1 TSE AX -> sub-P1_ses-20240304_T1w.nii.gz\n")
    segment.write_text("INFO N4\nERROR no limb found in the anatomical image\n")
    progress, _, _ = line_progress()
    progress.handle(job_info(7, "convert_segment", "20240304"))
    progress.handle(record("job_error", level=logging.ERROR, jobid=7,
                           rule_name="convert_segment", log=[str(convert), str(segment)],
                           msg="Error in rule convert_segment, jobid: 7"))
    assert progress.failure() == Failure("convert_segment ses-20240304",
                                         "no limb found in the anatomical image", str(segment))


def test_error_outside_any_step_is_the_failure() -> None:
    progress, _, _ = line_progress()
    progress.handle(record("error", level=logging.ERROR,
                           msg='ConfigError in file "Snakefile", line 49:\nconfig: events '
                               "file 'x.tsv' of subject P7 does not exist"))
    assert progress.failure() == Failure("", "config: events file 'x.tsv' of subject P7 does "
                                             "not exist")
    assert run.failure_lines(progress, "")[0] == (
        "limbtrack run: failed: config: events file 'x.tsv' of subject P7 does not exist")
    progress, _, _ = line_progress()
    assert run.failure_lines(progress, "Building DAG\nLockException: locked\n")[0] == \
        "limbtrack run: failed: LockException: locked"


def test_nothing_to_do_is_noticed() -> None:
    progress, _, _ = line_progress()
    progress.handle(record(msg="Nothing to be done (all requested files are present and up "
                               "to date)."))
    assert progress.nothing_to_do and progress.failure() is None


# ------------------------------------------------------------------------------------------
# arguments -> Snakemake config
# ------------------------------------------------------------------------------------------


def plan(argv: list[str], cwd: Path) -> run.RunPlan:
    return run.plan_run(run._parser().parse_args(argv), cwd)


def test_arguments_map_to_the_config_keys_of_the_snakemake_command(tmp_path: Path) -> None:
    study = tmp_path / "p7"
    study.mkdir()
    (tmp_path / "ev.tsv").write_text("day\tlabel\tcategory\n0\tCAR-T\tinfusion\n")
    p = plan(["p7", "--day0", "2024-05-02", "--subject", "P7", "--events", "ev.tsv"], tmp_path)
    assert p.config == {"input_dir": str(study), "subject": "P7", "day0": "2024-05-02",
                        "affected_side": "auto", "events": str(tmp_path / "ev.tsv"),
                        "results_dir": str(tmp_path / "results")}
    assert p.report == tmp_path / "results" / "P7" / "report.html"
    assert (p.cores, p.profile, p.cohort) == ("all", None, False)
    p = plan([str(study), "--day0", "2024-05-02", "--subject", "P7", "--side", "right",
              "--results", "out", "--cores", "3", "--patient", "0012345"], tmp_path)
    assert p.config["affected_side"] == "right" and p.config["patient"] == "0012345"
    assert p.config["results_dir"] == str(tmp_path / "out") and p.cores == "3"


def test_snakemake_arguments_keep_the_values_as_text(tmp_path: Path) -> None:
    from snakemake import cli as snakemake_cli

    study = tmp_path / "p7"
    study.mkdir()
    (tmp_path / "prof").mkdir()
    p = plan([str(study), "--day0", "2024-05-02", "--subject", "0042", "--patient", "0012345",
              "--profile", "prof"], tmp_path)
    args = run.snakemake_args(p)
    assert args[:4] == ["--snakefile", str(run.SNAKEFILE), "--directory", str(run.REPO_ROOT)]
    assert "--cores" not in args  # the profile's
    assert args[args.index("--profile") + 1] == str(tmp_path / "prof")
    config = snakemake_cli.parse_config(args[args.index("--config") + 1:])
    assert config == {**p.config}  # "0012345" stays text, not the number 12345
    assert run.SNAKEFILE.is_file()


@pytest.mark.parametrize("value", ["0012345", "2024-03-01", "true", "/data/it's here",
                                   "/data/a: b # c", "[x]", "{x}", '"q"', ""])
def test_config_values_reach_snakemake_as_the_same_text(value: str) -> None:
    from snakemake import cli as snakemake_cli

    assert snakemake_cli.parse_config([f"patient={run._config_value(value)}"]) == \
        {"patient": value}


def test_cohort_maps_to_the_subjects_sheet(tmp_path: Path) -> None:
    sheet = tmp_path / "subjects.tsv"
    sheet.write_text(f"subject\tinput_dir\tday0\taffected_side\nP7\t{tmp_path}\t2024-05-02\t"
                     "left\n")
    p = plan(["--cohort", "subjects.tsv", "--results", "r"], tmp_path)
    assert p.config == {"subjects_sheet": str(sheet), "results_dir": str(tmp_path / "r")}
    assert p.report == tmp_path / "r" / "cohort.html" and p.cohort


@pytest.mark.parametrize(("argv", "says"), [
    (["--day0", "2024-05-02"], "one of them"),
    (["STUDY", "--cohort", "s.tsv"], "one of them"),
    (["STUDY"], "--day0"),
    (["STUDY", "--day0", "2024-05-02", "--subject", "P-7"], "letters and digits"),
    (["STUDY", "--day0", "2024-05-02", "--subject", "P7", "--events", "nope.tsv"],
     "no such file"),
    (["nowhere", "--day0", "2024-05-02", "--subject", "P7"], "not a folder"),
    (["--cohort", "s.tsv", "--day0", "2024-05-02"], "--day0: given per subject"),
    (["--cohort", "missing.tsv"], "cannot be read"),
])
def test_arguments_that_cannot_work_are_refused(tmp_path: Path, argv: list[str],
                                                 says: str) -> None:
    (tmp_path / "STUDY").mkdir()
    (tmp_path / "s.tsv").write_text("subject\tinput_dir\tday0\taffected_side\n")
    with pytest.raises(run.RunError, match=says):
        plan(argv, tmp_path)


def test_cohort_sheet_with_relative_paths_needs_the_repository_folder(tmp_path: Path) -> None:
    (tmp_path / "s.tsv").write_text("subject\tinput_dir\tday0\taffected_side\n"
                                    "P7\tdata/p7\t2024-05-02\tleft\n")
    with pytest.raises(run.RunError, match="relative paths"):
        plan(["--cohort", "s.tsv"], tmp_path)


def test_bad_arguments_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert run.main([str(tmp_path / "nowhere"), "--day0", "2024-05-02"]) == 2
    assert "limbtrack run:" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_:
        run.main([str(tmp_path), "--day0", "2024-5-2"])
    assert exit_.value.code == 2
    with pytest.raises(SystemExit) as exit_:
        run.main(["--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: limbtrack run") and "--cohort" in out


# ------------------------------------------------------------------------------------------
# the default subject ID
# ------------------------------------------------------------------------------------------

OTHER = {"PatientID": "OTHER-99", "PatientName": "Roe^Richard", "PatientBirthDate": "20120303"}


def test_subject_defaults_to_the_fingerprint_of_the_patient_id(tmp_path: Path) -> None:
    write_series(tmp_path / "study1" / "t1")
    subject = run.default_subject(tmp_path)
    expected = patient_fingerprint(normalise_patient_id(PATIENT_TAGS["PatientID"]), None, None)
    assert subject == "P" + expected
    assert run.SUBJECT_PREFIX == "P" and len(subject) == 13 and subject.isalnum()
    for value in PATIENT_TAGS.values():
        assert value.upper() not in subject.upper()
    # the same subject from the config mapping, and for a name spelt differently
    write_series(tmp_path / "study2" / "t1", study_date="20240310",
                 tags={"PatientName": "DOE^JANE^M"})
    assert plan([str(tmp_path), "--day0", "2024-03-01"], tmp_path).config["subject"] == subject


def test_folder_of_several_patients_asks_for_the_patient(tmp_path: Path) -> None:
    write_series(tmp_path / "a" / "t1")
    write_series(tmp_path / "b" / "t1", study_date="20240310", tags=OTHER)
    with pytest.raises(run.RunError, match="2 patients") as err:
        run.default_subject(tmp_path)
    message = str(err.value)
    assert "--patient" in message and "fingerprint" in message
    assert "OTHER-99" not in message and "Roe" not in message  # fingerprints only
    chosen = run.default_subject(tmp_path, "other-99")
    assert chosen == run.subject_from_patient_id("OTHER-99")


def test_no_subject_without_a_patient_id(tmp_path: Path) -> None:
    with pytest.raises(run.RunError, match="no DICOM image series"):
        run.default_subject(tmp_path)
    write_series(tmp_path / "s" / "t1", tags={"PatientID": "ANONYMOUS"})
    with pytest.raises(run.RunError, match="no PatientID"):
        run.default_subject(tmp_path)
    sheet = tmp_path / "sessions.tsv"
    sheet.write_text("subject\tstudy_date\trole\tpath\n")
    with pytest.raises(run.RunError, match="--subject"):
        run.default_subject(sheet)


def test_cohort_runs_every_index_first_then_the_rest(tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch,
                                                     capsys: pytest.CaptureFixture[str]
                                                     ) -> None:
    """Two Snakemake runs for a cohort of more than 16: the subjects' sessions.json as targets
    (their index jobs alone), then the whole workflow, both keeping going past a failed
    subject; one run for fewer, and for a single subject."""
    for name in ("P7", "Q8"):
        (tmp_path / name).mkdir()
    (tmp_path / "subjects.tsv").write_text(
        "subject\tinput_dir\tday0\taffected_side\n"
        f"Q8\t{tmp_path / 'Q8'}\t2024-05-02\tleft\nP7\t{tmp_path / 'P7'}\t2024-05-02\tright\n")
    calls: list[list[str]] = []

    def fake_execute(args: list[str], progress: Progress) -> tuple[bool, str]:
        calls.append(list(args))
        report = tmp_path / "r" / "cohort.html"
        report.parent.mkdir(exist_ok=True)
        report.write_text("<html></html>")
        return True, ""

    monkeypatch.setattr(run, "execute", fake_execute)
    monkeypatch.chdir(tmp_path)
    # two subjects: one run (the re-planning costs less than a second Snakemake start)
    assert run.main(["--cohort", "subjects.tsv", "--results", "r", "--cores", "2"]) == 0
    assert len(calls) == 1 and calls[0][0] == "--snakefile" and "--keep-going" in calls[0]
    capsys.readouterr()
    calls.clear()
    monkeypatch.setattr(workflow, "INDEX_FIRST_ABOVE_SUBJECTS", 1)  # as if there were 17
    assert run.main(["--cohort", "subjects.tsv", "--results", "r", "--cores", "2"]) == 0
    assert len(calls) == 2
    first, second = calls
    results = tmp_path / "r"
    assert first[:2] == [f"{results}/P7/sessions.json", f"{results}/Q8/sessions.json"]
    assert second[0] == "--snakefile"  # no targets: the Snakefile's `all`
    assert first[2:] == second and "--keep-going" in second
    assert capsys.readouterr().out == f"Report: {results / 'cohort.html'}\n"

    calls.clear()
    (tmp_path / "r" / "P7").mkdir()
    (tmp_path / "r" / "P7" / "report.html").write_text("<html></html>")
    assert run.main([str(tmp_path / "P7"), "--day0", "2024-05-02", "--subject", "P7",
                     "--results", "r"]) == 0
    assert len(calls) == 1 and calls[0][0] == "--snakefile" and "--keep-going" not in calls[0]
