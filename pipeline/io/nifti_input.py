"""NIfTI input: a sessions sheet instead of a DICOM folder, feeding the same downstream rules.

The sheet is a TSV with columns ``subject, study_date, role, path``:

* ``study_date``: YYYY-MM-DD (one session per date);
* ``role``: ``anatomical`` (T1-weighted; also accepted: ``T1w``, ``t1``) or ``fluid``
  (fluid-sensitive: STIR, T2 fat-saturated, Dixon water; also accepted: ``STIR``, ``T2FS``);
* ``path``: a NIfTI file (``.nii`` or ``.nii.gz``), relative to the sheet's folder or absolute.

One image per role and date; or, where each leg was imaged in its own field of view, two rows
of the same role and date, one image per leg: which is left comes from their geometry
(:mod:`pipeline.io.split`), and ``convert`` composes them into one image.

Give the sheet where a study folder would go: ``--config input_dir=sessions.tsv``.
``index`` writes the same ``index.tsv``, ``problems.tsv``, ``sessions.json`` and
``sessions.tsv`` as the DICOM index; ``convert`` writes a session's two images under the same
names and with a JSON sidecar, as the DICOM converter does. Geometry is taken from the NIfTI
affine (sform, else qform) by nibabel and kept exactly; files are only read.

Refused, with the reason, in ``problems.tsv`` / ``index.tsv`` and the summary's warnings (the
other sessions go on):

* an image whose qform and sform both claim a geometry (codes > 0) that disagree: a corner
  of the image placed more than :data:`XFORM_TOLERANCE_MM` apart by the two, a mirrored one
  included. Tools do not agree on which to read (nibabel, FSL and FSLeyes read the sform;
  ITK, ANTs and most ITK-based viewers the qform unless both agree; MRtrix refuses a
  left-right disagreement), so left and right cannot be trusted; dcm2niix writes the two
  equal. Both are shown in the message. One of the two alone (the other's code 0) is used.
* a session whose anatomical and fluid image are the same file, or files of identical
  content (the fluid contrast would be the anatomical one: edema and lesion 0);
* a session whose two images do not overlap in space (their boxes in scanner coordinates
  share no volume): segmentation resamples one onto the other.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

from pipeline.io.files import (
    atomic_path,
    read_tsv,
    sha256_file,
    write_json_atomic,
    write_tsv_atomic,
)
from pipeline.io.sheet import SHEET_COLUMNS

ROLE_ALIASES = {
    "anatomical": "anatomical", "t1w": "anatomical", "t1": "anatomical",
    "fluid": "fluid", "stir": "fluid", "t2fs": "fluid", "fluid-sensitive": "fluid",
}
ROLE_CLASS = {"anatomical": "T1w", "fluid": "fluid"}
ROLE_SUFFIX = {"anatomical": "T1w", "fluid": "fluid"}
INDEX_COLUMNS = ("study_date", "study_time", "series_number", "series_description", "modality",
                 "sequence_class", "orientation", "n_files", "rows", "columns",
                 "pixel_spacing_mm", "slice_spacing_mm", "status", "reason")


#: qform and sform agree when they place every corner of the image within this distance.
XFORM_TOLERANCE_MM = 0.1


class SheetError(ValueError):
    """The sessions sheet cannot be used; the message names the file, line and problem."""


def _orientation(affine: np.ndarray) -> str:
    """axial / coronal / sagittal / oblique from the third voxel axis of a RAS affine."""
    axis = affine[:3, 2] / max(float(np.linalg.norm(affine[:3, 2])), 1e-12)
    k = int(np.argmax(np.abs(axis)))
    if abs(axis[k]) < np.cos(np.deg2rad(30)):
        return "oblique"
    return ("sagittal", "coronal", "axial")[k]


def inspect_nifti(path: Path) -> dict[str, Any]:
    """Header facts of a NIfTI file; raises ValueError saying what is wrong with it."""
    if not path.is_file():
        raise ValueError("file not found")
    try:
        img = nib.load(str(path))
    except Exception as err:  # nibabel raises many types for bad files
        raise ValueError(f"not a readable NIfTI file ({err})") from None
    if not isinstance(img, nib.Nifti1Image | nib.Nifti2Image):
        raise ValueError(f"not a NIfTI image ({type(img).__name__})")
    shape = img.shape
    if len(shape) == 4 and shape[3] == 1:
        shape = shape[:3]
    if len(shape) != 3:
        raise ValueError(f"needs one 3-D volume, found shape {img.shape}")
    if min(shape) < 1:
        raise ValueError(f"empty image, shape {img.shape}")
    affine = img.affine
    if not np.all(np.isfinite(affine)) or abs(np.linalg.det(affine[:3, :3])) < 1e-6:
        raise ValueError("no usable geometry: the affine is singular or not finite")
    sform_code = int(img.header["sform_code"])
    qform_code = int(img.header["qform_code"])
    if sform_code == 0 and qform_code == 0:
        raise ValueError("no geometry: sform_code and qform_code are both 0 (scanner "
                         "orientation unknown, left and right cannot be told apart)")
    if sform_code > 0 and qform_code > 0:
        conflict = xform_conflict(img.header.get_sform(), img.header.get_qform(), shape)
        if conflict:
            raise ValueError(conflict)
    zooms = [float(z) for z in img.header.get_zooms()[:3]]
    return {"shape": list(shape), "zooms_mm": zooms, "affine": affine.tolist(),
            "orientation": _orientation(affine)}


def _corners(affine: np.ndarray, shape: Sequence[int]) -> np.ndarray:
    """Scanner coordinates (8, 3) of the corner voxel centres of a grid."""
    idx = np.array([[i, j, k, 1.0] for i in (0, shape[0] - 1) for j in (0, shape[1] - 1)
                    for k in (0, shape[2] - 1)])
    return (idx @ np.asarray(affine, float).T)[:, :3]


def _describe_xform(affine: np.ndarray) -> str:
    a = np.asarray(affine, float)
    rows = "; ".join(" ".join(f"{v:.4g}" for v in row) for row in a[:3].round(3))
    codes = "".join(nib.aff2axcodes(a))
    hand = "right-handed" if np.linalg.det(a[:3, :3]) > 0 else "left-handed"
    return f"{codes} {hand} [{rows}]"


def xform_conflict(sform: np.ndarray, qform: np.ndarray, shape: Sequence[int]) -> str | None:
    """Why an image's sform and qform cannot both be right, or None when they agree (every
    corner voxel within XFORM_TOLERANCE_MM)."""
    apart = float(np.linalg.norm(_corners(sform, shape) - _corners(qform, shape), axis=1).max())
    if apart <= XFORM_TOLERANCE_MM:
        return None
    mirrored = np.sign(np.linalg.det(sform[:3, :3])) != np.sign(np.linalg.det(qform[:3, :3]))
    return (f"qform and sform disagree{' (one is mirrored)' if mirrored else ''}: they place "
            f"the image's corners up to {apart:.1f} mm apart (tolerance "
            f"{XFORM_TOLERANCE_MM} mm); sform {_describe_xform(sform)}, qform "
            f"{_describe_xform(qform)}. Software differs in which one it reads, so left and "
            "right cannot be trusted: rewrite the file with one geometry (e.g. convert again "
            "with dcm2niix, or set the wrong one's code to 0)")


def _box(facts: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    """Box in scanner coordinates covered by an image (voxel edges included); of both images
    for a composed (one leg per image) entry."""
    if facts.get("parts"):
        boxes = [_box(part) for part in facts["parts"]]
        return (np.min([b[0] for b in boxes], axis=0), np.max([b[1] for b in boxes], axis=0))
    affine = np.asarray(facts["affine"], float)
    shape = facts["shape"]
    idx = np.array([[i, j, k, 1.0] for i in (-0.5, shape[0] - 0.5)
                    for j in (-0.5, shape[1] - 0.5) for k in (-0.5, shape[2] - 0.5)])
    pts = (idx @ affine.T)[:, :3]
    return pts.min(axis=0), pts.max(axis=0)


def same_image_reason(anatomical: Path, fluid: Path) -> str | None:
    """Why one file (or two of identical content) cannot be both roles; None otherwise."""
    if anatomical.resolve() == fluid.resolve():
        return (f"the same file {anatomical.name} is given as anatomical and as fluid image: "
                "edema and lesion would read 0")
    if (anatomical.stat().st_size == fluid.stat().st_size
            and sha256_file(anatomical) == sha256_file(fluid)):
        return (f"anatomical {anatomical.name} and fluid {fluid.name} have identical content: "
                "edema and lesion would read 0")
    return None


def overlap_reason(anatomical: dict[str, Any], fluid: dict[str, Any]) -> str | None:
    """Why a session's two images cannot be segmented together (they share no volume in
    scanner coordinates), or None."""
    (a_lo, a_hi), (f_lo, f_hi) = _box(anatomical), _box(fluid)
    if (np.minimum(a_hi, f_hi) - np.maximum(a_lo, f_lo) > 0).all():
        return None

    def extent(lo: np.ndarray, hi: np.ndarray) -> str:
        return " x ".join(f"{a:.0f}..{b:.0f}" for a, b in zip(lo, hi, strict=True))

    return (f"anatomical {anatomical['description']} and fluid {fluid['description']} do not "
            f"overlap in space (RAS mm: {extent(a_lo, a_hi)} vs {extent(f_lo, f_hi)}): the "
            "two images of a session must cover the same anatomy")


def read_sheet(sheet: Path, subject: str) -> tuple[list[dict[str, Any]], list[dict[str, str]]]:
    """Rows of `subject` from the sheet, with paths resolved; and per-row problems."""
    try:
        rows = read_tsv(sheet)
    except (OSError, UnicodeDecodeError) as err:
        raise SheetError(f"{sheet}: cannot read the sessions sheet ({err})") from None
    if not rows:
        raise SheetError(f"{sheet}: the sessions sheet has no rows")
    missing = [c for c in SHEET_COLUMNS if c not in rows[0]]
    if missing:
        raise SheetError(f"{sheet}: missing column(s) {', '.join(missing)}; "
                         f"expected {', '.join(SHEET_COLUMNS)}")
    out: list[dict[str, Any]] = []
    problems: list[dict[str, str]] = []
    for line, row in enumerate(rows, start=2):
        if (row.get("subject") or "").strip() != subject:
            continue
        where = f"{sheet.name} line {line}"
        path_text = (row.get("path") or "").strip()
        role = ROLE_ALIASES.get((row.get("role") or "").strip().lower())
        if role is None:
            problems.append({"path": path_text, "problem": f"{where}: role {row.get('role')!r} "
                             "is not anatomical or fluid"})
            continue
        try:
            date = dt.date.fromisoformat((row.get("study_date") or "").strip())
        except ValueError:
            problems.append({"path": path_text, "problem": f"{where}: study_date "
                             f"{row.get('study_date')!r} is not YYYY-MM-DD"})
            continue
        path = Path(path_text)
        if not path.is_absolute():
            path = (sheet.parent / path).resolve()
        out.append({"line": line, "study_date": date.isoformat(), "role": role, "path": path})
    return out, problems


def index_sheet(sheet: Path, subject: str) -> dict[str, Any]:
    """Sessions (one per study date with an anatomical and a fluid image), index rows,
    problems and refused dates, in the shapes the DICOM index writes."""
    rows, problems = read_sheet(sheet, subject)
    n_rows = len(rows) + len(problems)  # every row of the subject, usable or not
    index_rows, by_date, why_not = _inspect_rows(rows, problems)
    sessions, refused, pair_problem = _pair_sessions(by_date, why_not, problems)
    _settle_status(index_rows, sessions, pair_problem)
    return {"sessions": sessions, "refused": refused, "index_rows": index_rows,
            "problems": problems, "n_rows": n_rows}


def _inspect_rows(rows: list[dict[str, Any]], problems: list[dict[str, str]]) -> tuple[
        list[dict[str, Any]], dict[str, dict[str, Any]], dict[tuple[str, str], str]]:
    """Each sheet row's image inspected: its index row (status 'used' or 'refused', role
    kept under ``_role``), the usable images by date and role, and why each refused image
    was refused (by date and role). Unreadable images go to `problems`."""
    index_rows: list[dict[str, Any]] = []
    by_date: dict[str, dict[str, Any]] = {}
    why_not: dict[tuple[str, str], str] = {}  # (date, role) -> why its image was refused
    for r in rows:
        status, reason = "used", ""
        facts: dict[str, Any] = {}
        try:
            facts = inspect_nifti(r["path"])
        except ValueError as err:
            status, reason = "refused", str(err)
            problems.append({"path": str(r["path"]), "problem": str(err)})
            why_not.setdefault((r["study_date"], r["role"]), f"{r['path'].name}: {err}")
        entry = by_date.setdefault(r["study_date"], {})
        if status == "used":
            candidate = {"series_uid": "", "series_number": None,
                         "description": r["path"].name, "sequence_class": ROLE_CLASS[r["role"]],
                         "files": [str(r["path"])], **facts}
            status, reason = _add_image(entry, r["role"], candidate, r["study_date"], r["line"])
        zooms = facts.get("zooms_mm", [None, None, None])
        shape = facts.get("shape", [None, None, None])
        index_rows.append({
            "study_date": r["study_date"], "study_time": None, "series_number": None,
            "series_description": r["path"].name, "modality": "MR",
            "sequence_class": ROLE_CLASS[r["role"]], "orientation": facts.get("orientation"),
            "n_files": 1, "rows": shape[1], "columns": shape[0],
            "pixel_spacing_mm": None if zooms[0] is None else f"{zooms[0]:.4g}x{zooms[1]:.4g}",
            "slice_spacing_mm": zooms[2], "status": status, "reason": reason,
            "_role": r["role"],
        })
    return index_rows, by_date, why_not


def lps_x_range_mm(facts: dict[str, Any]) -> tuple[float, float]:
    """Left-right range (LPS x = -RAS x, mm) of an image's voxel centres."""
    x = -_corners(np.asarray(facts["affine"], float), facts["shape"])[:, 0]
    return float(x.min()), float(x.max())


