"""``limbtrack run`` end to end (issue 15, point 1): the demo patient in one command, without a
terminal (a progress line per step start and finish), and a run that fails in one line.

Run as ``python -m pipeline.run`` (the ``limbtrack run`` subcommand calls the same ``main``).
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DEMO_DICOM = ROOT / "sample_data" / "demo" / "dicom"
LINE = re.compile(r"^\[ *(\d+)/(\d+)\] (.+?) (started|done in [0-9.:]+(?: s)?|FAILED)  "
                  r"elapsed [0-9:]+  (estimating…|~[0-9:]+ left)$")
#: What Snakemake prints on its own stream: it must not reach the user's terminal.
SNAKEMAKE_CHATTER = ("Building DAG", "Job stats", "Select jobs to execute", "localrule")


def limbtrack_run(*args: str, timeout: int = 900) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "pipeline.run", *args], cwd=ROOT,
                          stdin=subprocess.DEVNULL, capture_output=True, text=True,
                          timeout=timeout)


def test_demo_in_one_command_with_a_line_per_step(tmp_path: Path) -> None:
    results = tmp_path / "results"
    proc = limbtrack_run(str(DEMO_DICOM.relative_to(ROOT)), "--day0", "2024-03-01",
                         "--side", "left", "--subject", "demo", "--results", str(results),
                         "--cores", "2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = results / "demo" / "report.html"
    assert proc.stdout.splitlines() == [f"Report: {report}"]
    assert report.is_file() and (results / "demo" / "volumes.tsv").is_file()

    lines = proc.stderr.splitlines()
    assert lines and all(LINE.match(line) for line in lines), proc.stderr
    assert not any(word in proc.stderr for word in SNAKEMAKE_CHATTER)
    started = [LINE.match(ln).group(3) for ln in lines if " started  " in ln]
    done = [LINE.match(ln) for ln in lines if " done in " in ln]
    total = int(done[-1].group(2))
    # every step of the run (12 for the demo's 5 sessions: index, 5 convert_segment,
    # 4 register, measure_report, Snakemake's `all`) started once and finished once, counted
    # 1..N
    assert total == 12 and len(started) == total
    assert sorted(m.group(3) for m in done) == sorted(started)
    assert [int(m.group(1)) for m in done] == list(range(1, total + 1))
    assert {"index", "convert_segment ses-20240304", "register ses-20240307",
            "measure_report"} <= set(started)
    assert lines[0].endswith("estimating…")  # nothing finished yet
    assert lines[-1].endswith("~0:00 left")


def test_failing_run_names_the_step_and_its_reason_in_one_line(tmp_path: Path) -> None:
    study = tmp_path / "study"
    study.mkdir()
    (study / "scan.txt").write_text("not an image\n")
    proc = limbtrack_run(str(study), "--day0", "2024-03-01", "--subject", "P1",
                         "--results", str(tmp_path / "results"), timeout=300)
    assert proc.returncode == 1
    assert "Report:" not in proc.stdout
    failed = [ln for ln in proc.stderr.splitlines() if ln.startswith("limbtrack run:")]
    assert len(failed) == 1, proc.stderr
    assert failed[0].startswith("limbtrack run: step index failed: ")
    assert "no DICOM image series found" in failed[0]
    assert "step log: " in proc.stderr and "Snakemake's log: " in proc.stderr
    assert not any(word in proc.stderr for word in SNAKEMAKE_CHATTER)


def test_cohort_indexes_first_and_keeps_going_past_failed_subjects(tmp_path: Path) -> None:
    """``--cohort`` of more than 16 subjects: a first pass indexes every subject (index steps
    alone), the second does the rest; subjects whose folder holds no image fail alone, named
    with their reason, and the demo's report and the cohort page are written."""
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "scan.txt").write_text("not an image\n")
    failing = [f"B{k:02d}" for k in range(1, 18)]  # 17 + the demo: above the 16 of one pass
    sheet = tmp_path / "subjects.tsv"
    sheet.write_text("subject\tinput_dir\tday0\taffected_side\tevents\n"
                     f"demo\t{DEMO_DICOM}\t2024-03-01\tleft\t\n"
                     + "".join(f"{s}\t{bad}\t2024-03-01\tleft\t\n" for s in failing))
    results = tmp_path / "results"
    proc = limbtrack_run("--cohort", str(sheet), "--results", str(results), "--cores", "2")
    assert proc.returncode == 1, proc.stderr[-3000:]
    lines = proc.stderr.splitlines()
    steps = [m.group(3) for m in map(LINE.match, lines) if m and m.group(4) == "started"]
    # the first pass: the 18 indexes and nothing else; then the rest of the demo (the failed
    # indexes are tried again there, and reported there)
    assert sorted(steps[:18]) == sorted(f"index sub-{s}" for s in ["demo", *failing]), steps
    assert "convert_segment sub-demo ses-20240304" in steps[18:]
    assert "measure_report sub-demo" in steps[18:] and "index sub-demo" not in steps[18:]
    failed = [ln for ln in lines if ln.startswith("limbtrack run:")]
    assert failed and re.match(r"limbtrack run: step index sub-B\d\d failed: ", failed[0])
    assert "no DICOM image series found" in failed[0]
    assert (results / "demo" / "report.html").is_file()
    cohort = (results / "cohort.tsv").read_text(encoding="utf-8")
    assert all(s in cohort for s in ["demo", *failing])
