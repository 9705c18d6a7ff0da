"""Helpers of the DICOM node tests: free ports, tiny DICOM objects, an in-process destination."""

from __future__ import annotations

import io
import socket
import threading
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from pydicom import Dataset
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE, evt
from pynetdicom.presentation import StoragePresentationContexts

MR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.4"
CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"


def free_port() -> int:
    """A TCP port free on the loopback interface now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def tiny_image(patient_id: str, study_uid: str | None = None,
               sop_class: str = MR_IMAGE_STORAGE, name: str = "DOE^JANE") -> FileDataset:
    """A 4 x 4 image of `sop_class` (MR by default) of patient `patient_id`."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset("", Dataset(), file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.PatientID, ds.PatientName, ds.PatientBirthDate = patient_id, name, "20000101"
    ds.StudyInstanceUID = study_uid or generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.StudyDate, ds.StudyTime, ds.Modality = "20240301", "101300", "MR"
    ds.Rows = ds.Columns = 4
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated = ds.BitsStored = 16
    ds.HighBit, ds.PixelRepresentation = 15, 0
    ds.PixelData = np.arange(16, dtype=np.uint16).tobytes()
    return ds


class Destination:
    """An in-process storage SCP on loopback that keeps what it receives; SOP classes in
    `refuse` get status 0xA700."""

    def __init__(self, ae_title: str = "DEST", refuse: Iterable[str] = ()) -> None:
        self.ae_title = ae_title
        self.port = free_port()
        self.refuse = set(refuse)
        self.received: list[Dataset] = []
        self._lock = threading.Lock()
        ae = AE(ae_title=ae_title)
        ae.supported_contexts = StoragePresentationContexts
        self.server = ae.start_server(("127.0.0.1", self.port), block=False,
                                      evt_handlers=[(evt.EVT_C_STORE, self._store)])

    def _store(self, event: Any) -> int:
        if str(event.request.AffectedSOPClassUID) in self.refuse:
            return 0xA700
        with self._lock:
            self.received.append(event.dataset)
        return 0x0000

    @property
    def address(self) -> str:
        return f"{self.ae_title}@127.0.0.1:{self.port}"

    def close(self) -> None:
        self.server.shutdown()


def send(port: int, datasets: Iterable[Dataset], called: str = "LIMBTRACK") -> list[int]:
    """Send datasets with a pynetdicom SCU; the status of each (None: no answer)."""
    datasets = list(datasets)
    ae = AE(ae_title="SENDER")
    for sop_class in sorted({str(ds.SOPClassUID) for ds in datasets}):
        ae.add_requested_context(sop_class, ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", port, ae_title=called)
    assert assoc.is_established, "association with the node failed"
    try:
        out = []
        for ds in datasets:
            buffer = io.BytesIO()
            ds.save_as(buffer, enforce_file_format=True)  # read back: its encoding is known
            buffer.seek(0)
            answer = assoc.send_c_store(pydicom.dcmread(buffer))
            out.append(int(answer.Status) if "Status" in answer else None)
        return out
    finally:
        assoc.release()


def write(ds: FileDataset, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path
