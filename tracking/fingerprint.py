"""A fingerprint of each data source a run reads, so a package can say which data it was trained on and
`train --reproduce` can refuse data that changed.

    local files      size + sha256 of the content, cached by (real path, size, mtime) so a file is read
                     once: ~/.cache/rayfoundry/fingerprints.json ($RAYFOUNDRY_CACHE moves it)
    object stores    size + the store's ETag or checksum (through fsspec when it knows the scheme),
                     else size + modification time
    sklearn:NAME     sha256 of the arrays scikit-learn ships
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time
from pathlib import Path

from rayfoundry import storage
from rayfoundry.errors import DataError
from tracking.records import DataFingerprint, SourceFingerprint

SETTLED_S = 2.0  # files modified more recently than this are not cached
MAX_ENTRIES = 1000  # a source with more files is recorded as a whole (a mismatch names the source, not the file)


def cache_path() -> Path:
    root = os.environ.get("RAYFOUNDRY_CACHE") or os.path.join(os.environ.get("XDG_CACHE_HOME", "~/.cache"), "rayfoundry")
    return Path(root).expanduser() / "fingerprints.json"


class HashCache:
    """sha256 of local files by (real path, size, mtime_ns); a stale or unreadable cache is ignored.
    A file modified within the last few seconds is hashed but not cached: on filesystems with coarse
    timestamps a second write in the same tick would keep its mtime."""

    def __init__(self, path: Path | None):
        self.path, self.seen = path, {}
        self.entries: dict = {}
        if path is None:  # no cache: hash every file (what `train --reproduce` does)
            return
        try:
            self.entries = json.loads(path.read_text())
            if not isinstance(self.entries, dict):
                self.entries = {}
        except (OSError, ValueError):
            self.entries = {}

    def sha256(self, file: str) -> tuple[int, str]:
        real = os.path.realpath(file)
        st = os.stat(real)
        key = f"{real}|{st.st_size}|{st.st_mtime_ns}"
        digest = self.entries.get(key)
        if not isinstance(digest, str):
            digest = storage.sha256(Path(real))
            if time.time() - st.st_mtime > SETTLED_S:
                self.entries[key] = digest
        self.seen[real] = key
        return st.st_size, digest

    def save(self) -> None:
        """Keep one entry per file seen (its current size and mtime); write atomically. A cache that
        cannot be written only costs a re-read next time."""
        if self.path is None or not self.seen:
            return
        keep = {k: v for k, v in self.entries.items() if k.rsplit("|", 2)[0] not in self.seen or k in self.seen.values()}
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=".fingerprints.")
            with os.fdopen(fd, "w") as f:
                json.dump(keep, f)
            os.replace(tmp, self.path)
        except OSError:
            pass


def _object_tag(fs, inner: str) -> str | None:
    """The object store's ETag or checksum for one object, when fsspec has a filesystem for the scheme."""
    try:
        import fsspec

        info = fsspec.filesystem(fs.type_name).info(inner)
    except Exception:  # no fsspec implementation for the scheme, or no credentials: fall back to size+mtime
        return None
    for key in ("ETag", "etag", "md5Hash", "crc32c", "checksum"):
        if info.get(key):
            return f"{key}:{str(info[key]).strip(chr(34))}"
    return None


def _builtin(path: str) -> SourceFingerprint:
    from sklearn import datasets

    bunch = getattr(datasets, f"load_{path.split(':', 1)[1]}")()
    h = hashlib.sha256()
    for array in (bunch.data, bunch.target):
        h.update(array.tobytes())
    return SourceFingerprint(path=path, method="builtin", files=1, bytes=bunch.data.nbytes + bunch.target.nbytes,
                             digest=h.hexdigest())


def fingerprint_source(path: str, cache: HashCache) -> SourceFingerprint:
    """Fingerprint one source; a missing path is a DataError naming it."""
    if path.startswith("sklearn:"):
        return _builtin(path)
    try:
        files = storage.list_files(path)
    except FileNotFoundError:
        raise DataError(f"{path}: no such file or directory") from None
    if not files:
        raise DataError(f"{path}: holds no data files")
    root = storage.filesystem(path)[1].rstrip("/")
    local = storage.is_local(path)
    entries, total, methods = {}, 0, set()
    for fs, inner in files:
        name = inner[len(root) + 1:] if inner.startswith(root + "/") else os.path.basename(inner)
        if local:
            try:
                size, tag = cache.sha256(inner)
            except OSError as e:
                raise DataError(f"{path}: cannot read {inner} to fingerprint it ({e.strerror or e})") from None
            methods.add("sha256")
        else:
            info = fs.get_file_info(inner)
            size, tag = info.size, _object_tag(fs, inner)
            if tag is None:
                tag = f"mtime:{info.mtime_ns}"
                methods.add("size+mtime")
            else:
                methods.add("etag")
        entries[name or os.path.basename(inner)] = f"{size}:{tag}"
        total += size
    digest = hashlib.sha256(json.dumps(entries, sort_keys=True).encode()).hexdigest()
    method = "sha256" if local else ("size+mtime" if "size+mtime" in methods else "etag")
    return SourceFingerprint(path=path, method=method, files=len(entries), bytes=total, digest=digest,
                             entries=entries if len(entries) <= MAX_ENTRIES else {})


def fingerprint_data(train_path: str, validation_path: str | None = None, *, cached: bool = True) -> DataFingerprint:
    """Fingerprint a run's sources; `cached=False` hashes every file again, trusting no cache."""
    cache = HashCache(cache_path() if cached else None)
    try:
        train = fingerprint_source(train_path, cache)
        validation = fingerprint_source(validation_path, cache) if validation_path else None
    finally:
        cache.save()
    parts = [train.digest] + ([validation.digest] if validation else [])
    return DataFingerprint(digest=hashlib.sha256("|".join(parts).encode()).hexdigest(), train=train,
                           validation=validation)


def changed_sources(recorded: DataFingerprint, now: DataFingerprint) -> list[str]:
    """What differs, one phrase per source and file: 'data.train_path ../x/train.tsv: train.tsv changed'."""
    out = []
    for (field, old), (_, new) in zip(recorded.sources(), now.sources()):
        if old.digest == new.digest:
            continue
        names = sorted(old.entries.keys() | new.entries.keys())
        diffs = [f"{n} {'is new' if n not in old.entries else 'is gone' if n not in new.entries else 'changed'}"
                 for n in names if old.entries.get(n) != new.entries.get(n)]
        out.append(f"{field} {old.path}: " + (", ".join(diffs[:3]) or f"content changed ({new.files} files)")
                   + (f" (+{len(diffs) - 3} more)" if len(diffs) > 3 else ""))
    if (recorded.validation is None) != (now.validation is None):
        out.append("data.validation_path: set in one run and not the other")
    return out
