"""Volumes (mL) per session, side and structure, counted from the label maps.

Every volume comes from one label map per session (:mod:`pipeline.labels`):
``volume_ml = n_voxels(structure) * voxel_volume_mm3 / 1000``. Voxel volume is the product of
the label map's spacing (mm). Sides come from the label values, which the segmentation took from
the image geometry.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import SimpleITK as sitk
from numpy.typing import NDArray

from pipeline import qc as qc_mod
from pipeline.extent import (
    FieldOfView,
    Geometry,
    as_transform,
    common_extent,
    covered_range,
    read_label_map,
    volumes_in_extent,
)
from pipeline.io.files import mm3_to_ml, write_json_atomic, write_tsv_atomic
from pipeline.labels import SIDES, STRUCTURES, other_side, structure_labels
from pipeline.profiles import (
    CIRCUMFERENCE_COLUMNS,
    CSA_COLUMNS,
    circumference_profile,
    csa_profile,
    find_landmarks,
    write_profile_tsv,
)
from pipeline.qc import QCFlag
from pipeline.uncertainty import Drivers, RepeatabilityModel, ci95

#: Common-extent edges within this distance (mm) of the baseline's edges snap to them.
SNAP_MM = 1.0

VOLUME_COLUMNS = ("subject", "study_date", "day", "side", "role", "structure", "volume_ml", "qc",
                  "volume_ml_ci95", "session")


@dataclass(frozen=True)
class SessionVolumes:
    """Volumes of one session: ``volumes_ml[side][structure]`` (None: not available, see
    ``qc``) and the extent covered; ``qc[side]`` lists the QC codes raised for that side."""

    session: str
    study_date: str
    day: int
    volumes_ml: dict[str, dict[str, float | None]]
    z_range_mm: tuple[float, float]
    n_slices: int
    qc: dict[str, list[str]] = field(default_factory=dict)
    pixel_mm: float = 0.0
    slice_mm: float = 0.0
    misregistration_mm: float = 0.0

    def drivers(self, side: str, structure: str) -> Drivers | None:
        """What the measurement error of a volume depends on; None when not available."""
        v = self.volumes_ml[side][structure]
        return None if v is None else Drivers(v, self.pixel_mm, self.slice_mm,
                                              self.misregistration_mm)


def grid_mm(labels: sitk.Image) -> tuple[float, float]:
    """(in-plane pixel, slice) size in mm of a label map: the slice axis is the one closest
    to physical z; the pixel is the geometric mean of the other two."""
    geo = Geometry.of(labels)
    axis = geo.layer_axis_xyz
    in_plane = [geo.spacing_xyz_mm[i] for i in range(3) if i != axis]
    return float(np.sqrt(in_plane[0] * in_plane[1])), geo.spacing_xyz_mm[axis]


def misregistration_mm(xfm_json: str | Path | None) -> float:
    """Residual misregistration to the baseline: the registration QC's bone-centroid distance
    (mm); 0 for the baseline itself (no registration) or when the QC could not measure it."""
    if not xfm_json:
        return 0.0
    quality = json.loads(Path(xfm_json).read_text(encoding="utf-8")).get("quality") or {}
    return float(quality.get("centroid_distance_mm") or 0.0)


def volumes_from_labels(
    labels: NDArray[np.integer[Any]], voxel_mm3: float
) -> dict[str, dict[str, float]]:
    """Volume (mL) of every structure on both sides of a label map.

    Parameters
    ----------
    labels : ndarray of int, any shape
        Label map with the values of :mod:`pipeline.labels`.
    voxel_mm3 : float
        Volume of one voxel in mm^3.
    """
    counts = np.bincount(np.asarray(labels, dtype=np.int64).ravel(), minlength=9)
    return {
        side: {
            structure: mm3_to_ml(
                float(sum(counts[v] for v in structure_labels(side, structure))) * voxel_mm3
            )
            for structure in STRUCTURES
        }
        for side in SIDES
    }


def measure_label_map(
    path: str | Path,
) -> tuple[dict[str, dict[str, float]], tuple[float, float], int]:
    """Volumes of a label map file, its superior-inferior extent (mm, RAS z) and slice count."""
    img = nib.load(str(path))
    if not isinstance(img, nib.Nifti1Image | nib.Nifti2Image):
        raise ValueError(f"{path}: not a NIfTI label map")
    data = np.asanyarray(img.dataobj)
    zooms = img.header.get_zooms()[:3]
    voxel_mm3 = float(np.prod(zooms))
    corners = np.array(
        [
            [i, j, k]
            for i in (0, data.shape[0] - 1)
            for j in (0, data.shape[1] - 1)
            for k in (0, data.shape[2] - 1)
        ],
        dtype=float,
    )
    z = nib.affines.apply_affine(img.affine, corners)[:, 2]
    axis = int(np.argmax(np.abs(img.affine[2, :3])))
    return (
        volumes_from_labels(data, voxel_mm3),
        (float(z.min()), float(z.max())),
        int(data.shape[axis]),
    )


def infer_affected_side(sessions: Sequence[SessionVolumes]) -> tuple[str | None, str]:
    """Affected side from the images, with the reason.

    In order: the side with more marrow lesion (summed over sessions, >= 1 mL more); else more
    edema (>= 10 mL more); else the larger soft-tissue volume (>= 2 % more). None when no side
    stands out.
    """

    def total(side: str, structure: str) -> float:
        # sessions where either side is not available say nothing about the difference
        return sum(
            s.volumes_ml[side][structure] or 0.0
            for s in sessions
            if None not in (s.volumes_ml["left"][structure], s.volumes_ml["right"][structure])
        )

    for structure, margin_ml, rel in (
        ("marrow_lesion", 1.0, 0.0),
        ("edema", 10.0, 0.0),
        ("soft_tissue", 0.0, 0.02),
    ):
        left, right = total("left", structure), total("right", structure)
        diff = left - right
        if abs(diff) >= max(margin_ml, rel * max(left, right)) and max(left, right) > 0:
            side = "left" if diff > 0 else "right"
            return side, (
                f"{structure.replace('_', ' ')}: left {left:.1f} mL vs right "
                f"{right:.1f} mL summed over {len(sessions)} session(s)"
            )
    return None, "no side has more lesion, edema or soft tissue than the other"


def session_day(study_date: str, day0: str) -> int:
    """Days from day 0 to the study date (negative before day 0)."""
    return (dt.date.fromisoformat(study_date) - dt.date.fromisoformat(day0)).days


def volume_rows(
    subject: str, sessions: Sequence[SessionVolumes], affected_side: str,
    model: RepeatabilityModel | None = None,
) -> list[dict[str, Any]]:
    """Rows of volumes.tsv (docs/design.md output contract); ``volume_ml_ci95`` is the half-width
    of the 95 % interval from the repeatability model (default: the packaged one)."""
    model = model or RepeatabilityModel.load()
    rows = []
    for s in sessions:
        for side in (affected_side, other_side(affected_side)):
            role = "affected" if side == affected_side else "contralateral"
            for structure in STRUCTURES:
                rows.append(
                    dict(
                        subject=subject,
                        study_date=s.study_date,
                        day=s.day,
                        side=side,
                        role=role,
                        structure=structure,
                        volume_ml=_round3(s.volumes_ml[side][structure]),
                        qc=",".join(s.qc.get(side, [])),
                        volume_ml_ci95=_round3(ci95(_sd(model, s, side, structure))),
                        session=s.session,
                    )
                )
    return rows


def _sd(model: RepeatabilityModel, s: SessionVolumes, side: str, structure: str
        ) -> float | None:
    drivers = s.drivers(side, structure)
    return None if drivers is None else model.sd_ml(structure, drivers)


def _round3(x: float | None) -> float | None:
    return None if x is None else round(x, 3)


def load_sessions(sessions: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Copies of `sessions` with each label map and transform read once into memory (the
    extent, volumes and profiles all use them; reading per use read each file 5 times)."""
    loaded = []
    for s in sessions:
        entry = dict(s)
        entry["dseg"] = read_label_map(s["dseg"])
        entry["xfm"] = None if s.get("xfm") is None else as_transform(s["xfm"])
        loaded.append(entry)
    return loaded


