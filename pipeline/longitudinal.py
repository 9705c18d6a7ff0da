"""Longitudinal analysis: asymmetry, change from baseline, response pattern, clinical events.

Definitions (docs/design.md):

* ``asymmetry_pct = 100 * (affected / contralateral - 1)``; not available when the
  contralateral volume is 0 or the limb is missing;
* ``change_from_baseline_pct = 100 * (affected / affected_at_baseline - 1)``;
* baseline = the last session on or before day 0, else the first session;
* a session imaging the affected limb alone takes its contralateral values from the nearest
  session that images that limb (:func:`carry_contralateral`);
* the response pattern follows the rules of :func:`classify` with thresholds from the config.
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import json
import math
import platform
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from importlib import metadata
from pathlib import Path
from typing import Any, ClassVar

from pipeline import __version__
from pipeline import qc as qc_mod
from pipeline import uncertainty as unc
from pipeline.baseline import baseline_position
from pipeline.io.files import (
    finite_float,
    read_tsv,
    sha256_file,
    write_json_atomic,
    write_tsv_atomic,
)
from pipeline.labels import STRUCTURES, other_side
from pipeline.names import session_of
from pipeline.settings import ConfigSection

LONGITUDINAL_COLUMNS = (
    "subject",
    "study_date",
    "day",
    "structure",
    "affected_ml",
    "contralateral_ml",
    "difference_ml",
    "asymmetry_pct",
    "change_from_baseline_pct",
    "qc",
    "affected_ml_ci95",
    "contralateral_ml_ci95",
    "difference_ml_ci95",
    "asymmetry_pct_ci95",
    "change_from_baseline_pct_ci95",
    "asymmetry_change_pp",
    "asymmetry_change_pp_ci95",
    "change_beyond_mdc95",
    "session",
    "contralateral_session",
)
CLASSES = ("pseudo-progression", "progression", "response", "stable", "indeterminate")
#: Per-session states of the flare timeline (docs/design.md "Confirmation").
STATES = ("baseline", "no change", "unconfirmed flare", "confirmed flare", "resolved",
          "not assessable")
CONFIRMATION = ("confirmed", "unconfirmed", "not applicable")
EVENT_CATEGORIES = ("infusion", "CRS grade", "drug", "other")


@dataclass(frozen=True)
class Thresholds(ConfigSection):
    """Response-pattern thresholds of the config section ``response:`` (pp = percentage
    points). Defaults: config/config.yaml, the one place they are written (:meth:`default`
    reads them); meanings and units: config/schema.yaml."""

    SECTION: ClassVar[str] = "response"

    flare_asymmetry_pp: float
    flare_lesion_ratio: float
    flare_lesion_min_ml: float
    flare_edema_ratio: float
    flare_edema_min_ml: float
    resolved_asymmetry_pp: float
    response_lesion_min_ml: float
    response_lesion_ratio: float
    response_asymmetry_pp: float
    confirmation_min_interval_days: int
    crs_window_days: int
    contralateral_max_age_days: int


@dataclass
class Visit:
    """One session's affected / contralateral volumes (mL) per structure.

    None is *not available* (a QC flag excluded it, see ``qc``); a structure absent from
    ``contralateral_ml`` has no contralateral limb in view.
    """

    study_date: str
    day: int
    affected_ml: dict[str, float | None]
    contralateral_ml: dict[str, float | None]
    qc: list[str] = field(default_factory=list)
    #: standard deviation (mL) of each volume from the repeatability model; absent: unknown
    affected_sd_ml: dict[str, float | None] = field(default_factory=dict)
    contralateral_sd_ml: dict[str, float | None] = field(default_factory=dict)
    #: the session label (date, or date and time when one day holds several studies)
    session: str = ""
    #: key of the session whose contralateral values this one uses because it images the
    #: affected limb alone (:func:`carry_contralateral`); "" when they are its own
    contralateral_from: str = ""
    #: QC codes of the contralateral side's rows (volumes.tsv)
    contralateral_qc: list[str] = field(default_factory=list)

    @property
    def key(self) -> str:
        """What identifies the visit: its session label, else its date."""
        return self.session or self.study_date

    def asymmetry_pct(self, structure: str = "soft_tissue") -> float | None:
        contra = self.contralateral_ml.get(structure)
        aff = self.affected_ml.get(structure)
        if not contra or aff is None:
            return None
        return 100.0 * (aff / contra - 1.0)

    def asymmetry_sd_pp(self, structure: str = "soft_tissue") -> float | None:
        """sd (pp) of :meth:`asymmetry_pct`; None when a volume's uncertainty is unknown."""
        if self.asymmetry_pct(structure) is None:
            return None
        return unc.ratio_pct_sd(self.affected_ml.get(structure),
                                self.affected_sd_ml.get(structure),
                                self.contralateral_ml.get(structure),
                                self.contralateral_sd_ml.get(structure))

    def has(self, structure: str) -> bool:
        """True when the affected limb's `structure` was measured."""
        return self.affected_ml.get(structure) is not None

    @property
    def contralateral_in_view(self) -> bool:
        """This session imaged a contralateral limb (measured, or not available by a QC flag);
        a reference carried from another session is not in view."""
        if self.contralateral_from:
            return False
        contra = self.contralateral_ml.get("limb", 0.0)
        if qc_mod.LIMB_NOT_IN_VIEW in self.contralateral_qc:
            return False
        return (contra is None and bool(self.qc)) or (contra is not None and contra > 0)

    @property
    def contralateral_session(self) -> str | None:
        """The session that gave the contralateral values: another one (carried), this one
        (imaged), None (no contralateral value)."""
        if self.contralateral_from:
            return self.contralateral_from
        return self.key if self.contralateral_in_view else None

    @property
    def excluded(self) -> bool:
        """Nothing of the affected limb was measured (every structure not available)."""
        return not any(self.has(s) for s in STRUCTURES)


@dataclass
class Pattern:
    """The response pattern with its reasons in words and numbers."""

    classification: str
    reasons: list[str] = field(default_factory=list)
    flares: list[dict[str, Any]] = field(default_factory=list)
    states: list[SessionState] = field(default_factory=list)
    confirmation: str = "not applicable"


