"""Sending results (pipeline.node.send, pipeline.node.runner.send_results) to an in-process
destination on loopback: every answer kept, ``sent`` only when all were accepted, nothing
accepted is sent twice."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from node_helpers import (
    CT_IMAGE_STORAGE,
    MR_IMAGE_STORAGE,
    Destination,
    free_port,
    tiny_image,
    write,
)

from pipeline.node import runner
from pipeline.node.send import Destination as NodeDestination
from pipeline.node.send import send_files
from pipeline.node.spool import NodeError, Spool
from pipeline.node.status import read_status

KEY = "0123456789ab"


@pytest.fixture()
def dest() -> Iterator[Destination]:
    d = Destination(refuse=[CT_IMAGE_STORAGE])
    yield d
    d.close()


def test_destination_parse() -> None:
    d = NodeDestination.parse("PACS@10.0.0.5:104")
    assert (d.ae_title, d.host, d.port) == ("PACS", "10.0.0.5", 104)
    assert str(d) == "PACS@10.0.0.5:104"
    for bad in ("PACS", "PACS@host", "@host:104", "PACS@host:0", "PACS@host:70000",
                "A" * 17 + "@h:1"):
        with pytest.raises(NodeError, match="AET@HOST:PORT"):
            NodeDestination.parse(bad)


def test_send_files_keeps_every_answer(tmp_path: Path, dest: Destination) -> None:
    mr = write(tiny_image("P1"), tmp_path / "mr.dcm")
    ct = write(tiny_image("P1", sop_class=CT_IMAGE_STORAGE), tmp_path / "ct.dcm")
    results = send_files(NodeDestination.parse(dest.address), [mr, ct], "LIMBTRACK")
    assert [r.accepted for r in results] == [True, False]
    assert results[1].status == 0xA700
    assert results[1].describe()["sop_class"].startswith("CT Image Storage")
    assert len(dest.received) == 1 and dest.received[0].SOPClassUID == MR_IMAGE_STORAGE


def test_send_files_no_destination(tmp_path: Path) -> None:
    mr = write(tiny_image("P1"), tmp_path / "mr.dcm")
    results = send_files(NodeDestination("NOBODY", "127.0.0.1", free_port()), [mr], "LT",
                         timeout_s=5)
    assert [r.accepted for r in results] == [False]
    assert "could not be opened" in results[0].reason or "aborted" in results[0].reason


def _settings(tmp_path: Path, address: str) -> runner.NodeSettings:
    spool = Spool(tmp_path / "spool")
    spool.prepare()
    return runner.NodeSettings(spool=spool, results=tmp_path / "results",
                               destination=NodeDestination.parse(address), ae_title="LT")


def test_send_results_sent_then_nothing_twice(tmp_path: Path, dest: Destination) -> None:
    settings = _settings(tmp_path, dest.address)
    objects = [write(tiny_image("P1"), tmp_path / f"o{i}.dcm") for i in range(3)]
    assert runner.send_results(settings, KEY, objects, []) == runner.SENT
    status = read_status(settings.spool.status_path(KEY))
    assert status["state"] == "sent" and len(status["sent"]) == 3
    assert status["last_send"]["accepted"] == 3 and "not_accepted" not in status
    assert runner.send_results(settings, KEY, objects, []) == runner.SENT
    assert len(dest.received) == 3  # already accepted: not sent again
    assert read_status(settings.spool.status_path(KEY))["last_send"]["already_sent"] == 3


def test_send_results_refused_object_is_failed(tmp_path: Path, dest: Destination) -> None:
    settings = _settings(tmp_path, dest.address)
    mr = write(tiny_image("P1"), tmp_path / "mr.dcm")
    ct = write(tiny_image("P1", sop_class=CT_IMAGE_STORAGE), tmp_path / "ct.dcm")
    assert runner.send_results(settings, KEY, [mr, ct], []) == runner.FAILED_SEND
    status = read_status(settings.spool.status_path(KEY))
    assert status["state"] == "failed"
    assert "1 object(s) not accepted by the destination: ct.dcm" in status["reason"]
    assert [e["file"] for e in status["not_accepted"]] == ["ct.dcm"]
    assert status["not_accepted"][0]["status"] == "0xA700"
    assert [e["file"] for e in status["sent"]] == ["mr.dcm"]
    dest.refuse.clear()  # the destination is fixed: only the refused object goes again
    assert runner.send_results(settings, KEY, [mr, ct], []) == runner.SENT
    assert [str(d.SOPClassUID) for d in dest.received] == [MR_IMAGE_STORAGE, CT_IMAGE_STORAGE]
    assert "not_accepted" not in read_status(settings.spool.status_path(KEY))


def test_send_results_with_a_problem_is_never_sent(tmp_path: Path, dest: Destination) -> None:
    settings = _settings(tmp_path, dest.address)
    mr = write(tiny_image("P1"), tmp_path / "mr.dcm")
    outcome = runner.send_results(settings, KEY, [mr], ["report PDF not made: no browser"])
    assert outcome == runner.FAILED_SEND
    status = read_status(settings.spool.status_path(KEY))
    assert status["state"] == "failed" and "report PDF not made" in status["reason"]


def test_send_results_destination_down(tmp_path: Path) -> None:
    settings = _settings(tmp_path, f"DOWN@127.0.0.1:{free_port()}")
    mr = write(tiny_image("P1"), tmp_path / "mr.dcm")
    assert runner.send_results(settings, KEY, [mr], []) == runner.FAILED_SEND
    status = read_status(settings.spool.status_path(KEY))
    assert status["state"] == "failed" and status["not_accepted"][0]["status"] == "none"
    assert "association with DOWN@127.0.0.1" in status["reason"]
