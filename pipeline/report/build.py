"""The subject report: one self-contained HTML page per subject.

``python -m pipeline.report.build --summary S --longitudinal L --volumes V --index I
--problems P --csa C --circumference F --fluid ... --t1 ... --dseg ... --tfm ... --xfm ...
[--sessions-json J --show-phi] --out report.html`` (or ``limbtrack report ...``) reads exactly
the files it is given: the outputs of the earlier stages (``summary.json``, the tables, each
session's images, label map and registration) matched to the sessions of ``summary.json`` by the
``_ses-<label>_`` entity of their names. It writes one HTML file that needs no network: figures
are PNG data URIs, CSS is inline, there is no JavaScript.

The page is assembled in :mod:`pipeline.report.context` from one builder per part:

- :mod:`~pipeline.report.slices`, :mod:`~pipeline.report.positions`,
  :mod:`~pipeline.report.overlays`: radiological slices, where to look, the overlay views (the
  same baseline position for every session, resampled through its registration);
- :mod:`~pipeline.report.timeline`, :mod:`~pipeline.report.figures`: the figures;
- :mod:`~pipeline.report.qcview`, :mod:`~pipeline.report.states`: QC flags ("not available",
  never 0), session states and confirmation;
- :mod:`~pipeline.report.tables`, :mod:`~pipeline.report.methods`: tables and Methods;
- ``templates/report.html`` with ``figure_captions.html`` and ``methods.html``: every caption
  and fixed sentence (the context holds the numbers). The response rules come from
  :func:`pipeline.longitudinal.describe_rules`.

Patient name, ID and birth date are shown only with ``--show-phi`` (config ``show_phi``), read
from the DICOM headers listed in ``--sessions-json`` (:mod:`pipeline.report.phi`); without it
nothing identifying is read, and keys naming such data are dropped from the tables.

Every string that comes from DICOM headers or files is rendered as text (Jinja2 autoescape).
A figure that fails is replaced by a note that says which figure and why.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from pipeline.io.files import write_text_atomic
from pipeline.report import html
from pipeline.report.context import build_context
from pipeline.report.inputs import SESSION_FILES, ReportInputs

TEMPLATE_NAME = "report.html"

#: Table inputs: option -> (ReportInputs field, help).
TABLE_OPTIONS: dict[str, tuple[str, str]] = {
    "--longitudinal": ("longitudinal", "longitudinal.tsv"),
    "--volumes": ("volumes", "volumes.tsv"),
    "--index": ("index", "index.tsv (all series found)"),
    "--problems": ("problems", "problems.tsv (input files that could not be used)"),
    "--csa": ("csa", "profile_csa.tsv (limb cross-sectional area profile)"),
    "--circumference": ("circumference", "circumference.tsv"),
    "--sessions-json": ("sessions_json", "the index's sessions.json (read with --show-phi)"),
}


def render_html(context: Mapping[str, Any]) -> str:
    """Render the report template with autoescaping on (all file-derived text shows as text)."""
    return html.render(TEMPLATE_NAME, **context)


def build_report(inputs: ReportInputs, out_path: Path, show_phi: bool = False) -> None:
    """Build the self-contained HTML report of one subject and write it atomically.

    Parameters
    ----------
    inputs : ReportInputs
        The files to read (see :class:`pipeline.report.inputs.ReportInputs`).
    out_path : Path
        Where to write the HTML file.
    show_phi : bool
        See :func:`pipeline.report.context.build_context`.
    """
    write_text_atomic(out_path, render_html(build_context(inputs, show_phi=show_phi)))


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="limbtrack report",
                                description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--summary", type=Path, required=True, help="summary.json")
    for option, (dest, what) in TABLE_OPTIONS.items():
        p.add_argument(option, dest=dest, type=Path, help=what)
    for kind, what in SESSION_FILES.items():
        p.add_argument(f"--{kind}", nargs="*", type=Path, default=[],
                       help=f"the {what} of each session (name with _ses-<label>_)")
    p.add_argument("--out", type=Path, required=True, help="output HTML file")
    p.add_argument("--show-phi", action="store_true",
                   help="show the patient's name, ID and birth date (from the DICOM headers "
                        "listed in --sessions-json) and patient-identifying settings keys")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Command line (``limbtrack report``); see the module docstring."""
    p = parser()
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        inputs = ReportInputs.of(
            args.summary,
            **{dest: getattr(args, dest) for dest, _ in TABLE_OPTIONS.values()},
            **{kind: getattr(args, kind) for kind in SESSION_FILES},
        )
    except ValueError as exc:
        p.error(str(exc))
    build_report(inputs, args.out, show_phi=args.show_phi)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
