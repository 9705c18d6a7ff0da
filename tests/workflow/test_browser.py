"""The demo report and the cohort page in a real browser (Debian's chromium, headless).

The browser is driven through the Chrome DevTools Protocol over a websocket (a small stdlib
client below: no extra dependency, no browser download). ``tests/browser_setup.sh`` installs
chromium with apt when it is missing and we are root; otherwise these tests skip.

The demo patient is run through the workflow with one DICOM tag (the STIR series description
of one study) holding ``<script>`` and ``onerror`` payloads. Screenshots of every report
section and a PDF print go to ``test-artifacts/`` (gitignored).
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import pytest
from demo_case import XSS_IMG, XSS_SCRIPT

from pipeline.report.cohort import build_cohort

ROOT = Path(__file__).resolve().parents[2]
DEMO = ROOT / "sample_data" / "demo" / "dicom"
ARTIFACTS = ROOT / "test-artifacts"
SECTIONS = [
    "summary",
    "timeline",
    "measurements",
    "profile",
    "overlays",
    "qc",
    "volumes",
    "methods",
]
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
    "--hide-scrollbars",
    "--window-size=1100,900",
    "--remote-debugging-port=0",
    "about:blank",
]

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


# ------------------------------------------------------------------ a minimal websocket client


class WebSocket:
    """Just enough RFC 6455 for CDP: client text frames out, (fragmented) text frames in."""

    def __init__(self, url: str, timeout_s: float = 30.0) -> None:
        u = urlparse(url)
        self.sock = socket.create_connection((u.hostname, u.port), timeout=timeout_s)
        key = base64.b64encode(os.urandom(16)).decode()
        self.sock.sendall(
            (
                f"GET {u.path} HTTP/1.1\r\nHost: {u.hostname}:{u.port}\r\nUpgrade: websocket\r\n"
                f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
                "Sec-WebSocket-Version: 13\r\n\r\n"
            ).encode()
        )
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = self.sock.recv(4096)
            if not chunk:
                raise ConnectionError("websocket handshake: connection closed")
            head += chunk
        status = head.split(b"\r\n", 1)[0]
        if b" 101 " not in status:
            raise ConnectionError(f"websocket handshake refused: {status!r}")
        self.buffer = head.split(b"\r\n\r\n", 1)[1]

    def _exact(self, n: int) -> bytes:
        while len(self.buffer) < n:
            chunk = self.sock.recv(max(65536, n - len(self.buffer)))
            if not chunk:
                raise ConnectionError("websocket closed")
            self.buffer += chunk
        out, self.buffer = self.buffer[:n], self.buffer[n:]
        return out

    def send(self, text: str) -> None:
        payload = text.encode()
        n = len(payload)
        if n < 126:
            header = struct.pack("!BB", 0x81, 0x80 | n)
        elif n < 1 << 16:
            header = struct.pack("!BBH", 0x81, 0x80 | 126, n)
        else:
            header = struct.pack("!BBQ", 0x81, 0x80 | 127, n)
        mask = os.urandom(4)
        masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
        self.sock.sendall(header + mask + masked)

    def recv(self) -> str:
        parts: list[bytes] = []
        while True:
            b0, b1 = self._exact(2)
            n = b1 & 0x7F
            if n == 126:
                (n,) = struct.unpack("!H", self._exact(2))
            elif n == 127:
                (n,) = struct.unpack("!Q", self._exact(8))
            mask = self._exact(4) if b1 & 0x80 else None
            data = self._exact(n)
            if mask:
                data = bytes(b ^ mask[i % 4] for i, b in enumerate(data))
            opcode = b0 & 0x0F
            if opcode == 0x8:
                raise ConnectionError("websocket closed by the browser")
            if opcode == 0x9:  # ping: answer, keep reading
                self.sock.sendall(struct.pack("!BB", 0x8A, 0x80) + b"\0\0\0\0")
                continue
            if opcode in (0x1, 0x2, 0x0):
                parts.append(data)
                if b0 & 0x80:
                    return b"".join(parts).decode()

    def close(self) -> None:
        try:
            self.sock.sendall(struct.pack("!BB", 0x88, 0x80) + b"\0\0\0\0")
        except OSError:
            pass
        self.sock.close()


class Page:
    """One browser tab over CDP; records console errors, requests and dialogs."""

    def __init__(self, ws: WebSocket) -> None:
        self.ws = ws
        self.next_id = 0
        self.events: list[dict[str, Any]] = []
        self.replies: dict[int, dict[str, Any]] = {}
        self.session = ""
        target = self.call("Target.createTarget", {"url": "about:blank"}, session=False)
        self.session = self.call(
            "Target.attachToTarget",
            {"targetId": target["targetId"], "flatten": True},
            session=False,
        )["sessionId"]
        for domain in ("Page", "Runtime", "Network", "Log"):
            self.call(f"{domain}.enable")

    def _send(self, method: str, params: dict[str, Any] | None, session: bool) -> int:
        self.next_id += 1
        msg: dict[str, Any] = {"id": self.next_id, "method": method, "params": params or {}}
        if session:
            msg["sessionId"] = self.session
        self.ws.send(json.dumps(msg))
        return self.next_id

    def _pump(self) -> None:
        """Read one message; an event is recorded, and a JavaScript dialog dismissed at once
        (an open alert() would block the page; the test fails on the recorded event)."""
        msg = json.loads(self.ws.recv())
        if "id" in msg:
            self.replies[msg["id"]] = msg
            return
        self.events.append(msg)
        if msg.get("method") == "Page.javascriptDialogOpening":
            self._send("Page.handleJavaScriptDialog", {"accept": False}, session=True)

    def call(
        self,
        method: str,
        params: dict[str, Any] | None = None,
        session: bool = True,
        timeout_s: float = 30.0,
    ) -> dict[str, Any]:
        wanted = self._send(method, params, session)
        deadline = time.monotonic() + timeout_s
        while wanted not in self.replies:
            if time.monotonic() > deadline:
                raise TimeoutError(method)
            self._pump()
        reply = self.replies.pop(wanted)
        if "error" in reply:
            raise RuntimeError(f"{method}: {reply['error']}")
        return reply.get("result", {})

    def wait_for(self, method: str, timeout_s: float = 30.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout_s
        seen = 0
        while True:
            for ev in self.events[seen:]:
                if ev["method"] == method:
                    return ev
            seen = len(self.events)
            if time.monotonic() > deadline:
                raise TimeoutError(method)
            self._pump()

    def open(self, path: Path) -> None:
        self.events = []
        self.call("Page.navigate", {"url": path.resolve().as_uri()})
        self.wait_for("Page.loadEventFired")
        self.evaluate("1")  # drain events queued during load

    def evaluate(self, expression: str) -> Any:
        res = self.call(
            "Runtime.evaluate",
            {"expression": expression, "returnByValue": True, "awaitPromise": True},
        )
        if "exceptionDetails" in res:
            raise RuntimeError(f"{expression[:60]}...: {res['exceptionDetails']}")
        return res["result"].get("value")

    def errors(self) -> list[str]:
        out = []
        for ev in self.events:
            p = ev.get("params", {})
            if ev["method"] == "Runtime.exceptionThrown":
                out.append(json.dumps(p.get("exceptionDetails", {}))[:300])
            elif ev["method"] == "Runtime.consoleAPICalled" and p.get("type") in (
                "error",
                "assert",
            ):
                out.append(json.dumps(p.get("args", []))[:300])
            elif ev["method"] == "Log.entryAdded" and p.get("entry", {}).get("level") == "error":
                out.append(p["entry"].get("text", "")[:300])
        return out

    def requests(self) -> list[str]:
        return [
            ev["params"]["request"]["url"]
            for ev in self.events
            if ev["method"] == "Network.requestWillBeSent"
        ]

    def dialogs(self) -> list[dict[str, Any]]:
        return [ev for ev in self.events if ev["method"] == "Page.javascriptDialogOpening"]

    def screenshot(self, selector: str, out: Path) -> None:
        rect = self.evaluate(
            f"(() => {{ const r = document.querySelector({json.dumps(selector)})"
            ".getBoundingClientRect(); return {x: r.left + window.scrollX, "
            "y: r.top + window.scrollY, width: r.width, height: r.height}; })()"
        )
        data = self.call(
            "Page.captureScreenshot",
            {
                "format": "png",
                "captureBeyondViewport": True,
                "clip": {**rect, "height": min(rect["height"], 16000), "scale": 1},
            },
        )["data"]
        out.write_bytes(base64.b64decode(data))


# ------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def chromium() -> str:
    path = shutil.which("chromium")
    if path is None:
        setup = subprocess.run(
            ["sh", str(ROOT / "tests" / "browser_setup.sh")],
            capture_output=True,
            text=True,
            timeout=900,
        )
        path = shutil.which("chromium")
        if path is None:
            pytest.skip(
                "chromium is not installed and tests/browser_setup.sh could not install "
                f"it (needs root and apt): {setup.stderr.strip()[-300:]}"
            )
    return path


@pytest.fixture(scope="module")
def browser(chromium: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Page]:
    profile = tmp_path_factory.mktemp("chromium-profile")
    # own process group: /usr/bin/chromium is a wrapper script, and the browser's helper
    # processes must end with the test
    proc = subprocess.Popen(
        [chromium, *CHROMIUM_FLAGS, f"--user-data-dir={profile}"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        port_file = profile / "DevToolsActivePort"
        deadline = time.monotonic() + 30
        while not (port_file.exists() and len(port_file.read_text().split()) >= 2):
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.skip(f"chromium did not start (exit status {proc.poll()})")
            time.sleep(0.1)
        port, path = port_file.read_text().split()[:2]
        ws = WebSocket(f"ws://127.0.0.1:{port}{path}")
        try:
            yield Page(ws)
        finally:
            ws.close()
    finally:
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                break
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                continue
            time.sleep(0.5)  # let the helpers in the group exit too
            break


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory, chromium: str,
         demo_results: Path) -> dict[str, Path]:
    """The session's demo run (XSS in one DICOM tag, see demo_case.py) and a cohort page."""
    results = tmp_path_factory.mktemp("browser_demo") / "results"
    shutil.copytree(demo_results, results / "demo")
    failed = results / "broken"
    (failed / "logs").mkdir(parents=True)
    (failed / "logs" / "segment_ses-20240101.log").write_text(
        f"RuntimeError: no limb found {XSS_IMG}\n", encoding="utf-8"
    )
    build_cohort([results / "demo", failed], results / "cohort.html", results / "cohort.tsv")
    ARTIFACTS.mkdir(exist_ok=True)
    return {"report": results / "demo" / "report.html", "cohort": results / "cohort.html"}


