"""Cross-field checks that config sections share, called from their pydantic validators so that each
section's checks still live beside its fields."""

from __future__ import annotations

from pydantic import BaseModel


def check_order(model: BaseModel, low: str, high: str, prefix: str = "") -> None:
    """Refuse a section whose `low` field is above its `high` field (equal is fine), naming both fields
    and their values: `min_replicas 3 is above max_replicas 2`. `prefix` qualifies the field names
    (`worker.`) where the section's own name would not show in the message."""
    lo, hi = getattr(model, low), getattr(model, high)
    if lo > hi:
        raise ValueError(f"{prefix}{low} {lo} is above {prefix}{high} {hi}")
