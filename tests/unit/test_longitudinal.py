"""Unit tests of pipeline.longitudinal: asymmetry, change, baseline, response pattern, events.

Every classification of docs/design.md ("Response pattern") is reached by a case built for it, and
every threshold is probed on both sides of its edge.
"""

from __future__ import annotations

import csv
import datetime as dt
import hashlib
import json
from pathlib import Path

import pytest

from pipeline import __version__
from pipeline.io.files import write_tsv_atomic
from pipeline.longitudinal import (
    Thresholds,
    Visit,
    baseline_index,
    classify,
    input_checksums,
    longitudinal_rows,
    main,
    read_events,
    session_states,
    visits_from_rows,
)

DAY0 = "2024-03-01"
STRUCTURES = ["limb", "soft_tissue", "bone", "marrow_lesion", "edema"]
DESIGN_LONGITUDINAL_COLUMNS = ["subject", "study_date", "day", "structure", "affected_ml",
                               "contralateral_ml", "difference_ml", "asymmetry_pct",
                               "change_from_baseline_pct"]
#: issue 13: the uncertainty columns, after the contract's and the QC codes
UNCERTAINTY_COLUMNS = ["affected_ml_ci95", "contralateral_ml_ci95", "difference_ml_ci95",
                       "asymmetry_pct_ci95", "change_from_baseline_pct_ci95",
                       "asymmetry_change_pp", "asymmetry_change_pp_ci95", "change_beyond_mdc95",
                       "session"]
#: issue 18: the session that gave the contralateral value, after every earlier column
REFERENCE_COLUMNS = ["contralateral_session"]
CONTRA_SOFT_ML = 1000.0


def visit(day: int, asym_pct: float = 0.0, lesion: float = 0.0, edema: float = 0.0,
          contra_soft: float = CONTRA_SOFT_ML) -> Visit:
    """A visit whose soft-tissue asymmetry is `asym_pct` against a fixed contralateral side.

    The affected soft tissue is contra_soft * (1 + asym_pct / 100); `asym_pct` should be a
    round number of percent so that the volume is a round number of mL (as in volumes.tsv).
    """
    soft = round(contra_soft * (1.0 + asym_pct / 100.0), 3)
    bone = 200.0
    affected = {"limb": soft + bone + lesion, "soft_tissue": soft, "bone": bone + lesion,
                "marrow_lesion": lesion, "edema": edema}
    contra: dict[str, float | None] = {"limb": contra_soft + bone, "soft_tissue": contra_soft,
                                       "bone": bone, "marrow_lesion": 0.0, "edema": 0.0}
    date = (dt.date.fromisoformat(DAY0) + dt.timedelta(days=day)).isoformat()
    return Visit(date, day, affected, contra)


# ------------------------------------------------------------------ definitions


def test_asymmetry_pct_formula():
    v = Visit("2024-03-01", 0, {"soft_tissue": 1100.0, "limb": 900.0},
              {"soft_tissue": 1000.0, "limb": 1000.0})
    assert v.asymmetry_pct() == 100.0 * (1100.0 / 1000.0 - 1.0)
    assert v.asymmetry_pct() == pytest.approx(10.0)
    assert v.asymmetry_pct("limb") == pytest.approx(-10.0)


def test_asymmetry_pct_not_available():
    v = Visit("2024-03-01", 0, {"soft_tissue": 10.0, "edema": 5.0, "bone": 1.0},
              {"soft_tissue": 0.0, "edema": None})
    assert v.asymmetry_pct() is None  # contralateral 0
    assert v.asymmetry_pct("edema") is None  # contralateral n/a
    assert v.asymmetry_pct("bone") is None  # contralateral missing


@pytest.mark.parametrize(("days", "expected"), [
    ([-10, -2, 3, 14], 1),  # last on or before day 0
    ([0, 5], 0),  # day 0 itself counts as "on or before"
    ([-3, 0, 7], 1),
    ([3, 14], 0),  # none before: the first
    ([-5], 0),
])
def test_baseline_index(days, expected):
    assert baseline_index([visit(d) for d in days]) == expected


