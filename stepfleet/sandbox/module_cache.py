"""CompiledModuleCache: precompiled wasmtime artifacts on local disk, so a new worker does not
recompile every module it meets.

An entry is what `wasmtime.Module.serialize()` produced, sealed with an HMAC-SHA256 the worker
checks before `Module.deserialize` (which runs no validation: deserializing bytes someone else
wrote would run their machine code). Entries are keyed by the module digest and an engine
fingerprint; the directory must be private to the worker's user, writes are atomic, and the
directory is kept under a size bound by evicting the least recently used entries (by mtime,
touched on every hit). Nothing here raises on a bad entry: it is deleted and the caller compiles.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import hmac
import json
import os
import platform
import secrets
import stat
import struct
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Protocol

import structlog
import wasmtime

from stepfleet.sandbox.errors import SandboxError

log = structlog.get_logger("stepfleet.sandbox.module_cache")

FORMAT_VERSION = 1
"""Bump when the entry layout or the fingerprint's fields change."""
KEY_FILE = "hmac.key"
"""The random HMAC key made on first use when no key is configured (mode 0600)."""
SUFFIX = ".cwasm"
MIN_KEY_BYTES = 16

_MAGIC = b"stepfleet-cwasm\x01"
_TAG_BYTES = 32
_LENGTH = struct.Struct(">I")
_PREAMBLE = len(_MAGIC) + _TAG_BYTES + _LENGTH.size
_MAX_HEADER_BYTES = 4096
_TMP_PREFIX = ".tmp-"
_STALE_TMP_SECONDS = 3600.0
_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
_DIRECTORY = getattr(os, "O_DIRECTORY", 0)


class UnsafeCacheDirectory(SandboxError):
    """The cache directory is not private to this user, so its artifacts cannot be trusted."""


class _Secret(Protocol):
    """A secret setting (pydantic's SecretStr) without importing pydantic here."""

    def get_secret_value(self) -> str: ...


@dataclass(slots=True)
class CacheStats:
    """What the cache did since it was opened (for tests, benchmarks and logs)."""

    hits: int = 0
    misses: int = 0
    rejected: int = 0
    """Entries deleted because they failed the HMAC, the header or `deserialize`."""
    stored: int = 0
    evicted: int = 0


@functools.cache
def wasmtime_version() -> str:
    """The installed wasmtime-py (which bundles the matching libwasmtime)."""
    try:
        return metadata.version("wasmtime")
    except metadata.PackageNotFoundError:  # pragma: no cover - vendored wasmtime
        return "unknown"


