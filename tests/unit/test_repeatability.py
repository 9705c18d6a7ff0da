"""The scan-rescan repeatability study (pipeline/validation/repeatability.py) and its
shipped model."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest

from pipeline import uncertainty as unc
from pipeline.io.files import write_tsv_atomic
from pipeline.labels import STRUCTURES
from pipeline.measure import VOLUME_COLUMNS
from pipeline.validation import repeatability as rp

ROOT = Path(__file__).resolve().parents[2]

VOLUMES: dict[tuple[str, str], dict[str, float | None]] = {  # None is n/a
    ("2024-03-01", "left"): dict(limb=600.0, soft_tissue=570.0, bone=30.0, marrow_lesion=4.0,
                                 edema=50.0),
    ("2024-03-01", "right"): dict(limb=590.0, soft_tissue=561.0, bone=29.0, marrow_lesion=0.0,
                                  edema=0.0),
    ("2024-03-03", "left"): dict(limb=603.0, soft_tissue=572.5, bone=30.5, marrow_lesion=4.2,
                                 edema=48.0),
    ("2024-03-03", "right"): dict(limb=589.0, soft_tissue=560.0, bone=29.0, marrow_lesion=0.0,
                                  edema=0.0),
    ("2024-03-08", "left"): dict(limb=598.0, soft_tissue=568.0, bone=30.0, marrow_lesion=None,
                                 edema=None),
    ("2024-03-08", "right"): dict(limb=591.0, soft_tissue=562.0, bone=29.0, marrow_lesion=0.0,
                                  edema=0.0),
}
SESSIONS = [
    {"session": "20240301", "study_date": "2024-03-01", "day": 0, "pixel_mm": 1.6,
     "slice_mm": 5.0, "misregistration_mm": 0.0},
    {"session": "20240303", "study_date": "2024-03-03", "day": 2, "pixel_mm": 1.6,
     "slice_mm": 5.0, "misregistration_mm": 0.4},
    {"session": "20240308", "study_date": "2024-03-08", "day": 7, "pixel_mm": 1.2,
     "slice_mm": 4.0, "misregistration_mm": 1.1},
]


def _results(tmp_path: Path) -> Path:
    subject = tmp_path / "results" / "s1"
    subject.mkdir(parents=True)
    rows = []
    for (date, side), vols in VOLUMES.items():
        for structure in STRUCTURES:
            v = vols[structure]
            rows.append({"subject": "s1", "study_date": date, "day": 0, "side": side,
                         "role": "affected" if side == "left" else "contralateral",
                         "structure": structure, "volume_ml": v,
                         "qc": "" if v is not None else "fluid_not_fat_suppressed",
                         "volume_ml_ci95": None})
    write_tsv_atomic(subject / "volumes.tsv", rows, VOLUME_COLUMNS)
    # sessions listed out of date order: the baseline is named, not the first entry
    (subject / "side.json").write_text(json.dumps({
        "affected_side": "left", "baseline_session": "20240301",
        "sessions": [SESSIONS[2], SESSIONS[0], SESSIONS[1]]}), encoding="utf-8")
    return subject


def test_pairs_from_a_results_folder(tmp_path: Path) -> None:
    recs = rp.pairs_from_results(_results(tmp_path), "c1", "phantom", "thigh")
    # 2 follow-ups x 2 sides x 5 structures, less the two n/a values of the last session
    assert len(recs) == 18
    assert {r.session1 for r in recs} == {"20240301"}
    assert {r.session2 for r in recs} == {"20240303", "20240308"}
    by = {(r.session2, r.side, r.structure): r for r in recs}
    assert ("20240308", "left", "marrow_lesion") not in by
    assert ("20240308", "left", "edema") not in by
    r = by[("20240308", "left", "limb")]
    assert (r.case, r.source, r.region, r.role) == ("c1", "phantom", "thigh", "affected")
    assert r.first == unc.Drivers(600.0, 1.6, 5.0, 0.0)
    assert r.second == unc.Drivers(598.0, 1.2, 4.0, 1.1)
    assert r.difference_ml == pytest.approx(-2.0)
    assert by[("20240303", "right", "bone")].role == "contralateral"
    assert by[("20240303", "left", "marrow_lesion")].pair.difference_ml == pytest.approx(0.2)
    # the pair table round-trips
    rp.write_pairs(tmp_path / "pairs.tsv", recs)
    assert rp.read_pairs(tmp_path / "pairs.tsv") == recs


TRUE = unc.StructureModel((2e-5, 0.1, 0.01, 0.1, 0.04))


def _synthetic(n: int, seed: int, n_cases: int = 10) -> list[rp.PairRecord]:
    """Pairs drawn from TRUE: volumes 1-3000 mL, pixel 0.8-2.2 mm, slice 3-10 mm."""
    rng = np.random.default_rng(seed)
    out = []
    for k in range(n):
        v = float(np.exp(rng.uniform(0.0, math.log(3000.0))))
        px = float(rng.uniform(0.8, 2.2))
        sl = float(rng.choice([3.0, 4.0, 5.0, 6.0, 7.0, 10.0]))
        mis = float(rng.uniform(0.0, 3.0))
        first, second = unc.Drivers(v, px, sl, 0.0), unc.Drivers(v, px, sl, mis)
        v1 = v + float(rng.normal(0.0, TRUE.sd_ml(first)))
        v2 = v + float(rng.normal(0.0, TRUE.sd_ml(second)))
        out.append(rp.PairRecord(f"case{k % n_cases}", "phantom", "thigh", "left", "affected",
                                 "limb", "20240101", f"2024{k:04d}",
                                 unc.Drivers(v1, px, sl, 0.0), unc.Drivers(v2, px, sl, mis)))
    return out


def test_fit_recovers_known_coefficients() -> None:
    recs = _synthetic(8000, seed=3)
    model = unc.fit([r.pair for r in recs])
    got = model.structures["limb"]
    assert got.n_pairs == 8000
    for c, t, term in zip(got.coefficients, TRUE.coefficients, unc.TERMS, strict=True):
        assert c == pytest.approx(t, rel=0.35), term
    for d in (unc.Drivers(2.0, 1.0, 3.0), unc.Drivers(50.0, 1.6, 5.0, 1.0),
              unc.Drivers(1500.0, 2.0, 7.0, 2.0)):
        assert got.sd_ml(d) == pytest.approx(TRUE.sd_ml(d), rel=0.1)


def test_calibration_of_the_true_model_is_five_percent() -> None:
    recs = _synthetic(3000, seed=5)
    true_model = unc.RepeatabilityModel({"limb": TRUE})
    (row,) = rp.calibration_rows(recs, rp.model_sd(true_model))
    assert row["n_pairs"] == 3000
    assert 3.5 <= row["false_change_pct"] <= 6.5
    assert row["mean_z2"] == pytest.approx(1.0, abs=0.1)
    (loco,) = rp.calibration_rows(recs, rp.leave_one_case_out(recs))
    assert 3.5 <= loco["false_change_pct"] <= 7.0
    # repeatability table: wSD and RC from the differences
    (rc,) = rp.repeatability_rows(recs, true_model)
    wsd = math.sqrt(sum(r.difference_ml ** 2 for r in recs) / (2 * len(recs)))
    assert rc["wsd_ml"] == pytest.approx(wsd)
    assert rc["rc_ml"] == pytest.approx(1.959964 * math.sqrt(2) * wsd)
    assert rc["rc_pct"] == pytest.approx(100 * rc["rc_ml"] / rc["mean_ml"])


def _session(case: str, vols: dict[tuple[str, str], tuple[float, float]]
             ) -> list[rp.PairRecord]:
    return [rp.PairRecord(case, "phantom", "thigh", "left" if role == "affected" else "right",
                          role, structure, "20240101", "20240102",
                          unc.Drivers(v1, 1.6, 5.0), unc.Drivers(v2, 1.6, 5.0, 0.5))
            for (role, structure), (v1, v2) in vols.items()]


def test_false_flares_and_asymmetry_change() -> None:
    model = unc.RepeatabilityModel({s: unc.StructureModel((1e-6, 0.0, 0.0, 0.0, 0.01))
                                    for s in STRUCTURES})
    steady = _session("steady", {("affected", "soft_tissue"): (500.0, 501.0),
                                 ("contralateral", "soft_tissue"): (500.0, 500.0),
                                 ("affected", "marrow_lesion"): (3.0, 3.1),
                                 ("affected", "edema"): (40.0, 41.0)})
    lesion = _session("lesion", {("affected", "soft_tissue"): (500.0, 500.0),
                                 ("contralateral", "soft_tissue"): (500.0, 500.0),
                                 ("affected", "marrow_lesion"): (3.0, 4.5),
                                 ("affected", "edema"): (40.0, 40.0)})
    swollen = _session("swollen", {("affected", "soft_tissue"): (500.0, 530.0),
                                   ("contralateral", "soft_tissue"): (500.0, 500.0)})
    rows = {r["case"]: r for r in rp.session_rows(steady + lesion + swollen,
                                                   rp.model_sd(model))}
    assert rows["steady"]["flares"] == ""
    assert rows["steady"]["asymmetry_change_pp"] == pytest.approx(0.2)
    assert rows["steady"]["asymmetry_beyond"] is False  # MDC95 0.4 pp
    assert "marrow lesion" in rows["lesion"]["flares"]
    assert rows["swollen"]["asymmetry_change_pp"] == pytest.approx(6.0)
    assert "asymmetry" in rows["swollen"]["flares"]
    summary = rp.asymmetry_calibration(list(rows.values()))
    assert summary["false_flares"] == 2 and summary["n_sessions"] == 3


def test_case_definitions_span_the_study_design() -> None:
    cases = rp.PHANTOM_CASES
    assert len(cases) >= 8
    assert {c.region for c in cases} == {"thigh", "calf", "knee"}
    assert min(c.pixel_mm for c in cases) <= 1.0 and max(c.pixel_mm for c in cases) >= 2.2
    assert min(c.slice_mm for c in cases) <= 3.0 and max(c.slice_mm for c in cases) >= 7.0
    for c in cases:
        assert 4 <= len(c.shifts_mm) <= 5 and c.shifts_mm[0] == 0.0
        assert c.matrix[0] <= 160 and c.matrix[1] <= 120 and c.n_slices <= 30
        # other slice positions: no shift is a whole number of slices
        assert all(abs(s / c.slice_mm - round(s / c.slice_mm)) > 0.05
                   for s in c.shifts_mm[1:]), c.name
        spec = c.spec()
        assert len({(s.lesion_ml, s.edema, s.swelling) for s in spec.sessions}) == 1
    assert any(c.lesion_ml == 0 for c in cases) and any(c.lesion_ml >= 2 for c in cases)
    names = {c.name for c in rp.all_cases()}
    assert set(rp.QUICK) <= names
    real = {c.name for c in rp.usable_real_cases()}
    assert real and not real & {"thigh_same", "calf_same", "thigh_outofphase"}


def test_shipped_model() -> None:
    data = json.loads(unc.DEFAULT_MODEL.read_text(encoding="utf-8"))
    model = unc.RepeatabilityModel.load()
    assert set(STRUCTURES) <= set(model.structures)
    for s in ("limb", "soft_tissue", "bone"):
        assert model.structures[s].n_pairs >= 30, s
        assert (model.sd_ml(s, unc.Drivers(500.0, 1.6, 5.0, 0.5)) or 0.0) > 0.0
    source = data["source"]
    assert not source.get("bootstrap")
    cases = source["cases"]
    assert len(cases) >= 8
    assert {c["source"] for c in cases} >= {"phantom"}
    assert all(c["case"] and c["region"] and "geometry" in c for c in cases)
    assert sum(c["n_pairs"] for c in cases) == sum(source["n_pairs"].values())
    assert source["git_revision"] and source["date"] and source["command"]


@pytest.mark.slow
def test_tiny_phantom_through_the_workflow(tmp_path: Path) -> None:
    case = rp.PhantomCase("tiny", "thigh", 2.2, 5.0, 16, (96, 72), (0.0, 3.7, -6.1),
                          lesion_ml=3.0, edema=0.3, leg_radius_mm=38.0, bone_radius_mm=8.0,
                          gap_mm=10.0, seed=5, supersample=(2, 3))
    res = rp.run_case(case, tmp_path, ROOT, sys.executable, reuse=False)
    assert not res.error, res.error
    assert not res.excluded
    recs = res.records
    assert {r.session2 for r in recs} == {"20240302", "20240303"}
    assert {r.session1 for r in recs} == {"20240301"}
    assert len(recs) == 2 * 2 * len(STRUCTURES) - res.missing
    assert len(recs) >= 16
    for r in recs:
        assert r.first.slice_mm == pytest.approx(5.0)
        assert r.second.slice_mm == pytest.approx(5.0)
        assert r.first.pixel_mm == pytest.approx(2.2)
        assert r.first.misregistration_mm == 0.0
        assert 0.0 <= r.second.misregistration_mm < 3.0
    limb = [r for r in recs if r.structure == "limb"]
    assert limb and all(abs(r.difference_ml) < 0.03 * r.first.volume_ml for r in limb)
    # the collected pairs are kept: a second call reads them instead of running again
    again = rp.run_case(case, tmp_path, ROOT, sys.executable, reuse=True)
    assert again.records == recs
