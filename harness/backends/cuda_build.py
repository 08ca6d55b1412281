"""Build and load the bundled CUDA kernels, FlashInfer-JIT style: the only code that compiles.

The build is described by a `BuildSpec` (the sources of `kernels/`, the compiler flags and the
toolchain: torch and CUDA versions, the visible GPUs' architectures); its hash names the
extension and its directory in the cache (`~/.cache/moe-harness/<hash>`, or `$MOE_HARNESS_CACHE`).
`load_kernels()` builds it with `torch.utils.cpp_extension.load` on first use; a second process
finds the built library and imports it directly, without a compiler. Import-or-build runs under
a file lock beside the build directory (as FlashInfer's JIT does): xdist workers, the fuzz
worker and the sanitizer's child start at once, and only the first builds while the others
wait for it and import what it built. Anything that stops the
kernels from running here (no GPU, no CUDA toolkit, no ninja, a failed build) is a
`BackendUnavailable` with one line that says which.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.machinery
import importlib.util
import os
import shutil
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType

import torch
from filelock import FileLock

from harness.errors import BackendUnavailable

KERNEL_DIR = Path(__file__).resolve().parents[2] / "kernels"
CACHE_ENV = "MOE_HARNESS_CACHE"
MODULE_PREFIX = "moe_harness_kernels"
CFLAGS = ("-O3", "-std=c++17")
CUDA_CFLAGS = ("-O3", "-std=c++17", "-lineinfo")
#: the build without device coverage (every counter compiled away), to measure their cost
NO_COVERAGE_FLAG = "-DMOE_HARNESS_NO_COVERAGE"
#: lines of compiler output quoted in the error of a failed build
ERROR_TAIL_LINES = 8


def cache_root() -> Path:
    """Where built kernels live: $MOE_HARNESS_CACHE, else ~/.cache/moe-harness."""
    env = os.environ.get(CACHE_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "moe-harness"


def _toolchain() -> tuple[str, ...]:
    """What a built library depends on besides its sources: torch, CUDA, the GPUs' archs."""
    archs: tuple[str, ...] = ()
    if torch.cuda.is_available():
        caps = {torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())}
        archs = tuple(f"sm_{a}{b}" for a, b in sorted(caps))
    return (f"torch={torch.__version__}", f"cuda={torch.version.cuda}",
            f"python={sys.version_info[0]}.{sys.version_info[1]}",
            f"arch_list={os.environ.get('TORCH_CUDA_ARCH_LIST', '')}", *archs)


@dataclass(frozen=True)
class BuildSpec:
    """One build of the kernel chain: sources, headers, flags, toolchain."""

    sources: tuple[Path, ...]
    headers: tuple[Path, ...]
    cflags: tuple[str, ...] = CFLAGS
    cuda_cflags: tuple[str, ...] = CUDA_CFLAGS
    toolchain: tuple[str, ...] = field(default_factory=_toolchain)

    @classmethod
    def default(cls, kernel_dir: Path = KERNEL_DIR, coverage: bool = True) -> BuildSpec:
        """Every kernels/*.cu plus binding.cpp, with kernels/*.h and *.cuh as headers;
        `coverage=False`: the variant built with NO_COVERAGE_FLAG."""
        if not (kernel_dir / "binding.cpp").is_file():
            raise BackendUnavailable(
                f"the cuda backend needs the kernel sources in {kernel_dir} (binding.cpp not "
                "found; install moe-harness from a source checkout: pip install -e .)")
        sources = (*sorted(kernel_dir.glob("*.cu")), kernel_dir / "binding.cpp")
        headers = tuple(sorted([*kernel_dir.glob("*.h"), *kernel_dir.glob("*.cuh")]))
        if not coverage:
            return cls(sources, headers, (*CFLAGS, NO_COVERAGE_FLAG),
                       (*CUDA_CFLAGS, NO_COVERAGE_FLAG))
        return cls(sources, headers)

    def digest(self) -> str:
        """A hash of everything the built library depends on (contents, not timestamps)."""
        h = hashlib.sha256()
        for path in (*self.sources, *self.headers):
            h.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
        for part in (*self.cflags, "|", *self.cuda_cflags, "|", *self.toolchain):
            h.update(part.encode() + b"\0")
        return h.hexdigest()[:16]

    @property
    def name(self) -> str:
        return f"{MODULE_PREFIX}_{self.digest()}"

    def directory(self) -> Path:
        return cache_root() / self.digest()