def engine_fingerprint(options: Mapping[str, bool | int | str], abi_version: int) -> str:
    """Name the code an engine generates: wasmtime, target, the Config options set, host ABI.

    `options` are the `wasmtime.Config` attributes the engine was built with (the same mapping
    must be applied to the Config, so the two cannot drift apart).
    """
    fields = {
        "format": FORMAT_VERSION,
        "wasmtime": wasmtime_version(),
        "platform": sys.platform,
        "machine": platform.machine(),
        "abi": abi_version,
        "config": dict(sorted(options.items())),
    }
    text = json.dumps(fields, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


class CompiledModuleCache:
    """Precompiled modules in a private directory, HMAC-sealed, bounded to `max_bytes`.

    Several worker processes of one user may share the directory: writes are atomic
    (temporary file and `os.replace`) and a concurrent eviction only causes a miss.
    """

    def __init__(
        self,
        directory: Path | str,
        *,
        max_bytes: int = 1024**3,
        key: bytes | None = None,
    ) -> None:
        """Open (creating it 0700 if needed) a cache directory; raise UnsafeCacheDirectory if
        it is a symlink, not a directory, not owned by this user or group/world-writable.

        Without `key`, a random key is read from (or, on first use, created in) `KEY_FILE`.
        """
        if key is not None and len(key) < MIN_KEY_BYTES:
            raise ValueError(f"the module cache key must be at least {MIN_KEY_BYTES} bytes")
        self.directory = Path(directory).expanduser().absolute()
        self.max_bytes = max_bytes
        self.stats = CacheStats()
        self._key = _open_private_directory(self.directory, key)
        self._evict()

    @classmethod
    def open(
        cls,
        directory: Path | str | None,
        max_bytes: int = 1024**3,
        key: bytes | str | _Secret | None = None,
    ) -> CompiledModuleCache | None:
        """The cache at `directory`, or None (logged) when it is disabled or unusable."""
        if directory is None or str(directory) == "" or max_bytes <= 0:
            return None
        if key is not None and not isinstance(key, bytes | str):
            key = key.get_secret_value()
        if isinstance(key, str):
            key = key.encode()
        try:
            return cls(directory, max_bytes=max_bytes, key=key or None)
        except (UnsafeCacheDirectory, OSError, ValueError) as exc:
            log.warning("module_cache_disabled", directory=str(directory), reason=str(exc))
            return None

    # -- entries -------------------------------------------------------------------------

    def path(self, fingerprint: str, digest: str) -> Path:
        """Where the entry of `digest` compiled by an engine with `fingerprint` lives."""
        name = hashlib.sha256(f"{fingerprint}\n{digest}".encode()).hexdigest()
        return self.directory / f"{name}{SUFFIX}"

    def load(
        self, engine: wasmtime.Engine, fingerprint: str, digest: str
    ) -> wasmtime.Module | None:
        """The module from disk, or None (a miss, or a bad entry, which is deleted)."""
        path = self.path(fingerprint, digest)
        artifact = self._unsealed(path, fingerprint, digest)
        if artifact is None:
            return None
        try:
            module = wasmtime.Module.deserialize(engine, artifact)
        except Exception as exc:  # never let a bad artifact stop the worker
            self._reject(path, digest, f"deserialize failed: {_first_line(exc)}")
            return None
        self._hit(path)
        return module

    def read_artifact(self, fingerprint: str, digest: str) -> bytes | None:
        """The sealed artifact's bytes, HMAC checked but not deserialized, or None (a miss, or
        a bad entry, which is deleted). For a thread that may not touch the engine."""
        path = self.path(fingerprint, digest)
        artifact = self._unsealed(path, fingerprint, digest)
        if artifact is not None:
            self._hit(path)
        return artifact

    def store(self, fingerprint: str, digest: str, module: wasmtime.Module) -> bool:
        """Write `module`'s artifact atomically, then evict down to the bound; never raises."""
        try:
            artifact = bytes(module.serialize())
        except wasmtime.WasmtimeError as exc:
            log.warning("module_cache_store_failed", module_digest=digest, reason=str(exc))
            return False
        return self.store_artifact(fingerprint, digest, artifact)

    def store_artifact(self, fingerprint: str, digest: str, artifact: bytes) -> bool:
        """Seal and write what `Module.serialize()` returned, as `store` does; never raises.

        Only for artifacts this fleet compiled itself (a `ModuleCompiler`'s child process):
        sealing vouches for them to every worker sharing the key.
        """
        entry = self._seal(artifact, fingerprint, digest)
        if len(entry) > self.max_bytes:
            return False
        path = self.path(fingerprint, digest)
        tmp = self.directory / f"{_TMP_PREFIX}{secrets.token_hex(8)}"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _NOFOLLOW | _CLOEXEC, 0o600)
            with os.fdopen(fd, "wb") as out:
                out.write(entry)
            os.replace(tmp, path)
        except OSError as exc:
            with contextlib.suppress(OSError):
                tmp.unlink()
            log.warning("module_cache_store_failed", module_digest=digest, reason=str(exc))
            return False
        self.stats.stored += 1
        self._evict()
        return True

    def discard(self, fingerprint: str, digest: str) -> None:
        """Delete an entry (one that deserialized but that the host no longer accepts)."""
        with contextlib.suppress(OSError):
            self.path(fingerprint, digest).unlink()

    def size(self) -> int:
        """Bytes the entries and temporary files take now."""
        return sum(size for _, _, size in self._entries())

    # -- internals -----------------------------------------------------------------------

    def _unsealed(self, path: Path, fingerprint: str, digest: str) -> bytes | None:
        """The artifact in the entry at `path`, or None (counted a miss, or rejected)."""
        try:
            data = self._read(path)
        except FileNotFoundError:
            self.stats.misses += 1
            return None
        except OSError as exc:
            self._reject(path, digest, f"unreadable: {exc}")
            return None
        problem, artifact = self._unseal(data, fingerprint, digest)
        if problem:
            self._reject(path, digest, problem)
            return None
        return artifact

    def _hit(self, path: Path) -> None:
        self.stats.hits += 1
        with contextlib.suppress(OSError):
            os.utime(path)

    def _seal(self, artifact: bytes, fingerprint: str, digest: str) -> bytes:
        header = json.dumps(
            {"digest": digest, "fingerprint": fingerprint, "bytes": len(artifact)},
            sort_keys=True,
            separators=(",", ":"),
        ).encode()
        body = _LENGTH.pack(len(header)) + header + artifact
        tag = hmac.new(self._key, _MAGIC + body, hashlib.sha256).digest()
        return _MAGIC + tag + body

    def _unseal(self, data: bytes, fingerprint: str, digest: str) -> tuple[str, bytes]:
        """("", artifact) for an entry this fleet sealed for this key, else (problem, b"")."""
        if len(data) < _PREAMBLE or not data.startswith(_MAGIC):
            return "truncated or not an entry", b""
        tag = data[len(_MAGIC) : len(_MAGIC) + _TAG_BYTES]
        body = memoryview(data)[len(_MAGIC) + _TAG_BYTES :]
        expected = hmac.new(self._key, _MAGIC, hashlib.sha256)
        expected.update(body)
        if not hmac.compare_digest(tag, expected.digest()):
            return "HMAC mismatch (tampered, truncated or another key)", b""
        (header_length,) = _LENGTH.unpack_from(body)
        if header_length > min(_MAX_HEADER_BYTES, len(body) - _LENGTH.size):
            return "bad header", b""
        start = _LENGTH.size + header_length
        try:
            header = json.loads(bytes(body[_LENGTH.size : start]))
        except ValueError:
            return "bad header", b""
        if not isinstance(header, dict):
            return "bad header", b""
        if header.get("fingerprint") != fingerprint:
            return "compiled by another engine", b""
        if header.get("digest") != digest:
            return "holds another module", b""
        if header.get("bytes") != len(body) - start:
            return "artifact length mismatch", b""
        return "", bytes(body[start:])

    def _read(self, path: Path) -> bytes:
        fd = os.open(path, os.O_RDONLY | _NOFOLLOW | _CLOEXEC)
        with os.fdopen(fd, "rb") as entry:
            info = os.fstat(entry.fileno())
            if not stat.S_ISREG(info.st_mode):
                raise OSError(f"{path.name} is not a regular file")
            if info.st_size > self.max_bytes:
                raise OSError(f"{path.name} is larger than the cache bound")
            return entry.read()

    def _reject(self, path: Path, digest: str, problem: str) -> None:
        self.stats.rejected += 1
        with contextlib.suppress(OSError):
            path.unlink()
        log.warning("module_cache_entry_rejected", module_digest=digest, reason=problem)

    def _entries(self) -> list[tuple[int, str, int]]:
        """(mtime_ns, name, size) of every entry and temporary file; stale temporaries go."""
        found: list[tuple[int, str, int]] = []
        now = time.time()
        try:
            scan = os.scandir(self.directory)
        except OSError:
            return found
        with scan:
            for item in scan:
                if not (item.name.endswith(SUFFIX) or item.name.startswith(_TMP_PREFIX)):
                    continue
                try:
                    info = item.stat(follow_symlinks=False)
                except OSError:
                    continue
                if item.name.startswith(_TMP_PREFIX) and now - info.st_mtime > _STALE_TMP_SECONDS:
                    with contextlib.suppress(OSError):
                        os.unlink(item.path)
                    continue
                found.append((info.st_mtime_ns, item.name, info.st_size))
        return found

    def _evict(self) -> None:
        """Delete least recently used entries until the directory fits in `max_bytes`."""
        entries = self._entries()
        total = sum(size for _, _, size in entries)
        if total <= self.max_bytes:
            return
        for _, name, size in sorted(entries):
            if total <= self.max_bytes:
                break
            if not name.endswith(SUFFIX):
                continue  # another process's write in flight
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.directory / name)
                self.stats.evicted += 1
            total -= size


