"""``NAME=VALUE`` items of the training options (``--loss-weight``, ``--data-weight``)."""

from __future__ import annotations


def name_and_number(item: str) -> tuple[str, float]:
    """``"hv_msge=4"`` -> ``("hv_msge", 4.0)``; the number is NaN when missing or unreadable,
    so callers reject it with their own message."""
    name, sep, value = item.rpartition("=")
    try:
        number = float(value) if sep else float("nan")
    except ValueError:
        number = float("nan")
    return name.strip(), number
