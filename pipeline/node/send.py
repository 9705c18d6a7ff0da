"""C-STORE of result objects to the node's destination (pynetdicom SCU).

One association per send (one patient's results); each object's answer is kept, so the caller
knows exactly which were accepted. Success is status ``0x0000`` or a warning
(``0x0001``, ``0xB000``-``0xBFFF``: stored, perhaps with coercion); anything else, no answer,
or an association that cannot be opened or is lost, is a failure for that object.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pydicom
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, evt

from pipeline.node.scp import no_delay, sop_class_name
from pipeline.node.spool import NodeError

LOG = logging.getLogger("limbtrack.node")

#: ``AET@HOST:PORT``
_DESTINATION_RE = re.compile(r"(?P<aet>[^@]{1,16})@(?P<host>[^:@]+):(?P<port>[0-9]{1,5})")


@dataclass(frozen=True)
class Destination:
    """A DICOM application entity to send to."""

    ae_title: str
    host: str
    port: int

    @classmethod
    def parse(cls, text: str) -> Destination:
        """``AET@HOST:PORT`` (e.g. ``PACS@10.0.0.5:104``)."""
        m = _DESTINATION_RE.fullmatch(text.strip())
        if m is None or not 0 < int(m["port"]) < 65536 or not m["aet"].strip():
            raise NodeError(f"destination {text!r} is not AET@HOST:PORT (an AE title of 1-16 "
                            "characters, a host name or address, a port 1-65535), e.g. "
                            "PACS@10.0.0.5:104")
        return cls(m["aet"].strip(), m["host"], int(m["port"]))

    def __str__(self) -> str:
        return f"{self.ae_title}@{self.host}:{self.port}"


@dataclass(frozen=True)
class SendResult:
    """The destination's answer for one object."""

    path: Path
    sop_class_uid: str
    sop_instance_uid: str
    status: int | None  # None: no answer (not sent, association failed or lost)
    reason: str = ""

    @property
    def accepted(self) -> bool:
        return self.status is not None and (self.status in (0x0000, 0x0001)
                                            or 0xB000 <= self.status <= 0xBFFF)

    def describe(self) -> dict[str, str]:
        """For status.json."""
        out = {"file": self.path.name, "sop_class": sop_class_name(self.sop_class_uid),
               "sop_instance_uid": self.sop_instance_uid,
               "status": "none" if self.status is None else f"0x{self.status:04X}"}
        return {**out, "reason": self.reason} if self.reason else out


def _header(path: Path) -> tuple[str, str, str]:
    """(SOP class, SOP instance, transfer syntax) of a DICOM file."""
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    return (str(ds.SOPClassUID), str(ds.SOPInstanceUID),
            str(ds.file_meta.TransferSyntaxUID))


def send_files(destination: Destination, paths: Sequence[Path], calling_ae: str,
               timeout_s: float = 60.0) -> list[SendResult]:
    """Send `paths` (DICOM files) in one association; one :class:`SendResult` per path."""
    headers = [_header(p) for p in paths]
    ae = AE(ae_title=calling_ae)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout_s
    for sop_class, transfer in sorted({(c, t) for c, _, t in headers}):
        ae.add_requested_context(sop_class, sorted({transfer, ExplicitVRLittleEndian,
                                                    ImplicitVRLittleEndian}))
    assoc = ae.associate(destination.host, destination.port, ae_title=destination.ae_title,
                         evt_handlers=[(evt.EVT_CONN_OPEN, no_delay)])
    if not assoc.is_established:
        why = ("rejected" if assoc.is_rejected else "aborted" if assoc.is_aborted
               else "could not be opened")
        LOG.error("association with %s %s", destination, why)
        return [SendResult(p, c, i, None, f"association with {destination} {why}")
                for p, (c, i, _) in zip(paths, headers, strict=True)]
    results = []
    try:
        for path, (sop_class, sop_uid, _) in zip(paths, headers, strict=True):
            results.append(_send_one(assoc, path, sop_class, sop_uid))
    finally:
        if assoc.is_established:
            assoc.release()
    return results


def _send_one(assoc: object, path: Path, sop_class: str, sop_uid: str) -> SendResult:
    if not assoc.is_established:  # type: ignore[attr-defined]
        return SendResult(path, sop_class, sop_uid, None, "association lost before sending")
    try:
        answer = assoc.send_c_store(path)  # type: ignore[attr-defined]
    except (ValueError, RuntimeError) as err:  # e.g. no accepted presentation context
        return SendResult(path, sop_class, sop_uid, None, str(err))
    if "Status" not in answer:
        return SendResult(path, sop_class, sop_uid, None,
                          "no answer (timeout, or the association was aborted)")
    status = int(answer.Status)
    comment = str(answer.get("ErrorComment") or "")
    result = SendResult(path, sop_class, sop_uid, status, comment)
    level = logging.INFO if result.accepted else logging.ERROR
    LOG.log(level, "C-STORE %s %s: status 0x%04X%s", sop_class_name(sop_class), path.name,
            status, f" ({comment})" if comment else "")
    return result
