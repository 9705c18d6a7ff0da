"""Issue 18 point 2: a session that images the affected limb alone takes the contralateral
reference from the nearest session that images it (pipeline.longitudinal.carry_contralateral).
"""

from __future__ import annotations

import datetime as dt
import math

import pytest

from pipeline import qc as qc_mod
from pipeline.longitudinal import (
    CARRIED_SD_FACTOR,
    LONGITUDINAL_COLUMNS,
    Thresholds,
    Visit,
    carry_contralateral,
    classify,
    longitudinal_rows,
    reference_reasons,
)

DAY0 = "2024-03-01"
CONTRA = {"limb": 1200.0, "soft_tissue": 1000.0, "bone": 200.0, "marrow_lesion": 0.0,
          "edema": 0.0}
SD = {s: 10.0 for s in CONTRA}
MAX_AGE = Thresholds.default().contralateral_max_age_days


def visit(day: int, asym_pct: float = 0.0, lesion: float = 0.0, edema: float = 0.0,
          both: bool = True, contra_soft: float = 1000.0) -> Visit:
    """A visit with soft-tissue asymmetry `asym_pct` against a contralateral soft tissue of
    `contra_soft` mL; ``both=False``: the affected limb alone (contralateral not measured,
    ``limb_not_in_view``, as volumes.tsv has it for a limb not in the image)."""
    soft = round(1000.0 * (1.0 + asym_pct / 100.0), 3)
    affected = {"limb": soft + 200.0 + lesion, "soft_tissue": soft, "bone": 200.0 + lesion,
                "marrow_lesion": lesion, "edema": edema}
    contra: dict[str, float | None] = (
        {**CONTRA, "soft_tissue": contra_soft, "limb": contra_soft + 200.0} if both
        else dict.fromkeys(CONTRA))
    date = (dt.date.fromisoformat(DAY0) + dt.timedelta(days=day)).isoformat()
    codes = [] if both else [qc_mod.LIMB_NOT_IN_VIEW]
    return Visit(date, day, affected, contra, affected_sd_ml=dict(SD),
                 contralateral_sd_ml=dict(SD), session=date.replace("-", ""),
                 qc=list(codes), contralateral_qc=list(codes))


def test_nearest_session_gives_the_reference_and_its_sd_grows():
    visits = [visit(-2, 5.0), visit(6, 20.0, both=False), visit(40, 0.0, contra_soft=1100.0)]
    out, flags = carry_contralateral(visits, MAX_AGE, "right")
    assert out[1].contralateral_from == "20240228"
    assert out[1].contralateral_ml["soft_tissue"] == 1000.0
    assert out[1].asymmetry_pct() == pytest.approx(20.0)
    assert out[1].contralateral_sd_ml["soft_tissue"] == pytest.approx(10.0 * math.sqrt(2.0))
    assert CARRIED_SD_FACTOR >= 1.0
    # the carried reference is never more certain than a measured one
    assert out[1].asymmetry_sd_pp() > visit(6, 20.0).asymmetry_sd_pp()
    assert [(f.session, f.side, f.code, f.severity) for f in flags] == [
        ("20240307", "right", qc_mod.CONTRALATERAL_FROM_OTHER_SESSION, "warn")]
    assert qc_mod.CONTRALATERAL_FROM_OTHER_SESSION in out[1].qc
    # the sessions imaging both limbs are as they were
    assert out[0] == visits[0] and out[2] == visits[2]
    assert not out[1].contralateral_in_view


def test_tie_goes_to_the_earlier_session():
    visits = [visit(-10, contra_soft=900.0), visit(0, both=False), visit(10, contra_soft=1100.0)]
    out, _ = carry_contralateral(visits, MAX_AGE, "right")
    assert out[1].contralateral_from == "20240220"
    assert out[1].contralateral_ml["soft_tissue"] == 900.0


def test_carried_backwards_to_a_baseline_of_the_affected_limb_alone():
    visits = [visit(-2, 5.0, both=False), visit(12, 5.0)]
    out, _ = carry_contralateral(visits, MAX_AGE, "left")
    assert out[0].contralateral_from == "20240313"
    assert out[0].asymmetry_pct() == pytest.approx(5.0)


def test_too_old_reference_is_not_used():
    visits = [visit(-120, 5.0), visit(-2, 5.0, both=False), visit(6, 30.0, both=False)]
    out, flags = carry_contralateral(visits, 90, "right")
    assert [f.code for f in flags] == [qc_mod.CONTRALATERAL_TOO_OLD] * 2
    assert all(f.severity == "warn" for f in flags)
    for v in out[1:]:
        assert v.asymmetry_pct() is None and v.contralateral_session is None
    assert "118 days away" in flags[0].message and "more than 90 days" in flags[0].message
    rows = longitudinal_rows("P", out)
    soft = [r for r in rows if r["structure"] == "soft_tissue"]
    assert [r["contralateral_ml"] for r in soft] == [1000.0, None, None]
    assert [r["asymmetry_pct"] for r in soft] == [5.0, None, None]
    # both compared sessions lack a usable contralateral: swelling is judged with one limb
    pattern = classify(out)
    assert pattern.classification == "progression"
    assert "one limb only" in " ".join(pattern.flares[0]["criteria"])