# ------------------------------------------------------------------ tests

IMAGE_CHECK = """
(async () => {
  const out = [];
  for (const img of Array.from(document.images)) {
    await img.decode().catch(() => null);
    const c = document.createElement("canvas");
    c.width = img.naturalWidth; c.height = img.naturalHeight;
    let variance = -1;
    if (c.width > 0 && c.height > 0) {
      const g = c.getContext("2d");
      g.drawImage(img, 0, 0);
      const d = g.getImageData(0, 0, c.width, c.height).data;
      let n = 0, s = 0, s2 = 0;
      for (let i = 0; i < d.length; i += 4 * 7) {
        const v = (d[i] + d[i + 1] + d[i + 2]) / 3; n++; s += v; s2 += v * v;
      }
      variance = s2 / n - (s / n) * (s / n);
    }
    const r = img.getBoundingClientRect();
    out.push({alt: img.alt, complete: img.complete, w: img.naturalWidth,
              shownW: r.width, shownH: r.height, variance: variance});
  }
  return out;
})()
"""


def test_demo_report_in_browser(browser: Page, demo: dict[str, Path]) -> None:
    report = demo["report"]
    size_mb = report.stat().st_size / 1e6
    assert size_mb <= 5.0, f"report is {size_mb:.1f} MB"
    browser.open(report)

    assert browser.errors() == []
    requests = browser.requests()
    assert report.resolve().as_uri() in requests  # the Network domain does report requests
    bad = [u for u in requests if not u.startswith(("file://", "data:"))]
    assert bad == [], f"network requests: {bad}"
    assert [u for u in requests if u.startswith("file://")] == [report.resolve().as_uri()]
    assert browser.dialogs() == []

    images = browser.evaluate(IMAGE_CHECK)
    assert len(images) >= 2 + 3 * 5  # timeline, profile, 3 views x 5 sessions
    for img in images:
        assert img["complete"] and img["w"] > 0, img
        assert img["shownW"] > 100 and img["shownH"] > 50, img
        assert img["variance"] > 50.0, f"blank image: {img}"

    text = browser.evaluate("document.body.innerText")
    assert XSS_SCRIPT in text and XSS_IMG in text  # shown as text ...
    assert browser.evaluate("document.querySelectorAll('script').length") == 0  # ... not run
    assert browser.evaluate("document.querySelectorAll('img[src=x]').length") == 0
    assert browser.dialogs() == []
    for phi in ("PHANTOM^DEMO", "PHANTOM", "PH000007", "20140115", "2014-01-15"):
        assert phi not in text
    assert "Pattern consistent with pseudo-progression" in text

    for section in SECTIONS:
        out = ARTIFACTS / f"report-{section}.png"
        browser.screenshot(f"#{section}", out)
        assert out.stat().st_size > 2000
    pdf = browser.call("Page.printToPDF", {"printBackground": True}, timeout_s=60)["data"]
    (ARTIFACTS / "report.pdf").write_bytes(base64.b64decode(pdf))
    assert browser.errors() == [] and browser.dialogs() == []


