"""Measurement uncertainty of every volume, and the smallest change the method can detect.

The model (docs/design.md "Uncertainty") is measured, not assumed:
:mod:`pipeline.validation.repeatability`
images the same anatomy again (new noise, repositioning, other slice positions and thickness,
other bias field), measures both with the whole workflow and fits, per structure, the
standard deviation of one measurement as a function of what drives it::

    sd_ml**2 = a * V**2                       proportional (contrast, threshold, bias field)
             + b * (pixel_mm/10 * V**(2/3))**2   partial volume across the in-plane edges
             + c * (slice_mm/10 * V**(2/3))**2   partial volume at the slice ends
             + d * (misreg_mm/10 * V**(2/3))**2  residual misregistration to the baseline
             + e                              floor (spurious voxels of an empty structure)

with V the volume in mL (V**(2/3) a surface in cm2; times a length in cm it is a volume in
mL). The coefficients a..e are fitted by non-negative least squares on the squared
scan-rescan differences, ``E[(V2 - V1)**2] = sd1**2 + sd2**2``, and stored in
``pipeline/data/repeatability.json`` (written by ``benchmarks/repeatability.py``), which the
workflow reads. From the single-measurement sd follow (Bland & Altman 1996; Vaz et al. 2013):

* the 95 % interval of a volume: ``volume_ml_ci95 = 1.96 * sd`` (half-width);
* of a ratio (asymmetry, change from baseline) by first-order propagation, both volumes
  independent;
* the repeatability coefficient of two measurements under the same conditions
  ``RC = 1.96 * sqrt(2) * sd``, which is also the minimal detectable change MDC95; under
  different conditions ``MDC95 = 1.96 * sqrt(sd1**2 + sd2**2)``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import numpy as np
from numpy.typing import NDArray

#: Two-sided 95 % quantile of the standard normal distribution.
Z95: Final = 1.959964
#: The model's terms, in the order of the stored coefficients.
TERMS: Final = ("proportional", "pixel", "slice", "misregistration", "floor")
#: Terms each structure may use. Misregistration moves the ends of the common extent, so it
#: changes what is counted of the limb, its soft tissue and bone; a lesion or edema sits
#: inside the limb and is not cut by those ends. (Fitted freely, the misregistration term of
#: edema took up false edema that had nothing to do with registration, because only the
#: follow-up sessions have a misregistration: it made a 2 mm misregistration read as
#: +-200 mL of edema and hid every flare.)
STRUCTURE_TERMS: Final[dict[str, tuple[str, ...]]] = {
    "marrow_lesion": ("proportional", "pixel", "slice", "floor"),
    "edema": ("proportional", "pixel", "slice", "floor"),
}
#: The packaged model the workflow reads unless the configuration names another file.
DEFAULT_MODEL: Final = Path(__file__).parent / "data" / "repeatability.json"


@dataclass(frozen=True)
class Drivers:
    """What a volume's measurement error depends on."""

    volume_ml: float
    pixel_mm: float
    slice_mm: float
    misregistration_mm: float = 0.0

    def features(self) -> NDArray[np.float64]:
        """The model's terms for this measurement (their coefficients give sd**2 in mL2)."""
        v = max(self.volume_ml, 0.0)
        surface_cm2 = v ** (2.0 / 3.0)
        return np.array([
            v * v,
            (self.pixel_mm / 10.0 * surface_cm2) ** 2,
            (self.slice_mm / 10.0 * surface_cm2) ** 2,
            (self.misregistration_mm / 10.0 * surface_cm2) ** 2,
            1.0,
        ])


@dataclass(frozen=True)
class StructureModel:
    """One structure's fitted coefficients (of :data:`TERMS`, in mL2 per feature unit)."""

    coefficients: tuple[float, ...]
    n_pairs: int = 0

    def sd_ml(self, drivers: Drivers) -> float:
        return float(math.sqrt(max(0.0, float(np.dot(self.coefficients, drivers.features())))))


@dataclass(frozen=True)
class Pair:
    """One scan-rescan pair of a structure: both measurements' drivers and volumes."""

    structure: str
    first: Drivers
    second: Drivers

    @property
    def difference_ml(self) -> float:
        return self.second.volume_ml - self.first.volume_ml