def _add_image(entry: dict[str, Any], role: str, candidate: dict[str, Any], date: str,
               line: int) -> tuple[str, str]:
    """Add a usable image to its date's `entry` under `role`; a second image of the role is
    kept only when the two are one leg each (:func:`pipeline.io.split.pair_sides`: the
    ``parts`` of one composed entry, sides from geometry). Returns the row's (status,
    reason)."""
    from pipeline.io.split import pair_sides  # noqa: PLC0415

    if role not in entry:
        entry[role] = candidate
        return "used", ""
    first = entry[role]
    if first.get("parts"):
        return "refused", (f"a third {role} image for {date} (sheet line {line}); one per role "
                           "and date, or one per leg")
    sides = pair_sides(lps_x_range_mm(first), lps_x_range_mm(candidate))
    if sides is None:
        return "refused", (f"a second {role} image for {date} (sheet line {line}) that is not "
                           "the other leg of the first (their left-right ranges overlap); one "
                           "per role and date, or one per leg")
    parts = sorted(({**image, "side": side, "x_range_mm": [round(v, 2) for v in
                                                            lps_x_range_mm(image)]}
                    for side, image in zip(sides, (first, candidate), strict=True)),
                   key=lambda e: e["side"])
    entry[role] = {"series_uid": "", "series_number": None,
                   "description": " + ".join(f"{e['description']} ({e['side']} leg)"
                                             for e in parts),
                   "sequence_class": ROLE_CLASS[role],
                   "files": [f for e in parts for f in e["files"]], "parts": parts,
                   **{k: first[k] for k in ("shape", "zooms_mm", "affine", "orientation")}}
    return "used", ""


