"""``limbtrack listen``: run the DICOM node until stopped (Ctrl-C or SIGTERM).

Example::

    limbtrack listen --ae-title LIMBTRACK --port 11112 --spool /data/spool \
        --results /data/results --destination PACS@10.0.0.5:104 \
        --patients /data/patients.tsv --quiet-seconds 60 --cores 4

docs/dicom-node.md describes the PACS side, the patients sheet and the status files.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
from collections.abc import Sequence
from pathlib import Path
from types import FrameType

from pipeline.export import ExportError
from pipeline.export.pdf import find_chromium
from pipeline.io.files import is_within
from pipeline.node.jobs import Scheduler
from pipeline.node.runner import NodeSettings, process_patient, stop_runs
from pipeline.node.scp import StorageHandler, make_ae, start_scp
from pipeline.node.send import Destination
from pipeline.node.spool import NodeError, Spool
from pipeline.run import SNAKEFILE

LOG = logging.getLogger("limbtrack.node")
LOG_FORMAT = "%(asctime)s %(levelname)s %(message)s"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="limbtrack listen",
        description="DICOM node: receive MR studies (C-STORE), run the workflow per patient "
        "when the sending has been quiet, send DICOM SEG, SR and the report as Encapsulated "
        "PDF to the destination. See docs/dicom-node.md.")
    p.add_argument("--ae-title", default="LIMBTRACK", help="this node's AE title")
    p.add_argument("--port", type=int, default=11112, help="TCP port to listen on")
    p.add_argument("--host", default="0.0.0.0",
                   help="address to listen on (default all; 127.0.0.1 for this machine only)")
    p.add_argument("--spool", required=True, type=Path,
                   help="folder where received images and status files are kept")
    p.add_argument("--results", required=True, type=Path,
                   help="the workflow's results folder (<results>/P<patient key>/)")
    p.add_argument("--destination", required=True, metavar="AET@HOST:PORT",
                   help="where the results are sent (C-STORE), e.g. PACS@10.0.0.5:104")
    p.add_argument("--patients", type=Path, metavar="patients.tsv",
                   help="sheet with patient_id, day0, affected_side[, events]; a patient "
                   "without a row is filed and waits")
    p.add_argument("--archive", type=Path,
                   help="earlier studies, read-only: <archive>/<patient key>/ or "
                   "<archive>/<PatientID>/ is added to each run")
    p.add_argument("--quiet-seconds", type=float, default=60.0,
                   help="run a patient after this long without new images (default 60)")
    p.add_argument("--cores", type=int, default=2, help="cores of each workflow run")
    p.add_argument("--allow-ae", action="append", metavar="AET",
                   help="accept associations only from this calling AE title (repeatable)")
    p.add_argument("--chromium", help="browser printing the report PDF (default: chromium)")
    p.add_argument("--retry-seconds", type=float, default=300.0,
                   help="a failed send is tried again after this long (3 more tries)")
    p.add_argument("--snakefile", type=Path, default=SNAKEFILE,
                   help=argparse.SUPPRESS)
    p.add_argument("--log", type=Path, help="also write the node's log here "
                   "(default <spool>/node.log)")
    return p


def settings_from(args: argparse.Namespace) -> NodeSettings:
    """Check the options; NodeError says which one is wrong."""
    if not args.snakefile.is_file():
        raise NodeError(f"{args.snakefile}: the workflow's Snakefile is not there (run the "
                        "node from a checkout of limbtrack)")
    if args.patients is not None and not args.patients.is_file():
        raise NodeError(f"--patients {args.patients}: no such file")
    if args.archive is not None and not args.archive.is_dir():
        raise NodeError(f"--archive {args.archive}: no such folder")
    if not 0 < len(args.ae_title.strip()) <= 16:
        raise NodeError(f"--ae-title {args.ae_title!r}: 1 to 16 characters")
    if is_within(args.results, args.spool) or is_within(args.spool, args.results):
        raise NodeError(f"--results {args.results} and --spool {args.spool} must be separate "
                        "folders (neither inside the other)")
    return NodeSettings(
        spool=Spool(args.spool.resolve()), results=args.results.resolve(),
        destination=Destination.parse(args.destination), ae_title=args.ae_title.strip(),
        patients_sheet=args.patients.resolve() if args.patients else None,
        archive=args.archive.resolve() if args.archive else None, cores=args.cores,
        snakefile=args.snakefile.resolve(), chromium=args.chromium)


def _sheet_token(sheet: Path | None) -> object:
    try:
        return None if sheet is None else sheet.stat().st_mtime_ns
    except OSError:
        return None


def _configure_logging(log_file: Path) -> None:
    log_file.parent.mkdir(parents=True, exist_ok=True)
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr),
                                       logging.FileHandler(log_file, encoding="utf-8")]
    for handler in handlers:
        handler.setFormatter(logging.Formatter(LOG_FORMAT))
        LOG.addHandler(handler)
    LOG.setLevel(logging.INFO)
    LOG.propagate = False


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        settings = settings_from(args)
    except NodeError as err:
        print(f"limbtrack listen: {err}", file=sys.stderr)
        return 2
    settings.spool.prepare()
    settings.results.mkdir(parents=True, exist_ok=True)
    _configure_logging(args.log or settings.spool.root / "node.log")
    scheduler = Scheduler(settings.spool, lambda key: process_patient(settings, key),
                          args.quiet_seconds, retry_seconds=args.retry_seconds,
                          sheet_token=lambda: _sheet_token(settings.patients_sheet))
    handler = StorageHandler(settings.spool, scheduler.received, scheduler.closed)
    try:
        server = start_scp(make_ae(settings.ae_title, args.allow_ae), handler, args.host,
                           args.port)
    except OSError as err:
        LOG.error("cannot listen on %s:%d: %s", args.host, args.port, err)
        return 1
    try:
        find_chromium(args.chromium)
    except ExportError as err:
        LOG.warning("%s: results will be sent without the report PDF (status failed)", err)
    resumed = scheduler.resume()
    scheduler.start()
    LOG.info("listening as %s on %s:%d; spool %s; results %s; destination %s; quiet %.0f s;"
             " %d patient(s) resumed", settings.ae_title, args.host, args.port,
             settings.spool.root, settings.results, settings.destination,
             args.quiet_seconds, len(resumed))
    stop = threading.Event()

    def _on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)
    stop.wait()
    LOG.info("stopping: no new associations; the running workflow (if any) is stopped and "
             "runs again at the next start")
    server.shutdown()
    stop_runs()
    scheduler.stop(timeout_s=120)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