def test_visits_from_rows_groups_sorts_and_reads_na():
    rows = []
    for date, day, aff, contra in (("2024-03-15", "14", "7.5", "n/a"),
                                   ("2024-02-28", "-2", "5", "0")):
        for role, value in (("affected", aff), ("contralateral", contra)):
            rows.append({"study_date": date, "day": day, "role": role,
                         "structure": "marrow_lesion", "volume_ml": value})
    rows.append({"study_date": "2024-02-28", "day": "-2", "role": "affected",
                 "structure": "edema", "volume_ml": "n/a"})
    visits = visits_from_rows(rows)
    assert [v.study_date for v in visits] == ["2024-02-28", "2024-03-15"]
    assert [v.day for v in visits] == [-2, 14]
    assert visits[0].affected_ml == {"marrow_lesion": 5.0, "edema": None}  # never 0
    assert visits[0].contralateral_ml == {"marrow_lesion": 0.0}
    assert visits[1].contralateral_ml == {"marrow_lesion": None}


# ------------------------------------------------------------------ longitudinal_rows


def test_longitudinal_rows_values_and_change_from_baseline():
    visits = [visit(-10, asym_pct=50.0, lesion=1.0), visit(-2, asym_pct=10.0, lesion=4.0),
              visit(7, asym_pct=25.0, lesion=5.0, edema=30.0)]
    rows = longitudinal_rows("P1", visits)
    assert len(rows) == 3 * 5
    assert all(list(r) == [*DESIGN_LONGITUDINAL_COLUMNS, "qc", *UNCERTAINTY_COLUMNS,
                                                          *REFERENCE_COLUMNS] for r in rows)
    assert [r["structure"] for r in rows[:5]] == STRUCTURES
    soft = {r["day"]: r for r in rows if r["structure"] == "soft_tissue"}
    assert soft[7]["affected_ml"] == 1250.0
    assert soft[7]["contralateral_ml"] == 1000.0
    assert soft[7]["difference_ml"] == 250.0
    assert soft[7]["asymmetry_pct"] == 25.0
    # baseline is day -2 (1100 mL): 1250 / 1100 - 1
    assert soft[7]["change_from_baseline_pct"] == round(100 * (1250 / 1100 - 1), 2) == 13.64
    assert soft[-2]["change_from_baseline_pct"] == 0.0
    assert soft[-10]["change_from_baseline_pct"] == round(100 * (1500 / 1100 - 1), 2)
    lesion = {r["day"]: r for r in rows if r["structure"] == "marrow_lesion"}
    assert lesion[7]["change_from_baseline_pct"] == 25.0  # 5 vs 4 mL


def test_longitudinal_rows_na_where_contralateral_is_zero_or_missing():
    rows = longitudinal_rows("P1", [visit(-1), visit(5, lesion=2.0, edema=12.0)])
    lesion = [r for r in rows if r["structure"] == "marrow_lesion"]
    # contralateral 0 mL: asymmetry n/a, difference still defined
    assert [r["asymmetry_pct"] for r in lesion] == [None, None]
    assert lesion[1]["difference_ml"] == 2.0
    # baseline lesion 0 mL: change from baseline n/a
    assert lesion[1]["change_from_baseline_pct"] is None
    v = Visit("2024-03-01", 0, dict.fromkeys(STRUCTURES, 1.0),
              {"limb": None, "soft_tissue": 1.0})
    rows = longitudinal_rows("P1", [v])
    limb = rows[0]
    assert limb["contralateral_ml"] is None and limb["difference_ml"] is None
    assert limb["asymmetry_pct"] is None
    assert rows[2]["contralateral_ml"] is None  # bone not listed at all


# ------------------------------------------------------------------ classification


def test_indeterminate_with_one_session():
    p = classify([visit(-1, asym_pct=10)])
    assert p.classification == "indeterminate"
    assert "1 session(s)" in p.reasons[0]
    assert classify([]).classification == "indeterminate"


def test_indeterminate_when_nothing_after_baseline():
    p = classify([visit(-10), visit(-1, asym_pct=30)])
    assert p.classification == "indeterminate"
    assert "day -1" in p.reasons[0]


