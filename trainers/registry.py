"""The model registry: versioned packages under a root (local path or pyarrow URI), aliases, a gate.

    <root>/<model>/<version>/        one package (see package.py); versions are 1, 2, 3, ...
    <root>/<model>/registry.json     aliases, each alias's lineage (for rollback) and the event history
    <root>/.staging/<host>/          packages being built; never listed

A version becomes visible in one step: locally the finished staging directory is renamed into place;
on object stores, where rename is a copy, `metadata.json.sha256` is uploaded last and a version
without it is not listed. Promotion to `champion` passes a gate: the candidate's validation metric
must be at least the champion's minus a tolerance, on the same validation rows (re-measured with
each package's own ONNX model when the recorded numbers came from different data).
"""

from __future__ import annotations

import contextlib
import fcntl
import getpass
import hashlib
import json
import os
import shutil
import socket
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from trainers.package import METADATA, ModelPackage, PackageError

NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]*$"
COMMIT_MARKER = f"{METADATA}.sha256"
GATED_ALIAS = "champion"


class RegistryError(ValueError):
    """Unknown model/version/alias, or a refused operation; the message says which."""


class GateRefused(RegistryError):
    """The promotion gate refused a version; the message gives both metrics and the tolerance."""


def parse_ref(ref: str) -> tuple[str, str | None, str | None]:
    """'sst2' | 'sst2:3' | 'sst2@champion' -> (name, version, alias)."""
    if "@" in ref:
        name, alias = ref.split("@", 1)
        return name, None, alias
    name, _, version = ref.partition(":")
    if version and not version.isdigit():
        raise RegistryError(f"{ref!r}: a version is a number, e.g. {name}:3 (or use {name}@ALIAS)")
    return name, version or None, None


def filesystem_for(root: str):
    """(pyarrow filesystem, base path) of a registry root: a local path or any URI pyarrow reads."""
    import pyarrow.fs as pafs

    return pafs.FileSystem.from_uri(root if "://" in root else os.path.abspath(root))


