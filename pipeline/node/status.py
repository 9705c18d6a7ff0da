"""``<spool>/<patient key>/status.json``: where a patient stands in the DICOM node.

States, in order::

    received   images are arriving (or arrived; the quiet timer runs)
    waiting    filed, not run: no usable row in the patients sheet (the reason says which)
    running    the workflow runs
    sending    the results are being sent (C-STORE) to the destination
    sent       every result object was accepted by the destination
    failed     the run or the send failed; ``reason`` says why, ``not_accepted`` which
               objects the destination did not accept

``sent`` is written only after every C-STORE succeeded: a patient whose send stopped half-way
reads ``sending`` (node stopped) or ``failed``, never ``sent``. The file carries no name or
PatientID (the folder's name is the pseudonymous key). Written atomically.
"""

from __future__ import annotations

import datetime as dt
import json
import threading
from pathlib import Path
from typing import Any

from pipeline.io.files import write_json_atomic

STATES = ("received", "waiting", "running", "sending", "sent", "failed")
#: Read-modify-write of status files is serialised within the node process (association
#: threads and the run worker both write).
_LOCK = threading.Lock()


def now_iso() -> str:
    """The local time now, ISO 8601 with offset, to the second."""
    return dt.datetime.now().astimezone().isoformat(timespec="seconds")


def read_status(path: Path) -> dict[str, Any]:
    """The status (empty when the file is missing or unreadable)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def update_status(path: Path, state: str | None = None, **fields: Any) -> dict[str, Any]:
    """Merge `fields` (and `state`, one of :data:`STATES`) into the status file; a field
    given as None is removed. Stamps ``updated``. Returns the new status."""
    if state is not None and state not in STATES:
        raise ValueError(f"unknown node state {state!r}; one of {', '.join(STATES)}")
    with _LOCK:
        status = read_status(path)
        if state is not None:
            if status.get("state") != state:
                status["since"] = now_iso()
            status["state"] = state
        for key, value in fields.items():
            if value is None:
                status.pop(key, None)
            else:
                status[key] = value
        status["updated"] = now_iso()
        path.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(path, status)
        return status