def test_pseudo_progression_case_report():
    # swollen before day 0, more swollen with CRS, back to baseline by day 14
    visits = [visit(-2, asym_pct=10.0, edema=20.0), visit(3, asym_pct=22.0, edema=45.0),
              visit(14, asym_pct=9.0, edema=18.0)]
    p = classify(visits)
    assert p.classification == "pseudo-progression"
    assert [f["day"] for f in p.flares] == [3]
    text = " ".join(p.reasons)
    assert "Baseline: 2024-02-28 (day -2)" in text
    assert "+22.0 % vs +10.0 % at baseline (+12.0 pp" in text
    assert "edema 45.0 mL vs 20.0 mL at baseline (x2.25, +25.0 mL" in text
    assert "Resolved by day 14" in text


def test_progression_when_last_session_still_flares():
    visits = [visit(-1, lesion=5.0), visit(7, lesion=5.5), visit(30, lesion=8.0)]
    p = classify(visits)
    assert p.classification == "progression"
    assert [f["day"] for f in p.flares] == [30]
    assert "marrow lesion 8.0 mL vs 5.0 mL at baseline (x1.60, +3.0 mL" in " ".join(p.reasons)
    assert "flares against baseline, UNCONFIRMED" in p.reasons[-1]
    assert p.confirmation == "unconfirmed"


def test_progression_even_after_an_earlier_flare():
    visits = [visit(-1, asym_pct=5), visit(3, asym_pct=15), visit(14, asym_pct=12)]
    assert classify(visits).classification == "progression"


def test_response_via_lesion():
    visits = [visit(-1, lesion=10.0), visit(30, lesion=7.0)]  # exactly x0.7
    p = classify(visits)
    assert p.classification == "response"
    assert "marrow lesion 7.0 mL at day 30 vs 10.0 mL" in p.reasons[-1]
    assert "x0.70" in p.reasons[-1]


def test_response_via_asymmetry():
    visits = [visit(-1, asym_pct=20.0), visit(30, asym_pct=15.0)]  # -5.0 pp
    p = classify(visits)
    assert p.classification == "response"
    assert "day 30: soft-tissue asymmetry +15.0 % vs +20.0 % at baseline (-5.0 pp;" in p.reasons[-1]


def test_stable_nothing_changes():
    p = classify([visit(-1, asym_pct=3, lesion=2.0, edema=5.0),
                  visit(30, asym_pct=4, lesion=2.0, edema=5.0)])
    assert p.classification == "stable"
    assert p.flares == []
    assert "No flare and no response criterion" in p.reasons[-1]


def test_stable_when_flare_not_resolved_and_last_not_flaring():
    # flare at day 3 (+10 pp); at day 14 +3 pp over baseline: no flare, not resolved (> 2 pp)
    visits = [visit(-1), visit(3, asym_pct=10), visit(14, asym_pct=3)]
    p = classify(visits)
    assert p.classification == "stable"
    assert [f["day"] for f in p.flares] == [3]
    assert "Not resolved at day 14" in p.reasons[-1]


def test_sessions_before_baseline_are_ignored():
    # a huge lesion on day -30 does not make the pattern a response
    visits = [visit(-30, lesion=40.0), visit(-1, lesion=5.0), visit(20, lesion=5.0)]
    assert classify(visits).classification == "stable"


def test_baseline_first_session_when_none_before_day0():
    visits = [visit(2, lesion=10.0), visit(20, lesion=3.0)]
    p = classify(visits)
    assert p.classification == "response"
    assert "day 2" in p.reasons[0]


# ------------------------------------------------------------------ threshold edges


@pytest.mark.parametrize(("base_pct", "later_pct", "flare"), [
    (0.0, 4.9, False),
    (0.0, 5.0, True),
    (10.0, 14.9, False),
    (10.0, 15.0, True),  # 4.99999999999998 pp in floating point: still a flare
    (-3.0, 2.0, True),
    (20.0, 24.9, False),
])
def test_flare_asymmetry_edge(base_pct, later_pct, flare):
    p = classify([visit(-1, asym_pct=base_pct), visit(5, asym_pct=later_pct)])
    assert p.classification == ("progression" if flare else "stable")


