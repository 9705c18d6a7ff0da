"""Issue 13: every number with its uncertainty, flares beyond the MDC95, confirmed in time.

The propagation formulas are checked against Monte Carlo draws; the pattern logic on visits
whose volumes carry a known standard deviation.
"""

from __future__ import annotations

import datetime as dt

import numpy as np
import pytest

from pipeline import uncertainty as unc
from pipeline.longitudinal import (
    STATES,
    Thresholds,
    Visit,
    classify,
    longitudinal_rows,
    session_states,
    timing,
    visits_from_rows,
)

DAY0 = "2024-03-01"
CONTRA_SOFT_ML = 1000.0


def visit(day: int, asym_pct: float = 0.0, lesion: float = 0.0, edema: float = 0.0,
          soft_sd_ml: float = 5.0, lesion_sd_ml: float = 0.3, edema_sd_ml: float = 2.0,
          qc: list[str] | None = None) -> Visit:
    """A visit with the given asymmetry, lesion and edema, each volume with its sd."""
    soft = round(CONTRA_SOFT_ML * (1.0 + asym_pct / 100.0), 3)
    affected = {"limb": soft + 200.0 + lesion, "soft_tissue": soft, "bone": 200.0 + lesion,
                "marrow_lesion": lesion, "edema": edema}
    contra: dict[str, float | None] = {"limb": CONTRA_SOFT_ML + 200.0,
                                       "soft_tissue": CONTRA_SOFT_ML, "bone": 200.0,
                                       "marrow_lesion": 0.0, "edema": 0.0}
    sd = {"limb": soft_sd_ml, "soft_tissue": soft_sd_ml, "bone": 1.0,
          "marrow_lesion": lesion_sd_ml, "edema": edema_sd_ml}
    date = (dt.date.fromisoformat(DAY0) + dt.timedelta(days=day)).isoformat()
    return Visit(date, day, affected, contra, qc or [], dict(sd), dict(sd))


# ------------------------------------------------------------------ propagation


def test_ratio_sd_matches_monte_carlo() -> None:
    rng = np.random.default_rng(3)
    num, sd_num, den, sd_den = 1080.0, 12.0, 1000.0, 9.0
    draws = 100 * (rng.normal(num, sd_num, 200_000) / rng.normal(den, sd_den, 200_000) - 1)
    assert unc.ratio_pct_sd(num, sd_num, den, sd_den) == pytest.approx(draws.std(), rel=0.02)


def test_difference_sd_and_mdc() -> None:
    assert unc.difference_sd(3.0, 4.0) == pytest.approx(5.0)
    assert unc.difference_sd(3.0, None) is None
    assert unc.mdc95(5.0) == pytest.approx(1.959964 * 5.0)
    assert unc.repeatability_coefficient(1.0) == pytest.approx(2.7718, abs=1e-4)
    assert unc.beyond(10.0, 9.0) and not unc.beyond(-8.0, 9.0) and not unc.beyond(5.0, None)


def test_model_sd_grows_with_slice_thickness_and_volume() -> None:
    model = unc.StructureModel((1e-4, 0.5, 0.5, 0.5, 0.01))
    thin = model.sd_ml(unc.Drivers(500.0, 1.0, 3.0))
    thick = model.sd_ml(unc.Drivers(500.0, 1.0, 7.0))
    large = model.sd_ml(unc.Drivers(2000.0, 1.0, 3.0))
    assert thin < thick and thin < large
    assert model.sd_ml(unc.Drivers(0.0, 1.0, 3.0)) == pytest.approx(0.1)  # the floor


def test_fit_recovers_the_model_it_was_drawn_from() -> None:
    rng = np.random.default_rng(11)
    truth = unc.StructureModel((4e-5, 0.8, 0.3, 1.5, 0.04))
    pairs = []
    for _ in range(3000):
        volume_ml = float(np.exp(rng.uniform(np.log(5.0), np.log(3000.0))))
        d1 = unc.Drivers(volume_ml, rng.uniform(0.7, 2.2), rng.uniform(2, 8),
                         rng.uniform(0, 2))
        d2 = unc.Drivers(d1.volume_ml, rng.uniform(0.7, 2.2), rng.uniform(2, 8),
                         rng.uniform(0, 2))
        diff = rng.normal(0, np.hypot(truth.sd_ml(d1), truth.sd_ml(d2)))
        pairs.append(unc.Pair("limb", d1, unc.Drivers(d1.volume_ml + diff, d2.pixel_mm,
                                                         d2.slice_mm, d2.misregistration_mm)))
    fitted = unc.fit(pairs).structures["limb"]
    probe = [unc.Drivers(v, p, s, m) for v in (20, 400, 2500) for p in (0.8, 2.0)
             for s in (3, 7) for m in (0, 1.5)]
    for d in probe:
        assert fitted.sd_ml(d) == pytest.approx(truth.sd_ml(d), rel=0.2), d


