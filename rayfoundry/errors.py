"""Every error a user can act on: one base class that carries its exit code, and one formatter for
pydantic validation errors.

`python -m ray_apps` catches `RayfoundryError` once and prints its message as one line; the message
names the field, file, row or ref at fault. Each stage raises the subclass that says which stage
refused; scripts that call the library catch the base class or a subclass.

    0  done
    1  training failed for a reason other than its input (a traceback), or every sweep trial failed
    2  bad input or a refused step: config, data, checkpoint, package, registry ref, export check
    3  the promotion gate refused a version (a package may still have been published)
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


class RayfoundryError(Exception):
    """A failure the user can act on; `str(e)` is the one line shown, `exit_code` what the CLI exits with."""

    exit_code = 2
    prefix = "error"


class ConfigError(RayfoundryError, ValueError):
    """A job config that cannot be used; the message names the file, the field and the problem."""


class DataError(RayfoundryError, ValueError):
    """Bad input data; the message names file, line and column."""


class CheckpointError(RayfoundryError, ValueError):
    """A checkpoint file is missing, truncated, altered or a symlink; the message names the file."""


class PackageError(RayfoundryError, ValueError):
    """A package is missing a file, holds an unlisted one, or a file is truncated or altered; the
    message names the file."""


class RegistryError(RayfoundryError, ValueError):
    """Unknown or malformed model/version/alias, or a refused registry operation; the message says which."""


class GateRefused(RegistryError):
    """The promotion gate refused a version; the message gives both metrics and the tolerance."""

    exit_code = 3
    prefix = "refused"


class ExportError(RayfoundryError, ValueError):
    """The export was refused; the message says which check failed and by how much."""


class SweepError(RayfoundryError, RuntimeError):
    """A sweep cannot run or resume as asked; the message says why and what to do."""


# A discriminated union puts its tag in the error path (model.cnn.hidden); the field is model.hidden.
UNION_SECTIONS = ("model", "strategy", "scheduler")
MAX_SHOWN_INPUT = 80


def describe_validation_error(error: Any, source: str | None = None, *, as_flags: bool = False) -> str:
    """One line for a pydantic `ValidationError` (or FastAPI's list of error dicts):
    `source: field.path: problem (got value) (+N more)`. `as_flags` names the field as a command-line
    option (`--max-int8-drop`) for models built from CLI arguments."""
    errors: Sequence[dict[str, Any]] = error.errors() if hasattr(error, "errors") else error
    first = errors[0]
    parts = [str(p) for p in first["loc"]  # not the names pydantic gives a union's members
             if not str(p).startswith(("function-after", "tagged-union", "constrained-", "literal["))]
    parts = [p for i, p in enumerate(parts) if not (i > 0 and parts[i - 1] in UNION_SECTIONS and i + 1 < len(parts))]
    loc = ".".join(parts)
    if as_flags and loc:
        loc = "--" + loc.replace("_", "-")
    msg = first["msg"].removeprefix("Value error, ")
    if first["type"] == "extra_forbidden":
        msg = "unknown field"
    elif first["type"] == "missing":
        msg = "required field is missing"
    elif "input" in first and first["type"] not in ("value_error", "assertion_error") and not isinstance(first["input"], dict):
        shown = repr(first["input"])
        if len(shown) > MAX_SHOWN_INPUT:  # a request may carry megabytes; the message stays one short line
            shown = shown[:MAX_SHOWN_INPUT] + "..."
        msg = f"{msg} (got {shown})"
    more = f" (+{len(errors) - 1} more)" if len(errors) > 1 else ""
    return f"{source + ': ' if source else ''}{loc + ': ' if loc else ''}{msg}{more}"
