"""The numbers of a metrics record, as the external trackers take them."""

from __future__ import annotations

import math
import numbers
from typing import Any

#: Keys of a record that place it rather than measure something.
POSITION_KEYS = ("stage", "step")


def numeric_metrics(record: dict[str, Any]) -> dict[str, float]:
    """Every finite number of ``record`` but its ``step`` (no bools, text or lists)."""
    return {
        key: float(value)
        for key, value in record.items()
        if key not in POSITION_KEYS
        and isinstance(value, numbers.Real)
        and not isinstance(value, bool)
        and math.isfinite(value)
    }
