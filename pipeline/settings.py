"""The defaults of every setting: config/config.yaml, read here and nowhere else.

The workflow reads config/config.yaml itself (``configfile:``) and hands each step its section;
code called without a configuration (the command line without ``--settings-json``, the tests,
the benchmarks) takes the same file through :func:`defaults`. The settings dataclasses
(:class:`pipeline.segment.SegmentSettings`, :class:`pipeline.longitudinal.Thresholds`) hold no
default values of their own: they derive from :class:`ConfigSection` and are built from a config
section.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar, Self, TypeVar

import yaml

#: config/config.yaml of the source tree this package lives in (the project is installed
#: editable, so the package and its configuration stay side by side).
CONFIG_PATH = Path(__file__).resolve().parent.parent / "config" / "config.yaml"

T = TypeVar("T")


@functools.cache
def _load(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise FileNotFoundError(
            f"{path}: no such file. limbtrack takes its default settings from "
            "config/config.yaml beside the pipeline package; run it from a source checkout "
            "installed with `pip install -e .` (a copied or wheel-installed package has no "
            "configuration), or pass every setting explicitly"
        )
    data = yaml.safe_load(path.read_text(encoding="utf-8"))
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping of settings, found {type(data).__name__}")
    return data


def defaults(path: Path | None = None) -> dict[str, Any]:
    """The default configuration (a fresh copy of config/config.yaml, or of `path`)."""
    return copy.deepcopy(_load(path or CONFIG_PATH))


def from_section(cls: type[T], section: Mapping[str, Any], name: str) -> T:
    """An instance of the dataclass `cls` from a config section (`name`, for messages).

    Every field must be given and no other key; YAML/JSON lists become tuples.
    """
    fields = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(section) - fields)
    if unknown:
        raise ValueError(f"unknown {name} settings: {', '.join(unknown)}")
    missing = sorted(fields - set(section))
    if missing:
        raise ValueError(
            f"{name} settings lack {', '.join(missing)}: config/config.yaml ({name}:) "
            "lists every one"
        )
    values = {k: tuple(v) if isinstance(v, list) else v for k, v in section.items()}
    return cls(**values)


class ConfigSection:
    """Base of a frozen settings dataclass that mirrors one section of config/config.yaml
    (:attr:`SECTION`); its fields have no defaults, :meth:`default` reads them."""

    SECTION: ClassVar[str]

    @classmethod
    def from_config(cls, section: Mapping[str, Any]) -> Self:
        """From a complete config section; a missing or unknown key is refused."""
        return from_section(cls, section, cls.SECTION)

    @classmethod
    def default(cls, **overrides: Any) -> Self:
        """The defaults of config/config.yaml, with `overrides` replacing some of them (an
        unknown key is refused)."""
        return from_section(cls, {**defaults()[cls.SECTION], **overrides}, cls.SECTION)
