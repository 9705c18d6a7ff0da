"""Unit tests of pipeline.cli: usage, version, unknown commands, dispatch to a stage."""

from __future__ import annotations

import importlib.util
import re
import sys
import types
from pathlib import Path

import pytest

from pipeline import __version__, cli


@pytest.mark.parametrize("argv", [[], ["-h"], ["--help"]])
def test_help(argv, capsys):
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"limbtrack {__version__}")
    assert "usage: limbtrack COMMAND" in out
    for name in cli.COMMANDS:
        assert f"  {name} " in out
    assert "snakemake --cores 2 --config input_dir=PATH" in out


def test_version(capsys):
    assert cli.main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"limbtrack {__version__}"


def test_unknown_command(capsys):
    assert cli.main(["frobnicate", "--x"]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert "unknown command 'frobnicate'" in captured.err
    assert "commands:" in captured.err


def test_argv_defaults_to_sys_argv(monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["limbtrack", "--version"])
    assert cli.main() == 0
    assert __version__ in capsys.readouterr().out


def test_every_command_module_exists():
    for module, help_ in cli.COMMANDS.values():
        assert importlib.util.find_spec(module) is not None, module
        assert help_


@pytest.mark.parametrize(("command", "option"), [("measure", "--affected-side"),
                                                 ("longitudinal", "--thresholds-json"),
                                                 ("register", "--fixed-image"),
                                                 ("export", "{tables,dicom,dataset}"),
                                                 ("research", "--longitudinal")])
def test_dispatch_help_exits_zero(command, option, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main([command, "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert f"usage: limbtrack {command}" in out
    assert option in out


def test_dispatch_bad_options_exit_2(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["measure", "--subject", "P1"])
    assert exc.value.code == 2
    assert "required" in capsys.readouterr().err


def test_dispatch_passes_remaining_args_and_return_code(monkeypatch):
    seen = []
    fake = types.ModuleType("limbtrack_fake_stage")

    def fake_main(argv):
        seen.append(list(argv))
        return 3 if argv else None

    fake.main = fake_main  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "limbtrack_fake_stage", fake)
    monkeypatch.setitem(cli.COMMANDS, "fake", ("limbtrack_fake_stage", "a fake stage"))
    assert cli.main(["fake", "--a", "1"]) == 3
    assert cli.main(["fake"]) == 0  # None counts as success
    assert seen == [["--a", "1"], []]


ROOT = Path(__file__).resolve().parents[2]


def test_rules_run_limbtrack_subcommands():
    """Every rule's shell runs ``{params.limbtrack} <subcommand>`` of COMMANDS (the index and
    convert rules take theirs from pipeline.workflow, tested there), never a module."""
    for command in ("register", "export", "cohort", "nifti"):
        assert command in cli.COMMANDS
    seen = set()
    for smk in [ROOT / "Snakefile", *sorted((ROOT / "rules").glob("*.smk"))]:
        text = smk.read_text()
        if smk.name != "report.smk":  # another change brings it along
            assert "-m pipeline." not in text, smk
        # a rule's own subcommand, and each step of a `steps` chain (after `--` and `::`)
        subs = re.findall(r'(?m)^\s+"\{params\.limbtrack\} (\w+|\{params\.\w+\})', text)
        subs += re.findall(r'(?:--"\s*"|:: ) ?(\w+|\{params\.\w+\})', text)
        for sub in subs:
            seen.add(sub)
            assert sub.startswith("{params.") or sub in cli.COMMANDS, (smk, sub)
    assert {"steps", "segment", "register", "measure", "longitudinal", "report", "export",
            "research"} <= seen
