"""The DICOM node's storage SCP (pynetdicom): C-ECHO, and C-STORE of MR images into the spool.

What a sender sees:

* C-ECHO (Verification) is answered with success.
* MR Image Storage and Enhanced MR Image Storage are accepted in the usual transfer syntaxes
  (:data:`MR_TRANSFER_SYNTAXES`) and filed (:meth:`pipeline.node.spool.Spool.file_object`).
* Any other storage SOP class is accepted at association time, then each object is refused
  with status ``0x0122`` (SOP Class not supported) and a log line naming the class: a
  sender gets a clear per-object answer instead of a missing presentation context. A SOP
  class that is not a storage class at all has its presentation context rejected during
  negotiation (pynetdicom's behaviour); that is logged too, naming the class.
* An object without a usable PatientID (empty or a placeholder) or with a malformed UID is
  refused with ``0xC000`` (cannot understand), because the node files and runs per patient.
  A full disk gives ``0xA700`` (out of resources).

Nothing identifying is logged: patients appear by their key
(:func:`pipeline.node.spool.patient_key`).
"""

from __future__ import annotations

import logging
import socket
import threading
from collections.abc import Callable
from typing import Any

from pydicom import Dataset
from pydicom.uid import (
    JPEG2000,
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
)
from pynetdicom import AE, evt
from pynetdicom.presentation import StoragePresentationContexts
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    EnhancedMRImageStorage,
    MRImageStorage,
    Verification,
)

from pipeline.node.spool import Spool, is_uid, patient_key

LOG = logging.getLogger("limbtrack.node")

#: The SOP classes the node files; every other one is refused.
MR_STORAGE = (str(MRImageStorage), str(EnhancedMRImageStorage))
#: Transfer syntaxes accepted for MR images: uncompressed, deflated, and the compressed ones
#: the workflow decodes (pylibjpeg: JPEG, JPEG-LS, JPEG 2000, RLE).
MR_TRANSFER_SYNTAXES = [
    ExplicitVRLittleEndian, ImplicitVRLittleEndian, DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian, JPEGBaseline8Bit, JPEGExtended12Bit, JPEGLosslessSV1,
    JPEGLSLossless, JPEGLSNearLossless, JPEG2000Lossless, JPEG2000, RLELossless,
]
STATUS_SUCCESS = 0x0000
STATUS_SOP_CLASS_NOT_SUPPORTED = 0x0122
STATUS_OUT_OF_RESOURCES = 0xA700
STATUS_CANNOT_UNDERSTAND = 0xC000


def sop_class_name(uid: object) -> str:
    """``MR Image Storage (1.2.840.10008.5.1.4.1.1.4)``; the UID alone when unknown."""
    text = str(uid or "")
    name = UID(text).name if text else ""
    return f"{name} ({text})" if name and name != text else text or "(no SOP class)"


def no_delay(event: Any) -> None:
    """Turn Nagle's algorithm off on an association's socket (``EVT_CONN_OPEN`` handler).

    A C-STORE is written as several PDUs; with Nagle on, each exchange waits for the peer's
    delayed ACK (about 40 ms on Linux): 320 demo images took 16 s on loopback instead of 1 s.
    """
    sock = getattr(getattr(event.assoc.dul, "socket", None), "socket", None)
    if sock is not None:
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:  # not a TCP socket: nothing to tune
            pass


def _refusal(status: int, comment: str) -> Dataset:
    ds = Dataset()
    ds.Status = status
    ds.ErrorComment = comment[:64]  # LO
    return ds