@pytest.mark.parametrize(("base_ml", "later_ml", "flare"), [
    (2.5, 3.0, False),  # x1.2 but only +0.5 mL
    (5.0, 6.0, True),  # x1.2 and +1.0 mL
    (5.0, 5.99, False),
    (10.3, 12.36, True),  # x1.2 exactly, but 1.2 * 10.3 is 12.360000000000001
    (10.0, 11.9, False),  # +1.9 mL but x1.19
    (0.0, 1.0, True),  # none at baseline, +1 mL
    (0.0, 0.999, False),
])
def test_flare_lesion_edge(base_ml, later_ml, flare):
    p = classify([visit(-1, lesion=base_ml), visit(5, lesion=later_ml)])
    assert (p.classification == "progression") is flare
    if flare and base_ml == 0:
        assert ("marrow lesion 1.0 mL vs 0.0 mL at baseline (none at baseline; "
                "threshold +1 mL") in p.reasons[1]


@pytest.mark.parametrize(("base_ml", "later_ml", "flare"), [
    (50.0, 60.0, True),  # x1.2 and +10 mL
    (50.0, 59.9, False),
    (20.0, 29.9, False),  # x1.5 but +9.9 mL
    (10.0, 20.0, True),
    (100.0, 115.0, False),  # +15 mL but x1.15
    (0.0, 10.0, True),
    (6.4, 16.4, True),  # +10 mL exactly, but 16.4 - 6.4 is 9.999999999999998
])
def test_flare_edema_edge(base_ml, later_ml, flare):
    p = classify([visit(-1, edema=base_ml), visit(5, edema=later_ml)])
    assert (p.classification == "progression") is flare


@pytest.mark.parametrize(("last_pct", "resolved"), [
    (12.0, True),  # +2.0 pp over baseline: within 2 pp
    (12.1, False),
    (4.0, True),  # below baseline
])
def test_resolved_asymmetry_edge(last_pct, resolved):
    visits = [visit(-1, asym_pct=10.0), visit(3, asym_pct=20.0), visit(14, asym_pct=last_pct)]
    expected = "pseudo-progression" if resolved else "stable"
    assert classify(visits).classification == expected


@pytest.mark.parametrize(("lesion", "edema", "resolved"), [
    (4.0, 30.0, True),  # exactly at baseline
    (3.0, 10.0, True),  # below
    (4.1, 30.0, False),  # lesion above baseline (not a flare)
    (4.0, 30.5, False),  # edema above baseline (not a flare)
])
def test_resolved_requires_lesion_and_edema_at_or_below_baseline(lesion, edema, resolved):
    visits = [visit(-1, lesion=4.0, edema=30.0), visit(3, asym_pct=10.0, lesion=4.0, edema=30.0),
              visit(14, lesion=lesion, edema=edema)]
    expected = "pseudo-progression" if resolved else "stable"
    assert classify(visits).classification == expected


@pytest.mark.parametrize(("base_ml", "last_ml", "response"), [
    (10.0, 7.0, True),
    (10.0, 7.01, False),
    (3.0, 2.1, True),  # 0.7 * 3.0 is 2.0999999999999996
    (1.0, 0.7, True),  # baseline lesion of exactly 1 mL counts
    (0.9, 0.0, False),  # baseline lesion below 1 mL does not
])
def test_response_lesion_edge(base_ml, last_ml, response):
    p = classify([visit(-1, lesion=base_ml), visit(30, lesion=last_ml)])
    assert p.classification == ("response" if response else "stable")


@pytest.mark.parametrize(("last_pct", "response"), [(15.0, True), (15.1, False), (0.0, True)])
def test_response_asymmetry_edge(last_pct, response):
    p = classify([visit(-1, asym_pct=20.0), visit(30, asym_pct=last_pct)])
    assert p.classification == ("response" if response else "stable")


def test_response_needs_no_flare_at_all():
    # lesion halved at the end, but an asymmetry flare on day 3 that resolved
    visits = [visit(-1, lesion=10.0), visit(3, asym_pct=8.0, lesion=10.0),
              visit(30, lesion=5.0)]
    assert classify(visits).classification == "pseudo-progression"


