"""The DICOM node's quiet timer and job queue: one patient's job at a time, each when that
patient's sending has been quiet for ``quiet_seconds``.

A patient is *due* when

* something was received for them since their last job started (or the node restarted with
  their job unfinished),
* no open association has delivered images of theirs (a sender may pause between series), and
* their last image arrived at least ``quiet_seconds`` ago.

Jobs run one after another in one worker thread: two patients never share a run, and a run
has every core it was given. Images that arrive for a patient while their job runs make them
due again (the next run redoes only what changed). A failed send is retried after
``retry_seconds``, at most ``max_retries`` times; a failed workflow waits for new images. A
patient waiting for their row of the patients sheet is tried again when the sheet changes.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import defaultdict
from collections.abc import Callable

from pipeline.node.runner import FAILED_SEND, WAITING
from pipeline.node.spool import Spool
from pipeline.node.status import now_iso, read_status, update_status

LOG = logging.getLogger("limbtrack.node")
#: How often the worker looks for due patients (s).
POLL_SECONDS = 0.5


class Scheduler:
    """Quiet timer and worker. `process(key)` runs one patient's job and returns its outcome
    (:data:`pipeline.node.runner.SENT` ...); `sheet_token()` changes when the patients
    sheet changes; `clock` is monotonic seconds (tests pass their own)."""

    def __init__(self, spool: Spool, process: Callable[[str], str], quiet_seconds: float,
                 *, retry_seconds: float = 300.0, max_retries: int = 3,
                 sheet_token: Callable[[], object] = lambda: None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.spool = spool
        self.process = process
        self.quiet_seconds = quiet_seconds
        self.retry_seconds = retry_seconds
        self.max_retries = max_retries
        self.sheet_token = sheet_token
        self.clock = clock
        self.last_received: dict[str, float] = {}
        self.pending: set[str] = set()
        self.waiting: set[str] = set()
        self.retries: dict[str, int] = defaultdict(int)
        self.not_before: dict[str, float] = {}
        self.open_associations: dict[int, set[str]] = defaultdict(set)
        self.active: str | None = None
        self._cond = threading.Condition()
        self._stop = False
        self._thread: threading.Thread | None = None
        self._token = sheet_token()

    # ------------------------------------------------------------- events from the SCP
    def received(self, key: str, association: int) -> None:
        """An object of patient `key` was filed by association `association`."""
        with self._cond:
            first = key not in self.open_associations[association]
            self.open_associations[association].add(key)
            self.last_received[key] = self.clock()
            self.pending.add(key)
            self.waiting.discard(key)
            self.retries.pop(key, None)
            self.not_before.pop(key, None)
            running = self.active == key
        if first:
            self._mark_received(key, running)

    def closed(self, association: int) -> None:
        """An association's connection closed; its patients' quiet time starts now."""
        with self._cond:
            keys = self.open_associations.pop(association, set())
            for key in keys:
                self.last_received[key] = self.clock()
            running = set(keys) & {self.active}
            self._cond.notify_all()
        for key in sorted(keys):
            self._mark_received(key, key in running)

    def _mark_received(self, key: str, running: bool) -> None:
        """status.json: counts and time; state 'received' unless the patient's job runs."""
        studies, images = self.spool.counts(key)
        fields = {"studies": studies, "images": images, "last_received": now_iso()}
        update_status(self.spool.status_path(key), None if running else "received",
                      **fields, **({} if running else {"reason": None}))

    def resume(self) -> list[str]:
        """After a restart: patients whose job had not finished (received, waiting, running,
        sending) become due after the quiet time. Returns their keys."""
        keys = [k for k in self.spool.patients()
                if read_status(self.spool.status_path(k)).get("state")
                in ("received", "waiting", "running", "sending", None)]
        with self._cond:
            for key in keys:
                self.pending.add(key)
                self.last_received[key] = self.clock()
        return keys

    # ---------------------------------------------------------------------- the timer
    def due(self) -> list[str]:
        """Patients whose job may start now, longest quiet first."""
        now = self.clock()
        busy = set().union(*self.open_associations.values()) if self.open_associations \
            else set()
        ready = [k for k in self.pending
                 if k not in busy
                 and now - self.last_received.get(k, now) >= self.quiet_seconds
                 and now >= self.not_before.get(k, now)]
        return sorted(ready, key=lambda k: (self.last_received.get(k, now), k))

    def _check_sheet(self) -> None:
        token = self.sheet_token()
        if token != self._token:
            self._token = token
            if self.waiting:
                LOG.info("patients sheet changed: %d waiting patient(s) tried again",
                         len(self.waiting))
            self.pending |= self.waiting
            self.waiting.clear()

    def run_one(self) -> str | None:
        """Start the job of the first due patient, if any; returns its key."""
        with self._cond:
            self._check_sheet()
            ready = self.due()
            if not ready:
                return None
            key = ready[0]
            self.pending.discard(key)
            self.active = key
        try:
            outcome = self.process(key)
        except Exception:  # noqa: BLE001 - one patient's bug never stops the node
            LOG.exception("patient %s: job crashed", key)
            update_status(self.spool.status_path(key), "failed",
                          reason="the node's job crashed (see the node log)")
            outcome = "crashed"
        self._after(key, outcome)
        return key

    def _after(self, key: str, outcome: str) -> None:
        with self._cond:
            self.active = None
            new_images = key in self.pending  # received while the job ran
            if outcome == WAITING:
                self.waiting.add(key)
            if outcome == FAILED_SEND and not new_images:
                self.retries[key] += 1
                if self.retries[key] <= self.max_retries:
                    LOG.info("patient %s: send tried again in %.0f s (try %d of %d)", key,
                             self.retry_seconds, self.retries[key] + 1, self.max_retries + 1)
                    self.pending.add(key)
                    self.not_before[key] = self.clock() + self.retry_seconds
        if new_images:
            self._mark_received(key, running=False)

    # --------------------------------------------------------------------- the worker
    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="limbtrack-jobs", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while True:
            with self._cond:
                if self._stop:
                    return
            if self.run_one() is None:
                with self._cond:
                    self._cond.wait(POLL_SECONDS)

    def stop(self, timeout_s: float | None = None) -> None:
        """Stop after the running job (if any) ends."""
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout_s)
