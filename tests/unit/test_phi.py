"""No patient data leaks, no header text runs as code, no name escapes the results folder.

A phantom study gets a canary string in every PS3.15 Annex E identifier tag that could
plausibly leak; the whole workflow runs on it (defaults); then every output file is searched
for every canary: text, JSON, TSV, HTML (the PNGs embedded in it too), logs, and the NIfTI
files decompressed (header ``descrip``/``aux_file``/``intent_name``, extensions, data). The
folder-mode converter (``python -m pipeline.io.convert DIR OUT``) is checked the same way.

SeriesDescriptions carry HTML/JS injections and path pieces; they must appear in report.html
only escaped, and nothing may be written outside the results folder. A subject id ``../evil``
is refused by config validation (also: test_e2e::test_config_errors_name_the_problem and
test_workflow::test_sheet_bad_subject_path_traversal). The input folder is hashed before and
after the run (as test_e2e::demo_run does for the demo).
"""

from __future__ import annotations

import base64
import gzip
import hashlib
import re
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import pydicom
import pytest
from phantom_cases import small_spec

from pipeline.io import convert
from pipeline.validation import phantom
from pipeline.workflow import ConfigError, load_subjects

ROOT = Path(__file__).resolve().parents[2]

#: Annex E identifier tags -> canary value written into every file of the phantom.
CANARY_TAGS: dict[str, str] = {
    "PatientName": "CANARYFAMILY^CANARYGIVEN",
    "PatientID": "CANARY-PID-7Q3",
    "OtherPatientIDs": "CANARY-OPID-5X1",
    "OtherPatientNames": "CANARYOTHERNAME",
    "PatientBirthName": "CANARYBIRTHNAME",
    "PatientMotherBirthName": "CANARYMOTHER",
    "PatientBirthDate": "19230417",
    "PatientBirthTime": "031415",
    "PatientAge": "093Y",
    "PatientWeight": "71.3579",
    "PatientSize": "1.98765",
    "PatientAddress": "CANARY STREET 12",
    "PatientTelephoneNumbers": "CANARY-TEL-0815",
    "PatientComments": "CANARY patient comment",
    "MedicalRecordLocator": "CANARY-MRL",
    "EthnicGroup": "CANARYETHNIC",
    "Occupation": "CANARYJOB",
    "AdditionalPatientHistory": "CANARY history",
    "ResponsiblePerson": "CANARYRESPONSIBLE",
    "InstitutionName": "CANARY Hospital",
    "InstitutionAddress": "CANARY Institution Road",
    "InstitutionalDepartmentName": "CANARY Radiology",
    "ReferringPhysicianName": "CANARYREFDOC^X",
    "PerformingPhysicianName": "CANARYPERFDOC",
    "NameOfPhysiciansReadingStudy": "CANARYREADDOC",
    "PhysiciansOfRecord": "CANARYRECDOC",
    "RequestingPhysician": "CANARYREQDOC",
    "OperatorsName": "CANARYOPERATOR",
    "AccessionNumber": "CANARYACC1",
    "StudyID": "CANARYSTUDY",
    "DeviceSerialNumber": "CANARYSERIAL",
    "StationName": "CANARYSTATION",
    "ImageComments": "CANARY image comment",
    "StudyDescription": "CANARY study description",
    "RequestedProcedureDescription": "CANARY procedure",
    "PerformedProcedureStepDescription": "CANARY pps",
}

INJECTIONS = {
    "T1 TSE AX": "T1 <script>alert(1)</script> ../../x/y",
    "STIR AX": "STIR <img src=x onerror=alert(1)> javascript:alert(1) /etc/x",
}


def needles(tag: str, value: str) -> list[str]:
    """Strings whose presence in an output means `value` leaked."""
    found = [value, value.lower(), value.upper()]
    if "^" in value:
        found += [part for part in value.split("^") if len(part) > 3]
    if tag == "PatientBirthDate":
        found.append(f"{value[:4]}-{value[4:6]}-{value[6:]}")
    return sorted(set(found))


def tree_digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def searchable(path: Path) -> list[tuple[str, bytes]]:
    """(part, bytes) of one output file: raw bytes, decompressed NIfTI, header fields, PNGs."""
    data = path.read_bytes()
    parts = [("file", data)]
    if path.name.endswith(".gz"):
        parts.append(("gunzipped", gzip.decompress(data)))
    if path.name.endswith((".nii", ".nii.gz")):
        image = nib.load(path)
        header = image.header
        for field in ("descrip", "aux_file", "intent_name", "db_name"):
            if field in header:
                parts.append((field, bytes(header[field].tobytes())))
        for ext in getattr(header, "extensions", []):
            parts.append(("extension", bytes(ext.get_content())))
    if path.suffix == ".html":
        for encoded in re.findall(rb"base64,([A-Za-z0-9+/=]+)", data):
            parts.append(("embedded image", base64.b64decode(encoded)))
    return parts


