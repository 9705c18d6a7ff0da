"""Bad-input catalogue, workflow level (issue 17): stale results, ordinary irregularities,
silent wrongs of the NIfTI route, and the input folder that is never written.

Expected behaviour, whatever the case: a re-run redoes what an input change touches and
nothing else, and never serves outputs of another input; an odd study is refused (or
measured over what it covers, or flagged) with a one-line message naming the file and the
problem while the rest of the patient goes on; the input folder is byte-for-byte and
time-for-time unchanged after every run, failed or not.

Cases and where they are tested:

- a follow-up study copied into the folder, the same subject pointed at another folder, a
  file rewritten, the series settings changed: here test_input_digest_*,
  test_session_entry_digest_*, and end to end test_rerun_* (slow)
- events.tsv edited: test_input_digest_ignores_the_events_file, test_rerun_after_events_edit
  (slow; needs the events as an input of rule measure_report, see its skip reason)
- a follow-up of six contiguous thin slices (ITK "less than 4 pixels"):
  test_register::test_thin_follow_up_is_registered / test_three_slice_follow_up_in_plane /
  test_cli_itk_failure_flags_registration_failed
- T1 and STIR of a session that do not overlap: NIfTI route here
  test_nifti_sessions_that_cannot_be_measured_are_refused and test_workflow_nifti_bad_sessions
  (slow); DICOM route test_segment_flags_images_that_do_not_overlap (QC exclude flag)
- events.tsv in latin-1 / with a byte-order mark: test_events_latin1_read_with_a_warning,
  test_events_utf8_bom
- an event in 1850 (or far outside the studies): test_events_far_outside_are_left_off
- sform mirrored against qform: test_mirrored_sform_refused_with_both_shown
- the same NIfTI (or a copy) for both roles: test_same_image_for_both_roles_refused
- results (or the working folder) inside the input folder: test_results_inside_input_*,
  test_workflow_refuses_results_inside_input_before_writing (slow)
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk

from pipeline import segment as segment_mod
from pipeline.io import nifti_input
from pipeline.io.convert import read_series
from pipeline.longitudinal import read_events
from pipeline.validation import phantom
from pipeline.workflow import (
    ConfigError,
    input_digest,
    load_subjects,
    session_entry_digest,
)

ROOT = Path(__file__).resolve().parents[2]
DAY0 = "2024-03-01"


def tree_digest(top: Path) -> str:
    """Every path, size, mtime and content hash under `top` (what 'unchanged' means)."""
    h = hashlib.sha256()
    for dirpath, dirnames, filenames in os.walk(top):
        dirnames.sort()
        for name in sorted(filenames) + ["."]:
            p = Path(dirpath) / name
            st = p.stat()
            h.update(f"{p.relative_to(top)}\t{st.st_size}\t{st.st_mtime_ns}\n".encode())
            if p.is_file():
                h.update(hashlib.sha256(p.read_bytes()).digest())
    return h.hexdigest()


# ------------------------------------------------------------------ events file


def test_events_latin1_read_with_a_warning(tmp_path: Path) -> None:
    f = tmp_path / "events.tsv"
    f.write_bytes("day\tlabel\tcategory\n0\tinfusion\tinfusion\n3\tfièvre, CRS\tCRS grade\n"
                  .encode("latin-1"))
    warnings: list[str] = []
    events = read_events(f, DAY0, warnings=warnings)
    assert [e["label"] for e in events] == ["infusion", "fièvre, CRS"]
    assert len(warnings) == 1 and str(f) in warnings[0] and "not UTF-8" in warnings[0]


def test_events_latin1_without_a_list_warns_on_stderr(tmp_path: Path, capsys) -> None:
    f = tmp_path / "events.tsv"
    f.write_bytes("day\tlabel\n3\tBehandlung Ä\n".encode("cp1252"))
    assert read_events(f, DAY0)[0]["label"] == "Behandlung Ä"
    assert "WARNING" in capsys.readouterr().err


def test_events_utf8_bom(tmp_path: Path) -> None:
    f = tmp_path / "events.tsv"
    f.write_bytes("\ufeffday\tlabel\n0\tinfusion\n".encode())
    warnings: list[str] = []
    assert read_events(f, DAY0, warnings=warnings)[0]["day"] == 0
    assert warnings == []


@pytest.mark.parametrize("date", ["1850-03-04", "2204-03-01"])
def test_events_far_outside_are_left_off(tmp_path: Path, date: str) -> None:
    f = tmp_path / "events.tsv"
    f.write_text(f"date\tlabel\tcategory\n2024-03-01\tinfusion\tinfusion\n{date}\ttypo\tother\n"
                 "2024-03-04\tCRS\tCRS grade\n")
    warnings: list[str] = []
    events = read_events(f, DAY0, study_days=[-5, 3, 30], warnings=warnings)
    assert [e["label"] for e in events] == ["infusion", "CRS"]
    assert len(warnings) == 1
    assert f"{f}, line 3" in warnings[0] and date in warnings[0] and "left off" in warnings[0]


def test_events_window_rule(tmp_path: Path) -> None:
    """Kept: within max(365, span) days of the span of the studies and day 0."""
    f = tmp_path / "events.tsv"
    f.write_text("day\tlabel\n-370\tedge before\n-371\ttoo early\n395\tedge after\n"
                 "396\ttoo late\n1000\tlong follow-up\n")
    warnings: list[str] = []
    kept = read_events(f, DAY0, study_days=[-5, 30], warnings=warnings)  # margin 365
    assert [e["label"] for e in kept] == ["edge before", "edge after"]
    assert len(warnings) == 3
    # studies over 500 days: the margin is the span, 500 days
    assert [e["day"] for e in read_events(f, DAY0, study_days=[0, 500], warnings=[])] == [
        -371, -370, 395, 396, 1000]
    # without the studies: day 0 alone, 365 days either side
    assert read_events(f, DAY0, warnings=[]) == []


def test_events_checked_when_the_workflow_is_built(tmp_path: Path) -> None:
    d = tmp_path / "study"
    d.mkdir()
    (d / "events.tsv").write_bytes("day\tlabel\n0\tperfusión\n".encode("latin-1"))
    config = {"subject": "P1", "input_dir": str(d), "day0": DAY0, "affected_side": "left",
              "events": "auto", "results_dir": str(tmp_path / "res")}
    assert load_subjects(config)["P1"]["events"] == str(d / "events.tsv")  # readable
    (d / "events.tsv").write_text("day\tlabel\n0\tinfusion\nthree\tfever\n")
    with pytest.raises(ConfigError, match=r"events of subject P1: .*events\.tsv, line 3"):
        load_subjects(config)


# ------------------------------------------------------------------ nothing written inside


def _config(input_dir: Path | str, results: Path | str, **over: str) -> dict[str, str]:
    c = {"subject": "P1", "input_dir": str(input_dir), "day0": DAY0, "affected_side": "left",
         "events": "", "results_dir": str(results)}
    c.update(over)
    return c


def test_results_inside_input_refused(tmp_path: Path) -> None:
    d = tmp_path / "study"
    d.mkdir()
    with pytest.raises(ConfigError, match="lies inside its study folder"):
        load_subjects(_config(d, d / "results"))
    held = tmp_path / "res" / "P1" / "raw"  # the input inside the subject's results folder
    held.mkdir(parents=True)
    with pytest.raises(ConfigError, match="lies inside its study folder"):
        load_subjects(_config(held, tmp_path / "res"))
    assert load_subjects(_config(d, tmp_path / "results"))  # beside it: fine


def test_results_inside_input_refused_through_a_link(tmp_path: Path) -> None:
    d = tmp_path / "study"
    d.mkdir()
    (tmp_path / "link").symlink_to(d)
    with pytest.raises(ConfigError, match="lies inside its study folder"):
        load_subjects(_config(d, tmp_path / "link" / "results"))


def test_working_folder_inside_input_refused(tmp_path: Path, monkeypatch) -> None:
    d = tmp_path / "study"
    (d / "wd").mkdir(parents=True)
    monkeypatch.chdir(d / "wd")
    with pytest.raises(ConfigError, match="working folder .* lies inside the study folder"):
        load_subjects(_config(d, tmp_path / "results"))


def test_results_holding_the_sessions_sheet_refused(tmp_path: Path) -> None:
    sheet = tmp_path / "res" / "P1" / "sessions.tsv"
    sheet.parent.mkdir(parents=True)
    sheet.write_text("subject\tstudy_date\trole\tpath\n")
    with pytest.raises(ConfigError, match="holds its input"):
        load_subjects(_config(sheet, tmp_path / "res"))
    assert load_subjects(_config(sheet, tmp_path / "elsewhere"))


# ------------------------------------------------------------------ re-run fingerprints


def _study(top: Path) -> Path:
    for rel in ("ST1/SE1/IM1", "ST1/SE1/IM2", "ST1/SE2/IM1"):
        (top / rel).parent.mkdir(parents=True, exist_ok=True)
        (top / rel).write_bytes(b"x" * 10)
    return top


SERIES = {"anatomical_regex": "", "fluid_regex": ""}


def test_input_digest_follows_the_listing(tmp_path: Path) -> None:
    d = _study(tmp_path / "study")
    subject = {"subject": "P1", "input_dir": str(d), "events": ""}
    first = input_digest(subject, SERIES)
    assert input_digest(subject, SERIES) == first  # stable: a plain re-run does nothing
    assert "3 files" in first
    (d / "ST2" / "SE1").mkdir(parents=True)
    (d / "ST2" / "SE1" / "IM1").write_bytes(b"y")  # a follow-up study copied in
    added = input_digest(subject, SERIES)
    assert added != first and "4 files" in added
    os.utime(d / "ST1" / "SE1" / "IM1", ns=(1, 1))  # a file rewritten (same size)
    assert input_digest(subject, SERIES) != added
    touched = input_digest(subject, SERIES)
    assert input_digest(subject, {**SERIES, "fluid_regex": "STIR"}) != touched


def test_input_digest_of_another_folder_differs(tmp_path: Path) -> None:
    a = _study(tmp_path / "a")
    b = tmp_path / "b"
    shutil.copytree(a, b)  # same listing, times copied too
    for p in b.rglob("*"):
        st = (a / p.relative_to(b)).stat()
        os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns))
    da = input_digest({"subject": "P1", "input_dir": str(a), "events": ""}, SERIES)
    db = input_digest({"subject": "P1", "input_dir": str(b), "events": ""}, SERIES)
    assert da != db


def test_input_digest_ignores_the_events_file(tmp_path: Path) -> None:
    d = _study(tmp_path / "study")
    (d / "events.tsv").write_text("day\tlabel\n0\tinfusion\n")
    (d / "ST1" / "clinical.tsv").write_text("day\tlabel\n")
    subject = {"subject": "P1", "input_dir": str(d), "events": str(d / "ST1" / "clinical.tsv")}
    first = input_digest(subject, SERIES)
    (d / "events.tsv").write_text("day\tlabel\n0\tinfusion\n3\tfever\n")
    (d / "ST1" / "clinical.tsv").write_text("day\tlabel\n7\tsteroids\n")
    assert input_digest(subject, SERIES) == first


def test_input_digest_of_a_sheet(tmp_path: Path) -> None:
    for name in ("t1.nii.gz", "stir.nii.gz", "other.nii.gz"):
        (tmp_path / name).write_bytes(b"n")
    sheet = tmp_path / "sessions.tsv"
    sheet.write_text("subject\tstudy_date\trole\tpath\nP1\t2024-01-01\tT1w\tt1.nii.gz\n"
                     "P1\t2024-01-01\tfluid\tstir.nii.gz\nP2\t2024-01-01\tfluid\tother.nii.gz\n")
    subject = {"subject": "P1", "input_dir": str(sheet), "events": ""}
    first = input_digest(subject, SERIES)
    (tmp_path / "other.nii.gz").write_bytes(b"another subject's image")
    sheet.write_text(sheet.read_text().replace("P2\t2024-01-01", "P2\t2024-02-01"))
    assert input_digest(subject, SERIES) == first  # the other subject's rows and images
    (tmp_path / "stir.nii.gz").write_bytes(b"rewritten")
    assert input_digest(subject, SERIES) != first


def test_session_entry_digest(tmp_path: Path) -> None:
    files = []
    for n in range(3):
        files.append(tmp_path / f"IM{n}")
        files[-1].write_bytes(b"x")
    sessions = {"input_dir": str(tmp_path), "sessions": [
        {"session": "20240101", "anatomical": {"files": [str(files[0])]},
         "fluid": {"files": [str(files[1])]}},
        {"session": "20240201", "anatomical": {"files": [str(files[2])]},
         "fluid": {"files": [str(files[2])]}}]}
    path = tmp_path / "sessions.json"
    path.write_text(json.dumps(sessions))
    first = session_entry_digest(path, "20240101")
    sessions["sessions"][1]["fluid"]["files"] = [str(files[0])]  # another session changed
    path.write_text(json.dumps(sessions))
    assert session_entry_digest(path, "20240101") == first
    os.utime(files[1], ns=(1, 1))  # one of its files rewritten
    assert session_entry_digest(path, "20240101") != first
    touched = session_entry_digest(path, "20240101")
    sessions["input_dir"] = "/elsewhere"  # pointed at another folder
    path.write_text(json.dumps(sessions))
    assert session_entry_digest(path, "20240101") != touched


# ------------------------------------------------------------------ NIfTI route


def _image(path: Path, value: float = 1.0, offset_mm: float = 0.0,
           shape: tuple[int, int, int] = (16, 12, 6)) -> Path:
    affine = np.diag([1.5, 1.5, 5.0, 1.0])
    affine[:3, 3] = (-12.0, -9.0, offset_mm)
    img = nib.Nifti1Image(np.full(shape, value, np.float32), affine)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    nib.save(img, str(path))
    return path


def _sheet(path: Path, rows: list[tuple[str, str, str]]) -> Path:
    path.write_text("subject\tstudy_date\trole\tpath\n"
                    + "".join(f"P1\t{d}\t{r}\t{p}\n" for d, r, p in rows))
    return path


def test_mirrored_sform_refused_with_both_shown(tmp_path: Path) -> None:
    path = _image(tmp_path / "mirror.nii.gz")
    img = nib.load(str(path))
    sform = img.affine.copy()
    sform[0, :] *= -1  # left-right mirrored
    img.set_sform(sform, code=1)
    nib.save(img, str(path))
    with pytest.raises(ValueError) as exc:
        nifti_input.inspect_nifti(path)
    text = str(exc.value)
    assert "qform and sform disagree (one is mirrored)" in text
    assert "sform LAS left-handed" in text and "qform RAS right-handed" in text  # both shown
    assert "\n" not in text


def _with_sform(path: Path, sform: np.ndarray, qform_code: int = 1) -> Path:
    img = nib.load(str(path))
    qform = img.affine.copy()
    img.set_sform(sform, code=1)
    img.set_qform(qform if qform_code else None, code=qform_code)
    nib.save(img, str(path))
    return path


def test_qform_sform_agreeing_or_alone_accepted(tmp_path: Path) -> None:
    affine = nib.load(str(_image(tmp_path / "a.nii.gz"))).affine
    near = affine.copy()
    near[:3, 3] += 0.01  # float rounding between the two: they agree
    nifti_input.inspect_nifti(_with_sform(tmp_path / "a.nii.gz", near))
    mirrored = affine * [[-1], [1], [1], [1]]
    only = _with_sform(_image(tmp_path / "b.nii.gz"), mirrored, qform_code=0)
    assert nifti_input.inspect_nifti(only)["affine"][0][0] == pytest.approx(-1.5)


def test_qform_sform_shifted_refused(tmp_path: Path) -> None:
    affine = nib.load(str(_image(tmp_path / "a.nii.gz"))).affine
    shifted = affine.copy()
    shifted[2, 3] += 5.0
    with pytest.raises(ValueError, match=r"qform and sform disagree: .* up to 5\.0 mm apart"):
        nifti_input.inspect_nifti(_with_sform(tmp_path / "a.nii.gz", shifted))


def test_same_image_for_both_roles_refused(tmp_path: Path) -> None:
    _image(tmp_path / "t1.nii.gz", 1.0)
    shutil.copy(tmp_path / "t1.nii.gz", tmp_path / "copy.nii.gz")
    _image(tmp_path / "stir.nii.gz", 2.0)
    sheet = _sheet(tmp_path / "s.tsv", [
        ("2024-01-01", "anatomical", "t1.nii.gz"), ("2024-01-01", "fluid", "stir.nii.gz"),
        ("2024-02-01", "anatomical", "t1.nii.gz"), ("2024-02-01", "fluid", "t1.nii.gz"),
        ("2024-03-01", "anatomical", "t1.nii.gz"), ("2024-03-01", "fluid", "copy.nii.gz"),
    ])
    result = nifti_input.index_sheet(sheet, "P1")
    assert [s["session"] for s in result["sessions"]] == ["20240101"]
    reasons = {r["study_date"]: r["reason"] for r in result["refused"]}
    assert "same file t1.nii.gz is given as anatomical and as fluid" in reasons["2024-02-01"]
    assert "identical content" in reasons["2024-03-01"]
    refused_rows = [r for r in result["index_rows"] if r["status"] == "refused"]
    assert {r["study_date"] for r in refused_rows} == {"2024-02-01", "2024-03-01"}


def test_nifti_sessions_that_cannot_be_measured_are_refused(tmp_path: Path) -> None:
    _image(tmp_path / "t1.nii.gz", 1.0)
    _image(tmp_path / "stir.nii.gz", 2.0)
    _image(tmp_path / "stir_far.nii.gz", 3.0, offset_mm=600.0)
    _image(tmp_path / "stir_touching.nii.gz", 4.0, offset_mm=29.0)  # shares 1 mm: measured
    sheet = _sheet(tmp_path / "s.tsv", [
        ("2024-01-01", "anatomical", "t1.nii.gz"), ("2024-01-01", "fluid", "stir.nii.gz"),
        ("2024-02-01", "anatomical", "t1.nii.gz"), ("2024-02-01", "fluid", "stir_far.nii.gz"),
        ("2024-03-01", "anatomical", "t1.nii.gz"),
        ("2024-03-01", "fluid", "stir_touching.nii.gz"),
    ])
    result = nifti_input.index_sheet(sheet, "P1")
    assert [s["session"] for s in result["sessions"]] == ["20240101", "20240301"]
    (refused,) = result["refused"]
    assert refused["study_date"] == "2024-02-01"
    assert "t1.nii.gz and fluid stir_far.nii.gz do not overlap in space" in refused["reason"]
    assert any("stir_far.nii.gz" in p["path"] for p in result["problems"])


def test_segment_flags_images_that_do_not_overlap(tmp_path: Path, capsys) -> None:
    """DICOM route (the index does not look at geometry): that session only is flagged
    ``images_do_not_overlap`` (exclude) with an empty label map, one warning line, no
    traceback; registration then reports it not registered, so the others go on."""
    t1 = sitk.Image(16, 12, 6, sitk.sitkFloat32)
    t1.SetSpacing((1.5, 1.5, 5.0))
    fluid = sitk.Image(t1)
    fluid.SetOrigin((0.0, 0.0, 600.0))
    sitk.WriteImage(t1, str(tmp_path / "t1.nii.gz"))
    sitk.WriteImage(fluid, str(tmp_path / "fluid.nii.gz"))
    rc = segment_mod.main(["--t1", str(tmp_path / "t1.nii.gz"),
                           "--fluid", str(tmp_path / "fluid.nii.gz"),
                           "--out", str(tmp_path / "dseg.nii.gz"),
                           "--qc", str(tmp_path / "dseg.json")])
    err = capsys.readouterr().err.strip()
    assert rc == 0
    assert err.startswith("WARNING t1.nii.gz and fluid.nii.gz do not overlap in space")
    assert "\n" not in err
    labels = sitk.ReadImage(str(tmp_path / "dseg.nii.gz"))
    assert labels.GetSize() == fluid.GetSize() and labels.GetOrigin() == fluid.GetOrigin()
    assert not sitk.GetArrayViewFromImage(labels).any()
    flags = json.loads((tmp_path / "dseg.json").read_text())["qc_flags"]
    assert [(f["code"], f["severity"]) for f in flags] == [("images_do_not_overlap", "exclude")]
    # registering that session to a baseline: not registered, said why, no traceback
    from pipeline import register as register_mod
    base = sitk.Image(labels)
    base[8, 6, 3] = 1
    sitk.WriteImage(base, str(tmp_path / "base_dseg.nii.gz"))
    rc = register_mod.main(["--fixed-labels", str(tmp_path / "base_dseg.nii.gz"),
                            "--fixed-image", str(tmp_path / "fluid.nii.gz"),
                            "--moving-labels", str(tmp_path / "dseg.nii.gz"),
                            "--moving-image", str(tmp_path / "fluid.nii.gz"),
                            "--out-tfm", str(tmp_path / "xfm.tfm"),
                            "--out-json", str(tmp_path / "xfm.json")])
    assert rc == 0
    reg = json.loads((tmp_path / "xfm.json").read_text())
    assert reg["poor"] and "no limb segmented in dseg.nii.gz" in " ".join(reg["poor_reasons"])


# ------------------------------------------------------------------ end to end (slow)


def snakemake(workdir: Path, input_dir: Path | str, results: Path, *extra: str,
              expect_ok: bool = True) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "snakemake", "--cores", "2", "--directory", str(workdir),
           "--snakefile", str(ROOT / "Snakefile"),
           "--configfile", str(ROOT / "config" / "config.yaml"),
           "--config", f"input_dir={input_dir}", "subject=P1", f"day0={DAY0}",
           "affected_side=left", f"results_dir={results}", *extra]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    if expect_ok:
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def jobs_run(proc: subprocess.CompletedProcess[str]) -> set[str]:
    """'rule' or 'rule session' for each job Snakemake ran (or would run, with -n)."""
    out: set[str] = set()
    rule = None
    for line in (proc.stdout + proc.stderr).splitlines():
        m = re.match(r"^(?:local)?(?:rule|checkpoint) (\w+):", line.strip())
        if m:
            if rule:
                out.add(rule)
            rule = m.group(1)
            continue
        w = re.match(r"wildcards: (.*)", line.strip())
        if w and rule:
            session = re.search(r"session=(\w+)", w.group(1))
            out.add(f"{rule} {session.group(1)}" if session else rule)
            rule = None
    if rule:
        out.add(rule)
    out.discard("all")
    return out


@pytest.fixture(scope="module")
def serial(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A three-study phantom; the patient's folder holds the first two and an events file,
    and the workflow has run once on it."""
    base = tmp_path_factory.mktemp("rerun")
    phantom.main([str(base / "phantom"), "--slices", "12", "--matrix", "96x72",
                  "--supersample", "2x2",
                  "--sessions=-2:0.1:4:0.3,10:0:0:0,20:0:0:0"])
    studies = sorted((base / "phantom" / "dicom").iterdir())
    patient = base / "patient"
    patient.mkdir()
    for study in studies[:2]:
        shutil.copytree(study, patient / study.name)
    (patient / "events.tsv").write_text("day\tlabel\tcategory\n0\tinfusion\tinfusion\n")
    paths = {"base": base, "patient": patient, "third": studies[2],
             "results": base / "results", "wd": base / "wd"}
    snakemake(paths["wd"], patient, paths["results"])
    return paths


