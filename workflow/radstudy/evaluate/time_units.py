"""The unit of survival times (`evaluation.time_unit`, `radstudy evaluate --time-unit`): default horizons, axis
ticks and labels follow it, so that a table in days is neither cut at 12 days nor labelled "months"."""

from __future__ import annotations

import numpy as np

TIME_UNITS = ("days", "weeks", "months", "years")

# 1, 2 and 3 years in each unit: Uno's C is truncated at the last one, AUC(t) and calibration are read at each
DEFAULT_HORIZONS = {"days": (365, 730, 1095), "weeks": (52, 104, 156), "months": (12, 24, 36), "years": (1, 2, 3)}

# tick steps a reader of that unit expects (a week, a month, a quarter, a year in days; ...)
_TICK_STEPS = {"days": (7, 14, 30, 60, 91, 182, 365, 730, 1825, 3650),
               "weeks": (1, 2, 4, 8, 13, 26, 52, 104, 260, 520),
               "months": (1, 2, 3, 6, 12, 24, 60, 120),
               "years": (0.25, 0.5, 1, 2, 5, 10, 20)}
MAX_TICKS = 8


def check_unit(unit: str) -> str:
    if unit not in TIME_UNITS:
        raise ValueError(f"unknown time unit {unit!r}: expected one of {', '.join(TIME_UNITS)}")
    return unit


def default_horizons(unit: str) -> tuple[float, ...]:
    """1, 2 and 3 years expressed in `unit`."""
    return tuple(float(h) for h in DEFAULT_HORIZONS[check_unit(unit)])


def tick_step(max_time: float, unit: str) -> float:
    """The smallest of the unit's customary steps that spans 0..max_time in at most MAX_TICKS intervals."""
    steps = _TICK_STEPS[check_unit(unit)]
    if not np.isfinite(max_time) or max_time <= 0:
        return float(steps[0])
    return float(next((s for s in steps if max_time / s <= MAX_TICKS), steps[-1]))


def time_ticks(max_time: float, unit: str) -> list[float]:
    """Axis ticks (and the times of the numbers-at-risk table) from 0 to the last step within max_time; none
    without a (finite, positive) time."""
    if not np.isfinite(max_time) or max_time <= 0:
        return []
    step = tick_step(max_time, unit)
    return [float(x) for x in np.arange(0, max_time + 1e-9, step)]


def singular(unit: str) -> str:
    """'month' for 'months': "a 12-month event probability"."""
    return check_unit(unit)[:-1]