def test_custom_thresholds():
    visits = [visit(-1), visit(5, asym_pct=6.0)]
    assert classify(visits).classification == "progression"
    strict = Thresholds.default(flare_asymmetry_pp=10.0)
    p = classify(visits, strict)
    assert p.classification == "stable"
    visits = [visit(-1, lesion=4.0), visit(5, lesion=4.5)]
    assert classify(visits).classification == "stable"
    loose = Thresholds.default(flare_lesion_ratio=1.1, flare_lesion_min_ml=0.5)
    p = classify(visits, loose)
    assert p.classification == "progression"
    assert "thresholds x1.1 and +0.5 mL" in p.reasons[1]
    resp = Thresholds.default(response_lesion_ratio=0.9)
    assert classify([visit(-1, lesion=4.0), visit(30, lesion=3.5)], resp).classification == (
        "response")


# ------------------------------------------------------------------ events


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def test_read_events_day_and_date_columns(tmp_path):
    f = write(tmp_path / "events.tsv",
              "day\tdate\tlabel\tcategory\n"
              "6\t\ttocilizumab\tdrug\n"
              "\t2024-03-04\tfever, CRS\tCRS grade\n"
              "0\tn/a\tCAR-T infusion\tinfusion\n"
              "-3\t\tbiopsy\tsurgery\n"
              "7\t\t methylprednisolone \t\n")
    events = read_events(f, DAY0)
    assert events == [
        {"day": -3, "date": "2024-02-27", "label": "biopsy", "category": "other"},
        {"day": 0, "date": "2024-03-01", "label": "CAR-T infusion", "category": "infusion"},
        {"day": 3, "date": "2024-03-04", "label": "fever, CRS", "category": "CRS grade"},
        {"day": 6, "date": "2024-03-07", "label": "tocilizumab", "category": "drug"},
        {"day": 7, "date": "2024-03-08", "label": "methylprednisolone", "category": "other"},
    ]


def test_read_events_day_only_file(tmp_path):
    f = write(tmp_path / "e.tsv", "day\tlabel\n14\tMRI\n")
    assert read_events(f, DAY0) == [{"day": 14, "date": "2024-03-15", "label": "MRI",
                                     "category": "other"}]


def test_read_events_none():
    assert read_events(None, DAY0) == []
    assert read_events("", DAY0) == []


@pytest.mark.parametrize("bad_row", ["three\t\tx\tdrug", "\t2024-13-01\tx\tdrug",
                                     "\t\tx\tdrug", "2.5\t\tx\tdrug"])
def test_read_events_bad_row_names_file_and_line(tmp_path, bad_row):
    f = write(tmp_path / "events.tsv",
              f"day\tdate\tlabel\tcategory\n0\t\tinfusion\tinfusion\n{bad_row}\n")
    with pytest.raises(ValueError, match=r"events\.tsv, line 3: needs a 'day'"):
        read_events(f, DAY0)


def test_read_events_without_day_or_date_column(tmp_path):
    f = write(tmp_path / "ev.tsv", "when\tlabel\n3\tfever\n")
    with pytest.raises(ValueError, match=r"ev\.tsv, line 2"):
        read_events(f, DAY0)


# ------------------------------------------------------------------ checksums


def test_input_checksums(tmp_path):
    root = tmp_path / "study"
    (root / "a").mkdir(parents=True)
    files = {}
    for rel, data in (("a/1.dcm", b"one"), ("a/2.dcm", b"two"), ("b.dcm", b"")):
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)
        files[rel] = p
    outside = tmp_path / "elsewhere.dcm"
    outside.write_bytes(b"x" * 3000)
    index = {"input_dir": str(root), "sessions": [
        {"anatomical": {"files": [str(files["a/2.dcm"]), str(files["a/1.dcm"])]},
         "fluid": {"files": [str(files["b.dcm"]), str(outside)]}}]}
    out = input_checksums(index)
    assert out["n_files"] == 4
    assert [f["path"] for f in out["files"]] == ["a/1.dcm", "a/2.dcm", "b.dcm",
                                                 "elsewhere.dcm"]
    by_path = {f["path"]: f["sha256"] for f in out["files"]}
    assert by_path["a/1.dcm"] == hashlib.sha256(b"one").hexdigest()
    assert by_path["b.dcm"] == hashlib.sha256(b"").hexdigest()
    assert by_path["elsewhere.dcm"] == hashlib.sha256(b"x" * 3000).hexdigest()
    listing = "".join(f["path"] + f["sha256"] for f in out["files"])
    assert out["sha256_of_list"] == hashlib.sha256(listing.encode()).hexdigest()
    files["a/1.dcm"].write_bytes(b"changed")
    assert input_checksums(index)["sha256_of_list"] != out["sha256_of_list"]
    assert input_checksums({"sessions": []})["n_files"] == 0


