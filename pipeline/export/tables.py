"""Label tables for viewers and the BIDS derivative description of a subject's label maps.

Per session label map (``ses-<S>/sub-<subject>_ses-<S>_dseg.nii.gz``):
    ``..._dseg.tsv``          BIDS lookup table (index, name, abbreviation, color, mapping);
    ``..._dseg.itksnap.txt``  ITK-SNAP label description file (IDX R G B A VIS MSH "LABEL");
    ``..._dseg.ctbl``         3D Slicer colour table (``# Color table file`` format).
Per subject: ``dataset_description.json`` (BIDS derivative) and ``dseg.tsv``.

They carry no patient or study identification.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pipeline import __version__
from pipeline.export import ExportError
from pipeline.io.files import write_json_atomic, write_text_atomic
from pipeline.labels import LABEL_COLORS, LABEL_NAMES

#: BIDS version the dataset description and lookup tables follow.
BIDS_VERSION = "1.10.0"

#: BIDS common label of each tissue class (0 background, 4 bone, 5 soft tissue, 7 lesion).
_BIDS_MAPPING = {0: 0, 1: 5, 2: 5, 3: 4, 4: 7}
_ABBREVIATION = {0: "BG", 1: "ST", 2: "ED", 3: "BONE", 4: "ML"}


def _rgb(value: int) -> tuple[int, int, int]:
    return LABEL_COLORS[value]


def _side_class(value: int) -> tuple[str, int]:
    """(side, tissue class 1..4) of a label value 1..8."""
    side = "right" if value <= 4 else "left"
    return side, value - (0 if side == "right" else 4)


def bids_lookup_tsv() -> str:
    """The BIDS ``dseg.tsv`` lookup table: index, name, abbreviation, color, mapping.

    ``mapping`` is the BIDS common image-derived label (0 background, 4 bone, 5 soft tissue,
    7 lesion); edema is soft tissue there, as in docs/design.md's ``soft_tissue`` structure.
    """
    lines = ["index\tname\tabbreviation\tcolor\tmapping"]
    for value, name in sorted(LABEL_NAMES.items()):
        if value == 0:
            abbreviation, mapping = _ABBREVIATION[0], _BIDS_MAPPING[0]
        else:
            side, tissue = _side_class(value)
            abbreviation = side[0].upper() + _ABBREVIATION[tissue]
            mapping = _BIDS_MAPPING[tissue]
        color = "#{:02x}{:02x}{:02x}".format(*_rgb(value))
        lines.append(f"{value}\t{name}\t{abbreviation}\t{color}\t{mapping}")
    return "\n".join(lines) + "\n"


def itksnap_label_file() -> str:
    """ITK-SNAP label description file: ``IDX R G B A VIS MSH "LABEL"`` per line.

    A is the opacity (0..1), VIS and MSH the label and mesh visibility (0 or 1); background
    is invisible, as in ITK-SNAP's own ``Clear Label``.
    """
    lines = [
        "################################################",
        "# ITK-SnAP Label Description File",
        f"# limbtrack {__version__} label map (labels 1-4 right, 5-8 left)",
        "# File format:",
        "# IDX   -R-  -G-  -B-  -A--  VIS MSH  LABEL",
        "# Fields:",
        "#    IDX:   Zero-based index",
        "#    -R-:   Red color component (0..255)",
        "#    -G-:   Green color component (0..255)",
        "#    -B-:   Blue color component (0..255)",
        "#    -A-:   Label transparency (0.00 .. 1.00)",
        "#    VIS:   Label visibility (0 or 1)",
        "#    MSH:   Label mesh visibility (0 or 1)",
        "#  LABEL:   Label description",
        "################################################",
    ]
    for value, name in sorted(LABEL_NAMES.items()):
        r, g, b = _rgb(value)
        shown = 0 if value == 0 else 1
        alpha = "0" if value == 0 else "1"
        lines.append(f"{value:5d} {r:5d} {g:4d} {b:4d} {alpha:>8s} {shown:2d} {shown:2d}"
                     f'    "{name}"')
    return "\n".join(lines) + "\n"


def slicer_color_table(name: str = "limbtrack") -> str:
    """3D Slicer discrete colour table (``.ctbl``): ``index name R G B A`` (0..255).

    Slicer's format forbids spaces in names; they become underscores.
    """
    lines = [f"# Color table file {name}", f"# {len(LABEL_NAMES)} values"]
    for value, label in sorted(LABEL_NAMES.items()):
        r, g, b = _rgb(value)
        alpha = 0 if value == 0 else 255
        lines.append(f"{value} {label.replace(' ', '_')} {r} {g} {b} {alpha}")
    return "\n".join(lines) + "\n"


def dataset_description() -> dict[str, Any]:
    """BIDS derivative ``dataset_description.json`` content."""
    return {
        "Name": "limbtrack: longitudinal limb volumetry",
        "BIDSVersion": BIDS_VERSION,
        "DatasetType": "derivative",
        "GeneratedBy": [
            {
                "Name": "limbtrack",
                "Version": __version__,
                "Description": "Limb, edema, bone and marrow lesion label maps and volumes "
                "on serial MRI (labels 1-4 right, 5-8 left; see dseg.tsv)",
            }
        ],
    }


def write_label_tables(dseg: Path, lookup_tsv: Path, itksnap: Path, ctbl: Path) -> list[Path]:
    """Write the BIDS, ITK-SNAP and Slicer tables of the label map `dseg` (which must exist;
    its name, without suffixes, names the Slicer table)."""
    dseg = Path(dseg)
    if not dseg.exists():
        raise ExportError(f"{dseg}: label map not found; run the workflow first")
    write_text_atomic(lookup_tsv, bids_lookup_tsv())
    write_text_atomic(itksnap, itksnap_label_file())
    write_text_atomic(ctbl, slicer_color_table(dseg.name.split(".")[0]))
    return [Path(lookup_tsv), Path(itksnap), Path(ctbl)]


def write_dataset_files(description_json: Path, lookup_tsv: Path) -> list[Path]:
    """Write a subject's ``dataset_description.json`` and its top-level ``dseg.tsv``."""
    write_json_atomic(description_json, dataset_description())
    write_text_atomic(lookup_tsv, bids_lookup_tsv())
    return [Path(description_json), Path(lookup_tsv)]