def _pair_sessions(by_date: dict[str, dict[str, Any]], why_not: dict[tuple[str, str], str],
                   problems: list[dict[str, str]]) -> tuple[
        list[dict[str, Any]], list[dict[str, Any]], dict[str, str]]:
    """A session per date with a usable anatomical and fluid image that are two images of
    one place; refused dates with the reason; the reason per date whose pair was refused."""
    sessions, refused = [], []
    pair_problem: dict[str, str] = {}
    for date in sorted(by_date):
        entry = by_date[date]
        lacking = [role for role in ("anatomical", "fluid") if role not in entry]
        if lacking:
            details = [why_not[(date, role)] for role in lacking if (date, role) in why_not]
            refused.append({"study_uid": "", "study_date": date,
                            "reason": f"no usable {' and no '.join(lacking)} image"
                            + (f" ({'; '.join(details)})" if details else "")})
            continue
        a_path = Path(entry["anatomical"]["files"][0])
        f_path = Path(entry["fluid"]["files"][0])
        why = (same_image_reason(a_path, f_path)
               or overlap_reason(entry["anatomical"], entry["fluid"]))
        if why:
            pair_problem[date] = why
            refused.append({"study_uid": "", "study_date": date, "reason": why})
            problems.append({"path": str(f_path), "problem": f"session {date} refused: {why}"})
            continue
        sessions.append({"session": date.replace("-", ""), "study_date": date,
                         "study_uid": "", "anatomical": entry["anatomical"],
                         "fluid": entry["fluid"]})
    return sessions, refused, pair_problem