def _extent_of(labels: sitk.Image) -> tuple[tuple[float, float], int]:
    """Superior-inferior range (mm) of a label map's grid corners and its slice count."""
    size = labels.GetSize()
    z = [labels.TransformIndexToPhysicalPoint((i, j, k))[2]
         for i in (0, size[0] - 1) for j in (0, size[1] - 1) for k in (0, size[2] - 1)]
    direction = np.asarray(labels.GetDirection()).reshape(3, 3)
    axis = int(np.argmax(np.abs(direction[2])))  # the image axis closest to superior
    return (float(min(z)), float(max(z))), int(size[axis])


def collect_flags(sessions: Sequence[Mapping[str, Any]]) -> list[QCFlag]:
    """QC flags of every session: the segmentation's (``qc``: the label map's JSON sidecar)
    and ``registration_failed`` where the registration to the baseline (``xfm_json``) was
    poor. Paths may be absent (None)."""
    flags: list[QCFlag] = []
    for s in sessions:
        label = str(s["session"])
        if s.get("qc"):
            sidecar = json.loads(Path(s["qc"]).read_text(encoding="utf-8"))
            flags += qc_mod.flags_from_json(sidecar.get("qc_flags", []), session=label)
        if s.get("xfm_json"):
            reg = json.loads(Path(s["xfm_json"]).read_text(encoding="utf-8"))
            if reg.get("poor"):
                flags.append(QCFlag(
                    label, qc_mod.BOTH, qc_mod.REGISTRATION_FAILED, "exclude",
                    "registration to the baseline failed: "
                    + "; ".join(reg.get("poor_reasons", []) or ["poor quality"])))
    return flags


