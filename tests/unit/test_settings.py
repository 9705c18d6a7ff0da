"""config/config.yaml is the one place defaults live; the schema describes every key."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from pipeline import settings
from pipeline.longitudinal import Thresholds
from pipeline.segment import SegmentSettings

SCHEMA = yaml.safe_load((settings.CONFIG_PATH.parent / "schema.yaml").read_text("utf-8"))


@pytest.mark.parametrize(("section", "cls"), [("segment", SegmentSettings),
                                              ("response", Thresholds)])
def test_config_section_and_dataclass_have_the_same_keys(section: str, cls: type) -> None:
    config_keys = set(settings.defaults()[section])
    fields = {f.name for f in dataclasses.fields(cls)}
    assert config_keys == fields
    # no default typed in the dataclass: config.yaml is the only place
    assert all(f.default is dataclasses.MISSING for f in dataclasses.fields(cls))
    assert all(f.default_factory is dataclasses.MISSING for f in dataclasses.fields(cls))


def _undescribed(config: Mapping[str, Any], schema: Mapping[str, Any], where: str) -> list[str]:
    out = []
    properties = schema.get("properties", {})
    for key, value in config.items():
        sub = properties.get(key)
        if sub is None or not str(sub.get("description", "")).strip():
            out.append(f"{where}{key}")
        elif isinstance(value, Mapping):
            out.extend(_undescribed(value, sub, f"{where}{key}."))
    return out


def test_schema_describes_every_config_key_and_validates_the_defaults() -> None:
    config = settings.defaults()
    assert _undescribed(config, SCHEMA, "") == []
    jsonschema.validate(config, SCHEMA)


def test_defaults_build_the_settings() -> None:
    seg = SegmentSettings.default()
    assert seg == SegmentSettings.from_config(settings.defaults()["segment"])
    assert isinstance(seg.n4_iterations, tuple)  # a YAML list becomes a tuple
    assert SegmentSettings.default(n4_shrink=2).n4_shrink == 2
    assert Thresholds.default().crs_window_days == settings.defaults()["response"][
        "crs_window_days"]


def test_incomplete_or_unknown_settings_are_refused() -> None:
    section = settings.defaults()["response"]
    del section["crs_window_days"]
    with pytest.raises(ValueError, match="response settings lack crs_window_days"):
        Thresholds.from_config(section)
    with pytest.raises(ValueError, match="unknown segment settings: n4_shrnk"):
        SegmentSettings.default(n4_shrnk=2)


def test_a_missing_config_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="config.yaml: no such file.*pip install -e"):
        settings.defaults(tmp_path / "config.yaml")
