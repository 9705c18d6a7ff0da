"""Volumes (mL) per session, side and structure, counted from the label maps.

Every volume comes from one label map per session (:mod:`pipeline.labels`):
``volume_ml = n_voxels(structure) * voxel_volume_mm3 / 1000``. Voxel volume is the product of
the label map's spacing (mm). Sides come from the label values, which the segmentation took from
the image geometry.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk
from numpy.typing import NDArray

from pipeline import qc as qc_mod
from pipeline.baseline import baseline_position, session_day
from pipeline.extent import (
    FieldOfView,
    Geometry,
    as_transform,
    common_extent,
    covered_range,
    read_label_map,
    sides_present,
    volumes_in_extent,
)
from pipeline.io.files import finite_float, mm3_to_ml, write_json_atomic, write_tsv_atomic
from pipeline.labels import SIDES, STRUCTURES, other_side, structure_labels
from pipeline.names import session_of
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


def misregistration_mm(xfm: Mapping[str, Any] | None) -> float:
    """Residual misregistration to the baseline: the registration QC's bone-centroid distance
    (mm) in the registration record `xfm` (an ``_xfm.json``'s content); 0 for the baseline
    itself (no registration) or when the QC could not measure it."""
    if not xfm:
        return 0.0
    quality = xfm.get("quality") or {}
    return finite_float(quality.get("centroid_distance_mm")) or 0.0


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
    import nibabel as nib  # lazily: the measure step reads label maps with SimpleITK (0.45 s)

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

    imaged = [side for side in SIDES if any(s.volumes_ml[side]["limb"] for s in sessions)]
    if len(imaged) == 1:
        return imaged[0], f"the only limb the sessions image is the {imaged[0]} one"
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


# ----------------------------------------------------------------------------- sessions


@dataclass(frozen=True)
class Session:
    """One session as measure uses it: its files, its day, and its registration record.

    ``xfm`` is the content of the session's ``_xfm.json`` (quality, ``poor``, ...), read once;
    None for the baseline (not registered) or when there is none. ``tfm`` is the
    baseline-to-session transform beside it. ``label_map`` and ``transform`` hold the label
    map and transform once read (:meth:`loaded`): the extent, volumes and profiles share them.
    """

    label: str
    study_date: str
    day: int
    dseg: Path
    qc: Path | None = None
    tfm: Path | None = None
    xfm: dict[str, Any] | None = None
    label_map: sitk.Image | None = field(default=None, repr=False, compare=False)
    transform: sitk.Transform | None = field(default=None, repr=False, compare=False)

    def loaded(self) -> Session:
        """This session with its label map and transform read (a loaded one as it is)."""
        if self.label_map is not None:
            return self
        return replace(self, label_map=read_label_map(self.dseg),
                       transform=None if self.tfm is None else as_transform(self.tfm))

    @property
    def labels(self) -> sitk.Image:
        """The label map (read now if the session is not loaded)."""
        return self.label_map if self.label_map is not None else read_label_map(self.dseg)


def read_session(label: str, study_date: str, day: int, dseg: str | Path,
                 qc: str | Path | None = None, xfm_json: str | Path | None = None) -> Session:
    """A session from its files: the registration record `xfm_json` is read here, once, and
    the transform is the ``.tfm`` beside it."""
    xfm = None if not xfm_json else json.loads(Path(xfm_json).read_text(encoding="utf-8"))
    return Session(label, study_date, day, Path(dseg), qc=Path(qc) if qc else None,
                   tfm=Path(xfm_json).with_suffix(".tfm") if xfm_json else None, xfm=xfm)


def as_session(s: Session | Mapping[str, Any], day0: str = "") -> Session:
    """`s` as a :class:`Session`. A mapping (``session``, ``study_date``, ``dseg``, optional
    ``qc``, ``xfm`` (the .tfm) and ``xfm_json`` paths) is read into one; its day counts from
    `day0` (0 without it: QC flags need no day)."""
    if isinstance(s, Session):
        return s
    day = session_day(s["study_date"], day0) if day0 else 0
    session = read_session(str(s["session"]), s["study_date"], day, s["dseg"], s.get("qc"),
                           s.get("xfm_json"))
    return replace(session, tfm=Path(s["xfm"]) if s.get("xfm") else None)


def load_sessions(sessions: Sequence[Session]) -> list[Session]:
    """`sessions` with each label map and transform read once into memory (the extent,
    volumes and profiles all use them; reading per use read each file 5 times)."""
    return [s.loaded() for s in sessions]


def default_baseline(sessions: Sequence[Session]) -> str:
    """Label of the baseline session: :func:`pipeline.baseline.baseline_position` over the
    sessions in date order (the last on or before day 0, else the first)."""
    ordered = sorted(sessions, key=lambda s: s.study_date)
    return ordered[baseline_position([s.day for s in ordered])].label


def _extent_of(labels: sitk.Image) -> tuple[tuple[float, float], int]:
    """Superior-inferior range (mm) of a label map's grid corners and its slice count."""
    size = labels.GetSize()
    z = [labels.TransformIndexToPhysicalPoint((i, j, k))[2]
         for i in (0, size[0] - 1) for j in (0, size[1] - 1) for k in (0, size[2] - 1)]
    direction = np.asarray(labels.GetDirection()).reshape(3, 3)
    axis = int(np.argmax(np.abs(direction[2])))  # the image axis closest to superior
    return (float(min(z)), float(max(z))), int(size[axis])


def collect_flags(sessions: Sequence[Session | Mapping[str, Any]]) -> list[QCFlag]:
    """QC flags of every session: the segmentation's (``qc``: the label map's JSON sidecar)
    and ``registration_failed`` where the registration to the baseline (``xfm``) was
    poor."""
    flags: list[QCFlag] = []
    for s in map(as_session, sessions):
        if s.qc is not None:
            sidecar = json.loads(s.qc.read_text(encoding="utf-8"))
            flags += qc_mod.flags_from_json(sidecar.get("qc_flags", []), session=s.label)
        if s.xfm is not None and s.xfm.get("poor"):
            flags.append(QCFlag(
                s.label, qc_mod.BOTH, qc_mod.REGISTRATION_FAILED, "exclude",
                "registration to the baseline failed: "
                + "; ".join(s.xfm.get("poor_reasons", []) or ["poor quality"])))
    return flags


# ----------------------------------------------------------------------------- measuring


def fov_pieces(s: Session) -> tuple[tuple[Geometry, ...], ...]:
    """The grids of the one-leg series a session's images were composed of, per composed
    image (the segmentation's ``fields_of_view``, :func:`pipeline.qc.image_sidecar_facts`);
    empty for a session imaged in one field of view."""
    if s.qc is None or not s.qc.is_file():
        return ()
    records = json.loads(s.qc.read_text(encoding="utf-8")).get("fields_of_view") or []
    return tuple(tuple(Geometry.of_record(r) for r in union) for union in records)


def measurement_extent(
    label_maps: Sequence[sitk.Image], transforms: Sequence[sitk.Transform | None],
    usable: Sequence[bool], pieces: Sequence[tuple[tuple[Geometry, ...], ...]] | None = None,
    sides: Sequence[Sequence[str]] | None = None,
) -> tuple[tuple[float, float], list[FieldOfView], dict[str, Any]]:
    """The baseline cranio-caudal extent every usable session covers, the fields of view to
    intersect in-plane, and how they were set; every slice (with a warning) when no common
    extent can be set. The baseline is the session without a transform. `pieces`: per
    session, the grids of the one-leg series its images were composed of
    (:func:`fov_pieces`). `sides`: per session, the sides its label map holds (found here
    when not given)."""
    pieces = list(pieces) if pieces is not None else [()] * len(label_maps)
    info: dict[str, Any] = {"method": "common extent after registration"}
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
        info.update(z_min_mm=round(z_lo, 2), z_max_mm=round(z_hi, 2),
                    length_mm=round(z_hi - z_lo, 2))
        if len(maps_ok) > 1:
            pieces_ok = [p for p, u in zip(pieces, usable, strict=True) if u]
            sides_ok = ([tuple(sides_present(sitk.GetArrayViewFromImage(m))) for m in maps_ok]
                        if sides is None else
                        [tuple(d) for d, u in zip(sides, usable, strict=True) if u])
            fovs = [FieldOfView(Geometry.of(m), t, p, d)
                    for m, t, p, d in zip(maps_ok, trs_ok, pieces_ok, sides_ok, strict=True)]
            info["in_plane"] = "voxels seen by every session's field of view"
    except ValueError as err:
        z_lo, z_hi = -np.inf, np.inf
        info.update(method="every slice of each session", warning=(
            f"no common extent could be set ({err}); volumes cover every slice"))
    return (z_lo, z_hi), fovs, info


def measure_session(
    s: Session, transform: sitk.Transform | None, extent: tuple[float, float],
    fovs: Sequence[FieldOfView], flags: Sequence[QCFlag],
    present: Sequence[str] | None = None,
) -> SessionVolumes:
    """Volumes of one (loaded) session inside `extent` and every field of view in `fovs`;
    a structure an ``exclude`` flag removes is None. `present`: the sides its label map
    holds (found here when not given)."""
    labels = s.labels
    z_range, n = _extent_of(labels)
    vols: dict[str, dict[str, float | None]] = {
        side: dict(v) for side, v in volumes_in_extent(labels, transform, extent, fovs).items()}
    gone = qc_mod.unavailable(flags)
    for sd in SIDES:
        for structure in STRUCTURES:
            if (s.label, sd, structure) in gone:
                vols[sd][structure] = None
    qc_codes: dict[str, list[str]] = {sd: qc_mod.codes_for(flags, s.label, sd) for sd in SIDES}
    # a side the session does not image is not measured: empty, never 0, and says why
    if present is None:
        present = sides_present(sitk.GetArrayViewFromImage(labels))
    for sd in SIDES:
        if sd not in present:
            vols[sd] = dict.fromkeys(STRUCTURES)
            qc_codes[sd].append(qc_mod.LIMB_NOT_IN_VIEW)
    pixel, slice_ = grid_mm(labels)
    return SessionVolumes(s.label, s.study_date, s.day, vols, z_range, n, qc_codes, pixel,
                          slice_, misregistration_mm(s.xfm))


def resolve_side(affected_side: str, measured: Sequence[SessionVolumes]) -> tuple[str, str]:
    """(affected side, how it was decided): the configured one, or for ``'auto'`` the one
    :func:`infer_affected_side` finds (ValueError when none stands out)."""
    if affected_side == "auto":
        side, why = infer_affected_side(measured)
        if side is None:
            raise ValueError(
                f"affected_side=auto: cannot tell the affected side ({why}); "
                "give affected_side=left or right"
            )
        return side, f"automatic: {why}"
    if affected_side not in SIDES:
        raise ValueError(f"affected_side must be left, right or auto, not {affected_side!r}")
    return affected_side, "configuration"


def measure_subject(
    subject: str,
    day0: str,
    sessions: Sequence[Session | Mapping[str, Any]],
    affected_side: str,
    baseline: str | None = None,
    flags: Sequence[QCFlag] = (),
) -> tuple[list[SessionVolumes], str, str, dict[str, Any]]:
    """Measure every session's label map over the common extent; resolve ``'auto'`` sides.

    Parameters
    ----------
    sessions : :class:`Session` records (or mappings :func:`as_session` reads, their days
        counted from `day0`); the transform of the baseline is not used.
    baseline : session label of the baseline; the extent is in its coordinates.
    flags : QC flags (:mod:`pipeline.qc`). A structure an ``exclude`` flag removes is None
        (not available); a session with nothing left (failed registration, not T1-like)
        neither narrows the common extent nor the common field of view.

    Returns
    -------
    (session volumes sorted by date, affected side, how the side was decided, extent info)
    """
    ordered = load_sessions(sorted((as_session(s, day0) for s in sessions),
                                   key=lambda s: s.study_date))
    transforms = [None if s.label == baseline else s.transform for s in ordered]
    usable = [not qc_mod.session_excluded(flags, s.label) for s in ordered]
    # each label map scanned once for its sides (the extent's fields of view and the volumes)
    sides = [sides_present(sitk.GetArrayViewFromImage(s.labels)) for s in ordered]
    extent, fovs, extent_info = measurement_extent([s.labels for s in ordered], transforms,
                                                   usable, [fov_pieces(s) for s in ordered],
                                                   sides)
    measured = [measure_session(s, xfm, extent, fovs if ok else (), flags, present)
                for s, xfm, ok, present in zip(ordered, transforms, usable, sides, strict=True)]
    side, how = resolve_side(affected_side, measured)
    return measured, side, how, extent_info


def write_profiles(
    sessions: Sequence[Session], baseline: str, csa_path: Path, circ_path: Path
) -> dict[str, Any]:
    """Cross-sectional area and circumference profiles of every session in baseline
    coordinates, relative to the bone landmark found on the baseline. Returns the landmarks."""
    sessions = load_sessions(sessions)
    base = next(s for s in sessions if s.label == baseline)
    landmarks = find_landmarks(base.labels)
    csa: list[dict[str, Any]] = []
    circ: list[dict[str, Any]] = []
    for s in sorted(sessions, key=lambda s: s.study_date):
        xfm = None if s.label == baseline else s.transform
        csa += csa_profile(s.labels, xfm, landmarks, session=s.label)
        circ += circumference_profile(s.labels, xfm, landmarks, session=s.label)
    write_profile_tsv(csa_path, csa, CSA_COLUMNS)
    write_profile_tsv(circ_path, circ, CIRCUMFERENCE_COLUMNS)
    return {side: {"z_mm": round(lm.z_mm, 2), "method": lm.method}
            for side, lm in landmarks.items()}


# ----------------------------------------------------------------------------- command line


def build_parser() -> argparse.ArgumentParser:
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
    p.add_argument("--baseline", default=None,
                   help="baseline session label (default: the last session on or before "
                   "day 0, else the first)")
    p.add_argument("--repeatability", default=None, type=Path,
                   help="repeatability model JSON (default: the packaged one)")
    p.add_argument("--out", required=True, type=Path, help="volumes.tsv")
    p.add_argument("--side-json", required=True, type=Path,
                   help="where to write the resolved affected side, extent and registration")
    p.add_argument("--csa", type=Path, default=None, help="cross-sectional area profile TSV")
    p.add_argument("--circumference", type=Path, default=None, help="circumference TSV")
    return p


def read_sessions(args: argparse.Namespace, parser: argparse.ArgumentParser) -> list[Session]:
    """The sessions of the command line, in the order of ``--dseg``: dates from
    sessions.json, QC sidecars and registration records matched by session label."""
    index = json.loads(args.sessions_json.read_text(encoding="utf-8"))
    dates = {s["session"]: s["study_date"] for s in index["sessions"]}
    xfms = {session_of(x): x for x in args.xfm}
    sidecars = {session_of(q): q for q in args.qc}
    sessions = []
    for path in args.dseg:
        label = session_of(path)
        if label not in dates:
            parser.error(f"{path}: session {label or '(no _ses-<label>_ in the name)'} is not "
                         f"listed in {args.sessions_json}")
        sessions.append(read_session(label, dates[label], session_day(dates[label], args.day0),
                                     path, sidecars.get(label), xfms.get(label)))
    return sessions


def _profiles(args: argparse.Namespace, sessions: Sequence[Session], baseline: str,
              warnings: list[str]) -> dict[str, Any]:
    """Write the profiles when asked (empty tables and a warning when they cannot be
    computed); returns the landmarks."""
    if not (args.csa and args.circumference):
        return {}
    try:
        return write_profiles(sessions, baseline, args.csa, args.circumference)
    except ValueError as err:
        warnings.append(f"profiles not computed: {err}")
        write_profile_tsv(args.csa, [], CSA_COLUMNS)
        write_profile_tsv(args.circumference, [], CIRCUMFERENCE_COLUMNS)
        return {}


def _grid_record(m: SessionVolumes) -> dict[str, Any]:
    """A session's entry in side.json: its date, day, extent and grid."""
    return {"session": m.session, "study_date": m.study_date, "day": m.day,
            "z_range_mm": list(m.z_range_mm), "n_slices": m.n_slices,
            "pixel_mm": round(m.pixel_mm, 4), "slice_mm": round(m.slice_mm, 4),
            "misregistration_mm": round(m.misregistration_mm, 4)}


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    sessions = read_sessions(args, parser)
    baseline = args.baseline or default_baseline(sessions)
    flags = collect_flags(sessions)
    sessions = load_sessions(sessions)
    measured, side, how, extent = measure_subject(
        args.subject, args.day0, sessions, args.affected_side, baseline, flags)
    model = RepeatabilityModel.load(args.repeatability)
    write_tsv_atomic(args.out, volume_rows(args.subject, measured, side, model),
                     VOLUME_COLUMNS)
    warnings: list[str] = [extent["warning"]] if "warning" in extent else []
    landmarks = _profiles(args, sessions, baseline, warnings)
    write_json_atomic(args.side_json, {
        "affected_side": side,
        "affected_side_source": how,
        "baseline_session": baseline,
        "extent": extent,
        "landmarks": landmarks,
        "registration": {s.label: s.xfm for s in sessions if s.xfm is not None},
        "warnings": warnings,
        "qc_flags": [f.to_json() for f in flags],
        "uncertainty_model": model.describe(args.repeatability),
        "sessions": [_grid_record(m) for m in measured],
    })
    print(f"{args.subject}: affected side {side} ({how}); {len(measured)} sessions; "
          f"extent {extent}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
