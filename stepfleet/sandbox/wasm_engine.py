"""The sandbox's wasmtime engine and the modules loaded into it: compiled (or read from the
disk cache), checked against the guest ABI, and kept ready to instantiate."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import wasmtime

from stepfleet.sandbox.abi import ABI_VERSION, ALLOWED_IMPORTS, REQUIRED_EXPORTS
from stepfleet.sandbox.compiler import ModuleCompiler
from stepfleet.sandbox.epoch import ticks
from stepfleet.sandbox.errors import CompileFailed, InvalidModule, SandboxError
from stepfleet.sandbox.exports import ExportLayout
from stepfleet.sandbox.limits import SandboxLimits
from stepfleet.sandbox.module_cache import CompiledModuleCache, engine_fingerprint
from stepfleet.schemas import digest_of


@dataclass(frozen=True, slots=True)
class Compiled:
    """A loaded module: ready to instantiate, with where its run exports are."""

    pre: wasmtime.InstancePre
    exports: ExportLayout


class WasmEngine:
    """A wasmtime engine configured from the limits, and the modules loaded into it."""

    def __init__(self, limits: SandboxLimits, module_cache: CompiledModuleCache | None) -> None:
        self.limits = limits
        # Every Config option goes through this mapping: it is also the on-disk cache's key.
        engine_options: dict[str, bool | int | str] = {
            "consume_fuel": True,
            "epoch_interruption": True,
            "max_wasm_stack": self.limits.stack_bytes,
            "cranelift_opt_level": "speed",
        }
        config = wasmtime.Config()
        for option, value in engine_options.items():
            setattr(config, option, value)
        self._engine = wasmtime.Engine(config)
        self.module_cache = module_cache
        self._engine_fingerprint = engine_fingerprint(engine_options, ABI_VERSION)
        self.compiler = ModuleCompiler(
            engine_options, self.limits, fingerprint=self._engine_fingerprint, cache=module_cache
        )
        # Host imports are defined on it before any module is loaded: loading links them.
        self._linker = wasmtime.Linker(self._engine)
        self._compiled: OrderedDict[str, Compiled] = OrderedDict()
        self._modules: dict[str, wasmtime.Module] = {}
        """The modules behind `_compiled`'s entries, for `artifact_of`."""

    def validate(self, wasm: bytes) -> None:
        """Check size, imports, exports and ABI version, and that the module compiles."""
        self._check_abi_version(self._linker.instantiate_pre(self._compile(wasm)))

    def check_fits(self, digest: str, memory_bytes: int) -> None:
        """Refuse a loaded module that cannot start within a run's limits: its declared
        memory minimum over `memory_bytes` (a tenant's limit, or the fleet's), its tables'
        minimums over `limits.table_elements`, more than one memory or four tables.

        Raises:
            InvalidModule: what does not fit, and the limit.
        """
        store = wasmtime.Store(self._engine)
        set_run_limits(store, memory_bytes, self.limits.table_elements)
        store.set_fuel(1_000_000)
        store.set_epoch_deadline(ticks(10_000))
        try:
            self._compiled[digest].pre.instantiate(store)
        except wasmtime.Trap:
            pass  # it fits; a start function that traps is validate's and the run's to report
        except wasmtime.WasmtimeError as exc:
            raise InvalidModule(
                f"module can never start: {first_line(exc)} (the limits: {memory_bytes} bytes "
                f"= {memory_bytes // 65536} pages of memory, {self.limits.table_elements} "
                "table elements, 1 memory, 4 tables)"
            ) from None
        finally:
            store.close()

    def is_loaded(self, digest: str) -> bool:
        """Tell whether `digest` is compiled and cached (and mark it recently used)."""
        if digest in self._compiled:
            self._compiled.move_to_end(digest)
            return True
        return False

    def load(self, digest: str, wasm: bytes, artifact: bytes | None = None) -> None:
        """Compile and cache a module, refusing bytes that do not match their digest.

        `artifact` is what `self.compiler.submit(digest, wasm)` made, off this thread (it
        compiles or reads the disk cache): here it is only deserialized. Without it,
        a precompiled artifact in the `module_cache` replaces the compile (and a fresh compile
        is written there); either way the module is validated the same.
        """
        if digest_of(wasm) != digest:
            raise InvalidModule(f"module bytes do not hash to {digest}")
        module: wasmtime.Module | None
        if artifact is not None:
            try:
                module = self._deserialize(artifact)
            except SandboxError:
                # It may have come from the disk cache: do not hand it out again.
                if self.module_cache is not None:
                    self.module_cache.discard(self._engine_fingerprint, digest)
                raise
            fresh = False
        else:
            module = self._module_from_disk(digest, wasm)
            fresh = module is None
        if module is None:
            module = self._compile(wasm)
        pre = self._linker.instantiate_pre(module)
        self._check_abi_version(pre)
        if self.module_cache is not None and fresh:
            self.module_cache.store(self._engine_fingerprint, digest, module)
        self._keep(digest, module, pre)

    def load_artifact(self, digest: str, artifact: bytes) -> None:
        """Load, as `digest`, what `artifact_of` serialized in another process of this host.

        Deserializing runs no validation: only the artifact of a module this process's parent
        loaded itself (a guest process's) may come here.
        """
        module = self._deserialize(artifact)
        pre = self._linker.instantiate_pre(module)
        self._check_abi_version(pre)
        self._keep(digest, module, pre)

    def artifact_of(self, digest: str) -> Callable[[], bytes]:
        """A function that serializes the loaded module `digest` (for `load_artifact`).

        Call it on any thread: serializing a module touches no store and runs no host import.

        Raises:
            KeyError: the module is not loaded.
        """
        module = self._modules[digest]
        return lambda: bytes(module.serialize())

    def _keep(self, digest: str, module: wasmtime.Module, pre: wasmtime.InstancePre) -> None:
        self._compiled[digest] = Compiled(pre, ExportLayout.of(module))
        self._modules[digest] = module
        self._compiled.move_to_end(digest)
        while len(self._compiled) > self.limits.compiled_cache_entries:
            evicted, _ = self._compiled.popitem(last=False)
            self._modules.pop(evicted, None)

    def _compile(self, wasm: bytes) -> wasmtime.Module:
        # A child process compiles, under the compile limits (sandbox/compiler.py).
        return self._deserialize(self.compiler.compile(wasm))

    def _deserialize(self, artifact: bytes) -> wasmtime.Module:
        """Load what this fleet's compiler made, checked like a fresh compile.

        Deserializing runs no validation: only the fleet's own artifacts may come here.
        """
        try:
            module = wasmtime.Module.deserialize(self._engine, artifact)
        except wasmtime.WasmtimeError as exc:
            raise CompileFailed(f"the compiled module does not load: {first_line(exc)}") from None
        _check_imports(module)
        _check_exports(module)
        return module

    def _module_from_disk(self, digest: str, wasm: bytes) -> wasmtime.Module | None:
        """The module's artifact from the on-disk cache, checked like a fresh compile."""
        cache = self.module_cache
        if cache is None or len(wasm) > self.limits.module_bytes:
            return None
        module = cache.load(self._engine, self._engine_fingerprint, digest)
        if module is not None:
            try:
                _check_imports(module)
                _check_exports(module)
            except InvalidModule:
                cache.discard(self._engine_fingerprint, digest)
                raise
        return module

    def _check_abi_version(self, pre: wasmtime.InstancePre) -> None:
        """Ask the module once, at load, which ABI it speaks (not on every run)."""
        store = wasmtime.Store(self._engine)
        store.set_fuel(1_000_000)
        store.set_epoch_deadline(ticks(10_000))
        try:
            exports = pre.instantiate(store).exports(store)
            version = call_export(exports, store, "sf_abi_version")
        except (wasmtime.Trap, wasmtime.WasmtimeError) as exc:
            raise InvalidModule(f"module failed to start: {first_line(exc)}") from None
        finally:
            store.close()
        if version != ABI_VERSION:
            raise InvalidModule(
                f"module speaks guest ABI {version}, this host speaks {ABI_VERSION}"
            )


