"""The DICOM node's storage SCP (pipeline.node.scp) on loopback, with a pynetdicom SCU:
C-ECHO, MR filed per patient and study, other SOP classes refused with a clear status."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
from node_helpers import CT_IMAGE_STORAGE, SECONDARY_CAPTURE, free_port, send, tiny_image
from pynetdicom import AE
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from pipeline.node.scp import StorageHandler, make_ae, sop_class_name, start_scp
from pipeline.node.spool import Spool, patient_key

PATIENT_ROOT_FIND = "1.2.840.10008.5.1.4.1.2.1.1"


class Node:
    def __init__(self, root: Path) -> None:
        self.spool = Spool(root)
        self.spool.prepare()
        self.received: list[tuple[str, int]] = []
        self.closed: list[int] = []
        self.handler = StorageHandler(self.spool, lambda k, a: self.received.append((k, a)),
                                      self.closed.append)
        self.port = free_port()
        self.server = start_scp(make_ae("LIMBTRACK"), self.handler, "127.0.0.1", self.port)


@pytest.fixture()
def node(tmp_path: Path) -> Iterator[Node]:
    n = Node(tmp_path / "spool")
    yield n
    n.server.shutdown()


def test_echo(node: Node) -> None:
    ae = AE(ae_title="SENDER")
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", node.port, ae_title="LIMBTRACK")
    assert assoc.is_established
    assert assoc.send_c_echo().Status == 0x0000
    assoc.release()


def test_mr_filed_per_patient_and_study(node: Node) -> None:
    a1, a2 = tiny_image("PAT-A"), tiny_image("PAT-A")
    a2.StudyInstanceUID = a1.StudyInstanceUID
    b = tiny_image("PAT-B", name="ROE^RICHARD")
    a_other_study = tiny_image("PAT-A")
    assert send(node.port, [a1, a2, b, a_other_study]) == [0, 0, 0, 0]
    ka, kb = patient_key("PAT-A"), patient_key("PAT-B")
    assert ka and kb and node.spool.patients() == sorted([ka, kb])
    assert node.spool.counts(ka) == (2, 3) and node.spool.counts(kb) == (1, 1)
    filed = node.spool.object_path(ka, a1.StudyInstanceUID, a1.SOPInstanceUID)
    back = pydicom.dcmread(filed)
    assert back.SOPInstanceUID == a1.SOPInstanceUID and back.PixelData == a1.PixelData
    assert node.spool.patient_id(ka) == "PAT-A"
    names = " ".join(str(p) for p in node.spool.root.rglob("*"))
    assert "PAT-" not in names and "DOE" not in names and "ROE" not in names
    assert [k for k, _ in node.received] == [ka, ka, kb, ka]
    assert len({a for _, a in node.received}) == 1  # one association


def test_other_sop_classes_refused_with_0122(node: Node,
                                             caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="limbtrack.node")
    ct = tiny_image("PAT-A", sop_class=CT_IMAGE_STORAGE)
    sc = tiny_image("PAT-A", sop_class=SECONDARY_CAPTURE)
    assert send(node.port, [ct, sc, tiny_image("PAT-A")]) == [0x0122, 0x0122, 0]
    assert "refused CT Image Storage (1.2.840.10008.5.1.4.1.1.2)" in caplog.text
    assert "Secondary Capture Image Storage" in caplog.text
    assert "0x0122 SOP class not supported" in caplog.text
    assert node.spool.counts(patient_key("PAT-A") or "")[1] == 1
    assert node.handler.refused == 2


def test_no_patient_id_refused(node: Node, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="limbtrack.node")
    assert send(node.port, [tiny_image(""), tiny_image("ANONYMOUS")]) == [0xC000, 0xC000]
    assert "no PatientID" in caplog.text
    assert node.spool.patients() == []


def test_not_a_storage_class_rejected_at_negotiation(node: Node,
                                                     caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="limbtrack.node")
    ae = AE(ae_title="SENDER")
    ae.add_requested_context(Verification)
    ae.add_requested_context(PATIENT_ROOT_FIND)
    assoc = ae.associate("127.0.0.1", node.port, ae_title="LIMBTRACK")
    assert assoc.is_established
    assoc.release()
    assert "Patient Root Query/Retrieve Information Model - FIND" in caplog.text
    assert "rejected" in caplog.text


def test_wrong_called_ae_title_rejected(node: Node) -> None:
    ae = AE(ae_title="SENDER")
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", node.port, ae_title="SOMEONE")
    assert assoc.is_rejected


def test_association_close_reported(node: Node) -> None:
    send(node.port, [tiny_image("PAT-A")])
    for _ in range(50):  # the close event arrives on the server's thread
        if node.closed:
            break
        time.sleep(0.05)
    assert node.closed == [node.received[0][1]]


def test_sop_class_name() -> None:
    assert sop_class_name("1.2.840.10008.5.1.4.1.1.4") == \
        "MR Image Storage (1.2.840.10008.5.1.4.1.1.4)"
    assert sop_class_name("1.2.3.999") == "1.2.3.999"
    assert sop_class_name("") == "(no SOP class)"