def fit_structure(pairs: Sequence[Pair], terms: Sequence[str] = TERMS) -> StructureModel:
    """Non-negative least squares of the squared differences on the summed features; terms
    not in ``terms`` get the coefficient 0."""
    if not pairs:
        raise ValueError("no scan-rescan pairs to fit")
    used = np.array([t in terms for t in TERMS])
    design = np.array([p.first.features() + p.second.features() for p in pairs]) * used
    target = np.array([p.difference_ml ** 2 for p in pairs])
    # A squared difference's own sd is proportional to its expectation (chi-square, 1 dof):
    # iteratively reweighted by the predicted variance, so that large limbs do not drown the
    # small lesions of the same structure. Starts from each row scaled by its feature sum.
    from scipy.optimize import nnls  # here: the jobs that only apply a model never load it

    weight = 1.0 / np.maximum(design.sum(axis=1), 1e-12)
    coef = np.zeros(design.shape[1])
    for _ in range(8):
        coef, _ = nnls(design * weight[:, None], target * weight)
        predicted = design @ coef
        weight = 1.0 / np.maximum(predicted, 1e-6 * max(float(predicted.max()), 1e-12))
    return StructureModel(tuple(float(c) for c in coef), len(pairs))


@dataclass(frozen=True)
class RepeatabilityModel:
    """Per-structure models plus where they came from (the study's provenance)."""

    structures: Mapping[str, StructureModel]
    source: Mapping[str, Any] = field(default_factory=dict)

    def sd_ml(self, structure: str, drivers: Drivers) -> float | None:
        """Standard deviation of one measurement; None when the structure has no model."""
        model = self.structures.get(structure)
        return None if model is None else model.sd_ml(drivers)

    def describe(self, path: str | Path | None = None) -> dict[str, Any]:
        """Which model measured the uncertainty: file, scan-rescan pairs, study date."""
        return {
            "file": str(path) if path else "pipeline/data/repeatability.json (packaged)",
            "n_pairs": {s: m.n_pairs for s, m in self.structures.items()},
            "fitted": self.source.get("date", "not fitted (bootstrap)"
                                      if self.source.get("bootstrap") else "unknown"),
            "revision": self.source.get("git_revision", ""),
        }

    def to_json(self) -> dict[str, Any]:
        return {
            "terms": list(TERMS),
            "model": "sd_ml**2 = sum(coefficient * term); see pipeline/uncertainty.py",
            "structures": {s: {"coefficients": list(m.coefficients), "n_pairs": m.n_pairs}
                           for s, m in self.structures.items()},
            "source": dict(self.source),
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> RepeatabilityModel:
        if list(data.get("terms", [])) != list(TERMS):
            raise ValueError(f"repeatability model terms {data.get('terms')} != {list(TERMS)}")
        return cls({s: StructureModel(tuple(float(c) for c in m["coefficients"]),
                                      int(m.get("n_pairs", 0)))
                    for s, m in data["structures"].items()}, data.get("source", {}))

    @classmethod
    def load(cls, path: str | Path | None = None) -> RepeatabilityModel:
        """The model in ``path`` (default: the packaged one); ValueError naming the file."""
        p = Path(path) if path else DEFAULT_MODEL
        try:
            return cls.from_json(json.loads(p.read_text(encoding="utf-8")))
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise ValueError(f"{p}: not a repeatability model ({err})") from None


def fit(pairs: Sequence[Pair], source: Mapping[str, Any] | None = None) -> RepeatabilityModel:
    """One model per structure present in ``pairs``."""
    structures = sorted({p.structure for p in pairs})
    return RepeatabilityModel(
        {s: fit_structure([p for p in pairs if p.structure == s], STRUCTURE_TERMS.get(s, TERMS))
         for s in structures},
        dict(source or {}))


# --------------------------------------------------------------------------- propagation


def ci95(sd: float | None) -> float | None:
    """Half-width of the 95 % interval of a value with standard deviation ``sd``."""
    return None if sd is None else Z95 * sd


def sd_from_ci95(ci: float | None) -> float | None:
    return None if ci is None else ci / Z95


def difference_sd(*sds: float | None) -> float | None:
    """sd of a sum or difference of independent values; None when one is unknown."""
    if any(s is None for s in sds):
        return None
    return math.sqrt(sum(float(s) ** 2 for s in sds if s is not None))


def ratio_pct_sd(num: float | None, sd_num: float | None, den: float | None,
                 sd_den: float | None) -> float | None:
    """sd (percentage points) of ``100 * (num / den - 1)``, first-order, independent."""
    if num is None or den is None or sd_num is None or sd_den is None or den <= 0:
        return None
    return 100.0 * math.sqrt(sd_num ** 2 + (num * sd_den / den) ** 2) / den


def mdc95(sd_change: float | None) -> float | None:
    """Minimal detectable change at 95 % of a change whose sd is ``sd_change``."""
    return ci95(sd_change)


def repeatability_coefficient(sd_within: float) -> float:
    """RC = 1.96 * sqrt(2) * within-subject sd (two measurements under the same conditions)."""
    return Z95 * math.sqrt(2.0) * sd_within


def beyond(change: float, mdc: float | None) -> bool:
    """True when ``|change|`` exceeds its MDC95; a change of unknown MDC is not beyond it."""
    return mdc is not None and abs(change) > mdc