@pytest.mark.slow
def test_rerun_second_plain_run_does_nothing(serial: dict[str, Path]) -> None:
    proc = snakemake(serial["wd"], serial["patient"], serial["results"], "-n")
    assert "Nothing to be done" in proc.stdout + proc.stderr
    assert jobs_run(proc) == set()


def _longitudinal_reads_events() -> bool:
    text = (ROOT / "rules" / "analysis.smk").read_text()
    block = text[text.index("rule measure_report:"):text.index("output:", text.index(
        "rule measure_report:"))]
    return "events_input" in block


@pytest.mark.slow
@pytest.mark.skipif(not _longitudinal_reads_events(),
                    reason="needs `unpack(events_input),` in the input of rule measure_report "
                           "(rules/analysis.smk)")
def test_rerun_after_events_edit(serial: dict[str, Path]) -> None:
    events = serial["patient"] / "events.tsv"
    before = events.read_text()
    events.write_text(before + "3\tCRS grade 2\tCRS grade\n")
    try:
        proc = snakemake(serial["wd"], serial["patient"], serial["results"], "-n")
        # measure, longitudinal and report are one job (rules/analysis.smk: measure_report)
        assert jobs_run(proc) == {"measure_report"}
    finally:
        events.write_text(before)


@pytest.mark.slow
def test_rerun_after_a_study_is_added(serial: dict[str, Path]) -> None:
    before = tree_digest(serial["patient"])
    shutil.copytree(serial["third"], serial["patient"] / serial["third"].name)
    new = "20240321"  # day 20
    proc = snakemake(serial["wd"], serial["patient"], serial["results"])
    assert jobs_run(proc) == {"index", f"convert_segment {new}", f"register {new}",
                              "measure_report"}
    sessions = (serial["results"] / "P1" / "sessions.tsv").read_text()
    assert "2024-03-21" in sessions
    assert before != tree_digest(serial["patient"])  # (the copy, not the workflow)
    after = tree_digest(serial["patient"])
    proc = snakemake(serial["wd"], serial["patient"], serial["results"], "-n")
    assert jobs_run(proc) == set()
    assert tree_digest(serial["patient"]) == after