def visits_from_rows(rows: Sequence[Mapping[str, str]]) -> list[Visit]:
    """Visits (sorted by date) from volumes.tsv rows."""
    by_date: dict[str, Visit] = {}
    for r in rows:
        key = r.get("session") or r["study_date"]
        if key not in by_date:
            by_date[key] = Visit(r["study_date"], int(r["day"]), {}, {},
                                 session=r.get("session") or "")
        v = by_date[key]
        value = finite_float(r["volume_ml"])
        sd = unc.sd_from_ci95(finite_float(r.get("volume_ml_ci95")))
        if r["role"] == "affected":
            v.affected_ml[r["structure"]] = value
            v.affected_sd_ml[r["structure"]] = sd
        else:
            v.contralateral_ml[r["structure"]] = value
            v.contralateral_sd_ml[r["structure"]] = sd
            v.contralateral_qc = sorted({*v.contralateral_qc, *(
                c.strip() for c in (r.get("qc") or "").split(",") if c.strip())})
        for code in (r.get("qc") or "").split(","):
            if code.strip() and code.strip() != "n/a" and code.strip() not in v.qc:
                v.qc.append(code.strip())
    return sorted(by_date.values(), key=lambda v: (v.study_date, v.session))


#: A carried contralateral value's sd is its own measurement's sd and the scan-rescan sd that a
#: measurement in the receiving session would have had (taken equal), in quadrature: never
#: smaller than a measured one's.
CARRIED_SD_FACTOR = math.sqrt(2.0)


def _imaged_contralateral(v: Visit) -> bool:
    """`v` measured a contralateral limb of its own (a possible reference for other sessions)."""
    limb = v.contralateral_ml.get("limb")
    return not v.contralateral_from and limb is not None and limb > 0


def nearest_reference(v: Visit, references: Sequence[Visit]) -> Visit | None:
    """The session of `references` nearest to `v` in days; on a tie the earlier one."""
    return min(references, key=lambda r: (abs(r.day - v.day), r.day, r.key), default=None)


def _carried(v: Visit, ref: Visit, code: str) -> Visit:
    """`v` with the contralateral values (and sd x :data:`CARRIED_SD_FACTOR`) of `ref`."""
    sd = {s: None if x is None else x * CARRIED_SD_FACTOR
          for s, x in ref.contralateral_sd_ml.items()}
    return replace(v, contralateral_ml=dict(ref.contralateral_ml), contralateral_sd_ml=sd,
                   contralateral_from=ref.key, qc=[*v.qc, code])


def carry_contralateral(visits: Sequence[Visit], max_age_days: int, contralateral_side: str
                        ) -> tuple[list[Visit], list[qc_mod.QCFlag]]:
    """Give each session that images the affected limb alone the contralateral values of the
    nearest session (in days; ties: the earlier) that images that limb.

    The contralateral limb is the patient's own control: its volume over the common extent
    is assumed unchanged between the two sessions. A carried value's sd is multiplied by
    :data:`CARRIED_SD_FACTOR`. A reference more than `max_age_days` away is not used: the
    session keeps no contralateral value (asymmetry not available). Each carried or refused
    reference raises a ``warn`` flag (:mod:`pipeline.qc`) on `contralateral_side`. A subject
    whose sessions never image the contralateral limb is returned as it is (one limb only).
    """
    references = [v for v in visits if _imaged_contralateral(v)]
    out: list[Visit] = []
    flags: list[qc_mod.QCFlag] = []
    for v in visits:
        ref = nearest_reference(v, references)
        if ref is None or v.contralateral_in_view or v.excluded:
            out.append(v)
            continue
        away = abs(ref.day - v.day)
        where = f"session {ref.key} (day {ref.day}), {away} day{'s' if away != 1 else ''} away"
        if away <= max_age_days:
            code, message = qc_mod.CONTRALATERAL_FROM_OTHER_SESSION, (
                f"contralateral from {where}: asymmetry is against it, its uncertainty "
                f"x{CARRIED_SD_FACTOR:.2f} (its volume over the common extent assumed unchanged)")
            out.append(_carried(v, ref, code))
        else:
            code, message = qc_mod.CONTRALATERAL_TOO_OLD, (
                f"no contralateral reference: the nearest session imaging it, {where}, is more "
                f"than {max_age_days} days away; asymmetry not available")
            out.append(replace(v, contralateral_ml={}, contralateral_sd_ml={}, qc=[*v.qc, code]))
        flags.append(qc_mod.QCFlag(v.key, contralateral_side, code, "warn", message))
    return out, flags


def reference_reasons(visits: Sequence[Visit], flags: Sequence[qc_mod.QCFlag]) -> list[str]:
    """One reason per session whose contralateral reference is carried or refused."""
    day_of = {v.key: v.day for v in visits}
    codes = (qc_mod.CONTRALATERAL_FROM_OTHER_SESSION, qc_mod.CONTRALATERAL_TOO_OLD)
    return [f"Session {f.session} (day {day_of.get(f.session)}): {f.message}." for f in flags
            if f.code in codes]


def baseline_index(visits: Sequence[Visit]) -> int:
    """Index of the baseline visit (:func:`pipeline.baseline.baseline_position`)."""
    return baseline_position([v.day for v in visits])


def _pct(new: float | None, old: float | None) -> float | None:
    return None if new is None or not old else 100.0 * (new / old - 1.0)