def _settle_status(index_rows: list[dict[str, Any]], sessions: list[dict[str, Any]],
                   pair_problem: dict[str, str]) -> None:
    """Final status of each usable index row: used by its session, refused with its pair, or
    skipped (the other role's image is missing); the ``_role`` helper key is removed."""
    used = {s["study_date"] for s in sessions}
    for r in index_rows:
        if r["status"] == "used":
            if r["study_date"] in used:
                r["reason"] = f"{r['_role']} of session {r['study_date'].replace('-', '')}"
            elif r["study_date"] in pair_problem:
                r["status"], r["reason"] = "refused", pair_problem[r["study_date"]]
            else:
                r["status"] = "skipped"
                r["reason"] = "session not used: image missing for the other role"
        r.pop("_role", None)


def write_index(sheet: Path, subject: str, out_dir: Path) -> int:
    """Write index.tsv, problems.tsv, sessions.json, sessions.tsv; exit code like the DICOM
    index (0 when at least one session is usable, else 1)."""
    result = index_sheet(sheet, subject)
    write_tsv_atomic(out_dir / "index.tsv", result["index_rows"], INDEX_COLUMNS)
    write_tsv_atomic(out_dir / "problems.tsv", result["problems"], ("path", "problem"))
    write_json_atomic(out_dir / "sessions.json", {
        "input_dir": str(sheet.parent.resolve()), "input_kind": "nifti_sheet",
        "sessions": result["sessions"], "refused_studies": result["refused"],
        "n_files_seen": result["n_rows"], "n_files_dicom": 0,
    })
    write_tsv_atomic(out_dir / "sessions.tsv", [
        {"session": s["session"], "study_date": s["study_date"],
         "anatomical_series": s["anatomical"]["description"],
         "fluid_series": s["fluid"]["description"]} for s in result["sessions"]],
        ("session", "study_date", "anatomical_series", "fluid_series"))
    if not result["sessions"]:
        reasons = "; ".join(f"{r['study_date']}: {r['reason']}" for r in result["refused"])
        print(f"ERROR {sheet}: no session of subject {subject} has both an anatomical and a "
              f"fluid image ({reasons or 'no rows for this subject'}). See "
              f"{out_dir / 'problems.tsv'}.", file=sys.stderr)
        return 1
    return 0