def canary_hits(folder: Path) -> list[str]:
    hits = []
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        for part, data in searchable(path):
            for tag, value in CANARY_TAGS.items():
                for needle in needles(tag, value):
                    if needle.encode() in data:
                        hits.append(f"{path.relative_to(folder)} ({part}): {tag} {needle!r}")
    return hits


@pytest.fixture(scope="module")
def canary_run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("phi")
    phantom.generate(small_spec(subject="phi", n_slices=8), base / "phantom")
    study_in = base / "phantom" / "dicom"
    for path in sorted(p for p in study_in.rglob("*") if p.is_file()):
        ds = pydicom.dcmread(path)
        for tag, value in CANARY_TAGS.items():
            setattr(ds, tag, value)
        ds.SeriesDescription = INJECTIONS[str(ds.SeriesDescription)]
        ds.save_as(path, enforce_file_format=True)
    before = tree_digest(study_in)
    outside_before = sorted(p for p in base.rglob("*") if p.is_file())
    results = base / "results"
    cmd = [sys.executable, "-m", "snakemake", "--cores", "2", "--config",
           f"input_dir={study_in}", "subject=phi", "day0=2024-03-01", "affected_side=left",
           f"results_dir={results}"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        pytest.fail(f"workflow failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    assert tree_digest(study_in) == before, "the input folder was modified"
    folder_out = base / "folder_mode"
    assert convert.main([str(study_in), str(folder_out), "--subject", "phi"]) == 0
    assert tree_digest(study_in) == before
    return {"base": base, "input": study_in, "results": results, "folder": folder_out,
            "outside_before": outside_before}  # type: ignore[dict-item]


@pytest.mark.workflow
@pytest.mark.slow
def test_canaries_really_are_in_the_input(canary_run: dict[str, Path]) -> None:
    path = next(p for p in canary_run["input"].rglob("IM*"))
    data = path.read_bytes()
    for tag, value in CANARY_TAGS.items():
        assert value.encode() in data, tag


@pytest.mark.workflow
@pytest.mark.slow
def test_no_canary_in_any_workflow_output(canary_run: dict[str, Path]) -> None:
    results = canary_run["results"]
    n_files = sum(1 for p in results.rglob("*") if p.is_file())
    assert n_files >= 25 and any(results.rglob("*.nii.gz"))
    assert canary_hits(results) == []


@pytest.mark.workflow
@pytest.mark.slow
def test_no_canary_in_folder_mode_outputs(canary_run: dict[str, Path]) -> None:
    folder = canary_run["folder"]
    assert len(list(folder.glob("*.nii.gz"))) == 4
    assert canary_hits(folder) == []


@pytest.mark.workflow
@pytest.mark.slow
def test_header_text_escaped_in_report(canary_run: dict[str, Path]) -> None:
    html = (canary_run["results"] / "phi" / "report.html").read_text(encoding="utf-8")
    for raw in ("<script>alert(1)</script>", "<img src=x onerror=alert(1)>"):
        assert raw not in html
    assert "<script" not in html.lower()
    assert not re.search(r"<[^>]*\bon[a-z]+\s*=", html, re.I), "an event handler attribute"
    assert not re.search(r"""(href|src|action)\s*=\s*["']?\s*javascript:""", html, re.I)
    # the descriptions are shown, as text
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    assert "&lt;img src=x onerror=alert(1)&gt;" in html


@pytest.mark.workflow
@pytest.mark.slow
def test_nothing_written_outside_the_results(canary_run: dict[str, Path]) -> None:
    base = canary_run["base"]
    before = set(canary_run["outside_before"])  # type: ignore[arg-type]
    made = [p for p in base.rglob("*") if p.is_file() and p not in before]
    allowed = (canary_run["results"], canary_run["folder"])
    assert made and all(any(p.is_relative_to(a) for a in allowed) for p in made), \
        [p for p in made if not any(p.is_relative_to(a) for a in allowed)]
    for path in made:
        rel = path.relative_to(base).as_posix()
        assert "script" not in rel and "onerror" not in rel and "/x/y" not in rel, rel
        assert ".." not in path.relative_to(base).parts
    assert not (base.parent / "x").exists() and not (base / "x").exists()


@pytest.mark.parametrize("subject", ["../evil", "/abs", "a/b", "..", "x y", "ünï"])
def test_subject_ids_that_could_leave_the_results_are_refused(tmp_path: Path,
                                                              subject: str) -> None:
    config = {"subject": subject, "input_dir": str(tmp_path), "day0": "2024-01-01",
              "affected_side": "left", "events": ""}
    with pytest.raises(ConfigError, match="letters and digits"):
        load_subjects(config)
