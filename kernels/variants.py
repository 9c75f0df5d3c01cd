"""Which compiled variants of this package's JIT kernels a stretch of work launches.

Triton compiles one binary per *specialization* of a kernel: its constexpr values, whether each integer
argument is 1 or a multiple of 16, whether each pointer is 16-byte aligned, and the launch options
(num_warps, num_stages). A launch whose specialization is new compiles inside the call that made it, which
takes on the order of a second per kernel on a GPU host; a server that meets a new one mid-run stalls every
request in that step. `VariantCensus` lists the specializations first launched while it was open:

    with VariantCensus() as census:
        warm_up()
        before = census.snapshot()
        serve()
    census.new_since(before)   # {kernel name: [specialization, ...]} compiled during serve()

On a GPU the census reads Triton's own per-kernel compile caches (nothing is patched, nothing slows down).
Under the interpreter, which compiles nothing, it wraps each kernel's launch and computes the key Triton
would use with Triton's own binder (`triton.runtime.jit.create_function_from_signature`, what
`JITFunction.run` calls), so the CPU tests see the variants a GPU would compile.
"""

from __future__ import annotations

import importlib
from collections import defaultdict

#: modules that define launchable kernels
KERNEL_MODULES = ("append", "prefill", "decode_triton", "decode_gluon", "_reduce", "_common")
_MISSING = object()


def _is_kernel(obj) -> bool:
    return callable(getattr(obj, "run", None)) and callable(getattr(obj, "fn", None)) and hasattr(obj, "__getitem__")


def jit_kernels() -> dict[str, object]:
    """name -> the jit object (JITFunction, a Gluon one, or the interpreter's InterpretedFunction)."""
    found = {}
    for module_name in KERNEL_MODULES:
        module = importlib.import_module(f"{__package__}.{module_name}")
        for name, obj in vars(module).items():
            if _is_kernel(obj) and getattr(obj.fn, "__module__", None) == module.__name__:
                found[f"{module_name}.{name}"] = obj
    return found


def _compile_cache_keys(kernel) -> set | None:
    """The keys of a JITFunction's compiled kernels, all devices; None where it has no such cache."""
    caches = getattr(kernel, "device_caches", None)
    if caches is None:
        return None
    return {key for per_device in list(caches.values()) for key in per_device[0]}


class VariantCensus:
    def __init__(self):
        self.kernels = jit_kernels()
        self._launched: dict[str, set] = defaultdict(set)  # interpreter mode only
        self._saved: dict[str, object] = {}

    # --- opening and closing -------------------------------------------------------------------------
    def __enter__(self) -> "VariantCensus":
        for name, kernel in self.kernels.items():
            if _compile_cache_keys(kernel) is None:
                self._wrap(name, kernel)
        return self

    def __exit__(self, *exc) -> None:
        for name, previous in self._saved.items():
            kernel = self.kernels[name]
            if previous is _MISSING:
                del kernel.run
            else:
                kernel.run = previous
        self._saved.clear()

    def _wrap(self, name: str, kernel) -> None:
        from triton.backends.compiler import BaseBackend
        from triton.runtime.jit import JITFunction, create_function_from_signature

        jit = kernel if isinstance(kernel, JITFunction) else JITFunction(kernel.fn, **getattr(kernel, "kwargs", {}))
        binder = create_function_from_signature(jit.signature, jit.params, BaseBackend)
        launch = kernel.run
        launched = self._launched[name]

        def run(*args, grid, warmup, **kwargs):
            _, specialization, options = binder(*args, **kwargs)
            launched.add((tuple(specialization), str(sorted(options.items()))))
            return launch(*args, grid=grid, warmup=warmup, **kwargs)

        self._saved[name] = kernel.__dict__.get("run", _MISSING)
        kernel.run = run

    # --- reading -------------------------------------------------------------------------------------
    def snapshot(self) -> dict[str, frozenset]:
        """kernel name -> the specializations launched (compiled) so far."""
        out = {}
        for name, kernel in self.kernels.items():
            keys = _compile_cache_keys(kernel)
            out[name] = frozenset(self._launched.get(name, ()) if keys is None else keys)
        return out

    def new_since(self, before: dict[str, frozenset]) -> dict[str, list]:
        """kernel name -> specializations first launched after `before` (kernels with none left out)."""
        now = self.snapshot()
        return {name: sorted(map(str, keys - before.get(name, frozenset())))
                for name, keys in now.items() if keys - before.get(name, frozenset())}