def _open_private_directory(directory: Path, key: bytes | None) -> bytes:
    """Create or check the directory through one descriptor, and return the HMAC key."""
    directory.parent.mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(FileExistsError):
        directory.mkdir(mode=0o700)
    try:
        fd = os.open(directory, os.O_RDONLY | _DIRECTORY | _NOFOLLOW | _CLOEXEC)
    except OSError as exc:
        if directory.is_symlink():
            raise UnsafeCacheDirectory(f"{directory} is a symlink") from None
        raise UnsafeCacheDirectory(f"{directory} cannot be opened: {exc}") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISDIR(info.st_mode):
            raise UnsafeCacheDirectory(f"{directory} is not a directory")
        if info.st_uid != os.geteuid():
            raise UnsafeCacheDirectory(
                f"{directory} is owned by uid {info.st_uid}, not this user ({os.geteuid()})"
            )
        if info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
            raise UnsafeCacheDirectory(
                f"{directory} is group- or world-writable (mode {stat.S_IMODE(info.st_mode):o})"
            )
        if stat.S_IMODE(info.st_mode) != 0o700:
            os.fchmod(fd, 0o700)
        return key if key is not None else _key_from_file(fd, directory)
    finally:
        os.close(fd)


def _key_from_file(dir_fd: int, directory: Path) -> bytes:
    """Read the directory's key file, creating it atomically (link of a full file) if absent."""
    try:
        return _read_key(dir_fd, directory)
    except FileNotFoundError:
        pass
    tmp = f"{_TMP_PREFIX}key-{secrets.token_hex(8)}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _NOFOLLOW, 0o600, dir_fd=dir_fd)
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(secrets.token_bytes(32))
        with contextlib.suppress(FileExistsError):  # another worker made it first: use theirs
            os.link(tmp, KEY_FILE, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
    finally:
        with contextlib.suppress(OSError):
            os.unlink(tmp, dir_fd=dir_fd)
    return _read_key(dir_fd, directory)


def _read_key(dir_fd: int, directory: Path) -> bytes:
    fd = os.open(KEY_FILE, os.O_RDONLY | _NOFOLLOW | _CLOEXEC, dir_fd=dir_fd)
    with os.fdopen(fd, "rb") as source:
        info = os.fstat(source.fileno())
        if (
            not stat.S_ISREG(info.st_mode)
            or info.st_uid != os.geteuid()
            or info.st_mode & (stat.S_IRWXG | stat.S_IRWXO)
        ):
            raise UnsafeCacheDirectory(
                f"{directory / KEY_FILE} is not a private (0600) file of this user"
            )
        key = source.read(1024)
    if len(key) < MIN_KEY_BYTES:
        raise UnsafeCacheDirectory(f"{directory / KEY_FILE} is too short to be a key")
    return key


def _first_line(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return lines[0] if lines else type(exc).__name__