def longitudinal_rows(subject: str, visits: Sequence[Visit]) -> list[dict[str, Any]]:
    """Rows of longitudinal.tsv: one per visit and structure."""
    base = visits[baseline_index(visits)]
    rows = []
    for v in visits:
        for s in STRUCTURES:
            aff = v.affected_ml.get(s)
            contra = v.contralateral_ml.get(s)
            sd_aff, sd_contra = v.affected_sd_ml.get(s), v.contralateral_sd_ml.get(s)
            change = _pct(aff, base.affected_ml.get(s))
            change_sd = None if change is None or v is base else unc.ratio_pct_sd(
                aff, sd_aff, base.affected_ml.get(s), base.affected_sd_ml.get(s))
            a, a0 = v.asymmetry_pct(s), base.asymmetry_pct(s)
            asym_change = None if a is None or a0 is None else a - a0
            asym_change_sd = None if asym_change is None or v is base else unc.difference_sd(
                v.asymmetry_sd_pp(s), base.asymmetry_sd_pp(s))
            beyond: bool | None = None
            if v is not base and change is not None and change_sd is not None:
                beyond = unc.beyond(change, unc.mdc95(change_sd))
            rows.append(
                dict(
                    subject=subject,
                    study_date=v.study_date,
                    day=v.day,
                    structure=s,
                    affected_ml=_round(aff, 3),
                    contralateral_ml=_round(contra, 3),
                    difference_ml=None if contra is None or aff is None else round(
                        aff - contra, 3),
                    asymmetry_pct=_round(v.asymmetry_pct(s)),
                    change_from_baseline_pct=_round(change),
                    qc=",".join(v.qc),
                    affected_ml_ci95=_round(unc.ci95(sd_aff), 3),
                    contralateral_ml_ci95=_round(unc.ci95(sd_contra), 3),
                    difference_ml_ci95=_round(unc.ci95(unc.difference_sd(sd_aff, sd_contra))
                                              if aff is not None and contra is not None
                                              else None, 3),
                    asymmetry_pct_ci95=_round(unc.ci95(v.asymmetry_sd_pp(s))),
                    change_from_baseline_pct_ci95=_round(unc.ci95(change_sd)),
                    asymmetry_change_pp=None if v is base else _round(asym_change),
                    asymmetry_change_pp_ci95=_round(unc.ci95(asym_change_sd)),
                    change_beyond_mdc95=None if beyond is None else ("yes" if beyond else "no"),
                    session=v.session or None,
                    contralateral_session=v.contralateral_session,
                )
            )
    return rows


def _round(x: float | None, nd: int = 2) -> float | None:
    return None if x is None else round(x, nd)


def _at_least(x: float, threshold: float) -> bool:
    """``x >= threshold`` up to floating-point noise.

    Volumes come rounded to 0.001 mL, so a change of exactly +5.0 pp or exactly x0.7 must meet
    its threshold: 100 * (115/100 - 1) - 100 * (110/100 - 1) is 4.99999999999998 and
    0.7 * 3.0 is 2.0999999999999996 in binary floating point.
    """
    return x >= threshold - 1e-9 * max(1.0, abs(threshold))


def _at_most(x: float, threshold: float) -> bool:
    """``x <= threshold`` up to floating-point noise (see :func:`_at_least`)."""
    return x <= threshold + 1e-9 * max(1.0, abs(threshold))


@dataclass(frozen=True)
class Change:
    """A change since baseline with its MDC95 (None: the measurement error is unknown)."""

    value: float
    mdc95: float | None
    text: str

    @property
    def beyond_error(self) -> bool:
        """Larger than its measurement error (always, when the error is unknown)."""
        return self.mdc95 is None or abs(self.value) > self.mdc95

    def error_text(self, unit: str) -> str:
        return ("measurement error unknown" if self.mdc95 is None
                else f"MDC95 {self.mdc95:.1f} {unit}")


def swelling_change(v: Visit, base: Visit) -> Change | None:
    """Change of swelling since baseline in percentage points, with its MDC95.

    With both limbs: soft-tissue asymmetry now minus at baseline. With one limb only (no
    contralateral control): the affected soft tissue's change from baseline in percent, which
    equals the asymmetry change when the other limb does not change. None when neither can be
    computed (not in view, or not available at either session).
    """
    a, a0 = v.asymmetry_pct(), base.asymmetry_pct()
    if a is not None and a0 is not None:
        sd = unc.difference_sd(v.asymmetry_sd_pp(), base.asymmetry_sd_pp())
        return Change(a - a0, unc.mdc95(sd),
                      f"soft-tissue asymmetry {a:+.1f} % vs {a0:+.1f} % at baseline")
    if v.contralateral_in_view or base.contralateral_in_view:
        return None  # a contralateral limb exists: its absence from one session is a QC gap
    x, x0 = v.affected_ml.get("soft_tissue"), base.affected_ml.get("soft_tissue")
    if x is not None and x0:
        sd = unc.ratio_pct_sd(x, v.affected_sd_ml.get("soft_tissue"), x0,
                              base.affected_sd_ml.get("soft_tissue"))
        return Change(100.0 * (x / x0 - 1.0), unc.mdc95(sd), (
            f"affected soft tissue {x:.0f} mL vs {x0:.0f} mL at baseline (one limb only: "
            "change from baseline in place of asymmetry)"))
    return None


def volume_change(v: Visit, base: Visit, structure: str) -> Change | None:
    """Change of the affected limb's ``structure`` since baseline (mL) with its MDC95."""
    x, x0 = v.affected_ml.get(structure), base.affected_ml.get(structure)
    if x is None or x0 is None:
        return None
    sd = unc.difference_sd(v.affected_sd_ml.get(structure), base.affected_sd_ml.get(structure))
    return Change(x - x0, unc.mdc95(sd),
                  f"{structure.replace('_', ' ')} {x:.1f} mL vs {x0:.1f} mL at baseline")


#: The three kinds of evidence the pattern weighs, and the structure each needs.
CRITERIA = ("swelling", "marrow_lesion", "edema")


def assessable(v: Visit, base: Visit) -> dict[str, bool]:
    """Which criteria can be judged at `v` against `base` (both values available)."""
    return {
        "swelling": swelling_change(v, base) is not None,
        "marrow_lesion": v.has("marrow_lesion") and base.has("marrow_lesion"),
        "edema": v.has("edema") and base.has("edema"),
    }


@dataclass(frozen=True)
class Assessment:
    """One session against baseline: the flare criteria met (beyond threshold and MDC95),
    those beyond threshold but inside the measurement error, and the changes."""

    flares: list[str]
    within_error: list[str]
    changes: dict[str, Change]


