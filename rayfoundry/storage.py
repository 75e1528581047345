"""Run storage, registries and data as local paths or URIs, through one set of pyarrow filesystems.

Every module that reads or writes a path a user gave (a run's `storage_path`, a registry root, a
data path, a checkpoint) goes through `resolve`: URIs (s3://, gs://, file://, ...) stay as they are,
local paths become absolute. No Ray here.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any

from rayfoundry.errors import ConfigError


def is_uri(path: str) -> bool:
    return "://" in path


def is_local(path: str) -> bool:
    """True for plain paths and file:// URIs: places where rename and flock work."""
    return not is_uri(path) or path.startswith("file://")


NAMED_STORES = ("databricks", "databricks-uc", "uc")  # MLflow tracking URIs that name a service, not a path


def relative_local(path: str) -> bool:
    """A place named relative to the process's working directory: a plain relative path, or an MLflow
    `sqlite:///relative.db` (an absolute one has four slashes). URIs of any scheme (s3://, file:/abs,
    databricks://profile) and MLflow's named stores are not."""
    if path.startswith("sqlite:///"):
        return not path.removeprefix("sqlite:///").startswith("/")
    if path in NAMED_STORES or re.match(r"[A-Za-z][A-Za-z0-9+.-]+:", path):
        return False
    return not os.path.isabs(path)


def require_shared(places: dict[str, str | None], nodes: int) -> None:
    """Refuse relative local paths on a cluster of several nodes: each node (and a submitted job's copy of
    the working dir) resolves them on its own disk, so checkpoints, packages or runs would scatter.
    `places` maps each config field (or option) to the path the user gave."""
    if nodes < 2:
        return
    for field, path in places.items():
        if path and relative_local(path):
            raise ConfigError(f"{field} {path!r} is a relative local path, which each of this cluster's {nodes} nodes "
                              f"resolves on its own disk; give a URI (s3://bucket/..., gs://...) or an absolute path on "
                              f"storage that every node mounts (NFS, a shared volume)")


def resolve(path: str) -> str:
    """A path as Ray and pyarrow take it: URIs as they are, local paths made absolute."""
    return path if is_uri(path) else os.path.abspath(path)


def filesystem(path: str):
    """(pyarrow filesystem, path inside it) for a local path or any URI pyarrow reads."""
    import pyarrow.fs as pafs

    return pafs.FileSystem.from_uri(resolve(path))


def join(base: str, *parts: str) -> str:
    return "/".join([base.rstrip("/"), *parts])


def kind(path: str) -> str:
    """'file', 'dir' or 'missing'."""
    import pyarrow.fs as pafs

    fs, inner = filesystem(path)
    found = fs.get_file_info(inner).type
    return {pafs.FileType.File: "file", pafs.FileType.Directory: "dir"}.get(found, "missing")


def write_text(path: str, text: str) -> None:
    fs, inner = filesystem(path)
    fs.create_dir(inner.rsplit("/", 1)[0], recursive=True)
    with fs.open_output_stream(inner) as f:
        f.write(text.encode())


def read_text(path: str) -> str | None:
    """The file's text, or None when there is no such file."""
    import pyarrow.fs as pafs

    fs, inner = filesystem(path)
    if fs.get_file_info(inner).type != pafs.FileType.File:
        return None
    with fs.open_input_stream(inner) as f:
        return f.read().decode()


def read_json(path: str) -> Any:
    """The file's JSON, or None when there is no such file."""
    text = read_text(path)
    return None if text is None else json.loads(text)


def delete_dir(path: str) -> bool:
    """Remove a directory tree; False when there was nothing to remove."""
    if kind(path) == "missing":
        return False
    fs, inner = filesystem(path)
    fs.delete_dir(inner)
    return True


def list_files(path: str) -> list[tuple[Any, str]]:
    """(filesystem, path) of each data file under `path` (a file, or a directory read recursively,
    hidden and `_` files skipped), sorted by path. Missing: FileNotFoundError naming the path."""
    import pyarrow.fs as pafs

    fs, root = filesystem(path)
    info = fs.get_file_info(root)
    if info.type == pafs.FileType.NotFound:
        raise FileNotFoundError(f"{path}: no such file or directory")
    if info.type == pafs.FileType.File:
        return [(fs, root)]
    found = fs.get_file_info(pafs.FileSelector(root, recursive=True))
    return [(fs, f.path) for f in sorted(found, key=lambda f: f.path)
            if f.type == pafs.FileType.File and not f.base_name.startswith((".", "_"))]


def sha256(path: Path) -> str:
    """Hex sha256 of a local file, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def is_plain_name(name: str) -> bool:
    """A file name that stays inside its directory: no separators, no `..`, not hidden, not empty."""
    return bool(name) and "/" not in name and "\\" not in name and not name.startswith(".") and "\0" not in name
