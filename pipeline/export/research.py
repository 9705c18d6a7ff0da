"""Opt-in research export: de-identified tables and NIfTI with consistently shifted dates.

From the files of one subject named on the command line (the workflow's rule passes its
declared inputs), writes ``<subject_dir>/research/`` holding only:

* ``sub-<pseudonym>_volumes.tsv`` and ``sub-<pseudonym>_longitudinal.tsv``: the subject ID
  replaced by a pseudonym, every date shifted back by the same per-subject number of days
  (``day``, the days since day 0, is unchanged, so the timeline and the response pattern
  are too);
* ``ses-<shifted date>/sub-<pseudonym>_ses-<shifted date>_{T1w,fluid,dseg}.nii.gz``: voxels
  and geometry only (NIfTI text fields and extensions emptied);
* ``dataset_description.json`` saying what was done.

Pseudonym and shift derive from a secret salt (config ``research.salt``) and the subject ID
with HMAC-SHA-256, so they are stable across runs and cohorts but cannot be recomputed
without the salt. No salt, no export: a shift anyone can recompute protects nothing.
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import hmac
import os
import shutil
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

import nibabel as nib
import numpy as np

from pipeline import __version__
from pipeline.io.files import atomic_path, read_tsv, write_json_atomic, write_tsv_atomic
from pipeline.names import session_of

MAX_SHIFT_DAYS = 365
TABLES = ("volumes.tsv", "longitudinal.tsv")
IMAGES = ("T1w", "fluid", "dseg")


class ResearchExportError(ValueError):
    """The export cannot be made safely; the message says why."""


def pseudonym_and_shift(subject: str, salt: str) -> tuple[str, int]:
    """Pseudonym (``R`` + 10 hex digits) and date shift (1..365 days back) of a subject."""
    if len(salt) < 16:
        raise ResearchExportError(
            "research export needs a secret salt of at least 16 characters (config "
            "research.salt); without it pseudonyms and date shifts could be recomputed")
    digest = hmac.new(salt.encode(), subject.encode(), hashlib.sha256).digest()
    shift = 1 + int.from_bytes(digest[:4], "big") % MAX_SHIFT_DAYS
    return "R" + digest[4:9].hex(), shift


def shift_date(date: str, days: int) -> str:
    """ISO date `days` earlier; an unknown date stays unknown."""
    try:
        return (dt.date.fromisoformat(date) - dt.timedelta(days=days)).isoformat()
    except ValueError:
        return "n/a"


def _deidentified_nifti(src: Path, dst: Path) -> None:
    img = nib.load(str(src))
    if not isinstance(img, nib.Nifti1Image | nib.Nifti2Image):
        raise ResearchExportError(f"{src}: not a NIfTI image")
    data = np.asanyarray(img.dataobj)
    out = nib.Nifti1Image(data, img.affine)
    out.set_qform(img.affine, code=1)
    out.set_sform(img.affine, code=1)
    out.header["descrip"] = b""
    out.header["aux_file"] = b""
    out.header["intent_name"] = b""
    dst.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(dst) as tmp:
        nib.save(out, str(tmp))


def export_subject(subject: str, salt: str, out_dir: Path, tables: Mapping[str, Path],
                   images: Mapping[str, Sequence[Path]]) -> Path:
    """Write the research export of `subject` into `out_dir` (replaced as a whole).

    Parameters
    ----------
    tables : ``{"volumes.tsv": path, "longitudinal.tsv": path}`` (the names of :data:`TABLES`)
    images : ``{kind: [path per session]}`` for the kinds of :data:`IMAGES`; the session label
        is taken from each file name (``..._ses-<label>_...``).
    """
    pseudo, shift = pseudonym_and_shift(subject, salt)
    tmp_dir = out_dir.with_name(out_dir.name + ".partial")
    shutil.rmtree(tmp_dir, ignore_errors=True)
    tmp_dir.mkdir(parents=True)
    for name in TABLES:
        rows = read_tsv(tables[name])
        if not rows:
            continue
        for row in rows:
            row["subject"] = pseudo
            row["study_date"] = shift_date(row["study_date"], shift)
            if row.get("session"):  # the label is the study date (and time): shifted too
                row["session"] = _shifted_label(row["session"], shift)
        write_tsv_atomic(tmp_dir / f"sub-{pseudo}_{name}", rows, list(rows[0]))
    for kind in IMAGES:
        for src in images.get(kind, ()):
            new_label = _shifted_label(session_of(src), shift)
            _deidentified_nifti(Path(src), tmp_dir / f"ses-{new_label}" /
                                f"sub-{pseudo}_ses-{new_label}_{kind}.nii.gz")
    write_json_atomic(tmp_dir / "dataset_description.json", {
        "Name": f"limbtrack research export of {pseudo}",
        "DatasetType": "derivative",
        "GeneratedBy": [{"Name": "limbtrack", "Version": __version__}],
        "Deidentification": (
            "subject ID replaced by an HMAC pseudonym; every date shifted back by the same "
            "secret number of days (1-365); days since day 0 unchanged; NIfTI text fields "
            "emptied; no DICOM-derived text, paths or UIDs"),
    })
    shutil.rmtree(out_dir, ignore_errors=True)
    tmp_dir.rename(out_dir)
    return out_dir


def _shifted_label(label: str, shift: int) -> str:
    """A session label ``YYYYMMDD[THHMMSS]`` with its date shifted back by `shift` days."""
    if not label:
        raise ResearchExportError("an image file name has no _ses-<label>_ entity")
    date = f"{label[:4]}-{label[4:6]}-{label[6:8]}"
    return shift_date(date, shift).replace("-", "") + label[8:]


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="limbtrack research", description=__doc__.split("\n")[0])
    p.add_argument("--subject", required=True)
    p.add_argument("--volumes", required=True, type=Path, help="the subject's volumes.tsv")
    p.add_argument("--longitudinal", required=True, type=Path,
                   help="the subject's longitudinal.tsv")
    for kind in IMAGES:
        p.add_argument(f"--{kind.lower()}", nargs="*", default=[], type=Path,
                       help=f"the sessions' _{kind}.nii.gz images")
    p.add_argument("--out-dir", required=True, type=Path)
    p.add_argument("--salt-env", default="LIMBTRACK_RESEARCH_SALT",
                   help="environment variable holding the secret salt (kept out of logs)")
    p.add_argument("--salt", default=None, help="the salt itself (prefer --salt-env)")
    args = p.parse_args(argv)
    salt = args.salt if args.salt is not None else os.environ.get(args.salt_env, "")
    try:
        out = export_subject(
            args.subject, salt, args.out_dir,
            {"volumes.tsv": args.volumes, "longitudinal.tsv": args.longitudinal},
            {kind: getattr(args, kind.lower()) for kind in IMAGES})
    except ResearchExportError as err:
        print(f"ERROR {args.out_dir}: {err}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
