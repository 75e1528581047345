"""The model registry: versioned packages under a root (local path or pyarrow URI), aliases, a gate.

    <root>/<model>/<version>/        one package (see package.py); versions are 1, 2, 3, ...
    <root>/<model>/registry.json     the gate policy, aliases, each alias's lineage (for rollback) and
                                     the event history
    <root>/.staging/<host>/          packages being built; never listed

A version becomes visible in one step: locally the finished staging directory is renamed into place;
on object stores, where rename is a copy, `metadata.json.sha256` is uploaded last and a version
without it is not listed. Promotion to `champion` passes a gate: on the metric and direction of the
model's policy (set by its first version, never by a candidate), the candidate must be at least as
good as the champion within a tolerance, on the same validation rows (re-measured with each
package's own ONNX model when the recorded numbers came from different data). Every name, alias and
version in a ref is checked against NAME_PATTERN, so no ref reaches outside the root.
"""

from __future__ import annotations

import contextlib
import fcntl
import getpass
import hashlib
import os
import re
import shutil
import socket
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from model_registry.package import COMMIT_MARKER, METADATA, Metric, ModelPackage, PackageMetadata, read_metadata
from rayfoundry import storage
from rayfoundry.errors import GateRefused, PackageError, RegistryError, describe_validation_error

__all__ = ["GATED_ALIAS", "NAME_PATTERN", "Event", "GatePolicy", "GateRefused", "GateResult", "GuardResult", "Registry",
           "RegistryError", "RegistryState", "RolloutRecord", "VersionTally", "parse_ref"]

NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]*$"
GATED_ALIAS = "champion"
HIGHER_IS_BETTER = {"val_accuracy": True, "val_macro_f1": True, "val_loss": False}


class GatePolicy(BaseModel):
    """What the promotion gate compares for one model: set when the model is first published, changed
    only with a recorded `registry policy --force --reason`."""

    model_config = ConfigDict(extra="forbid")
    metric: Metric
    mode: Literal["max", "min"]

    @model_validator(mode="after")
    def _direction(self) -> GatePolicy:
        if (self.mode == "max") != HIGHER_IS_BETTER[self.metric]:
            raise ValueError(f"{self.metric} is better when {'higher' if HIGHER_IS_BETTER[self.metric] else 'lower'}; "
                             f"mode {self.mode} contradicts it")
        return self

    def __str__(self) -> str:
        return f"{self.metric} ({'higher' if self.mode == 'max' else 'lower'} is better)"


class GateResult(BaseModel):
    """One gate decision: both values on the same rows, the bound, and how they were measured."""

    model_config = ConfigDict(extra="forbid")
    passed: bool
    metric: str
    mode: str
    summary: str
    candidate: float | None = None
    champion: float | None = None
    champion_version: str | None = None
    tolerance: float | None = None
    measured: str | None = None
    champion_corrupt: bool = False


class GuardResult(BaseModel):
    """One rollout guard's verdict: its value against its threshold, on how many samples."""

    model_config = ConfigDict(extra="forbid")
    name: str
    status: Literal["pending", "pass", "fail"]
    value: float | None = None
    threshold: float
    samples: int = 0
    min_samples: int = 0
    p_value: float | None = None
    detail: str = ""


class VersionTally(BaseModel):
    """What one served version did during a rollout (all replicas merged)."""

    model_config = ConfigDict(extra="forbid")
    requests: int = 0
    errors: int = 0
    instances: int = 0
    p50_ms: float | None = None
    p99_ms: float | None = None


class RolloutRecord(BaseModel):
    """The evidence behind a rollout's decision, kept in the model's history."""

    model_config = ConfigDict(extra="forbid")
    outcome: Literal["promoted", "rolled_back", "aborted"]
    champion: str
    candidate: str
    phase: str
    weight: float
    started: str
    tallies: dict[str, VersionTally] = Field(default_factory=dict, description="By version.")
    shadow: dict[str, int] = Field(default_factory=dict, description="compared, disagreed and dropped instances.")
    guards: list[GuardResult] = Field(default_factory=list)


class RetrainRecord(BaseModel):
    """One step of the retraining loop: triggered by an alarm, then trained, exported and shadowed (or failed)."""

    model_config = ConfigDict(extra="forbid")
    stage: Literal["dry_run", "submitted", "trained", "exported", "shadow", "failed"]
    trigger: str | None = Field(None, description="Which alarm, on which version.")
    command: list[str] | None = None
    submission: str | None = Field(None, description="The Ray job id, or the local process id and its log file.")
    data_path: str | None = None
    run_dir: str | None = None
    candidate: str | None = None