def _convert_composed(entry: dict[str, Any], role: str, subject: str, session: str,
                      out_dir: Path, min_contact_mm: float) -> Path:
    """Write a role given as one image per leg as one image (:func:`pipeline.io.split.compose`;
    read and written by SimpleITK: the index refused images whose qform and sform disagree,
    so SimpleITK's reading of the qform is the geometry nibabel reads)."""
    import SimpleITK as sitk  # noqa: PLC0415 - only composed sessions need it

    from pipeline.io import split  # noqa: PLC0415

    parts = [split.Part(p["side"], sitk.Cast(sitk.ReadImage(p["files"][0]), sitk.sitkFloat32),
                        Path(p["files"][0]).name) for p in entry[role]["parts"]]
    composition = split.compose(parts, t1_like=role == "anatomical",
                                min_contact_mm=min_contact_mm)
    out = out_dir / f"sub-{subject}_ses-{session}_{ROLE_SUFFIX[role]}.nii.gz"
    with atomic_path(out) as tmp:
        sitk.WriteImage(composition.image, str(tmp), True)
    sources = [Path(p["files"][0]) for p in entry[role]["parts"]]
    write_json_atomic(out.with_name(out.name.replace(".nii.gz", ".json")), {
        "Source": "NIfTI sessions sheet", "SourceFile": [p.name for p in sources],
        "SourceSHA256": [sha256_file(p) for p in sources], "Role": role,
        "SequenceClass": entry[role]["sequence_class"], "StudyDate": entry["study_date"],
        "Shape": list(composition.image.GetSize()),
        "Zooms_mm": list(composition.image.GetSpacing()),
        "SplitSeries": composition.record,
        "QCFlags": [flag.to_json() for flag in composition.flags], "warnings": [],
    })
    return out


