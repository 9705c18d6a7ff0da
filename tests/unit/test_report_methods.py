"""The Methods state the response rules from pipeline.longitudinal.describe_rules, the one
source shared with classify: every threshold's value appears, in the rule that applies it."""

from __future__ import annotations

import dataclasses
import re

from pipeline.longitudinal import Thresholds, describe_rules
from pipeline.report.methods import response_rules

#: Distinct values, none a part of another, so each can only come from its own field.
VALUES = {
    "flare_asymmetry_pp": 5.5,
    "flare_lesion_ratio": 1.23,
    "flare_lesion_min_ml": 1.7,
    "flare_edema_ratio": 1.31,
    "flare_edema_min_ml": 10.9,
    "resolved_asymmetry_pp": 2.2,
    "response_lesion_min_ml": 1.1,
    "response_lesion_ratio": 0.71,
    "response_asymmetry_pp": 4.9,
    "confirmation_min_interval_days": 6,
    "crs_window_days": 13,
    "contralateral_max_age_days": 97,
}
#: How each value reads in its rule.
PHRASES = {
    "flare_asymmetry_pp": "soft-tissue asymmetry up by at least 5.5 pp",
    "flare_lesion_ratio": "the marrow lesion at least ×1.23 its baseline volume",
    "flare_lesion_min_ml": "at least 1.7 mL larger",
    "flare_edema_ratio": "edema at least ×1.31",
    "flare_edema_min_ml": "at least 10.9 mL larger",
    "resolved_asymmetry_pp": "at most 2.2 pp above baseline",
    "response_lesion_min_ml": "a marrow lesion of at least 1.1 mL at baseline",
    "response_lesion_ratio": "down to at most ×0.71 its baseline volume",
    "response_asymmetry_pp": "at least 4.9 pp below baseline",
    "confirmation_min_interval_days": "at least 6 days after the episode's first flare",
    "crs_window_days": "days 1–13 after the infusion",
    "contralateral_max_age_days": "at most 97 days away",
}


def test_rules_name_every_threshold_value() -> None:
    assert set(VALUES) == {f.name for f in dataclasses.fields(Thresholds)}
    rules = describe_rules(Thresholds(**VALUES))
    text = " ".join(rules)
    for name, value in VALUES.items():
        assert re.search(rf"(?<![\d.]){re.escape(f'{value:g}')}(?![\d])", text), name
        assert PHRASES[name] in text, name
    assert all(r.endswith(".") for r in rules)


def test_rules_follow_the_thresholds() -> None:
    base = " ".join(describe_rules(Thresholds(**VALUES)))
    other = " ".join(describe_rules(Thresholds(**{**VALUES, "flare_asymmetry_pp": 7.5})))
    assert "up by at least 7.5 pp" in other and "5.5" not in other and "5.5" in base


def test_report_rules_from_the_summary_thresholds() -> None:
    rules, why = response_rules({**VALUES, "a_later_key": 1})
    assert why == "" and rules == describe_rules(Thresholds(**VALUES))
    rules, why = response_rules({k: v for k, v in VALUES.items() if k != "crs_window_days"})
    assert rules == [] and "crs_window_days" in why