class Event(BaseModel):
    """One entry of a model's history: a promotion, a rollback, a policy change, a rollout's decision or a
    step of the retraining loop."""

    model_config = ConfigDict(extra="ignore")
    at: str
    action: Literal["promote", "rollback", "policy", "unchanged", "rollout", "retrain"]
    user: str = ""
    host: str = ""
    alias: str | None = None
    version: str | None = None
    previous: str | None = None
    forced: bool = False
    reason: str | None = None
    gate: GateResult | None = None
    policy: GatePolicy | None = None
    previous_policy: GatePolicy | None = None
    rollout: RolloutRecord | None = None
    retraining: RetrainRecord | None = None


class RegistryState(BaseModel):
    """<root>/<model>/registry.json."""

    model_config = ConfigDict(extra="ignore")
    policy: GatePolicy | None = None
    aliases: dict[str, str] = Field(default_factory=dict)
    lineage: dict[str, list[str]] = Field(default_factory=dict, description="Each alias's versions, for rollback.")
    history: list[Event] = Field(default_factory=list)


def check_name(value: str, what: str, ref: str | None = None) -> str:
    """A model name or alias that stays inside the registry root: the name pattern, nothing else."""
    if not isinstance(value, str) or not re.fullmatch(NAME_PATTERN, value):
        raise RegistryError(f"{ref if ref is not None else value!r}: {what} {value!r} must match {NAME_PATTERN} "
                            f"(letters, digits, '_', '.', '-')")
    return value


def parse_ref(ref: str) -> tuple[str, str | None, str | None]:
    """'sst2' | 'sst2:3' | 'sst2@champion' -> (name, version, alias); every part checked."""
    if "@" in ref:
        name, alias = ref.split("@", 1)
        return check_name(name, "model name", ref), None, check_name(alias, "alias", ref)
    name, _, version = ref.partition(":")
    check_name(name, "model name", ref)
    if version and not re.fullmatch(r"[0-9]{1,9}", version):
        raise RegistryError(f"{ref!r}: a version is a number, e.g. {name}:3 (or use {name}@ALIAS)")
    return name, (str(int(version)) if version else None), None


def filesystem_for(root: str):
    """(pyarrow filesystem, base path) of a registry root: a local path or any URI pyarrow reads."""
    return storage.filesystem(root)