# ------------------------------------------------------------------ main


def _volume_rows(visits: list[Visit]) -> list[dict[str, object]]:
    rows: list[dict[str, object]] = []
    for v in visits:
        for role, vols in (("affected", v.affected_ml), ("contralateral", v.contralateral_ml)):
            side = "left" if role == "affected" else "right"
            for s in STRUCTURES:
                rows.append({"subject": "P1", "study_date": v.study_date, "day": v.day,
                             "side": side, "role": role, "structure": s,
                             "volume_ml": vols[s]})
    return rows


def test_main_end_to_end(tmp_path, capsys):
    subject_dir = tmp_path / "P1"
    study = tmp_path / "study"
    study.mkdir()
    visits = [visit(-2, asym_pct=10.0, edema=20.0), visit(3, asym_pct=22.0, edema=45.0),
              visit(14, asym_pct=9.0, edema=18.0)]
    volumes = subject_dir / "volumes.tsv"
    write_tsv_atomic(volumes, _volume_rows(visits),
                     ["subject", "study_date", "day", "side", "role", "structure", "volume_ml"])
    sessions, qc_paths = [], []
    for i, v in enumerate(visits):
        label = v.study_date.replace("-", "")
        t1, fl = study / f"t1_{i}.dcm", study / f"stir_{i}.dcm"
        t1.write_bytes(b"T1 %d" % i)
        fl.write_bytes(b"STIR %d" % i)
        sessions.append({"session": label, "study_date": v.study_date,
                         "anatomical": {"description": "T1 TSE", "series_number": 3,
                                        "files": [str(t1)]},
                         "fluid": {"description": "STIR", "series_number": 4,
                                   "files": [str(fl)]}})
        ses_dir = subject_dir / f"ses-{label}"
        ses_dir.mkdir(parents=True)
        qc = ses_dir / f"sub-P1_ses-{label}_dseg.json"
        qc.write_text(json.dumps({"warnings": ["thin bone"] if i == 1 else []}))
        qc_paths.append(str(qc))
    sessions_json = subject_dir / "sessions.json"
    sessions_json.write_text(json.dumps({"input_dir": str(study), "sessions": sessions,
                                         "refused_studies": []}))
    side_json = subject_dir / "side.json"
    side_json.write_text(json.dumps({
        "affected_side": "left", "affected_side_source": "configuration",
        "sessions": [{"session": s["session"], "study_date": s["study_date"], "day": v.day,
                      "z_range_mm": [0.0, 100.0], "n_slices": 20}
                     for s, v in zip(sessions, visits, strict=True)]}))
    events = write(tmp_path / "events.tsv", "day\tlabel\tcategory\n0\tCAR-T\tinfusion\n"
                   "3\ttocilizumab\tdrug\n")
    out_tsv, out_summary = subject_dir / "longitudinal.tsv", subject_dir / "summary.json"
    rc = main(["--subject", "P1", "--day0", DAY0, "--subject-dir", str(subject_dir),
               "--volumes", str(volumes), "--side-json", str(side_json),
               "--sessions-json", str(sessions_json), "--qc", *qc_paths,
               "--events", str(events),
               "--thresholds-json", json.dumps({"flare_asymmetry_pp": 5.0}),
               "--settings-json", json.dumps({"segment": {"n4_shrink": 4}}),
               "--out-tsv", str(out_tsv), "--out-summary", str(out_summary)])
    assert rc == 0
    assert "P1: pseudo-progression" in capsys.readouterr().out

    with open(out_tsv, newline="") as fh:
        reader = csv.reader(fh, delimiter="\t")
        header = next(reader)
        rows = [dict(zip(header, r, strict=True)) for r in reader]
    assert header == [*DESIGN_LONGITUDINAL_COLUMNS, "qc", *UNCERTAINTY_COLUMNS, *REFERENCE_COLUMNS]
    assert len(rows) == 3 * 5
    soft = [r for r in rows if r["structure"] == "soft_tissue"]
    assert [r["asymmetry_pct"] for r in soft] == ["10", "22", "9"]
    assert [r["change_from_baseline_pct"] for r in soft] == ["0", str(round(
        100 * (1220 / 1100 - 1), 2)), str(round(100 * (1090 / 1100 - 1), 2))]
    edema = [r for r in rows if r["structure"] == "edema"]
    assert [r["asymmetry_pct"] for r in edema] == ["n/a"] * 3  # contralateral 0 mL

    summary = json.loads(out_summary.read_text())
    for key in ("subject", "affected_side", "baseline_study_date", "classification", "reasons",
                "warnings", "software", "inputs"):
        assert key in summary
    assert summary["subject"] == "P1"
    assert summary["affected_side"] == "left"
    assert summary["baseline_study_date"] == "2024-02-28"
    assert summary["classification"] == "pseudo-progression"
    assert any("+12.0 pp" in r for r in summary["reasons"])
    assert summary["warnings"] == ["session 20240304: thin bone"]
    assert summary["software"]["limbtrack"] == __version__
    assert summary["inputs"]["n_files"] == 6
    assert {f["path"] for f in summary["inputs"]["files"]} == {
        f"{k}_{i}.dcm" for k in ("t1", "stir") for i in range(3)}
    assert [e["label"] for e in summary["events"]] == ["CAR-T", "tocilizumab"]
    assert summary["thresholds"]["flare_asymmetry_pp"] == 5.0
    assert summary["settings"] == {"segment": {"n4_shrink": 4}}
    assert [s["session"] for s in summary["sessions"]] == ["20240228", "20240304", "20240315"]
    assert summary["sessions"][0]["files"]["dseg"] == (
        "ses-20240228/sub-P1_ses-20240228_dseg.nii.gz")
    assert summary["sessions"][0]["anatomical_series"] == "T1 TSE (series 3)"