def measure_subject(
    subject: str,
    day0: str,
    sessions: Sequence[Mapping[str, Any]],
    affected_side: str,
    baseline: str | None = None,
    flags: Sequence[QCFlag] = (),
) -> tuple[list[SessionVolumes], str, str, dict[str, Any]]:
    """Measure every session's label map over the common extent; resolve ``'auto'`` sides.

    Parameters
    ----------
    sessions : sequence of mappings with ``session``, ``study_date``, ``dseg`` (path) and
        optionally ``xfm`` (the baseline-to-session transform of :mod:`pipeline.register`,
        a .tfm path; None or absent for the baseline, or when there is none).
    baseline : session label of the baseline; the extent is in its coordinates.
    flags : QC flags (:mod:`pipeline.qc`). A structure an ``exclude`` flag removes is None
        (not available); a session with nothing left (failed registration, not T1-like)
        neither narrows the common extent nor the common field of view.

    Returns
    -------
    (session volumes sorted by date, affected side, how the side was decided, extent info)
    """
    ordered = load_sessions(sorted(sessions, key=lambda s: s["study_date"]))
    label_maps = [s["dseg"] for s in ordered]
    transforms = [None if s["session"] == baseline else s.get("xfm") for s in ordered]
    usable = [not qc_mod.session_excluded(flags, s["session"]) for s in ordered]
    gone = qc_mod.unavailable(flags)
    extent_info: dict[str, Any] = {"method": "common extent after registration"}
    fovs: list[FieldOfView] = []
    try:
        if not any(usable):
            raise ValueError("every session is excluded by a QC flag")
        maps_ok = [m for m, u in zip(label_maps, usable, strict=True) if u]
        trs_ok = [t for t, u in zip(transforms, usable, strict=True) if u]
        z_lo, z_hi = common_extent(maps_ok, trs_ok)
        # Registration is good to a few tenths of a millimetre: an edge that close to the
        # baseline's own edge means the sessions cover the same extent, i.e. every slice.
        base_idx = next((i for i, t in enumerate(transforms) if t is None), 0)
        b_lo, b_hi = covered_range(label_maps[base_idx])
        if abs(z_lo - b_lo) <= SNAP_MM:
            z_lo = min(z_lo, b_lo)
        if abs(z_hi - b_hi) <= SNAP_MM:
            z_hi = max(z_hi, b_hi)
        extent_info.update(z_min_mm=round(z_lo, 2), z_max_mm=round(z_hi, 2),
                           length_mm=round(z_hi - z_lo, 2))
        if len(maps_ok) > 1:
            fovs = [FieldOfView(Geometry.of(m), t) for m, t in zip(maps_ok, trs_ok, strict=True)]
            extent_info["in_plane"] = "voxels seen by every session's field of view"
    except ValueError as err:
        z_lo, z_hi = -np.inf, np.inf
        extent_info.update(method="every slice of each session", warning=(
            f"no common extent could be set ({err}); volumes cover every slice"))
    measured = []
    for s, xfm, ok in zip(ordered, transforms, usable, strict=True):
        z_range, n = _extent_of(s["dseg"])
        vols: dict[str, dict[str, float | None]] = {
            side: dict(v) for side, v in volumes_in_extent(
                s["dseg"], xfm, (z_lo, z_hi), fovs if ok else ()).items()}
        for sd in SIDES:
            for structure in STRUCTURES:
                if (s["session"], sd, structure) in gone:
                    vols[sd][structure] = None
        qc_codes: dict[str, list[str]] = {
            sd: qc_mod.codes_for(flags, s["session"], sd) for sd in SIDES}
        pixel, slice_ = grid_mm(s["dseg"])
        measured.append(SessionVolumes(s["session"], s["study_date"],
                                       session_day(s["study_date"], day0), vols, z_range, n,
                                       qc_codes, pixel, slice_,
                                       misregistration_mm(s.get("xfm_json"))))
    if affected_side == "auto":
        side, why = infer_affected_side(measured)
        if side is None:
            raise ValueError(
                f"affected_side=auto: cannot tell the affected side ({why}); "
                "give affected_side=left or right"
            )
        return measured, side, f"automatic: {why}", extent_info
    if affected_side not in SIDES:
        raise ValueError(f"affected_side must be left, right or auto, not {affected_side!r}")
    return measured, affected_side, "configuration", extent_info