def assess(v: Visit, base: Visit, t: Thresholds) -> Assessment:
    """The flare criteria of docs/design.md at `v`: a criterion counts only when its change exceeds
    both its clinical threshold and its MDC95."""
    flares: list[str] = []
    within: list[str] = []
    changes: dict[str, Change] = {}
    change = swelling_change(v, base)
    if change is not None:
        changes["swelling"] = change
        if _at_least(change.value, t.flare_asymmetry_pp):
            text = (f"{change.text} ({change.value:+.1f} pp, threshold "
                    f"+{t.flare_asymmetry_pp:g} pp, {change.error_text('pp')})")
            (flares if change.beyond_error else within).append(text)
    for s, ratio, min_ml in (
        ("marrow_lesion", t.flare_lesion_ratio, t.flare_lesion_min_ml),
        ("edema", t.flare_edema_ratio, t.flare_edema_min_ml),
    ):
        c = volume_change(v, base, s)
        if c is None:
            continue
        changes[s] = c
        x0 = base.affected_ml[s] or 0.0
        x = x0 + c.value
        if _at_least(x, ratio * x0) and _at_least(c.value, min_ml):
            size = (f"x{x / x0:.2f}, +{c.value:.1f} mL; thresholds x{ratio:g} and +{min_ml:g} mL"
                    if x0 > 0 else f"none at baseline; threshold +{min_ml:g} mL")
            text = f"{c.text} ({size}; {c.error_text('mL')})"
            (flares if c.beyond_error else within).append(text)
    return Assessment(flares, within, changes)


def _flare_criteria(v: Visit, base: Visit, t: Thresholds) -> list[str]:
    return assess(v, base, t).flares


def _back(c: Change | None, limit: float) -> bool:
    """At or below ``limit`` (mL or pp) above baseline, or inside the measurement error."""
    return c is None or _at_most(c.value, limit) or not c.beyond_error


def _resolved(v: Visit, base: Visit, t: Thresholds) -> tuple[bool, str]:
    """Whether `v` is back to baseline: asymmetry within the resolution threshold, lesion and
    edema at most their baseline volume, each or inside its measurement error; only call when
    every criterion is assessable."""
    change = swelling_change(v, base)
    les_c, ede_c = volume_change(v, base, "marrow_lesion"), volume_change(v, base, "edema")
    ok = (_back(change, t.resolved_asymmetry_pp) and _back(les_c, 0.0) and _back(ede_c, 0.0))
    les, les0 = v.affected_ml["marrow_lesion"] or 0.0, base.affected_ml["marrow_lesion"] or 0.0
    ede, ede0 = v.affected_ml["edema"] or 0.0, base.affected_ml["edema"] or 0.0
    asym_txt = "swelling not available" if change is None else change.text
    return ok, (
        f"{asym_txt}; lesion {les:.1f} mL (baseline {les0:.1f}); "
        f"edema {ede:.1f} mL (baseline {ede0:.1f})"
    )


def _qc_note(v: Visit) -> str:
    return f" ({', '.join(v.qc)})" if v.qc else ""


@dataclass(frozen=True)
class SessionState:
    """A session's place in the flare timeline (docs/design.md "Confirmation")."""

    study_date: str
    day: int
    state: str
    criteria: list[str] = field(default_factory=list)
    within_measurement_error: list[str] = field(default_factory=list)
    note: str = ""
    session: str = ""

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def session_states(visits: Sequence[Visit], t: Thresholds | None = None
                   ) -> tuple[list[SessionState], str]:
    """Each session's state and the subject's confirmation.

    A flare (a criterion beyond its threshold and MDC95) opens an episode as an *unconfirmed
    flare*; a later session that still flares, at least ``confirmation_min_interval_days``
    after the episode's first flare, is a *confirmed flare* (iRECIST iCPD); a session that no
    longer flares ends the episode: *resolved* when back within the resolution criteria, else
    *no change* with a note. Confirmation: ``confirmed`` when any episode was confirmed,
    ``unconfirmed`` when flares were never confirmed, ``not applicable`` without a flare.
    """
    t = t or Thresholds.default()
    if not visits:
        return [], "not applicable"
    b = baseline_index(visits)
    base = visits[b]
    states: list[SessionState] = []
    for v in visits[:b]:
        states.append(SessionState(v.study_date, v.day, "not assessable",
                                   note="before the baseline session", session=v.session))
    states.append(SessionState(base.study_date, base.day,
                               "not assessable" if base.excluded else "baseline",
                               note=f"did not pass QC{_qc_note(base)}" if base.excluded else "",
                               session=base.session))
    episode_day: int | None = None
    confirmed_any = flared_any = False
    for v in visits[b + 1:]:
        ok = assessable(v, base)
        if base.excluded or v.excluded or not any(ok.values()):
            states.append(SessionState(v.study_date, v.day, "not assessable",
                                       note=f"nothing assessable against baseline{_qc_note(v)}",
                                       session=v.session))
            continue
        a = assess(v, base, t)
        missing = [c.replace("_", " ") for c, good in ok.items() if not good]
        gap = f"not available: {', '.join(missing)}{_qc_note(v)}" if missing else ""
        if a.flares:
            flared_any = True
            if episode_day is None:
                episode_day = v.day
                state, note = "unconfirmed flare", "first flare of the episode"
            elif v.day - episode_day >= t.confirmation_min_interval_days:
                confirmed_any = True
                state, note = "confirmed flare", (
                    f"still flaring {v.day - episode_day} days after the first flare "
                    f"(day {episode_day})")
            else:
                state, note = "unconfirmed flare", (
                    f"{v.day - episode_day} days after the first flare (day {episode_day}): "
                    f"confirmation needs >= {t.confirmation_min_interval_days} days")
        elif episode_day is not None:
            episode_day = None
            resolved = not missing and _resolved(v, base, t)[0]
            state = "resolved" if resolved else "no change"
            note = ("back within the resolution criteria" if resolved else
                    "no flare criterion met any more, not back within the resolution criteria"
                    if not missing else "no flare criterion met; resolution cannot be judged")
        else:
            state, note = "no change", "no flare criterion beyond its threshold and MDC95"
        if gap:
            note = f"{note}; {gap}"
        states.append(SessionState(v.study_date, v.day, state, a.flares, a.within_error, note,
                                   v.session))
    confirmation = ("confirmed" if confirmed_any else "unconfirmed" if flared_any
                    else "not applicable")
    return states, confirmation


