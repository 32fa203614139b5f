"""The on-disk compiled-module cache: warm loads, integrity, privacy and the size bound."""

from __future__ import annotations

import os
import stat
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import wasmtime

from stepfleet.sandbox import (
    CompiledModuleCache,
    GuestRun,
    InvalidModule,
    ReplayJournal,
    SandboxLimits,
    UnsafeCacheDirectory,
    WasmSandbox,
    encode_replay_buffer,
)
from stepfleet.sandbox.module_cache import KEY_FILE, SUFFIX
from stepfleet.schemas import StepSucceeded, digest_of
from stepfleet.workers.settings import Settings
from tests.conftest import capture_logs

ORDER_PARAMS = '{"order_id":"A-1","amount":4200,"items":3}'
KEY_A = b"a" * 32
KEY_B = b"b" * 32


@pytest.fixture
def sandboxes() -> Iterator[Callable[..., WasmSandbox]]:
    """Make sandboxes that are closed after the test."""
    made: list[WasmSandbox] = []

    def make(cache: CompiledModuleCache | None, limits: SandboxLimits | None = None) -> WasmSandbox:
        sandbox = WasmSandbox(limits, module_cache=cache)
        made.append(sandbox)
        return sandbox

    yield make
    for sandbox in made:
        sandbox.close()