class Registry:
    def __init__(self, root: str):
        self.root = root
        self.local = storage.is_local(root)
        self.fs, self.base = filesystem_for(root)

    # --- reading -------------------------------------------------------------------------------
    def _path(self, *parts: str) -> str:
        return storage.join(self.base, *parts)

    def _ls(self, path: str) -> list[Any]:
        import pyarrow.fs as pafs

        if self.fs.get_file_info(path).type != pafs.FileType.Directory:
            return []
        return self.fs.get_file_info(pafs.FileSelector(path))

    def _exists(self, path: str) -> bool:
        import pyarrow.fs as pafs

        return self.fs.get_file_info(path).type != pafs.FileType.NotFound

    def _read(self, path: str) -> bytes:
        with self.fs.open_input_stream(path) as f:
            return f.read()

    def models(self) -> list[str]:
        return sorted(i.base_name for i in self._ls(self.base)
                      if i.type.name == "Directory" and re.fullmatch(NAME_PATTERN, i.base_name))

    def versions(self, name: str) -> list[str]:
        check_name(name, "model name")
        found = [i.base_name for i in self._ls(self._path(name)) if re.fullmatch(r"[0-9]+", i.base_name)]
        return sorted((v for v in found if self._exists(self._path(name, v, COMMIT_MARKER))), key=int)

    def state(self, name: str) -> RegistryState:
        path = self._path(check_name(name, "model name"), "registry.json")
        if not self._exists(path):
            return RegistryState()
        return RegistryState.model_validate_json(self._read(path))

    def metadata(self, name: str, version: str) -> PackageMetadata:
        """A version's metadata.json as recorded, without hashing its files (listing); `open` verifies."""
        path = self._path(check_name(name, "model name"), version, METADATA)
        if self.local:
            return read_metadata(Path(path))
        return PackageMetadata.model_validate_json(self._read(path))

    def policy(self, name: str, state: RegistryState | None = None) -> GatePolicy:
        """The model's gate policy; registries from before policies take it from the first version."""
        state = state or self.state(name)
        if state.policy is not None:
            return state.policy
        first = self.metadata(name, self.versions(name)[0]).validation
        return GatePolicy(metric=first.metric, mode=first.mode)

    def resolve(self, ref: str) -> tuple[str, str]:
        """(name, version) for a ref; a bare name means its champion, else its newest version."""
        name, version, alias = parse_ref(ref)
        versions = self.versions(name)
        if not versions:
            known = ", ".join(self.models()) or "none"
            raise RegistryError(f"{name}: no such model in registry {self.root} (models: {known})")
        if alias or version is None:
            aliases = self.state(name).aliases
            if alias and alias not in aliases:
                raise RegistryError(f"{ref}: no alias {alias!r} (aliases: {', '.join(aliases) or 'none'})")
            version = aliases.get(alias or GATED_ALIAS, versions[-1])
        if version not in versions:
            raise RegistryError(f"{ref}: no version {version} of {name} (versions: {', '.join(versions)})")
        return name, version

    def open(self, ref: str) -> ModelPackage:
        """The verified package for a ref; remote packages are downloaded to a local cache first, and
        the cache is used only while it matches the remote's metadata.json.sha256."""
        name, version = self.resolve(ref)
        if self.local:
            return ModelPackage.open(Path(self._path(name, version)))
        import pyarrow.fs as pafs

        remote_digest = self._read(self._path(name, version, COMMIT_MARKER)).decode().strip()
        key = hashlib.sha256(self.root.encode()).hexdigest()[:16]
        cache = Path(os.environ.get("RAYFOUNDRY_CACHE", Path.home() / ".cache" / "rayfoundry")) / key / name / version
        try:
            pkg = ModelPackage.open(cache)
            if (cache / COMMIT_MARKER).read_text().strip() == remote_digest:
                return pkg
        except PackageError:
            pass
        shutil.rmtree(cache, ignore_errors=True)
        # Download beside the cache entry and rename: replicas starting together never see half a copy.
        part = cache.with_name(f".{version}-{uuid.uuid4().hex[:8]}")
        part.mkdir(parents=True)
        try:
            pafs.copy_files(self._path(name, version), str(part), source_filesystem=self.fs,
                            destination_filesystem=pafs.LocalFileSystem())
            ModelPackage.open(part)
            if (part / COMMIT_MARKER).read_text().strip() != remote_digest:
                raise PackageError(f"{self.root}/{name}/{version}: changed while it was downloaded; try again")
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
        check_name(name, "model name")
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
        """Give the staged package the next version number and make it visible in one step. The first
        version of a model sets its gate policy (from its validation metric and mode)."""
        check_name(name, "model name")
        with self._lock(name):
            versions = [i.base_name for i in self._ls(self._path(name)) if i.base_name.isdigit()]
            version = str(max(map(int, versions), default=0) + 1)  # never reuse a number, even a broken one
            finalize(staging, name, version)
            if self.local:
                os.rename(staging, self._path(name, version))
            else:
                import pyarrow.fs as pafs

                dest = self._path(name, version)
                self.fs.create_dir(dest, recursive=True)
                local = pafs.LocalFileSystem()
                for item in sorted(staging.iterdir(), key=lambda p: p.name == COMMIT_MARKER):  # marker last
                    pafs.copy_files(str(item), f"{dest}/{item.name}", source_filesystem=local,
                                    destination_filesystem=self.fs)
            state = self.state(name)
            if state.policy is None:
                state.policy = self.policy(name, state)  # from the oldest version: this one, for a new model
                state.history.append(self._event("policy", version=version, policy=state.policy,
                                                 reason="set by the model's first published version"))
                self._save_state(name, state)
            return version

    def _save_state(self, name: str, state: RegistryState) -> None:
        self._write(name, "registry.json", state.model_dump_json(indent=2, exclude_none=True).encode())

    def read_document(self, name: str, filename: str) -> bytes | None:
        """A service document kept beside registry.json (e.g. a running service's rollout.json), or None."""
        path = self._path(check_name(name, "model name"), check_name(filename, "file name"))
        return self._read(path) if self._exists(path) else None

    def write_document(self, name: str, filename: str, data: bytes) -> None:
        self._write(check_name(name, "model name"), check_name(filename, "file name"), data)

    def record(self, name: str, action: str, **fields: Any) -> Event:
        """Append an event to a model's history (a rollout's decision and its evidence)."""
        check_name(name, "model name")
        with self._lock(name):
            state = self.state(name)
            event = self._event(action, **fields)
            state.history.append(event)
            self._save_state(name, state)
            return event

    def _write(self, name: str, filename: str, data: bytes) -> None:
        path = self._path(name, filename)
        if self.local:
            tmp = f"{path}.tmp-{os.getpid()}"
            Path(tmp).write_bytes(data)
            os.replace(tmp, path)
            return
        with self.fs.open_output_stream(path) as f:
            f.write(data)

    @staticmethod
    def _event(action: str, **fields: Any) -> Event:
        return Event(at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), action=action,
                     user=getpass.getuser(), host=socket.gethostname(), **fields)

    def set_policy(self, name: str, metric: str, mode: str, *, force: bool, reason: str | None) -> Event:
        """Change a model's gate policy: only with force and a reason, both recorded."""
        self.resolve(name)  # an unknown model fails here, naming the models there are
        if not force or not reason:
            raise RegistryError(f"{name}: changing the gate policy needs --force and --reason (it is recorded)")
        try:
            new = GatePolicy(metric=metric, mode=mode)
        except ValidationError as e:
            raise RegistryError(describe_validation_error(e, f"{name}: policy")) from None
        with self._lock(name):
            state = self.state(name)
            old = self.policy(name, state)
            event = self._event("policy", policy=new, previous_policy=old, forced=True, reason=reason)
            state.policy = new
            state.history.append(event)
            self._save_state(name, state)
            return event

    def promote(self, ref: str, to: str, *, tolerance: float = 0.005, force: bool = False,
                reason: str | None = None) -> Event:
        """Point alias `to` at a version. `champion` is gated on the model's policy unless forced; a
        corrupt champion can only be replaced by force. Returns the recorded event."""
        from model_registry.gate import compare

        name, version = self.resolve(ref)
        check_name(to, "alias")
        with self._lock(name):
            state = self.state(name)
            current = state.aliases.get(to)
            if current == version:
                return self._event("unchanged", alias=to, version=version, previous=current)
            gate = None
            if to == GATED_ALIAS and current is not None:
                candidate = self.open(f"{name}:{version}")  # a corrupt candidate is refused, forced or not
                try:
                    champion = self.open(f"{name}:{current}")
                except PackageError as e:
                    if not force:
                        raise RegistryError(f"{name}@{to} is {name}:{current}, whose package is corrupt ({e}); "
                                            f"--force --reason replaces it (recorded)") from None
                    policy = self.policy(name, state)
                    gate = GateResult(passed=False, metric=policy.metric, mode=policy.mode, champion_corrupt=True,
                                      champion_version=current,
                                      summary=f"champion {name}:{current} is corrupt and was not compared: {e}")
                else:
                    gate = compare(candidate, champion, tolerance, self.policy(name, state))
                if not gate.passed and not force:
                    raise GateRefused(f"{name}:{version} not promoted to {to}: {gate.summary} "
                                      f"(--force to override; it is recorded)")
            event = self._event("promote", alias=to, version=version, previous=current,
                                forced=bool(force and gate and not gate.passed), reason=reason, gate=gate)
            state.aliases[to] = version
            state.lineage.setdefault(to, []).append(version)
            state.history.append(event)
            self._save_state(name, state)
            return event

    def rollback(self, name: str, alias: str = GATED_ALIAS, reason: str | None = None) -> Event:
        """Point `alias` back at the version it had before its latest promotion."""
        self.resolve(name)  # an unknown model fails here, naming the models there are
        check_name(alias, "alias")
        with self._lock(name):
            state = self.state(name)
            lineage = state.lineage.get(alias, [])
            if len(lineage) < 2:
                raise RegistryError(f"{name}@{alias}: no earlier version to roll back to "
                                    f"(lineage: {', '.join(lineage) or 'empty'})")
            dropped = lineage.pop()
            state.aliases[alias] = lineage[-1]
            event = self._event("rollback", alias=alias, version=lineage[-1], previous=dropped, reason=reason)
            state.history.append(event)
            self._save_state(name, state)
            return event