class StorageHandler:
    """The SCP's event handlers; files into `spool` and tells the scheduler.

    Parameters
    ----------
    spool : Spool
    on_received : callable (patient key, association id) -> None
        Called after each filed object.
    on_closed : callable (association id) -> None
        Called when an association's connection closes (released, aborted or dropped).
    """

    def __init__(self, spool: Spool, on_received: Callable[[str, int], None],
                 on_closed: Callable[[int], None]) -> None:
        self.spool = spool
        self.on_received = on_received
        self.on_closed = on_closed
        self.refused = 0
        self._lock = threading.Lock()

    def handlers(self) -> list[Any]:
        return [(evt.EVT_CONN_OPEN, no_delay),
                (evt.EVT_C_ECHO, self.handle_echo), (evt.EVT_C_STORE, self.handle_store),
                (evt.EVT_ACCEPTED, self.handle_accepted),
                (evt.EVT_CONN_CLOSE, self.handle_close)]

    def handle_echo(self, event: Any) -> int:
        LOG.info("C-ECHO from %s: answered", _peer(event))
        return STATUS_SUCCESS

    def handle_accepted(self, event: Any) -> None:
        for cx in event.assoc.rejected_contexts:
            LOG.warning("association from %s: presentation context for %s rejected (not a "
                        "storage SOP class this node knows)", _peer(event),
                        sop_class_name(cx.abstract_syntax))

    def handle_close(self, event: Any) -> None:
        self.on_closed(id(event.assoc))

    def handle_store(self, event: Any) -> Dataset | int:
        """File one object, or refuse it with a status saying why."""
        sop_class = str(event.request.AffectedSOPClassUID or "")
        if sop_class not in MR_STORAGE:
            with self._lock:
                self.refused += 1
            LOG.warning("refused %s from %s: status 0x0122 SOP class not supported (this node "
                        "accepts MR Image Storage and Enhanced MR Image Storage only)",
                        sop_class_name(sop_class), _peer(event))
            return _refusal(STATUS_SOP_CLASS_NOT_SUPPORTED,
                            "SOP class not supported: MR images only")
        try:
            ds = event.dataset
            key = patient_key(ds.get("PatientID"))
            study_uid = str(ds.get("StudyInstanceUID") or "")
            sop_uid = str(event.request.AffectedSOPInstanceUID or ds.get("SOPInstanceUID"))
        except Exception as err:  # noqa: BLE001 - a dataset that cannot be decoded
            LOG.warning("refused an object from %s: status 0xC000, dataset cannot be decoded "
                        "(%s)", _peer(event), type(err).__name__)
            return _refusal(STATUS_CANNOT_UNDERSTAND, "dataset cannot be decoded")
        problem = (("no PatientID (empty or placeholder)" if key is None else "")
                   or ("" if is_uid(study_uid) else "malformed StudyInstanceUID")
                   or ("" if is_uid(sop_uid) else "malformed SOPInstanceUID"))
        if key is None or problem:
            LOG.warning("refused an MR object from %s: status 0xC000, %s", _peer(event),
                        problem)
            return _refusal(STATUS_CANNOT_UNDERSTAND, problem)
        try:
            self.spool.file_object(key, study_uid, sop_uid, event.encoded_dataset())
        except OSError as err:
            LOG.error("cannot file an object of patient %s: %s (status 0xA700)", key, err)
            return _refusal(STATUS_OUT_OF_RESOURCES, "cannot write to the spool folder")
        self.on_received(key, id(event.assoc))
        return STATUS_SUCCESS


def _peer(event: Any) -> str:
    """The calling AE title and address of an event's association."""
    requestor = event.assoc.requestor
    title = requestor.ae_title
    title = title.decode(errors="replace") if isinstance(title, bytes) else str(title)
    return f"{title.strip()}@{requestor.address}:{requestor.port}"


def make_ae(ae_title: str, allowed_calling: list[str] | None = None) -> AE:
    """The node's application entity: Verification, every storage SOP class (MR ones with
    :data:`MR_TRANSFER_SYNTAXES`, the others to refuse them clearly), the called AE title
    enforced, and optionally only the given calling AE titles."""
    ae = AE(ae_title=ae_title)
    ae.add_supported_context(Verification)
    for cx in StoragePresentationContexts:
        sop_class = str(cx.abstract_syntax)
        syntaxes = MR_TRANSFER_SYNTAXES if sop_class in MR_STORAGE else cx.transfer_syntax
        ae.add_supported_context(sop_class, syntaxes)
    ae.require_called_aet = True
    if allowed_calling:
        ae.require_calling_aet = allowed_calling
    return ae


def start_scp(ae: AE, handler: StorageHandler, host: str, port: int) -> Any:
    """Start the SCP in its own threads; returns pynetdicom's server (``.shutdown()``)."""
    return ae.start_server((host, port), block=False, evt_handlers=handler.handlers())
