"""Times and durations as the stages and the service read them: epoch seconds, UTC days.

One home for parsing and for the day boundaries that the nightly job, its
backtest and the evaluation share, so that "the end of day D" means one
thing everywhere. No heavy imports: the Serve app and config parsing use it.
"""

from __future__ import annotations

import datetime as dt
import re

import numpy as np

DAY_S = 86_400
# The moments after a user's last event that returning users are scored at by
# default (the train stage's select metric and the evaluate stage's curve).
DEFAULT_DELTAS = ["0s", "1h", "1d", "7d", "30d"]


def parse_time(value: int | str) -> int:
    """Seconds since the epoch from an int or an ISO-8601 string."""
    if isinstance(value, int):
        return value
    import pandas as pd

    text = str(value).strip()
    if re.fullmatch(r"-?\d+", text):
        return int(text)
    try:
        ts = pd.Timestamp(text)
        if ts is pd.NaT:
            raise ValueError("NaT")
        if ts.tzinfo is None:
            ts = ts.tz_localize("UTC")
        return int(ts.timestamp())
    except (ValueError, TypeError, OverflowError) as e:
        raise ValueError(f"not an ISO-8601 time or epoch seconds: {value!r}") from e


_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86_400, "w": 604_800}


def parse_duration(value: int | str) -> int:
    """Seconds from an int or a number with a unit: 90, "90s", "15m", "1h", "7d", "2w"."""
    if isinstance(value, bool):
        raise ValueError(f"not a duration: {value!r}")
    if isinstance(value, int):
        seconds = value
    else:
        m = re.fullmatch(r"\s*(\d+)\s*([smhdw]?)\s*", str(value))
        if not m:
            raise ValueError(f"not a duration (seconds, or a number with s/m/h/d/w): {value!r}")
        seconds = int(m.group(1)) * _UNITS[m.group(2) or "s"]
    if seconds < 0:
        raise ValueError(f"a duration cannot be negative: {value!r}")
    return seconds


def format_duration(seconds: int) -> str:
    """The largest unit that divides `seconds`: 0 -> "0", 3600 -> "1h", 90 -> "90s"."""
    if seconds == 0:
        return "0"
    for unit in ("d", "h", "m"):
        if seconds % _UNITS[unit] == 0:
            return f"{seconds // _UNITS[unit]}{unit}"
    return f"{seconds}s"


def day_start(t: np.ndarray | int) -> np.ndarray:
    """00:00 UTC of the day of each epoch-seconds time."""
    t = np.asarray(t, dtype=np.int64)
    return t - np.mod(t, DAY_S)


def end_of_day(date: str) -> int:
    """Epoch seconds of the last second of `date` (YYYY-MM-DD, UTC)."""
    day = dt.datetime.fromisoformat(date).replace(tzinfo=dt.timezone.utc)
    return int((day + dt.timedelta(days=1)).timestamp()) - 1