def test_model_round_trips_and_names_a_bad_file(tmp_path) -> None:
    model = unc.RepeatabilityModel({"limb": unc.StructureModel((1.0, 2.0, 3.0, 4.0, 5.0), 7)},
                                   {"cases": ["a"]})
    again = unc.RepeatabilityModel.from_json(model.to_json())
    assert again.structures["limb"] == model.structures["limb"]
    bad = tmp_path / "model.json"
    bad.write_text("{}")
    with pytest.raises(ValueError, match="model.json"):
        unc.RepeatabilityModel.load(bad)


def test_packaged_model_is_measured() -> None:
    model = unc.RepeatabilityModel.load()
    assert not model.source.get("bootstrap"), "the packaged model must come from the study"
    for structure in ("limb", "soft_tissue", "bone", "marrow_lesion", "edema"):
        assert structure in model.structures
        sd = model.sd_ml(structure, unc.Drivers(100.0, 1.0, 5.0))
        assert sd is not None and 0 < sd < 100.0


# ------------------------------------------------------------------ flares beyond error


def test_flare_needs_change_beyond_its_mdc() -> None:
    # +6 pp asymmetry, above the 5 pp threshold; soft-tissue sd 40 mL -> MDC95 of the
    # asymmetry change ~ 1.96 * sqrt(2) * sqrt(2) * 4 pp ~ 15.7 pp: within measurement error
    noisy = [visit(-1, 0.0, soft_sd_ml=40.0), visit(30, 6.0, soft_sd_ml=40.0)]
    p = classify(noisy)
    assert p.flares == [] and p.classification == "stable"
    assert any("within measurement error" in r for r in p.reasons)
    assert p.confirmation == "not applicable"
    precise = [visit(-1, 0.0, soft_sd_ml=2.0), visit(30, 6.0, soft_sd_ml=2.0)]
    assert classify(precise).classification == "progression"


def test_lesion_growth_inside_its_mdc_is_no_flare() -> None:
    visits = [visit(-1, lesion=4.0, lesion_sd_ml=1.0), visit(5, lesion=5.5, lesion_sd_ml=1.0)]
    assert classify(visits).flares == []  # +1.5 mL, MDC95 = 2.8 mL
    visits = [visit(-1, lesion=4.0, lesion_sd_ml=0.2), visit(5, lesion=5.5, lesion_sd_ml=0.2)]
    assert len(classify(visits).flares) == 1


# ------------------------------------------------------------------ confirmation


def test_flare_seen_once_then_gone_is_unconfirmed_then_resolved() -> None:
    visits = [visit(-2), visit(3, asym_pct=12.0, edema=40.0), visit(30)]
    p = classify(visits)
    assert p.classification == "pseudo-progression"
    assert p.confirmation == "unconfirmed"
    assert [s.state for s in p.states] == ["baseline", "unconfirmed flare", "resolved"]


def test_flare_confirmed_twice_then_resolved() -> None:
    visits = [visit(-2), visit(3, asym_pct=12.0), visit(7, asym_pct=14.0),
              visit(10, asym_pct=11.0), visit(30)]
    p = classify(visits)
    assert [s.state for s in p.states] == ["baseline", "unconfirmed flare", "confirmed flare",
                                           "confirmed flare", "resolved"]
    assert p.confirmation == "confirmed" and p.classification == "pseudo-progression"


def test_confirmation_needs_the_minimum_interval() -> None:
    visits = [visit(-2), visit(3, asym_pct=12.0), visit(5, asym_pct=12.0)]
    states, confirmation = session_states(
        visits, Thresholds.default(confirmation_min_interval_days=4))
    assert [s.state for s in states][1:] == ["unconfirmed flare", "unconfirmed flare"]
    assert confirmation == "unconfirmed"
    p = classify(visits, Thresholds.default(confirmation_min_interval_days=4))
    assert p.classification == "progression"
    assert "UNCONFIRMED" in p.reasons[-1] and "iUPD" in p.reasons[-1]
    states, confirmation = session_states(
        visits, Thresholds.default(confirmation_min_interval_days=2))
    assert confirmation == "confirmed" and states[-1].state == "confirmed flare"