def classify(visits: Sequence[Visit], t: Thresholds | None = None) -> Pattern:
    """Response pattern of docs/design.md, on what passed QC, beyond measurement error.

    * ``pseudo-progression``: a flare after baseline, and the last session resolved;
    * ``progression``: the last session still flares against baseline, confirmed by an earlier
      flare of the same episode at least ``confirmation_min_interval_days`` before, or, at the
      last session only, unconfirmed (said in the reasons: iRECIST iUPD);
    * ``response``: no flare, and at the last session a baseline lesion >= 1 mL is down to
      <= 0.7 x baseline, or asymmetry is >= 5 pp below baseline, beyond measurement error;
    * ``stable``: none of these; ``indeterminate``: fewer than two sessions.

    A flare criterion counts only when its change exceeds both its threshold and its MDC95
    (:mod:`pipeline.uncertainty`). Values that a QC flag excluded (None) never enter: a
    session with nothing measured is left out; a criterion is judged only where it is
    available at the session and at the baseline. A label that needs every criterion
    (pseudo-progression, response, stable) is given only when every criterion is assessable
    at the last session; otherwise, and when no session after the baseline is left, the
    pattern is ``indeterminate`` and the reasons say which flags removed what.
    """
    t = t or Thresholds.default()
    states, confirmation = session_states(visits, t)
    if len(visits) < 2:
        return Pattern("indeterminate", [f"{len(visits)} session(s): at least two are needed"],
                       states=states, confirmation=confirmation)
    b = baseline_index(visits)
    base = visits[b]
    if base.excluded:
        return Pattern("indeterminate", [
            f"The baseline session ({base.study_date}, day {base.day}) did not pass QC"
            f"{_qc_note(base)}: nothing to compare with."], states=states,
            confirmation=confirmation)
    reasons: list[str] = []
    later = []
    for v in visits[b + 1:]:
        ok = assessable(v, base)
        if v.excluded or not any(ok.values()):
            reasons.append(f"Session {v.study_date} (day {v.day}) left out of the pattern: "
                           f"nothing assessable against baseline{_qc_note(v)}.")
        else:
            later.append(v)
    if not later:
        return Pattern("indeterminate", [
            *reasons, f"No session after the baseline (day {base.day}) passed QC."],
            states=states, confirmation=confirmation)
    by_key = {s.session or s.study_date: s for s in states}
    flares: list[dict[str, Any]] = []
    for v in later:
        a = assess(v, base, t)
        st = by_key[v.key]
        if a.flares:
            flares.append({"study_date": v.study_date, "day": v.day, "criteria": a.flares,
                           "state": st.state})
        for w in a.within_error:
            reasons.append(f"Day {v.day}: {w}: above the threshold but within measurement "
                           "error, not counted as a flare.")
    last = later[-1]
    last_state = by_key[last.key]
    reasons.insert(0,
        f"Baseline: {base.study_date} (day {base.day}); last session: "
        f"{last.study_date} (day {last.day})."
    )
    for f in flares:
        criteria: list[str] = f["criteria"]
        reasons.append(f"Flare at day {f['day']} ({f['state']}): " + "; ".join(criteria) + ".")
    pattern = _label(later, base, last, last_state, flares, reasons, t)
    return Pattern(pattern.classification, pattern.reasons, flares, states, confirmation)


def describe_rules(t: Thresholds) -> list[str]:
    """The rules of :func:`classify` in words, one sentence each, with the values of `t` as
    :func:`assess`, :func:`session_states`, :func:`_label` and :func:`timing` apply them: the
    report's Methods state them from here, never retyped."""
    days = t.confirmation_min_interval_days
    return [
        "A session flares when a flare criterion is met against the baseline beyond its "
        "measurement error (MDC95): soft-tissue asymmetry up by at least "
        f"{t.flare_asymmetry_pp:g} pp (one limb in view: the affected soft tissue up by at "
        f"least {t.flare_asymmetry_pp:g} %), the marrow lesion at least "
        f"×{t.flare_lesion_ratio:g} its baseline volume and at least "
        f"{t.flare_lesion_min_ml:g} mL larger, or edema at least ×{t.flare_edema_ratio:g} and "
        f"at least {t.flare_edema_min_ml:g} mL larger.",
        "A session that images the affected limb alone takes the contralateral values of the "
        "nearest session (in days; on a tie the earlier) that images that limb, at most "
        f"{t.contralateral_max_age_days} days away, with their standard deviation ×√2; farther, "
        "asymmetry is not available, and the swelling of two sessions neither of which images "
        "the contralateral limb is judged as with one limb in view.",
        "The first flaring session of an episode is an unconfirmed flare; a later session at "
        f"least {days} days after the episode's first flare that still flares is a confirmed "
        "flare; a session with no flare criterion met ends the episode.",
        "A session is back within the resolution criteria when soft-tissue asymmetry is at "
        f"most {t.resolved_asymmetry_pp:g} pp above baseline and marrow lesion and edema are at "
        "most their baseline volume, each or within its measurement error.",
        "Pseudo-progression: a flare after the baseline, and the last session back within the "
        "resolution criteria.",
        "Progression: the last session still flares; confirmed when a flare of the same "
        f"episode lies at least {days} days before it, else UNCONFIRMED (iRECIST iUPD).",
        "Response: no flare at any session, and at the last session a marrow lesion of at "
        f"least {t.response_lesion_min_ml:g} mL at baseline down to at most "
        f"×{t.response_lesion_ratio:g} its baseline volume, or soft-tissue asymmetry at least "
        f"{t.response_asymmetry_pp:g} pp below baseline, beyond measurement error.",
        "Stable: none of these (a flare that is over without being back within the resolution "
        "criteria included).",
        "Indeterminate: fewer than two sessions, a baseline or no later session that passed "
        "QC, or a criterion that cannot be judged at the last session.",
        f"Sessions on days 1–{t.crs_window_days} after the infusion lie in the CRS window.",
    ]


