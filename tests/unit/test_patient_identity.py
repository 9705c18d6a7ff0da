"""One subject is one patient (issue 17, case 1): grouping studies by patient identity.

A folder holding several patients is refused with a table of who is in it (pseudonymous
fingerprints, study counts and dates; names and IDs only with --show-phi), unless the patient
to use is named (--patient, config ``patient``: a fingerprint or a PatientID). Anonymised
exports: placeholders count as missing, a study lacking a field joins the one patient it
agrees with, and a folder with no identity at all is one patient with a warning.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import pytest
from dicom_factory import PATIENT_TAGS, edit_file, write_series
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from pipeline.io import dicom_index
from pipeline.io.files import read_tsv
from pipeline.io.identity import (
    FINGERPRINT_ROUNDS,
    FINGERPRINT_SALT,
    PatientIdentity,
    group_patients,
    normalise_birth_date,
    normalise_patient_id,
    normalise_patient_name,
    patient_fingerprint,
)
from pipeline.io.records import SeriesRecord
from pipeline.io.scan import index_folder
from pipeline.io.selection import choose_patient

JANE = {"PatientID": "SECRET-ID-4711", "PatientName": "Doe^Jane", "PatientBirthDate": "20140101"}
JOHN = {"PatientID": "OTHER-99", "PatientName": "Roe^Richard", "PatientBirthDate": "20120303"}


def study(root: Path, date: str, patient: dict[str, str] | None = None,
          time: str = "101500") -> str:
    """A usable study (T1w + STIR, 5 slices each) of `patient` (default: PATIENT_TAGS)."""
    uid = generate_uid()
    tags = dict(patient or PATIENT_TAGS)
    for name, sequence, number in (("t1", "T1w", 3), ("stir", "STIR", 5)):
        write_series(root / f"{date}_{time}" / name, sequence=sequence, study_uid=uid,
                     series_number=number, study_date=date, study_time=time, tags=tags,
                     seed=number)
    return uid


def tree(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): (hashlib.sha256(p.read_bytes()).hexdigest()
                                         if p.is_file() else "folder")
            for p in sorted(folder.rglob("*"))}


def run_index(tmp_path: Path, *args: str) -> tuple[int, dict[str, Any]]:
    out = tmp_path / "out"
    code = dicom_index.main(["--input-dir", str(tmp_path / "in"), "--out-dir", str(out),
                             *args])
    return code, json.loads((out / "sessions.json").read_text())


def all_output_text(out: Path) -> str:
    return "".join(p.read_text() for p in sorted(out.rglob("*")) if p.is_file())


# --------------------------------------------------------------------------------------------
# normalisation and fingerprint
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("value", "expected"), [
    ("PH000007", "PH000007"), ("  ph 7 ", "PH 7"), ("", None), (None, None),
    ("ANONYMOUS", None), ("Anonymized", None), ("N/A", None), ("UNKNOWN", None),
    ("00000000", None), ("-", None), ("ANON_0042", "ANON_0042"),  # a pseudonym identifies
])
def test_normalise_patient_id(value: Any, expected: str | None) -> None:
    assert normalise_patient_id(value) == expected


@pytest.mark.parametrize(("value", "expected"), [
    ("Doe^Jane", "DOE^JANE"), ("DOE^JANE^^^", "DOE^JANE"), ("doe^jane^Marie^Dr", "DOE^JANE"),
    ("Müller-Lüdenscheidt^Åsa", "MULLERLUDENSCHEIDT^ASA"), ("Doe^Jane=ドウ^ジェーン", "DOE^JANE"),
    ("", None), ("ANONYMOUS^", None), ("Anonymized", None), ("UNKNOWN^PATIENT", None),
])
def test_normalise_patient_name(value: str, expected: str | None) -> None:
    assert normalise_patient_name(value) == expected


def test_name_without_component_separator_is_the_same_name() -> None:
    a = PatientIdentity("X1", normalise_patient_name("DOE^JANE"), "2014-01-01")
    b = PatientIdentity("X1", normalise_patient_name("Doe Jane"), "2014-01-01")
    assert a.values == b.values and a.fingerprint() == b.fingerprint()
    assert a == b and len(group_patients([_rec("s1", a), _rec("s2", b)])) == 1


def test_birth_date_placeholders() -> None:
    assert normalise_birth_date("20140101") == "2014-01-01"
    assert normalise_birth_date("19000101") is None
    assert normalise_birth_date("") is None and normalise_birth_date("00000000") is None


def test_fingerprint_is_the_documented_formula_and_hides_the_identity() -> None:
    expected = hashlib.pbkdf2_hmac(
        "sha256", b"SECRET-ID-4711\x1fDOEJANE\x1f2014-01-01", FINGERPRINT_SALT,
        FINGERPRINT_ROUNDS).hex()[:12]
    assert expected == "08415728afd9"  # the same on every machine and in every release
    assert FINGERPRINT_SALT == b"limbtrack-patient-fingerprint-v1"
    assert patient_fingerprint("SECRET-ID-4711", "DOE^JANE", "2014-01-01") == expected
    identity = PatientIdentity("SECRET-ID-4711", "DOE^JANE", "2014-01-01")
    assert identity.fingerprint() == expected
    assert "SECRET" not in repr(identity) and "DOE" not in repr(identity)


def _rec(study: str, identity: PatientIdentity, date: str = "2024-02-25") -> SeriesRecord:
    return SeriesRecord(study_uid=study, study_date=date, study_time="10:00:00",
                        series_uid=study + ".1", series_number=1, series_description="t1",
                        modality="MR", sequence_class="T1w", orientation="axial", n_files=5,
                        rows=6, columns=7, pixel_spacing_mm=(1.0, 1.0), slice_spacing_mm=2.0,
                        status="skipped", reason="", identity=identity)


def test_group_patients_rule() -> None:
    full = PatientIdentity("ID1", "DOE^JANE", "2014-01-01")
    no_birth = PatientIdentity("ID1", "DOE^JANE", None)  # joins `full`
    name_birth = PatientIdentity(None, "DOE^JANE", "2014-01-01")  # joins `full`
    other_name = PatientIdentity("ID1", "ROE^RICHARD", "2014-01-01")  # a patient of its own
    birth_only = PatientIdentity(None, None, "2014-01-01")  # cannot join anyone
    nobody = PatientIdentity()
    records = [_rec("a", full), _rec("b", no_birth), _rec("c", name_birth),
               _rec("d", other_name), _rec("e", birth_only), _rec("f", nobody)]
    groups = group_patients(records)
    by_fp = {g.fingerprint: g for g in groups}
    jane = by_fp[full.fingerprint()]
    assert {uid for uid, _ in jane.study_keys} == {"a", "b", "c"} and jane.merged == 2
    assert jane.identified_by == ("PatientID", "PatientName", "PatientBirthDate")
    assert {uid for g in groups if g is not jane for uid, _ in g.study_keys} == {"d", "e", "f"}
    assert len(groups) == 4 and groups[0] is jane
    assert by_fp[nobody.fingerprint()].identified_by == ()
    # an identity missing a field that fits two patients joins neither
    twins = [_rec("a", full), _rec("d", other_name), _rec("x", PatientIdentity("ID1", None,
                                                                              "2014-01-01"))]
    assert len(group_patients(twins)) == 3


def test_choose_patient() -> None:
    jane = PatientIdentity("ID1", "DOE^JANE", "2014-01-01")
    jane_renamed = PatientIdentity("ID1", "SMITH^JANE", "2014-01-01")
    john = PatientIdentity("ID2", "ROE^JOHN", "2012-03-03")
    groups = group_patients([_rec("a", jane), _rec("b", jane_renamed), _rec("c", john)])
    assert len(groups) == 3
    chosen, error = choose_patient(groups)
    assert chosen == [] and error is not None and "3 patients" in error
    chosen, error = choose_patient(groups, john.fingerprint().upper())
    assert error is None and [g.fingerprint for g in chosen] == [john.fingerprint()]
    chosen, error = choose_patient(groups, " id1 ")  # a PatientID takes every variant of it
    assert error is None and {g.fingerprint for g in chosen} == {jane.fingerprint(),
                                                                  jane_renamed.fingerprint()}
    chosen, error = choose_patient(groups, "ID3")
    assert chosen == [] and error is not None and "ID3" not in error
    only = group_patients([_rec("a", jane)])
    assert choose_patient(only) == (only, None)
    assert choose_patient(only, "ID2")[0] == []  # the wrong folder for the patient named


# --------------------------------------------------------------------------------------------
# the index step
# --------------------------------------------------------------------------------------------

def test_two_patients_in_one_folder_refused_with_a_table(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = tmp_path / "in"
    study(root, "20240228", JANE)
    study(root, "20240311", JANE)
    study(root, "20240306", JOHN)
    before = tree(root)
    code, data = run_index(tmp_path)
    err = capsys.readouterr().err
    assert code == 1
    jane_fp = PatientIdentity.of(_ds(JANE)).fingerprint()
    john_fp = PatientIdentity.of(_ds(JOHN)).fingerprint()
    assert "the folder holds 2 patients" in err and "`patient`" in err
    table = err[err.index("fingerprint"):]
    assert jane_fp in table and john_fp in table
    assert "2024-02-28, 2024-03-11" in table and "2024-03-06" in table
    for value in (*JANE.values(), *JOHN.values(), "DOE", "ROE"):
        assert value not in err
        assert value not in all_output_text(tmp_path / "out")
    assert data["sessions"] == [] and data["patient_fingerprint"] is None
    assert {(r["study_date"], r["patient_fingerprint"]) for r in data["refused_studies"]} == {
        ("2024-02-28", jane_fp), ("2024-03-11", jane_fp), ("2024-03-06", john_fp)}
    assert all("2 patients" in r["reason"] for r in data["refused_studies"])
    assert [(p["fingerprint"], p["n_studies"], p["used"]) for p in data["patients"]] == [
        (jane_fp, 2, False), (john_fp, 1, False)]
    assert tree(root) == before


def _ds(tags: dict[str, str]) -> Any:
    ds = Dataset()
    for key, value in tags.items():
        setattr(ds, key, value)
    return ds


def test_show_phi_puts_identity_in_the_table_only(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    study(tmp_path / "in", "20240228", JANE)
    study(tmp_path / "in", "20240306", JOHN)
    code, _ = run_index(tmp_path, "--show-phi")
    err = capsys.readouterr().err
    assert code == 1 and "SECRET-ID-4711" in err and "ROE^RICHARD" in err
    assert "SECRET-ID-4711" not in all_output_text(tmp_path / "out")


@pytest.mark.parametrize("how", ["fingerprint", "PatientID"])
def test_named_patient_is_used_and_the_others_listed(
        tmp_path: Path, how: str, caplog: pytest.LogCaptureFixture) -> None:
    study(tmp_path / "in", "20240228", JANE)
    study(tmp_path / "in", "20240311", JANE)
    study(tmp_path / "in", "20240306", JOHN)
    john_fp = PatientIdentity.of(_ds(JOHN)).fingerprint()
    jane_fp = PatientIdentity.of(_ds(JANE)).fingerprint()
    code, data = run_index(tmp_path, "--patient",
                           john_fp if how == "fingerprint" else "other-99")
    assert code == 0
    assert [s["session"] for s in data["sessions"]] == ["20240306"]
    assert data["patient_fingerprint"] == john_fp
    assert data["patient_fingerprint_fields"] == ["PatientID", "PatientName", "PatientBirthDate"]
    assert {r["study_date"] for r in data["refused_studies"]} == {"2024-02-28", "2024-03-11"}
    assert all(r["reason"].startswith(f"another patient (fingerprint {jane_fp})")
               for r in data["refused_studies"])
    assert {p["fingerprint"]: p["used"] for p in data["patients"]} == {jane_fp: False,
                                                                      john_fp: True}
    index = {r["study_date"]: r for r in read_tsv(tmp_path / "out" / "index.tsv")}
    assert index["2024-02-28"]["patient_fingerprint"] == jane_fp
    assert index["2024-02-28"]["reason"].startswith("study not used: another patient")
    assert "OTHER-99" not in all_output_text(tmp_path / "out")


def test_same_id_other_name_is_two_patients_unless_the_id_is_named(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # the phantom's default: two subjects generated with the same PatientID
    study(tmp_path / "in", "20240228", JANE)
    study(tmp_path / "in", "20240306", JANE | {"PatientName": "Smith^Jane"})
    code, _ = run_index(tmp_path)
    assert code == 1 and "2 patients" in capsys.readouterr().err
    code, data = run_index(tmp_path, "--patient", "SECRET-ID-4711")
    assert code == 0 and len(data["sessions"]) == 2
    assert any("carried by 2 identities" in w for w in data["warnings"])


def test_named_patient_not_in_the_folder_is_refused(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    study(tmp_path / "in", "20240228", JANE)
    code, data = run_index(tmp_path, "--patient", "OTHER-99")
    assert code == 1 and data["sessions"] == []
    err = capsys.readouterr().err
    assert "not in the folder" in err and "OTHER-99" not in err


@pytest.mark.parametrize("anonymous", [
    {"PatientID": "ANONYMOUS", "PatientName": "", "PatientBirthDate": ""},
    {"PatientID": "", "PatientName": "Anonymized", "PatientBirthDate": "19000101"},
])
def test_anonymised_export_is_one_patient_with_a_warning(tmp_path: Path,
                                                         anonymous: dict[str, str]) -> None:
    study(tmp_path / "in", "20240228", anonymous)
    study(tmp_path / "in", "20240311", anonymous)
    code, data = run_index(tmp_path)
    assert code == 0 and len(data["sessions"]) == 2
    assert data["patient_fingerprint_fields"] == []
    assert any("no patient identity" in w and "one patient" in w for w in data["warnings"])


def test_anonymised_by_name_and_birth_date(tmp_path: Path) -> None:
    """An export that blanked the PatientID keeps name and birth date: two patients are still
    told apart."""
    study(tmp_path / "in", "20240228", JANE | {"PatientID": "ANONYMOUS"})
    study(tmp_path / "in", "20240306", JOHN | {"PatientID": "ANONYMOUS"})
    result = index_folder(tmp_path / "in")
    assert len(result.patients) == 2
    assert all(p.identified_by == ("PatientName", "PatientBirthDate") for p in result.patients)


def test_study_with_a_blanked_birth_date_joins_its_patient(tmp_path: Path) -> None:
    study(tmp_path / "in", "20240228", JANE)
    study(tmp_path / "in", "20240311", JANE | {"PatientBirthDate": ""})
    code, data = run_index(tmp_path)
    assert code == 0 and len(data["sessions"]) == 2
    assert data["patient_fingerprint"] == PatientIdentity.of(_ds(JANE)).fingerprint()
    assert any("joined to that patient" in w for w in data["warnings"])


def test_a_file_of_another_patient_is_left_out_of_its_series(tmp_path: Path) -> None:
    study(tmp_path / "in", "20240228", JANE)
    t1 = sorted((tmp_path / "in" / "20240228_101500" / "t1").iterdir())
    edit_file(t1[2], PatientID="OTHER-99", PatientName="Roe^Richard")
    result = index_folder(tmp_path / "in")
    assert len(result.patients) == 1
    problem = {p.path: p.problem for p in result.problems}[
        t1[2].relative_to(tmp_path / "in").as_posix()]
    assert "another patient (PatientID, PatientName differ)" in problem
    assert "OTHER" not in problem and "ROE" not in problem.upper()
    t1_record = next(r for r in result.series if r.series_number == 3)
    assert t1_record.n_files == 4 and t1[2].resolve() not in t1_record.files