def set_run_limits(store: wasmtime.Store, memory_bytes: int, table_elements: int) -> None:
    """The resource limits of a guest run's store (and of `check_fits`)."""
    store.set_limits(
        memory_size=memory_bytes, table_elements=table_elements, instances=1, tables=4, memories=1
    )


def call_export(exports: Any, store: wasmtime.Store, name: str, *args: int) -> Any:
    func = exports[name]
    assert isinstance(func, wasmtime.Func)
    return func(store, *args)


def first_line(exc: BaseException) -> str:
    """The line of a wasmtime error that says what happened (a trap's cause, not its backtrace)."""
    lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    for line in lines:
        if line.startswith("wasm trap:"):
            return line.removeprefix("wasm trap:").strip()
    return lines[0] if lines else type(exc).__name__


def _signature(functype: wasmtime.FuncType) -> tuple[tuple[str, ...], tuple[str, ...]]:
    return tuple(str(t) for t in functype.params), tuple(str(t) for t in functype.results)


def _check_imports(module: wasmtime.Module) -> None:
    for imported in module.imports:
        where = f"{imported.module}.{imported.name}"
        allowed = ALLOWED_IMPORTS.get(imported.module, {})
        expected = allowed.get(imported.name or "")
        if expected is None:
            raise InvalidModule(
                f"module imports {where}, which the guest ABI does not grant "
                f"(allowed: the stepfleet imports and an inert WASI subset, see docs/guest-abi.md)"
            )
        if (
            not isinstance(imported.type, wasmtime.FuncType)
            or _signature(imported.type) != expected
        ):
            raise InvalidModule(f"module imports {where} with the wrong type")


def _check_exports(module: wasmtime.Module) -> None:
    exports = {export.name: export.type for export in module.exports}
    if not isinstance(exports.get("memory"), wasmtime.MemoryType):
        raise InvalidModule("module does not export its memory as 'memory'")
    for name, expected in REQUIRED_EXPORTS.items():
        functype = exports.get(name)
        if not isinstance(functype, wasmtime.FuncType):
            raise InvalidModule(
                f"module does not export {name}: build it with a stepfleet guest SDK "
                f"(guest ABI v{ABI_VERSION})"
            )
        if _signature(functype) != expected:
            raise InvalidModule(f"module exports {name} with the wrong type")