def _label(later: Sequence[Visit], base: Visit, last: Visit, last_state: SessionState,
           flares: list[dict[str, Any]], reasons: list[str], t: Thresholds) -> Pattern:
    """The label from the assessed sessions (see :func:`classify`)."""
    if last_state.state == "confirmed flare":
        reasons.append(f"The last session (day {last.day}) still flares against baseline: "
                       f"{last_state.note}; progression confirmed.")
        return Pattern("progression", reasons)
    if last_state.state == "unconfirmed flare":
        reasons.append(
            f"The last session (day {last.day}) flares against baseline, UNCONFIRMED "
            f"({last_state.note}): a first apparent progression (iRECIST iUPD, LYRIC "
            f"indeterminate response) that a later scan at least "
            f"{t.confirmation_min_interval_days} days after it must confirm.")
        return Pattern("progression", reasons)
    missing = [c for c, ok in assessable(last, base).items() if not ok]
    if missing:
        names = ", ".join(c.replace("_", " ") for c in missing)
        reasons.append(
            f"At the last session (day {last.day}) {names} cannot be judged against "
            f"baseline (not available{_qc_note(last) or _qc_note(base)}): resolution, "
            "response or stability cannot be stated.")
        return Pattern("indeterminate", reasons)
    resolved, resolved_txt = _resolved(last, base, t)
    if flares and resolved:
        reasons.append(f"Resolved by day {last.day}: {resolved_txt}.")
        return Pattern("pseudo-progression", reasons)
    if flares:
        reasons.append(f"Not resolved at day {last.day} ({resolved_txt}), no flare either.")
        return Pattern("stable", reasons)
    les0 = base.affected_ml["marrow_lesion"] or 0.0
    les_c = volume_change(last, base, "marrow_lesion")
    les = les0 + (les_c.value if les_c else 0.0)
    if (les_c is not None and _at_least(les0, t.response_lesion_min_ml)
            and _at_most(les, t.response_lesion_ratio * les0)):
        if les_c.beyond_error:
            reasons.append(
                f"No flare; marrow lesion {les:.1f} mL at day {last.day} vs {les0:.1f} mL "
                f"at baseline (x{les / les0:.2f}, threshold x{t.response_lesion_ratio:g}; "
                f"{les_c.error_text('mL')}).")
            return Pattern("response", reasons)
        reasons.append(f"Day {last.day}: marrow lesion {les:.1f} mL vs {les0:.1f} mL at "
                       f"baseline is within measurement error ({les_c.error_text('mL')}).")
    change = swelling_change(last, base)
    if change is not None and _at_least(-change.value, t.response_asymmetry_pp):
        if change.beyond_error:
            reasons.append(f"No flare; at day {last.day}: {change.text} "
                           f"({change.value:+.1f} pp; {change.error_text('pp')}).")
            return Pattern("response", reasons)
        reasons.append(f"Day {last.day}: {change.text} ({change.value:+.1f} pp) is within "
                       f"measurement error ({change.error_text('pp')}).")
    reasons.append(f"No flare and no response criterion met at day {last.day} ({resolved_txt}).")
    return Pattern("stable", reasons)


def timing(day: int, events: Sequence[Mapping[str, Any]], t: Thresholds | None = None) -> str:
    """Where a session sits relative to day 0 (the infusion), the CRS window and the clinical
    events: the latest event on or before it and the next one after it."""
    t = t or Thresholds.default()
    if day < 0:
        where = f"day {day}: before the infusion"
    elif day == 0:
        where = "day 0: day of the infusion"
    elif day <= t.crs_window_days:
        where = f"day {day}: within the CRS window (days 1-{t.crs_window_days})"
    else:
        where = f"day {day}: after the CRS window (day > {t.crs_window_days})"
    before = [e for e in events if e["day"] <= day]
    after = [e for e in events if e["day"] > day]
    parts = [where]
    if before:
        e = before[-1]
        gap = day - e["day"]
        parts.append(f"{gap} day{'s' if gap != 1 else ''} after {e['label'] or e['category']} "
                     f"(day {e['day']})" if gap else f"on the day of {e['label'] or e['category']}")
    if after:
        e = after[0]
        gap = e["day"] - day
        parts.append(f"{gap} day{'s' if gap != 1 else ''} before "
                     f"{e['label'] or e['category']} (day {e['day']})")
    return "; ".join(parts)


def qc_reasons(flags: Sequence[qc_mod.QCFlag]) -> list[str]:
    """One reason per ``exclude`` flag: what the pattern was not allowed to rest on."""
    return [f"Not used for the pattern: {qc_mod.describe(f)}." for f in flags
            if f.severity == "exclude"]


def _decode_events(path: str | Path) -> tuple[str, list[str]]:
    """The events file's text: UTF-8 (with or without a byte-order mark), else Windows-1252,
    else Latin-1 (which decodes any byte), with a note naming the file when not UTF-8."""
    raw = Path(path).read_bytes()
    text, encoding = "", ""
    for encoding in ("utf-8-sig", "cp1252", "latin-1"):
        try:
            text = raw.decode(encoding)
            break
        except UnicodeDecodeError:
            continue
    if encoding == "utf-8-sig":
        return text, []
    return text, [f"{path}: not UTF-8; read as {encoding} (save it as UTF-8 to be sure "
                  "of accented labels)"]


