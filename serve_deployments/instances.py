"""What one model takes as instances, checked once where a request enters and again in the replica.

Texts must be non-empty strings within `max_text_chars`; numeric instances must be rows (or 8x8
images) of the model's width whose values are finite in float32. A bad instance raises
`InstanceError` naming its index, so the request gets a JSON 422 before it can join a batch, and a
request that reaches a replica some other way still cannot break the batch it joins.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

FLOAT32_MAX = float(np.finfo(np.float32).max)


class InstanceError(ValueError):
    """An instance the model cannot take; the message names its index and the problem."""


@dataclass(frozen=True)
class InstanceSpec:
    """The shape of a model's instances, from its package metadata."""

    name: str
    kind: str  # text, image or features
    num_features: int | None
    max_text_chars: int

    def describe(self) -> str:
        if self.kind == "image":
            return "8x8 images or rows of 64 pixel values"
        return "text strings" if self.kind == "text" else f"rows of {self.num_features} features"

    def check(self, instances: Any) -> list[str] | np.ndarray:
        """Instances as the engine takes them: a list of str, or float32 [N, F]."""
        if self.kind == "text":
            return self._texts(instances)
        if isinstance(instances, np.ndarray) and instances.dtype == np.float32:
            rows = instances
        else:
            rows = self._numbers(instances)
        rows = rows.reshape(len(rows), -1) if rows.ndim >= 2 else rows
        if rows.ndim != 2 or rows.shape[1] != self.num_features:
            raise InstanceError(f"instances: shape {list(np.shape(instances))}; {self.name} takes {self.describe()}")
        bad = np.flatnonzero(~np.isfinite(rows).all(axis=1))
        if len(bad):
            raise InstanceError(f"instances[{bad[0]}]: a value is not finite or beyond float32's range "
                                f"(|x| <= {FLOAT32_MAX:.3g})")
        return rows

    def _texts(self, instances: Any) -> list[str]:
        for i, text in enumerate(instances):
            if not isinstance(text, str):
                raise InstanceError(f"instances[{i}]: expected a text string, got {type(text).__name__}")
            if not text.strip():
                raise InstanceError(f"instances[{i}]: empty text")
            if len(text) > self.max_text_chars:
                raise InstanceError(f"instances[{i}]: text of {len(text)} characters; the limit is {self.max_text_chars}")
            try:
                text.encode("utf-8")
            except UnicodeEncodeError:  # a lone surrogate (JSON "\ud800"): no tokenizer takes it
                raise InstanceError(f"instances[{i}]: text holds an unpaired surrogate (not valid Unicode)") from None
        return list(instances)

    def _numbers(self, instances: Any) -> np.ndarray:
        for i, row in enumerate(instances):
            if isinstance(row, str):
                raise InstanceError(f"instances[{i}]: {self.name} takes {self.describe()}, not text")
        try:
            with np.errstate(over="ignore"):  # beyond float32 becomes inf, refused below by index
                return np.asarray(instances, dtype=np.float32)
        except OverflowError:  # an integer too large even for float64 (a 400-digit number)
            row = next((i for i, r in enumerate(instances) if _has_huge_int(r)), 0)
            raise InstanceError(f"instances[{row}]: a number beyond float32's range (|x| <= {FLOAT32_MAX:.3g})") from None
        except (TypeError, ValueError):
            raise InstanceError(f"instances: expected {self.describe()}, all of the same shape") from None


def _has_huge_int(value: Any) -> bool:
    if isinstance(value, list):
        return any(_has_huge_int(v) for v in value)
    return isinstance(value, int) and abs(value) > FLOAT32_MAX