def convert_session(sessions_json: Path, session: str, subject: str, out_dir: Path,
                    min_contact_mm: float | None = None) -> list[Path]:
    """Write the session's two images as float32 NIfTI (same affine) with JSON sidecars; a
    role given as one image per leg is composed into one (`min_contact_mm`: see
    :func:`pipeline.io.convert.convert_session`)."""
    if min_contact_mm is None:
        from pipeline.settings import defaults  # noqa: PLC0415

        min_contact_mm = float(defaults()["segment"]["min_fov_contact_mm"])
    data = json.loads(Path(sessions_json).read_text(encoding="utf-8"))
    entries = {s["session"]: s for s in data["sessions"]}
    if session not in entries:
        raise SheetError(f"{sessions_json}: no session {session!r}")
    written = []
    for role in ("anatomical", "fluid"):
        if entries[session][role].get("parts"):
            written.append(_convert_composed(entries[session], role, subject, session,
                                             out_dir, min_contact_mm))
            continue
        src = Path(entries[session][role]["files"][0])
        img = nib.load(str(src))
        if not isinstance(img, nib.Nifti1Image | nib.Nifti2Image):
            raise SheetError(f"{src}: not a NIfTI image")
        arr = np.asanyarray(img.dataobj, dtype=np.float32)
        if arr.ndim == 4:
            arr = arr[..., 0]
        out_img = nib.Nifti1Image(arr, img.affine)
        out_img.set_qform(img.affine, code=1)
        out_img.set_sform(img.affine, code=1)
        out = out_dir / f"sub-{subject}_ses-{session}_{ROLE_SUFFIX[role]}.nii.gz"
        with atomic_path(out) as tmp:
            nib.save(out_img, str(tmp))
        write_json_atomic(out.with_name(out.name.replace(".nii.gz", ".json")), {
            "Source": "NIfTI sessions sheet", "SourceFile": src.name,
            "SourceSHA256": sha256_file(src), "Role": role,
            "SequenceClass": entries[session][role]["sequence_class"],
            "StudyDate": entries[session]["study_date"], "Shape": list(arr.shape),
            "Zooms_mm": [float(z) for z in img.header.get_zooms()[:3]],
            "AffineRAS": np.asarray(img.affine).round(6).tolist(), "warnings": [],
        })
        written.append(out)
    return written


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="limbtrack nifti", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    pi = sub.add_parser("index", help="index a sessions sheet")
    pi.add_argument("--sheet", required=True, type=Path)
    pi.add_argument("--subject", required=True)
    pi.add_argument("--out-dir", required=True, type=Path)
    pc = sub.add_parser("convert", help="write one session's images")
    pc.add_argument("--sessions-json", required=True, type=Path)
    pc.add_argument("--session", required=True)
    pc.add_argument("--subject", required=True)
    pc.add_argument("--out-dir", required=True, type=Path)
    pc.add_argument("--min-fov-contact-mm", type=float, default=None,
                    help="contact (mm) with a one-leg image's own field-of-view edge that cuts "
                         "the leg (default: the segmentation setting min_fov_contact_mm)")
    args = p.parse_args(argv)
    try:
        if args.command == "index":
            return write_index(args.sheet, args.subject, args.out_dir)
        for path in convert_session(args.sessions_json, args.session, args.subject,
                                    args.out_dir, args.min_fov_contact_mm):
            print(f"wrote {path}")
    except SheetError as err:
        print(f"ERROR {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