@pytest.mark.slow
def test_rerun_other_folder_reindexes(serial: dict[str, Path], tmp_path: Path) -> None:
    other = tmp_path / "other"
    shutil.copytree(serial["patient"], other)  # same studies, another folder
    proc = snakemake(serial["wd"], other, serial["results"], "-n")
    assert "index" in jobs_run(proc)
    assert "Params have changed" in proc.stdout + proc.stderr


@pytest.mark.slow
def test_workflow_refuses_results_inside_input_before_writing(serial: dict[str, Path],
                                                              tmp_path: Path) -> None:
    before = tree_digest(serial["patient"])
    proc = snakemake(tmp_path / "wd", serial["patient"], serial["patient"] / "results",
                     expect_ok=False)
    assert proc.returncode != 0
    assert "lies inside its study folder" in proc.stdout + proc.stderr
    assert tree_digest(serial["patient"]) == before


@pytest.mark.slow
def test_workflow_nifti_bad_sessions(serial: dict[str, Path], tmp_path: Path) -> None:
    """Two good sessions and three that cannot be measured (mirrored sform, the same image for
    both roles, images that do not overlap): the three are refused with their reasons, the
    two measured, the sheet's folder untouched."""
    folder = tmp_path / "nifti"
    folder.mkdir()
    rows = []
    studies = sorted((serial["base"] / "phantom" / "dicom").iterdir())[:2]
    for study in studies:
        for series, role in (("SE0003", "anatomical"), ("SE0004", "fluid")):
            image, meta = read_series(sorted((study / series).iterdir()))
            out = folder / f"{study.name}_{role}.nii.gz"
            sitk.WriteImage(image, str(out))
            rows.append((meta["StudyDate"], role, out.name))
    t1, fluid = f"{studies[1].name}_anatomical.nii.gz", f"{studies[1].name}_fluid.nii.gz"
    img = nib.load(str(folder / fluid))
    mirrored = img.affine.copy()
    mirrored[0, :] *= -1
    out = nib.Nifti1Image(np.asanyarray(img.dataobj), img.affine)
    out.set_qform(img.affine, code=1)
    out.set_sform(mirrored, code=1)
    nib.save(out, str(folder / "mirrored.nii.gz"))
    far = img.affine.copy()
    far[2, 3] += 600.0
    out = nib.Nifti1Image(np.asanyarray(img.dataobj), far)
    out.set_qform(far, code=1)
    out.set_sform(far, code=1)
    nib.save(out, str(folder / "far.nii.gz"))
    rows += [("2024-03-12", "anatomical", t1), ("2024-03-12", "fluid", "mirrored.nii.gz"),
             ("2024-03-13", "anatomical", t1), ("2024-03-13", "fluid", t1),
             ("2024-03-14", "anatomical", t1), ("2024-03-14", "fluid", "far.nii.gz")]
    sheet = _sheet(folder / "sessions.tsv", rows)
    before = tree_digest(folder)
    results = tmp_path / "results"
    snakemake(tmp_path / "wd", sheet, results)
    summary = json.loads((results / "P1" / "summary.json").read_text())
    assert [s["study_date"] for s in summary["sessions"]] == ["2024-02-28", "2024-03-11"]
    warnings = " | ".join(summary["warnings"])
    assert "study 2024-03-12 not used: no usable fluid image (mirrored.nii.gz: qform and " \
           "sform disagree (one is mirrored)" in warnings
    assert "study 2024-03-13 not used: the same file" in warnings
    assert "study 2024-03-14 not used: anatomical" in warnings and "do not overlap" in warnings
    assert tree_digest(folder) == before