def test_cohort_page_in_browser(browser: Page, demo: dict[str, Path]) -> None:
    browser.open(demo["cohort"])
    assert browser.errors() == []
    assert [u for u in browser.requests() if not u.startswith(("file://", "data:"))] == []
    rows = (
        "Array.from(document.querySelectorAll('#cohort tbody tr')).map(r => r.cells[0].innerText)"
    )
    assert browser.evaluate(rows) == ["demo", "broken"]
    # sort by peak asymmetry: ascending puts the failed subject (n/a) last, descending too
    click = "document.querySelector('th[data-key=peak_soft_tissue_asymmetry_pct] button').click()"
    browser.evaluate(click)
    assert browser.evaluate(rows) == ["demo", "broken"]
    browser.evaluate("document.querySelector('th[data-key=subject] button').click()")
    assert browser.evaluate(rows) == ["broken", "demo"]
    browser.evaluate("document.querySelector('th[data-key=subject] button').click()")
    assert browser.evaluate(rows) == ["demo", "broken"]
    assert (
        browser.evaluate("document.querySelector('th[data-key=subject]').getAttribute('aria-sort')")
        == "descending"
    )
    link = browser.evaluate("document.querySelector('#cohort a').href")
    assert link.startswith("file://") and link.endswith("/demo/report.html")
    assert Path(urlparse(link).path).is_file()
    text = browser.evaluate("document.body.innerText")
    assert XSS_IMG in text and browser.dialogs() == []
    browser.screenshot("body", ARTIFACTS / "cohort.png")
    assert browser.errors() == []
