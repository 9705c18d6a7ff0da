"""The baseline rule, in one place: the last session on or before day 0, else the first.

Registration (the fixed session), the common extent, change from baseline, the DICOM SR's time
points and the report all use :func:`baseline_position`, so they cannot disagree.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence


def session_day(study_date: str, day0: str) -> int:
    """Days from day 0 to the study date (both YYYY-MM-DD; negative before day 0)."""
    return (dt.date.fromisoformat(study_date) - dt.date.fromisoformat(day0)).days


def baseline_position(days: Sequence[int]) -> int:
    """Position of the baseline in `days` (days after day 0, in session order): the last
    session on or before day 0, else the first. Raises ValueError for no sessions."""
    if not days:
        raise ValueError("no sessions: there is no baseline")
    before = [i for i, day in enumerate(days) if day <= 0]
    return before[-1] if before else 0