def _import_built(name: str, directory: Path) -> ModuleType | None:
    """The already-built extension `name` from `directory`, or None if it is not there."""
    matches = sorted(directory.glob(f"{name}*.so")) + sorted(directory.glob(f"{name}*.pyd"))
    if not matches:
        return None
    if name in sys.modules:
        return sys.modules[name]
    loader = importlib.machinery.ExtensionFileLoader(name, str(matches[0]))
    spec = importlib.util.spec_from_file_location(name, str(matches[0]), loader=loader)
    if spec is None:
        return None
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    sys.modules[name] = module
    return module


def _tail(text: str, lines: int = ERROR_TAIL_LINES) -> str:
    kept = [ln.strip() for ln in text.strip().splitlines() if ln.strip()][-lines:]
    return " | ".join(kept)[-1500:]


def _require_toolchain() -> None:
    """Raise BackendUnavailable unless nvcc and ninja are there to build the kernels."""
    from torch.utils import cpp_extension

    if cpp_extension.CUDA_HOME is None and shutil.which("nvcc") is None:
        raise BackendUnavailable(
            "no CUDA toolkit: nvcc not found (set CUDA_HOME or put nvcc on PATH); it is needed "
            f"once, to build the kernels into {cache_root()}")
    if not cpp_extension.is_ninja_available():
        # a pip-installed ninja lives beside the interpreter, which may not be on PATH
        bindir = str(Path(sys.executable).parent)
        os.environ["PATH"] = bindir + os.pathsep + os.environ.get("PATH", "")
        if not cpp_extension.is_ninja_available():
            raise BackendUnavailable(
                "ninja is required to build the CUDA kernels once (pip install ninja)")


def build(spec: BuildSpec, verbose: bool = False) -> ModuleType:
    """Build `spec` into its cache directory and import it (BackendUnavailable on failure)."""
    from torch.utils import cpp_extension

    _require_toolchain()
    directory = spec.directory()
    directory.mkdir(parents=True, exist_ok=True)
    try:
        return cpp_extension.load(
            name=spec.name, sources=[str(p) for p in spec.sources],
            extra_cflags=list(spec.cflags), extra_cuda_cflags=list(spec.cuda_cflags),
            extra_include_paths=[str(spec.sources[0].parent)], build_directory=str(directory),
            verbose=verbose, with_cuda=True)
    except (RuntimeError, OSError, ImportError) as exc:
        raise BackendUnavailable(
            f"building the CUDA kernels failed (in {directory}): {_tail(str(exc))}") from None


@functools.cache
def load_kernels(verbose: bool = False, coverage: bool = True) -> ModuleType:
    """The kernel chain's extension module, built on first use, cached across processes;
    `coverage=False`: the build without device coverage (its own name and cache directory).

    Raises BackendUnavailable without a GPU, without a toolkit (when a build is needed) or when
    the build fails.
    """
    if not torch.cuda.is_available():
        raise BackendUnavailable(
            "the cuda backend needs a CUDA GPU: torch.cuda.is_available() is False "
            f"(torch {torch.__version__}, CUDA {torch.version.cuda or 'not compiled in'})")
    return load_or_build(BuildSpec.default(coverage=coverage),
                         lambda spec: build(spec, verbose=verbose))


def load_or_build(spec: BuildSpec, build_fn: Callable[[BuildSpec], ModuleType] = build,
                  import_fn: Callable[[str, Path], ModuleType | None] = _import_built
                  ) -> ModuleType:
    """`spec`'s extension imported from its directory, or built there first, under the
    directory's file lock: concurrent processes never build (or import half a build) at once.
    `build_fn` and `import_fn` are the build and the import (replaced in tests)."""
    directory = spec.directory()
    directory.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(directory) + ".lock"):
        try:
            module = import_fn(spec.name, directory)
        except ImportError:
            module = None  # a stale or partial library: rebuild over it
        return module if module is not None else build_fn(spec)