def write_profiles(
    sessions: Sequence[Mapping[str, Any]], baseline: str, csa_path: Path, circ_path: Path
) -> dict[str, Any]:
    """Cross-sectional area and circumference profiles of every session in baseline
    coordinates, relative to the bone landmark found on the baseline. Returns the landmarks."""
    base = next(s for s in sessions if s["session"] == baseline)
    landmarks = find_landmarks(base["dseg"])
    csa: list[dict[str, Any]] = []
    circ: list[dict[str, Any]] = []
    for s in sorted(sessions, key=lambda s: s["study_date"]):
        xfm = None if s["session"] == baseline else s.get("xfm")
        csa += csa_profile(s["dseg"], xfm, landmarks, session=s["session"])
        circ += circumference_profile(s["dseg"], xfm, landmarks, session=s["session"])
    write_profile_tsv(csa_path, csa, CSA_COLUMNS)
    write_profile_tsv(circ_path, circ, CIRCUMFERENCE_COLUMNS)
    return {side: {"z_mm": round(lm.z_mm, 2), "method": lm.method}
            for side, lm in landmarks.items()}


def _session_label(path: Path) -> str:
    return path.name.split("_ses-")[1].split("_")[0] if "_ses-" in path.name else ""


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="limbtrack measure", description=__doc__.split("\n")[0])
    p.add_argument("--subject", required=True)
    p.add_argument("--day0", required=True, help="YYYY-MM-DD")
    p.add_argument("--affected-side", required=True, choices=["left", "right", "auto"])
    p.add_argument("--sessions-json", required=True, type=Path)
    p.add_argument("--dseg", nargs="+", required=True, type=Path,
                   help="label maps, file names containing _ses-<session>_")
    p.add_argument("--xfm", nargs="*", default=[], type=Path,
                   help="registration results (_xfm.json, with the .tfm beside) of the "
                   "sessions other than the baseline")
    p.add_argument("--qc", nargs="*", default=[], type=Path,
                   help="segmentation QC sidecars (_dseg.json) holding the QC flags")
    p.add_argument("--baseline", default=None, help="baseline session label")
    p.add_argument("--repeatability", default=None, type=Path,
                   help="repeatability model JSON (default: the packaged one)")
    p.add_argument("--out", required=True, type=Path, help="volumes.tsv")
    p.add_argument("--side-json", required=True, type=Path,
                   help="where to write the resolved affected side, extent and registration")
    p.add_argument("--csa", type=Path, default=None, help="cross-sectional area profile TSV")
    p.add_argument("--circumference", type=Path, default=None, help="circumference TSV")
    args = p.parse_args(argv)
    index = json.loads(args.sessions_json.read_text(encoding="utf-8"))
    dates = {s["session"]: s["study_date"] for s in index["sessions"]}
    xfms = {_session_label(x): x for x in args.xfm}
    sidecars = {_session_label(q): q for q in args.qc}
    sessions: list[dict[str, Any]] = []
    for path in args.dseg:
        label = _session_label(path)
        if label not in dates:
            p.error(f"{path}: session {label or '(no _ses-<label>_ in the name)'} is not "
                    f"listed in {args.sessions_json}")
        xfm = xfms.get(label)
        sessions.append({"session": label, "study_date": dates[label], "dseg": str(path),
                         "xfm": None if xfm is None else str(xfm.with_suffix(".tfm")),
                         "xfm_json": None if xfm is None else str(xfm),
                         "qc": None if label not in sidecars else str(sidecars[label])})
    baseline = args.baseline or min(sessions, key=lambda s: s["study_date"])["session"]
    flags = collect_flags(sessions)
    sessions = load_sessions(sessions)
    measured, side, how, extent = measure_subject(
        args.subject, args.day0, sessions, args.affected_side, baseline, flags)
    model = RepeatabilityModel.load(args.repeatability)
    write_tsv_atomic(args.out, volume_rows(args.subject, measured, side, model),
                     VOLUME_COLUMNS)
    landmarks: dict[str, Any] = {}
    warnings: list[str] = [extent["warning"]] if "warning" in extent else []
    if args.csa and args.circumference:
        try:
            landmarks = write_profiles(sessions, baseline, args.csa, args.circumference)
        except ValueError as err:
            warnings.append(f"profiles not computed: {err}")
            write_profile_tsv(args.csa, [], CSA_COLUMNS)
            write_profile_tsv(args.circumference, [], CIRCUMFERENCE_COLUMNS)
    registration = {}
    for s in sessions:
        if s["xfm_json"]:
            reg = json.loads(Path(s["xfm_json"]).read_text(encoding="utf-8"))
            registration[s["session"]] = reg
    write_json_atomic(args.side_json, {
        "affected_side": side,
        "affected_side_source": how,
        "baseline_session": baseline,
        "extent": extent,
        "landmarks": landmarks,
        "registration": registration,
        "warnings": warnings,
        "qc_flags": [f.to_json() for f in flags],
        "uncertainty_model": model.describe(args.repeatability),
        "sessions": [
            {"session": m.session, "study_date": m.study_date, "day": m.day,
             "z_range_mm": list(m.z_range_mm), "n_slices": m.n_slices,
             "pixel_mm": round(m.pixel_mm, 4), "slice_mm": round(m.slice_mm, 4),
             "misregistration_mm": round(m.misregistration_mm, 4)}
            for m in measured
        ],
    })
    print(f"{args.subject}: affected side {side} ({how}); {len(measured)} sessions; "
          f"extent {extent}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