def read_events(
    path: str | Path | None,
    day0: str,
    study_days: Sequence[int] | None = None,
    warnings: list[str] | None = None,
) -> list[dict[str, Any]]:
    """Clinical events from a TSV with columns ``day`` or ``date``, ``label``, ``category``.

    Encoding: UTF-8 (with or without a byte-order mark); a file that is not UTF-8 (e.g. saved
    by a spreadsheet as Windows-1252 / Latin-1) is read as Windows-1252, else Latin-1, with a
    warning naming the file.

    Timeline: the studies (`study_days`, days since day 0) and day 0 span ``lo..hi``; an event
    more than ``max(365, hi - lo)`` days outside that span (a typo such as 1850, an event of
    another episode) is left off, with a warning naming the file, line and date, so that it
    cannot squeeze the timeline. Without `study_days` the span is day 0 alone (events within
    365 days of day 0 are kept).

    Warnings go to `warnings` when given, else to stderr (the step's log).
    Raises ValueError naming the file and row for a row that cannot be placed on the timeline.
    """
    import csv
    import io
    import sys

    if not path:
        return []
    d0 = dt.date.fromisoformat(day0)
    text, notes = _decode_events(path)
    span = [0, *(int(d) for d in (study_days or []))]
    lo, hi = min(span), max(span)
    margin = max(365, hi - lo)
    events = []
    for n, row in enumerate(csv.DictReader(io.StringIO(text, newline=""), delimiter="\t"),
                            start=2):
        try:
            if row.get("date") not in (None, "", "n/a"):
                date = dt.date.fromisoformat(row["date"])
                day = (date - d0).days
            else:
                day = int(row["day"])
                date = d0 + dt.timedelta(days=day)
        except (KeyError, TypeError, ValueError, OverflowError) as err:
            raise ValueError(
                f"{path}, line {n}: needs a 'day' (integer) or 'date' (YYYY-MM-DD) column ({err})"
            ) from None
        label = (row.get("label") or "").strip()
        if not lo - margin <= day <= hi + margin:
            notes.append(
                f"{path}, line {n}: event {label!r} on {date.isoformat()} (day {day}) lies more "
                f"than {margin} days outside the studies and day 0 (days {lo}..{hi}); left off "
                "the timeline"
            )
            continue
        category = (row.get("category") or "other").strip()
        events.append(
            {
                "day": day,
                "date": date.isoformat(),
                "label": label,
                "category": category if category in EVENT_CATEGORIES else "other",
            }
        )
    if warnings is not None:
        warnings.extend(notes)
    else:
        for note in notes:
            print(f"WARNING {note}", file=sys.stderr)
    return sorted(events, key=lambda e: e["day"])


def software_versions() -> dict[str, str]:
    """Versions of limbtrack, Python and the libraries that shape the numbers."""
    out = {"limbtrack": __version__, "python": platform.python_version()}
    for pkg in (
        "numpy",
        "scipy",
        "SimpleITK",
        "scikit-image",
        "pydicom",
        "nibabel",
        "snakemake",
        "matplotlib",
        "jinja2",
    ):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = "not installed"
    return out


def input_checksums(sessions_index: Mapping[str, Any]) -> dict[str, Any]:
    """SHA-256 of every input file used, relative to the input folder, and of the list."""
    root = Path(sessions_index.get("input_dir", "."))
    files = []
    for s in sessions_index.get("sessions", []):
        for role in ("anatomical", "fluid"):
            for f in s[role]["files"]:
                p = Path(f)
                try:
                    rel = str(p.relative_to(root))
                except ValueError:
                    rel = p.name
                files.append({"path": rel, "sha256": sha256_file(p)})
    files.sort(key=lambda x: x["path"])
    digest = hashlib.sha256("".join(f["path"] + f["sha256"] for f in files).encode()).hexdigest()
    return {"n_files": len(files), "sha256_of_list": digest, "files": files}


def _describe_series(entry: Mapping[str, Any], role: str) -> str:
    """'T1 TSE AX (series 3)'; for the legs in two series (pipeline/io/split.py)
    'T1 LT (series 31, left leg) + T1 RT (series 32, right leg)'."""
    e = entry.get(role, {})
    if e.get("parts"):
        return " + ".join(f"{p.get('description', '')} (series {p.get('series_number', '?')}, "
                          f"{p['side']} leg)" for p in e["parts"])
    return f"{e.get('description', '')} (series {e.get('series_number', '?')})"


def _summary_sessions(
    visits: Sequence[Visit],
    side_info: Mapping[str, Any],
    sessions_index: Mapping[str, Any],
    session_files: Mapping[str, Mapping[str, str]],
    qc: Mapping[str, Mapping[str, Any]],
    flags: Sequence[qc_mod.QCFlag],
) -> tuple[list[dict[str, Any]], list[str]]:
    """summary.json ``sessions`` and the sessions' own warnings, in session order."""
    by_label = {s["session"]: s for s in sessions_index.get("sessions", [])}
    extents = {s["session"]: s for s in side_info.get("sessions", [])}
    visit_of = {v.key: v for v in visits}
    sessions, warnings = [], []
    for label, files in session_files.items():
        entry = by_label.get(label, {})
        ext = extents.get(label, {})
        s_warn = [f"session {label}: {w}" for w in qc.get(label, {}).get("warnings", [])]
        warnings.extend(s_warn)
        visit = visit_of.get(label) or visit_of.get(str(entry.get("study_date")))
        sessions.append(
            {
                "session": label,
                "study_date": entry.get("study_date"),
                "day": ext.get("day"),
                "files": dict(files),
                "anatomical_series": _describe_series(entry, "anatomical"),
                "fluid_series": _describe_series(entry, "fluid"),
                "z_range_mm": ext.get("z_range_mm"),
                "n_slices": ext.get("n_slices"),
                "warnings": s_warn,
                "qc_codes": qc_mod.codes_for(flags, label),
                "excluded": qc_mod.session_excluded(flags, label)
                or bool(visit and visit.excluded),
            }
        )
    return sessions, warnings