def test_last_session_confirms_progression() -> None:
    visits = [visit(-2), visit(7, lesion=3.0), visit(30, lesion=6.0)]
    p = classify(visits)
    assert p.classification == "progression" and p.confirmation == "confirmed"
    assert "progression confirmed" in p.reasons[-1]


def test_flare_no_longer_met_but_not_resolved_ends_the_episode() -> None:
    visits = [visit(-2), visit(3, asym_pct=12.0), visit(10, asym_pct=4.0),
              visit(20, asym_pct=12.0)]
    states, confirmation = session_states(visits)
    assert [s.state for s in states] == ["baseline", "unconfirmed flare", "no change",
                                         "unconfirmed flare"]
    assert "not back within the resolution criteria" in states[2].note
    assert confirmation == "unconfirmed"


def test_excluded_session_is_not_assessable() -> None:
    gone = visit(5, asym_pct=12.0, qc=["registration_failed"])
    for s in ("limb", "soft_tissue", "bone", "marrow_lesion", "edema"):
        gone.affected_ml[s] = None
    states, _ = session_states([visit(-2), gone, visit(20)])
    assert [s.state for s in states] == ["baseline", "not assessable", "no change"]
    assert "registration_failed" in states[1].note
    assert set(s.state for s in states) <= set(STATES)


def test_resolution_and_response_respect_measurement_error() -> None:
    # the lesion 0.3 mL above baseline at the end, inside its MDC95 (~1.1 mL): resolved
    visits = [visit(-2, lesion=4.0, lesion_sd_ml=0.4), visit(3, asym_pct=12.0, lesion=4.0),
              visit(30, lesion=4.3, lesion_sd_ml=0.4)]
    assert classify(visits).classification == "pseudo-progression"
    # lesion x0.65 but the drop (1.4 mL) is inside its MDC95 (2.8 mL): not a response
    visits = [visit(-2, lesion=4.0, lesion_sd_ml=1.0), visit(30, lesion=2.6, lesion_sd_ml=1.0)]
    p = classify(visits)
    assert p.classification == "stable"
    assert any("within measurement error" in r for r in p.reasons)


# ------------------------------------------------------------------ tables and timing


def test_longitudinal_rows_carry_intervals() -> None:
    visits = [visit(-2, 0.0, soft_sd_ml=5.0), visit(7, 10.0, soft_sd_ml=5.0)]
    rows = {(r["day"], r["structure"]): r for r in longitudinal_rows("P", visits)}
    base, later = rows[(-2, "soft_tissue")], rows[(7, "soft_tissue")]
    assert base["affected_ml_ci95"] == pytest.approx(1.96 * 5.0, abs=0.01)
    assert base["change_from_baseline_pct_ci95"] is None  # the baseline has no change
    assert base["asymmetry_change_pp"] is None
    want = unc.ci95(unc.ratio_pct_sd(1100.0, 5.0, 1000.0, 5.0))
    assert later["change_from_baseline_pct_ci95"] == pytest.approx(want, abs=0.01)
    assert later["asymmetry_change_pp"] == pytest.approx(10.0)
    assert later["change_beyond_mdc95"] == "yes"
    assert later["difference_ml_ci95"] == pytest.approx(1.96 * np.hypot(5.0, 5.0), abs=0.01)


def test_visits_read_the_intervals_from_volumes_rows() -> None:
    rows = [{"study_date": "2024-03-05", "day": "4", "role": role, "structure": "edema",
             "volume_ml": "12.5", "qc": "", "volume_ml_ci95": ci}
            for role, ci in (("affected", "3.92"), ("contralateral", "n/a"))]
    v = visits_from_rows(rows)[0]
    assert v.affected_sd_ml["edema"] == pytest.approx(2.0, abs=1e-3)
    assert v.contralateral_sd_ml["edema"] is None


def test_timing_places_sessions_against_day0_and_events() -> None:
    events = [{"day": 0, "label": "CAR-T infusion", "category": "infusion"},
              {"day": 2, "label": "CRS grade 2", "category": "CRS grade"}]
    assert timing(-3, events).startswith("day -3: before the infusion; 3 days before CAR-T")
    assert timing(3, events) == ("day 3: within the CRS window (days 1-14); "
                                 "1 day after CRS grade 2 (day 2)")
    assert timing(30, []).startswith("day 30: after the CRS window")