def test_exactly_at_the_maximum_age_is_used():
    visits = [visit(0), visit(90, both=False)]
    out, flags = carry_contralateral(visits, 90, "right")
    assert out[1].contralateral_from == "20240301"
    assert flags[0].code == qc_mod.CONTRALATERAL_FROM_OTHER_SESSION


def test_no_contralateral_image_at_all_keeps_single_limb_behaviour():
    visits = [visit(-2, both=False), visit(6, 10.0, both=False)]
    out, flags = carry_contralateral(visits, MAX_AGE, "right")
    assert out == visits and flags == []
    rows = longitudinal_rows("P", out)
    assert {r["contralateral_session"] for r in rows} == {None}
    assert classify(out) == classify(visits)


def test_contralateral_in_view_but_excluded_by_qc_is_not_replaced():
    v = visit(6, both=True)
    v.contralateral_ml = dict.fromkeys(CONTRA)
    v.qc = ["registration_failed"]
    out, flags = carry_contralateral([visit(-2), v], MAX_AGE, "right")
    assert out[1] is v and flags == []


def test_column_names_the_session_that_gave_the_value():
    assert LONGITUDINAL_COLUMNS[-1] == "contralateral_session"
    out, _ = carry_contralateral([visit(-2), visit(6, 10.0, both=False)], MAX_AGE, "right")
    rows = longitudinal_rows("P", out)
    assert list(rows[0]) == list(LONGITUDINAL_COLUMNS)
    assert {r["contralateral_session"] for r in rows if r["day"] == -2} == {"20240228"}
    assert {r["contralateral_session"] for r in rows if r["day"] == 6} == {"20240228"}
    soft = next(r for r in rows if r["day"] == 6 and r["structure"] == "soft_tissue")
    assert soft["contralateral_ml_ci95"] == pytest.approx(1.96 * 10.0 * math.sqrt(2.0), abs=0.01)


def test_flare_and_resolution_against_a_carried_reference():
    visits = [visit(-2, 5.0, lesion=3.0, edema=50.0),
              visit(6, 25.0, lesion=4.5, edema=150.0, both=False),
              visit(20, 5.0, lesion=2.5, edema=20.0, both=False)]
    out, flags = carry_contralateral(visits, MAX_AGE, "right")
    pattern = classify(out)
    assert pattern.classification == "pseudo-progression"
    assert "soft-tissue asymmetry +25.0 % vs +5.0 % at baseline" in " ".join(
        pattern.flares[0]["criteria"])
    reasons = reference_reasons(out, flags)
    assert reasons[0].startswith("Session 20240307 (day 6): contralateral from session "
                                 "20240228 (day -2), 8 days away")


def test_report_table_names_where_the_contralateral_came_from():
    from pipeline.report.tables import carries_reference, longitudinal_table

    out, _ = carry_contralateral([visit(-2), visit(6, 10.0, both=False),
                                  visit(200, both=False)], MAX_AGE, "right")
    rows = [{k: "n/a" if v is None else str(v) for k, v in r.items()}
            for r in longitudinal_rows("P", out)]
    table = longitudinal_table(rows, "2024-02-28")
    soft = {t["day"]: t for t in table if t["structure"] == "Soft tissue"} or {
        t["day"]: t for t in table if "soft" in t["structure"].lower()}
    assert soft["-2"]["contralateral_from"] == "this session"
    assert soft["6"]["contralateral_from"] == "session 20240228 (day -2)"
    assert soft["200"]["contralateral_from"] == "none"
    assert qc_mod.CONTRALATERAL_TOO_OLD in soft["200"]["contralateral_ml"].reason
    assert carries_reference(table)
    # a subject imaging both limbs at every session: the table keeps its columns
    both = [{k: "n/a" if v is None else str(v) for k, v in r.items()}
            for r in longitudinal_rows("P", [visit(-2), visit(6)])]
    assert not carries_reference(longitudinal_table(both, "2024-02-28"))


def test_phantom_session_of_the_affected_limb_alone():
    from pipeline.validation.phantom import PhantomSpec, SessionSpec, is_legacy, session_sides

    spec = PhantomSpec(sessions=(SessionSpec(day=0), SessionSpec(day=7, affected_only=True)))
    assert session_sides(spec, spec.sessions[0]) == ("right", "left")
    assert session_sides(spec, spec.sessions[1]) == ("left",)
    assert not is_legacy(spec) and is_legacy(PhantomSpec())