def _registration_summary(side_info: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """summary.json ``registration``: per follow-up, the transform and its quality."""
    return {
        label: {
            "translation_mm": reg.get("translation_mm"),
            "rotation_deg": reg.get("rotation_deg"),
            "quality": reg.get("quality"),
            "poor": reg.get("poor", False),
            "poor_reasons": reg.get("poor_reasons", []),
            "initialisation": reg.get("initialisation"),
        }
        for label, reg in side_info.get("registration", {}).items()
    }


UNILATERAL_WARNING = ("one limb only in the field of view: asymmetry is not available; "
                      "swelling is judged from the affected limb's change from baseline")


def _subject_warnings(
    side_info: Mapping[str, Any], sessions_index: Mapping[str, Any], unilateral: bool
) -> list[str]:
    """Warnings about the subject as a whole: measurement, one limb, index, refused studies."""
    warnings = list(side_info.get("warnings", []))
    if unilateral:
        warnings.append(UNILATERAL_WARNING)
    warnings.extend(str(w) for w in sessions_index.get("warnings", []))
    for r in sessions_index.get("refused_studies", []):
        warnings.append(f"study {r.get('study_date') or 'without date'} not used: {r['reason']}")
    return warnings


def build_summary(
    subject: str,
    day0: str,
    visits: Sequence[Visit],
    pattern: Pattern,
    side_info: Mapping[str, Any],
    sessions_index: Mapping[str, Any],
    session_files: Mapping[str, Mapping[str, str]],
    qc: Mapping[str, Mapping[str, Any]],
    events: list[dict[str, Any]],
    thresholds: Thresholds,
    settings: Mapping[str, Any],
) -> dict[str, Any]:
    """summary.json content (docs/design.md output contract plus provenance)."""
    base = visits[baseline_index(visits)] if visits else None
    flags = qc_mod.flags_from_json(side_info.get("qc_flags", []))
    sessions, warnings = _summary_sessions(
        visits, side_info, sessions_index, session_files, qc, flags)
    unilateral = bool(visits) and not any(v.contralateral_in_view for v in visits)
    warnings += _subject_warnings(side_info, sessions_index, unilateral)
    return {
        "subject": subject,
        "affected_side": side_info["affected_side"],
        "patient_fingerprint": sessions_index.get("patient_fingerprint"),
        "affected_side_source": side_info.get("affected_side_source", "configuration"),
        "day0": day0,
        "baseline_study_date": base.study_date if base else None,
        "baseline_day": base.day if base else None,
        "classification": pattern.classification,
        "classification_note": "A pattern consistent with this label, from volume measurements; "
        "a measurement aid, not a diagnosis.",
        "reasons": pattern.reasons,
        "confirmation": pattern.confirmation,
        "session_states": [{**st.to_json(), "timing": timing(st.day, events, thresholds)}
                           for st in pattern.states],
        "flares": pattern.flares,
        "qc_flags": [f.to_json() for f in flags],
        "warnings": warnings,
        "sessions": sessions,
        "extent_mm": side_info.get("extent", {}),
        "baseline_session": side_info.get("baseline_session"),
        "registration": _registration_summary(side_info),
        "uncertainty_model": side_info.get("uncertainty_model", {}),
        "landmarks": side_info.get("landmarks", {}),
        "unilateral": unilateral,
        "events": events,
        "thresholds": asdict(thresholds),
        "settings": dict(settings),
        "software": software_versions(),
        "inputs": input_checksums(sessions_index),
        "run_date": dt.datetime.now(dt.UTC).replace(microsecond=0).isoformat(),
    }


def _session_sidecars(sidecars: Sequence[Path], subject_dir: Path
                      ) -> tuple[dict[str, Any], dict[str, dict[str, str]]]:
    """Each session's segmentation QC sidecar and its files (relative to `subject_dir`)."""
    qc = {}
    session_files: dict[str, dict[str, str]] = {}
    for q in sidecars:
        label = session_of(q)
        qc[label] = json.loads(q.read_text(encoding="utf-8"))
        stem = q.name[: -len("_dseg.json")]
        rel = q.parent.relative_to(subject_dir)
        session_files[label] = {
            "t1": str(rel / f"{stem}_T1w.nii.gz"),
            "fluid": str(rel / f"{stem}_fluid.nii.gz"),
            "dseg": str(rel / f"{stem}_dseg.nii.gz"),
        }
    return qc, dict(sorted(session_files.items()))


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="limbtrack longitudinal", description=__doc__.split("\n")[0])
    p.add_argument("--subject", required=True)
    p.add_argument("--day0", required=True)
    p.add_argument("--subject-dir", required=True, type=Path)
    p.add_argument("--volumes", required=True, type=Path)
    p.add_argument("--side-json", required=True, type=Path)
    p.add_argument("--sessions-json", required=True, type=Path)
    p.add_argument("--qc", nargs="*", default=[], type=Path, help="segmentation QC sidecars")
    p.add_argument("--events", default="", help="events TSV (optional)")
    p.add_argument("--thresholds-json", default="{}")
    p.add_argument("--settings-json", default="{}")
    p.add_argument("--out-tsv", required=True, type=Path)
    p.add_argument("--out-summary", required=True, type=Path)
    args = p.parse_args(argv)

    thresholds = Thresholds.default(**json.loads(args.thresholds_json))
    side_info = json.loads(args.side_json.read_text(encoding="utf-8"))
    visits, carry_flags = carry_contralateral(
        visits_from_rows(read_tsv(args.volumes)), thresholds.contralateral_max_age_days,
        other_side(side_info["affected_side"]))
    side_info["qc_flags"] = [*side_info.get("qc_flags", []), *(f.to_json() for f in carry_flags)]
    pattern = classify(visits, thresholds)
    pattern.reasons.extend(qc_reasons(qc_mod.flags_from_json(side_info.get("qc_flags", []))))
    pattern.reasons.extend(reference_reasons(visits, carry_flags))
    index = json.loads(args.sessions_json.read_text(encoding="utf-8"))
    qc, session_files = _session_sidecars(args.qc, args.subject_dir)
    event_warnings: list[str] = []
    events = read_events(args.events or None, args.day0, study_days=[v.day for v in visits],
                         warnings=event_warnings)
    summary = build_summary(
        args.subject,
        args.day0,
        visits,
        pattern,
        side_info,
        index,
        session_files,
        qc,
        events,
        thresholds,
        json.loads(args.settings_json),
    )
    summary["warnings"].extend(event_warnings)
    write_tsv_atomic(args.out_tsv, longitudinal_rows(args.subject, visits), LONGITUDINAL_COLUMNS)
    write_json_atomic(args.out_summary, summary)
    print(f"{args.subject}: {pattern.classification}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