def test_one_limb_only_uses_the_affected_limbs_change_from_baseline():
    """Unilateral study: asymmetry is not available; swelling is judged from the affected
    soft tissue's change from baseline, and the reasons say so."""

    def v(date, day, soft, lesion, edema):
        return Visit(date, day, {"limb": soft + 50, "soft_tissue": soft, "bone": 50,
                                 "marrow_lesion": lesion, "edema": edema},
                     {s: None for s in ("limb", "soft_tissue", "bone", "marrow_lesion",
                                        "edema")})

    visits = [v("2024-01-01", -1, 1000, 5, 50), v("2024-01-10", 8, 1080, 5, 50),
              v("2024-02-01", 30, 1005, 4, 40)]
    p = classify(visits)
    assert p.classification == "pseudo-progression"
    assert "one limb only" in " ".join(p.reasons)
    assert "+8.0 pp" in " ".join(p.reasons)
    rows = longitudinal_rows("s", visits)
    assert all(r["asymmetry_pct"] is None for r in rows)


def test_two_sessions_on_one_date_stay_apart():
    """Issue 17: two studies on one day are two sessions (keyed by date and time), never one."""
    rows = [{"study_date": "2024-03-05", "day": "4", "role": role, "structure": s,
             "volume_ml": str(ml), "qc": "", "volume_ml_ci95": "n/a", "session": session}
            for session, ml in (("20240305T081500", 10.0), ("20240305T170000", 30.0))
            for role in ("affected", "contralateral") for s in STRUCTURES]
    visits = visits_from_rows(rows)
    assert [v.session for v in visits] == ["20240305T081500", "20240305T170000"]
    assert [v.affected_ml["edema"] for v in visits] == [10.0, 30.0]
    out = longitudinal_rows("P1", visits)
    assert {r["session"] for r in out} == {"20240305T081500", "20240305T170000"}
    states, _ = session_states(visits)
    assert [s.session for s in states] == ["20240305T081500", "20240305T170000"]
