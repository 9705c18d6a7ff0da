"""``limbtrack steps``: subcommands chained in one process, each output in its own log."""

from __future__ import annotations

import logging
import subprocess
import sys
import types
from collections.abc import Iterator
from pathlib import Path

import pytest

from pipeline import cli, steps


def _say(argv: list[str]) -> int:
    """A step that writes through print, logging (configured as a step does) and a child
    process, then exits with the status it is given."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    print(f"stdout {argv[0]}")
    logging.getLogger("fake").info("logged %s", argv[0])
    subprocess.run([sys.executable, "-c", f"import sys; sys.stderr.write('child {argv[0]}')"],
                   check=True)
    return int(argv[1])


def _boom(argv: list[str]) -> int:
    raise ValueError(f"bad input {argv[0]}")


@pytest.fixture
def fake_commands(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    for name, func in (("say", _say), ("boom", _boom)):
        module = types.ModuleType(f"fake_{name}")
        module.main = func  # type: ignore[attr-defined]
        monkeypatch.setitem(sys.modules, f"fake_{name}", module)
        monkeypatch.setitem(cli.COMMANDS, name, (f"fake_{name}", "a test step"))
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    assert root.handlers == handlers and root.level == level  # put back after every step


def test_parse_pairs_each_command_with_its_log() -> None:
    chain = steps.parse(["--log", "a.log", "--log", "b.log", "--", "convert", "--x", "1", "::",
                         "segment", "--t1", "t.nii.gz"])
    assert chain == [(["convert", "--x", "1"], Path("a.log")),
                     (["segment", "--t1", "t.nii.gz"], Path("b.log"))]


@pytest.mark.parametrize(("argv", "message"), [
    (["--log", "a.log", "convert"], "follow '--'"),
    (["--log", "a.log", "--", "convert", "::", "segment"], "2 commands but 1 --log"),
    (["--log", "a.log", "--log", "b.log", "--", "convert", "::"], "empty command"),
    (["--log"], "needs a file"),
])
def test_parse_names_what_is_wrong(argv: list[str], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        steps.parse(argv)


def test_bad_command_line_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert steps.main(["--", "convert"]) == 2
    assert "1 commands but 0 --log files" in capsys.readouterr().err


def test_each_step_writes_its_own_log(tmp_path: Path, fake_commands: None,
                                      capfd: pytest.CaptureFixture[str]) -> None:
    logs = [tmp_path / "logs" / "one.log", tmp_path / "logs" / "two.log"]
    status = steps.main(["--log", str(logs[0]), "--log", str(logs[1]), "--",
                         "say", "A", "0", "::", "say", "B", "0"])
    assert status == 0
    one, two = (p.read_text() for p in logs)
    # print, logging and a child process's stderr, each in its step's log only
    assert one.splitlines() == ["stdout A", "INFO logged A", "child A"]
    assert two.splitlines() == ["stdout B", "INFO logged B", "child B"]
    out, err = capfd.readouterr()
    assert out == "" and err == ""  # nothing reached the job's own output


def test_a_failing_step_stops_the_chain(tmp_path: Path, fake_commands: None,
                                        capfd: pytest.CaptureFixture[str]) -> None:
    logs = [tmp_path / f"{k}.log" for k in range(3)]
    argv = [a for p in logs for a in ("--log", str(p))]
    status = steps.main([*argv, "--", "say", "A", "0", "::", "say", "B", "3", "::",
                         "say", "C", "0"])
    assert status == 3  # the failing step's own exit status
    assert "child B" in logs[1].read_text()
    assert logs[2].read_text() == f"not run: say failed before it (exit status 3; see {logs[1]})\n"
    assert f"say failed (exit status 3), step 2 of 3; its log: {logs[1]}" in capfd.readouterr().err


def test_an_exception_is_a_failure_with_its_traceback_in_the_log(
        tmp_path: Path, fake_commands: None) -> None:
    logs = [tmp_path / "a.log", tmp_path / "b.log"]
    status = steps.main(["--log", str(logs[0]), "--log", str(logs[1]), "--", "boom", "X",
                         "::", "say", "B", "0"])
    assert status == 1
    text = logs[0].read_text()
    assert "Traceback" in text and text.rstrip().endswith("ValueError: bad input X")
    assert logs[1].read_text().startswith("not run: boom failed before it")


def test_steps_through_the_limbtrack_command(tmp_path: Path) -> None:
    """In a fresh process, as a rule runs it: an unknown subcommand fails its step."""
    logs = [tmp_path / "a.log", tmp_path / "b.log"]
    proc = subprocess.run([sys.executable, "-m", "pipeline.cli", "steps", "--log", str(logs[0]),
                           "--log", str(logs[1]), "--", "--version", "::", "nosuch"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert logs[0].read_text().startswith("limbtrack ")
    assert "unknown command 'nosuch'" in logs[1].read_text()
    assert "nosuch failed (exit status 2), step 2 of 2" in proc.stderr
