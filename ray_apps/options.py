"""Options several jobs share: where the registry is, and where to write a JSON copy of the result."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

from pydantic import BaseModel


def add_registry(p: argparse.ArgumentParser, what: str = "registry root") -> None:
    p.add_argument("--registry", default=os.environ.get("RAYFOUNDRY_REGISTRY", "registry"),
                   help=f"{what}: a path or URI (default $RAYFOUNDRY_REGISTRY or ./registry)")


def add_json_out(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("--json-out", type=Path, metavar="PATH", help=f"also write {what} to PATH as JSON")


def write_json_out(path: Path | None, record: BaseModel | dict[str, Any]) -> None:
    """Write a typed record (or a plain summary) as JSON when --json-out was given."""
    if path is None:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    text = record.model_dump_json(indent=2) if isinstance(record, BaseModel) else json.dumps(record, indent=2, default=str)
    path.write_text(text + "\n")