class Registry:
    def __init__(self, root: str):
        self.root = root
        self.local = "://" not in root or root.startswith("file://")
        self.fs, self.base = filesystem_for(root)

    # --- reading -------------------------------------------------------------------------------
    def _path(self, *parts: str) -> str:
        return "/".join([self.base.rstrip("/"), *parts])

    def _ls(self, path: str) -> list[Any]:
        import pyarrow.fs as pafs

        if self.fs.get_file_info(path).type != pafs.FileType.Directory:
            return []
        return self.fs.get_file_info(pafs.FileSelector(path))

    def _exists(self, path: str) -> bool:
        import pyarrow.fs as pafs

        return self.fs.get_file_info(path).type != pafs.FileType.NotFound

    def models(self) -> list[str]:
        return sorted(i.base_name for i in self._ls(self.base) if i.type.name == "Directory" and not i.base_name.startswith("."))

    def versions(self, name: str) -> list[str]:
        found = [i.base_name for i in self._ls(self._path(name)) if i.base_name.isdigit()]
        return sorted((v for v in found if self._exists(self._path(name, v, COMMIT_MARKER))), key=int)

    def state(self, name: str) -> dict[str, Any]:
        path = self._path(name, "registry.json")
        if not self._exists(path):
            return {"aliases": {}, "lineage": {}, "history": []}
        with self.fs.open_input_stream(path) as f:
            return json.loads(f.read().decode())

    def metadata(self, name: str, version: str) -> dict[str, Any]:
        """A version's metadata.json as recorded, without hashing its files (listing); `open` verifies."""
        with self.fs.open_input_stream(self._path(name, version, METADATA)) as f:
            return json.loads(f.read().decode())

    def resolve(self, ref: str) -> tuple[str, str]:
        """(name, version) for a ref; a bare name means its champion, else its newest version."""
        name, version, alias = parse_ref(ref)
        versions = self.versions(name)
        if not versions:
            known = ", ".join(self.models()) or "none"
            raise RegistryError(f"{name}: no such model in registry {self.root} (models: {known})")
        if alias or version is None:
            aliases = self.state(name)["aliases"]
            if alias and alias not in aliases:
                raise RegistryError(f"{ref}: no alias {alias!r} (aliases: {', '.join(aliases) or 'none'})")
            version = aliases.get(alias or GATED_ALIAS, versions[-1])
        if version not in versions:
            raise RegistryError(f"{ref}: no version {version} of {name} (versions: {', '.join(versions)})")
        return name, version

    def open(self, ref: str) -> ModelPackage:
        """The verified package for a ref; remote packages are downloaded to a local cache first."""
        name, version = self.resolve(ref)
        if self.local:
            return ModelPackage.open(Path(self._path(name, version)))
        import pyarrow.fs as pafs

        key = hashlib.sha256(self.root.encode()).hexdigest()[:16]
        cache = Path(os.environ.get("RAYFOUNDRY_CACHE", Path.home() / ".cache" / "rayfoundry")) / key / name / version
        try:
            return ModelPackage.open(cache)
        except PackageError:
            shutil.rmtree(cache, ignore_errors=True)
        # Download beside the cache entry and rename: replicas starting together never see half a copy.
        part = cache.with_name(f".{version}-{uuid.uuid4().hex[:8]}")
        part.mkdir(parents=True)
        try:
            pafs.copy_files(self._path(name, version), str(part), source_filesystem=self.fs,
                            destination_filesystem=pafs.LocalFileSystem())
            ModelPackage.open(part)
            os.rename(part, cache)
        except OSError:
            if not cache.is_dir():
                raise
        finally:
            shutil.rmtree(part, ignore_errors=True)
        return ModelPackage.open(cache)

    # --- writing -------------------------------------------------------------------------------
    @contextlib.contextmanager
    def _lock(self, name: str) -> Iterator[None]:
        """Serializes writers of one model on one filesystem (local roots; object stores have no locks)."""
        if not self.local:
            yield
            return
        Path(self._path(name)).mkdir(parents=True, exist_ok=True)
        with open(self._path(name, ".lock"), "w") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            yield

    @contextlib.contextmanager
    def staging(self, name: str) -> Iterator[Path]:
        """A private directory to build a package in; removed on any failure. Local roots stage on the
        same filesystem so publishing is a rename."""
        if self.local:
            root = Path(self._path(".staging", socket.gethostname()))
            root.mkdir(parents=True, exist_ok=True)
            self._sweep_staging(root)
            path = root / f"{os.getpid()}-{uuid.uuid4().hex[:8]}-{name}"
            path.mkdir()
        else:
            path = Path(tempfile.mkdtemp(prefix=f"rayfoundry-{name}-"))
        try:
            yield path
        finally:
            shutil.rmtree(path, ignore_errors=True)

    @staticmethod
    def _sweep_staging(root: Path) -> None:
        """Remove staging directories of this host's exports whose process is gone (a crash)."""
        for d in root.iterdir():
            pid = d.name.split("-", 1)[0]
            if not pid.isdigit():
                continue
            try:
                os.kill(int(pid), 0)
            except ProcessLookupError:
                shutil.rmtree(d, ignore_errors=True)
            except PermissionError:  # alive, another user's
                pass

    def publish(self, name: str, staging: Path, finalize: Callable[[Path, str, str], None]) -> str:
        """Give the staged package the next version number and make it visible in one step."""
        with self._lock(name):
            versions = [i.base_name for i in self._ls(self._path(name)) if i.base_name.isdigit()]
            version = str(max(map(int, versions), default=0) + 1)  # never reuse a number, even a broken one
            finalize(staging, name, version)
            if self.local:
                os.rename(staging, self._path(name, version))
                return version
            import pyarrow.fs as pafs

            dest = self._path(name, version)
            self.fs.create_dir(dest, recursive=True)
            local = pafs.LocalFileSystem()
            for item in sorted(staging.iterdir(), key=lambda p: p.name == COMMIT_MARKER):  # marker last
                pafs.copy_files(str(item), f"{dest}/{item.name}", source_filesystem=local, destination_filesystem=self.fs)
            return version

    def _save_state(self, name: str, state: dict[str, Any]) -> None:
        data = json.dumps(state, indent=2).encode()
        path = self._path(name, "registry.json")
        if self.local:
            tmp = f"{path}.tmp-{os.getpid()}"
            Path(tmp).write_bytes(data)
            os.replace(tmp, path)
            return
        with self.fs.open_output_stream(path) as f:
            f.write(data)

    def _event(self, action: str, **fields: Any) -> dict[str, Any]:
        return {"at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "action": action,
                "user": getpass.getuser(), "host": socket.gethostname()} | fields

    def promote(self, ref: str, to: str, *, tolerance: float = 0.005, force: bool = False,
                reason: str | None = None) -> dict[str, Any]:
        """Point alias `to` at a version. `champion` is gated unless forced; returns the recorded event."""
        from trainers.gate import compare

        name, version = self.resolve(ref)
        with self._lock(name):
            state = self.state(name)
            current = state["aliases"].get(to)
            if current == version:
                return {"action": "unchanged", "alias": to, "version": version, "previous": current,
                        "forced": False, "gate": None}
            gate = None
            if to == GATED_ALIAS and current is not None and current != version:
                gate = compare(self.open(f"{name}:{version}"), self.open(f"{name}:{current}"), tolerance)
                if not gate["passed"] and not force:
                    raise GateRefused(f"{name}:{version} not promoted to {to}: {gate['summary']} "
                                      f"(--force to override; it is recorded)")
            event = self._event("promote", alias=to, version=version, previous=current, forced=force and bool(gate)
                                and not gate["passed"], reason=reason, gate=gate)
            state["aliases"][to] = version
            state["lineage"].setdefault(to, []).append(version)
            state["history"].append(event)
            self._save_state(name, state)
            return event

    def rollback(self, name: str, alias: str = GATED_ALIAS, reason: str | None = None) -> dict[str, Any]:
        """Point `alias` back at the version it had before its latest promotion."""
        self.resolve(name)  # an unknown model fails here, naming the models there are
        with self._lock(name):
            state = self.state(name)
            lineage = state["lineage"].get(alias, [])
            if len(lineage) < 2:
                raise RegistryError(f"{name}@{alias}: no earlier version to roll back to "
                                    f"(lineage: {', '.join(lineage) or 'empty'})")
            dropped = lineage.pop()
            state["aliases"][alias] = lineage[-1]
            event = self._event("rollback", alias=alias, version=lineage[-1], previous=dropped, reason=reason)
            state["history"].append(event)
            self._save_state(name, state)
            return event
