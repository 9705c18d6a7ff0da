"""``limbtrack export``: the per-session and per-subject exports for other tools.

Every file is named on the command line (the workflow's rules pass their declared inputs and
outputs); nothing is looked up in the results folder::

    limbtrack export tables --dseg D_dseg.nii.gz --lookup D_dseg.tsv \\
        --itksnap D_dseg.itksnap.txt --ctbl D_dseg.ctbl
    limbtrack export dicom --subject S --session X --dseg D_dseg.nii.gz \\
        --fluid-json D_fluid.json --sessions-json sessions.json --volumes volumes.tsv \\
        --seg D_seg.dcm --sr D_sr.dcm
    limbtrack export dataset --description dataset_description.json --lookup dseg.tsv

What they write: :mod:`pipeline.export.tables` (label tables, BIDS dataset description) and
:mod:`pipeline.export.dicom` (DICOM Segmentation and TID 1500 Structured Report).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from pipeline.export import ExportError
from pipeline.export.tables import write_dataset_files, write_label_tables

if TYPE_CHECKING:
    from pipeline.export.dicom import SessionExport


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="limbtrack export",
        description="Label tables for ITK-SNAP / 3D Slicer / BIDS, the BIDS dataset files, "
        "and DICOM SEG + SR of a session; every file named here.")
    sub = p.add_subparsers(dest="what", required=True)
    t = sub.add_parser("tables", help="BIDS, ITK-SNAP and Slicer tables of one label map")
    t.add_argument("--dseg", required=True, type=Path, help="the session's label map")
    t.add_argument("--lookup", required=True, type=Path, help="BIDS _dseg.tsv to write")
    t.add_argument("--itksnap", required=True, type=Path, help="ITK-SNAP label file to write")
    t.add_argument("--ctbl", required=True, type=Path, help="3D Slicer colour table to write")
    d = sub.add_parser("dicom", help="DICOM Segmentation and Structured Report of a session")
    d.add_argument("--subject", required=True, help="subject ID (tracking UIDs)")
    d.add_argument("--session", required=True, help="session label in sessions.json")
    d.add_argument("--dseg", required=True, type=Path, help="the session's label map")
    d.add_argument("--fluid-json", required=True, type=Path,
                   help="the fluid series' JSON sidecar (its SeriesInstanceUID is checked)")
    d.add_argument("--sessions-json", required=True, type=Path,
                   help="the index's sessions.json (the source DICOM files)")
    d.add_argument("--volumes", required=True, type=Path, help="the subject's volumes.tsv")
    d.add_argument("--seg", required=True, type=Path, help="DICOM SEG to write")
    d.add_argument("--sr", required=True, type=Path, help="DICOM SR to write")
    s = sub.add_parser("dataset", help="dataset_description.json and dseg.tsv of a subject")
    s.add_argument("--description", required=True, type=Path,
                   help="dataset_description.json to write")
    s.add_argument("--lookup", required=True, type=Path, help="dseg.tsv to write")
    return p


def _print_notes(result: SessionExport) -> None:
    """Where the SR's volumes (over the common extent) differ from the whole segment, and
    which volumes the SR reports as not available."""
    session = result.session
    for (side, structure), (tsv_ml, whole_ml) in sorted(result.volumes_ml.items()):
        if abs(tsv_ml - whole_ml) > 0.01:
            print(f"note: ses-{session} {side} {structure}: {tsv_ml} mL over the common "
                  f"extent, {whole_ml:.3f} mL in the whole segment")
    for (side, structure), qc_codes in sorted(result.not_available.items()):
        why = ", ".join(qc_codes) or "n/a in volumes.tsv"
        print(f"note: ses-{session} {side} {structure}: not available ({why}); no volume "
              "in the SR, only the reason")


def _run(args: argparse.Namespace) -> tuple[list[Path], SessionExport | None]:
    """The files written, and for a DICOM export what it found."""
    if args.what == "tables":
        return write_label_tables(args.dseg, args.lookup, args.itksnap, args.ctbl), None
    if args.what == "dataset":
        return write_dataset_files(args.description, args.lookup), None
    # lazily: nibabel and pydicom's SR codes (0.6-0.9 s) only for the DICOM export
    from pipeline.export.dicom import DicomPaths, export_dicom

    result = export_dicom(DicomPaths(
        subject=args.subject, session=args.session, dseg=args.dseg,
        fluid_json=args.fluid_json, sessions_json=args.sessions_json,
        volumes_tsv=args.volumes, seg=args.seg, sr=args.sr))
    return result.written, result


def main(argv: Sequence[str] | None = None) -> int:
    """Command line; exit status 1 when the export cannot be written (the reason on stderr)."""
    args = build_parser().parse_args(argv)
    try:
        written, result = _run(args)
    except ExportError as err:
        where = f"ses-{args.session}: " if args.what == "dicom" else ""
        print(f"limbtrack export: {where}{err}", file=sys.stderr)
        return 1
    for path in written:
        print(f"wrote {path}")
    if result is not None:
        _print_notes(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