@pytest.fixture
def compiles(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Count every fresh compile any sandbox makes."""
    calls: list[int] = []
    original = WasmSandbox._compile

    def counting(self: WasmSandbox, wasm: bytes) -> wasmtime.Module:
        calls.append(len(wasm))
        return original(self, wasm)

    monkeypatch.setattr(WasmSandbox, "_compile", counting)
    return calls


def entries(directory: Path) -> list[Path]:
    return sorted(directory.glob(f"*{SUFFIX}"))


def warm_up(directory: Path, wasm: bytes, make: Callable[..., WasmSandbox], **kw: object) -> Path:
    """Load `wasm` once through a fresh cache, so its entry is on disk; return the entry."""
    cache = CompiledModuleCache(directory, **kw)  # type: ignore[arg-type]
    make(cache).load(digest_of(wasm), wasm)
    assert cache.stats.stored == 1
    (entry,) = entries(directory)
    return entry


def first_step(sandbox: WasmSandbox, digest: str) -> StepSucceeded:
    report = sandbox.run(
        GuestRun(digest, encode_replay_buffer("i-1", ORDER_PARAMS, ReplayJournal()))
    )
    assert isinstance(report.outcome, StepSucceeded)
    return report.outcome


def test_second_sandbox_loads_from_disk_without_compiling(
    tmp_path, order_wasm, sandboxes, compiles
):
    """A new sandbox on the same directory deserializes the artifact and runs it as before."""
    directory = tmp_path / "modules"
    digest = digest_of(order_wasm)
    first = CompiledModuleCache(directory)
    cold = sandboxes(first)
    cold.load(digest, order_wasm)
    assert (first.stats.misses, first.stats.stored, len(compiles)) == (1, 1, 1)

    second = CompiledModuleCache(directory)
    warm = sandboxes(second)
    warm.load(digest, order_wasm)
    assert len(compiles) == 1, "the warm sandbox compiled the module"
    assert (second.stats.hits, second.stats.misses, second.stats.stored) == (1, 0, 0)
    assert warm.is_loaded(digest)
    assert first_step(warm, digest) == first_step(cold, digest)


def test_directory_and_files_are_private(tmp_path, order_wasm, sandboxes):
    """The directory is 0700, entries and the generated key 0600."""
    directory = tmp_path / "modules"
    entry = warm_up(directory, order_wasm, sandboxes)
    assert stat.S_IMODE(directory.stat().st_mode) == 0o700
    assert stat.S_IMODE(entry.stat().st_mode) == 0o600
    key = directory / KEY_FILE
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert len(key.read_bytes()) == 32
    assert not [p for p in directory.iterdir() if p.name.startswith(".tmp-")]


def tamper(entry: Path) -> None:
    data = bytearray(entry.read_bytes())
    data[len(data) // 2] ^= 0x01  # one bit of machine code
    entry.write_bytes(bytes(data))


def truncate(entry: Path) -> None:
    entry.write_bytes(entry.read_bytes()[: entry.stat().st_size // 2])


def empty(entry: Path) -> None:
    entry.write_bytes(b"")


@pytest.mark.parametrize("damage", [tamper, truncate, empty], ids=lambda f: f.__name__)
def test_damaged_artifact_is_rejected_and_recompiled(
    tmp_path, order_wasm, sandboxes, compiles, damage
):
    """A changed or cut artifact fails the HMAC: deleted, recompiled, rewritten, never run."""
    directory = tmp_path / "modules"
    digest = digest_of(order_wasm)
    damage(warm_up(directory, order_wasm, sandboxes))
    cache = CompiledModuleCache(directory)
    sandbox = sandboxes(cache)
    with capture_logs() as logs:
        sandbox.load(digest, order_wasm)
    assert (cache.stats.rejected, cache.stats.hits, cache.stats.stored) == (1, 0, 1)
    assert len(compiles) == 2
    assert [e["event"] for e in logs] == ["module_cache_entry_rejected"]
    first_step(sandbox, digest)
    again = CompiledModuleCache(directory)
    sandboxes(again).load(digest, order_wasm)
    assert again.stats.hits == 1, "the rewritten entry is good"


def test_artifact_sealed_with_another_key_is_rejected(tmp_path, order_wasm, sandboxes, compiles):
    """An entry whose HMAC was made with another key is not deserialized."""
    directory = tmp_path / "modules"
    digest = digest_of(order_wasm)
    warm_up(directory, order_wasm, sandboxes, key=KEY_A)
    cache = CompiledModuleCache(directory, key=KEY_B)
    sandboxes(cache).load(digest, order_wasm)
    assert (cache.stats.rejected, cache.stats.hits, len(compiles)) == (1, 0, 2)
    # And the generated key file is not the configured key either.
    generated = CompiledModuleCache(directory)
    sandboxes(generated).load(digest, order_wasm)
    assert generated.stats.rejected == 1


def test_artifact_of_another_engine_fingerprint_is_rejected(
    tmp_path, order_wasm, sandboxes, compiles
):
    """Sealed for another engine (here another stack limit), an entry copied to this engine's
    name fails the header check; with its own name it is simply a miss."""
    directory = tmp_path / "modules"
    digest = digest_of(order_wasm)
    entry = warm_up(directory, order_wasm, sandboxes)
    other_limits = SandboxLimits(stack_bytes=1024 * 1024)

    miss = CompiledModuleCache(directory)
    sandboxes(miss, other_limits).load(digest, order_wasm)
    assert (miss.stats.misses, miss.stats.rejected, len(compiles)) == (1, 0, 2)

    (mine,) = set(entries(directory)) - {entry}
    mine.write_bytes(entry.read_bytes())  # valid HMAC, another engine's header and code
    cache = CompiledModuleCache(directory)
    with capture_logs() as logs:
        sandboxes(cache, other_limits).load(digest, order_wasm)
    assert (cache.stats.rejected, cache.stats.hits, len(compiles)) == (1, 0, 3)
    assert logs[0]["reason"] == "compiled by another engine"


def test_artifact_for_another_digest_is_rejected(
    tmp_path, order_wasm, greeter_wasm, sandboxes, compiles
):
    """A validly sealed entry moved to another module's name does not stand in for it."""
    directory = tmp_path / "modules"
    order_entry = warm_up(directory, order_wasm, sandboxes)
    cache = CompiledModuleCache(directory)
    sandbox = sandboxes(cache)
    sandbox.load(digest_of(greeter_wasm), greeter_wasm)
    (greeter_entry,) = set(entries(directory)) - {order_entry}
    greeter_entry.write_bytes(order_entry.read_bytes())
    again = CompiledModuleCache(directory)
    with capture_logs() as logs:
        sandboxes(again).load(digest_of(greeter_wasm), greeter_wasm)
    assert again.stats.rejected == 1
    assert logs[0]["reason"] == "holds another module"


def test_sealed_garbage_fails_deserialize_and_is_recompiled(
    tmp_path, order_wasm, sandboxes, compiles
):
    """Even an entry with a good HMAC that wasmtime cannot deserialize costs only a compile."""
    directory = tmp_path / "modules"
    digest = digest_of(order_wasm)
    entry = warm_up(directory, order_wasm, sandboxes)
    cache = CompiledModuleCache(directory)
    sandbox = sandboxes(cache)
    fingerprint = sandbox._engine_fingerprint
    assert cache.path(fingerprint, digest) == entry
    entry.write_bytes(cache._seal(b"\0asm not an artifact", fingerprint, digest))
    with capture_logs() as logs:
        sandbox.load(digest, order_wasm)
    assert (cache.stats.rejected, len(compiles)) == (1, 2)
    assert logs[0]["reason"].startswith("deserialize failed")
    first_step(sandbox, digest)


def test_cached_module_is_still_validated(tmp_path, order_wasm, sandboxes, monkeypatch):
    """Import and export checks run on a module from disk too."""
    directory = tmp_path / "modules"
    digest = digest_of(order_wasm)
    warm_up(directory, order_wasm, sandboxes)
    checked: list[str] = []

    def refuse(module: wasmtime.Module) -> None:
        checked.append("imports")
        raise InvalidModule("module imports env.evil")

    monkeypatch.setattr("stepfleet.sandbox.wasm_engine._check_imports", refuse)
    cache = CompiledModuleCache(directory)
    with pytest.raises(InvalidModule, match=r"env\.evil"):
        sandboxes(cache).load(digest, order_wasm)
    assert checked == ["imports"]
    assert cache.stats.hits == 1
    assert entries(directory) == [], "an entry the host no longer accepts is discarded"


def test_validate_compiles_fresh_and_leaves_the_cache_alone(
    tmp_path, order_wasm, sandboxes, compiles
):
    """Push-time validation never reads or writes the cache."""
    directory = tmp_path / "modules"
    warm_up(directory, order_wasm, sandboxes)
    cache = CompiledModuleCache(directory)
    sandboxes(cache).validate(order_wasm)
    assert len(compiles) == 2
    assert (cache.stats.hits, cache.stats.misses, cache.stats.stored) == (0, 0, 0)


@pytest.mark.parametrize("mode", [0o777, 0o770, 0o722])
def test_group_or_world_writable_directory_is_refused(tmp_path, mode):
    """A directory others may write to cannot be trusted; open() logs and disables the cache."""
    directory = tmp_path / "shared"
    directory.mkdir()
    directory.chmod(mode)
    with pytest.raises(UnsafeCacheDirectory, match="writable"):
        CompiledModuleCache(directory)
    with capture_logs() as logs:
        assert CompiledModuleCache.open(directory, 1024**3) is None
    assert [e["event"] for e in logs] == ["module_cache_disabled"]
    assert not (directory / KEY_FILE).exists()


def test_symlinked_directory_is_refused(tmp_path):
    """The cache directory itself may not be a symlink (to a place others control)."""
    target = tmp_path / "target"
    target.mkdir(mode=0o700)
    link = tmp_path / "link"
    link.symlink_to(target)
    with pytest.raises(UnsafeCacheDirectory, match="symlink"):
        CompiledModuleCache(link)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to make a directory of another user")
def test_directory_of_another_user_is_refused(tmp_path):
    directory = tmp_path / "theirs"
    directory.mkdir(mode=0o700)
    os.chown(directory, 12345, 12345)
    with pytest.raises(UnsafeCacheDirectory, match="owned by uid 12345"):
        CompiledModuleCache(directory)


def test_readable_key_file_is_refused(tmp_path):
    """The generated key must stay 0600: a key others can read lets them forge entries."""
    directory = tmp_path / "modules"
    CompiledModuleCache(directory)
    (directory / KEY_FILE).chmod(0o644)
    with pytest.raises(UnsafeCacheDirectory, match="private"):
        CompiledModuleCache(directory)


def test_lax_directory_mode_is_tightened(tmp_path):
    """A directory of ours that others may only read is made 0700."""
    directory = tmp_path / "modules"
    directory.mkdir()
    directory.chmod(0o755)
    CompiledModuleCache(directory)
    assert stat.S_IMODE(directory.stat().st_mode) == 0o700


def test_short_configured_key_disables_the_cache(tmp_path):
    with pytest.raises(ValueError, match="at least 16 bytes"):
        CompiledModuleCache(tmp_path / "modules", key=b"short")
    with capture_logs():
        assert CompiledModuleCache.open(tmp_path / "modules", 1024, "short") is None


def test_open_disabled(tmp_path):
    """No directory, an empty one or a zero bound: no cache."""
    assert CompiledModuleCache.open(None) is None
    assert CompiledModuleCache.open("") is None
    assert CompiledModuleCache.open(tmp_path / "modules", 0) is None
    cache = CompiledModuleCache.open(tmp_path / "modules", 1024, "k" * 16)
    assert cache is not None
    assert not (tmp_path / "modules" / KEY_FILE).exists(), "a configured key needs no key file"


def test_size_bound_evicts_least_recently_used(tmp_path, order_wasm, sandboxes):
    """Past max_bytes the oldest entries by mtime go; a hit counts as a use."""
    directory = tmp_path / "modules"
    sandbox = sandboxes(None)
    module = wasmtime.Module(sandbox._engine, order_wasm)
    fingerprint = sandbox._engine_fingerprint
    probe = CompiledModuleCache(tmp_path / "probe")
    assert probe.store(fingerprint, "sha256:probe", module)
    entry_bytes = probe.size()

    cache = CompiledModuleCache(directory, max_bytes=entry_bytes * 5 // 2)  # room for two
    one, two, three = (f"sha256:{n * 64}" for n in "123")
    assert cache.store(fingerprint, one, module)
    assert cache.store(fingerprint, two, module)
    os.utime(cache.path(fingerprint, one), (1_000_000, 1_000_000))
    os.utime(cache.path(fingerprint, two), (2_000_000, 2_000_000))
    assert cache.load(sandbox._engine, fingerprint, one) is not None  # touched: now the newest
    assert cache.store(fingerprint, three, module)
    assert cache.stats.evicted == 1
    assert not cache.path(fingerprint, two).exists()
    assert cache.path(fingerprint, one).exists()
    assert cache.path(fingerprint, three).exists()
    assert cache.size() <= cache.max_bytes

    small = CompiledModuleCache(tmp_path / "small", max_bytes=entry_bytes - 1)
    assert not small.store(fingerprint, one, module), "an entry over the bound is not kept"
    assert entries(tmp_path / "small") == []


def test_lowered_bound_evicts_when_opened(tmp_path, order_wasm, greeter_wasm, sandboxes):
    directory = tmp_path / "modules"
    cache = CompiledModuleCache(directory)
    sandbox = sandboxes(cache)
    sandbox.load(digest_of(order_wasm), order_wasm)
    sandbox.load(digest_of(greeter_wasm), greeter_wasm)
    assert len(entries(directory)) == 2
    smaller = CompiledModuleCache(
        directory, max_bytes=max(p.stat().st_size for p in entries(directory))
    )
    assert len(entries(directory)) == 1
    assert smaller.stats.evicted == 1


def test_settings_default_and_disable(tmp_path, monkeypatch):
    """The cache lives under $XDG_CACHE_HOME by default; an empty value turns it off."""
    for name in ("MODULE_CACHE_DIR", "MODULE_CACHE_BYTES", "MODULE_CACHE_KEY"):
        monkeypatch.delenv(f"STEPFLEET_{name}", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    settings = Settings()
    assert settings.module_cache_dir == tmp_path / "xdg" / "stepfleet" / "modules"
    assert settings.module_cache_bytes == 1024**3
    assert settings.module_cache_key is None

    monkeypatch.setenv("XDG_CACHE_HOME", "relative/is/ignored")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert Settings().module_cache_dir == tmp_path / "home" / ".cache" / "stepfleet" / "modules"

    monkeypatch.setenv("STEPFLEET_MODULE_CACHE_DIR", "")
    monkeypatch.setenv("STEPFLEET_MODULE_CACHE_KEY", "")
    disabled = Settings()
    assert disabled.module_cache_dir is None
    assert disabled.module_cache_key is None
    assert CompiledModuleCache.open(disabled.module_cache_dir) is None

    monkeypatch.setenv("STEPFLEET_MODULE_CACHE_DIR", str(tmp_path / "configured"))
    monkeypatch.setenv("STEPFLEET_MODULE_CACHE_KEY", "s" * 32)
    configured = Settings()
    assert "s" * 32 not in repr(configured)
    cache = CompiledModuleCache.open(
        configured.module_cache_dir, configured.module_cache_bytes, configured.module_cache_key
    )
    assert cache is not None
    assert cache.directory == tmp_path / "configured"
    assert not (tmp_path / "configured" / KEY_FILE).exists()
