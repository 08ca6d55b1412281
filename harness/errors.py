"""Every exception moe-harness raises, in one hierarchy.

A caller that wants "anything the harness reports" catches `HarnessError`; the CLI turns each
kind into one line naming the problem and exits 2 (bad input) or 1 (a finding).
"""

from __future__ import annotations


class HarnessError(Exception):
    """Base of every error the harness raises on purpose."""


class CaseError(HarnessError):
    """A `MoECase` whose configuration is impossible (K > E, T = 0, a shape that does not fit).

    Raised by `MoECase.validate()` before anything runs; `field` names the offending field.
    """

    def __init__(self, field: str, message: str) -> None:
        self.field = field
        super().__init__(f"case field '{field}': {message}")


class CorpusError(HarnessError):
    """A corpus file that cannot be read: missing, not JSON, wrong schema, a bad field.

    Always names the file and, where one is at fault, the field.
    """

    def __init__(self, path: str, message: str, field: str | None = None) -> None:
        self.path = path
        self.field = field
        where = f"{path}: field '{field}'" if field else path
        super().__init__(f"{where}: {message}")


class UnknownVariant(HarnessError):
    """A bug-variant name that is not in the registry (`moe-harness bugs` lists them)."""

    def __init__(self, name: str, known: list[str]) -> None:
        self.name = name
        super().__init__(f"unknown bug variant '{name}' (known: {', '.join(known)})")


class ContractError(HarnessError):
    """A stage cleanly rejected an input outside its documented domain.

    Fixed stages either reject such input with this error or behave defensively; they never
    raise `IllegalAccess`.
    """

    def __init__(self, stage: str, message: str) -> None:
        self.stage = stage
        super().__init__(f"{stage}: {message}")


class LaunchConfigError(HarnessError):
    """A kernel launch whose geometry exceeds the device's limits (grid.y > 65535, ...).

    On a GPU such a launch fails with cudaErrorInvalidConfiguration or worse; the harness checks
    the geometry before launching, on every backend, with the same function.
    """

    def __init__(self, stage: str, message: str, grid: tuple[int, int, int] = (0, 0, 0),
                 block: tuple[int, int, int] = (0, 0, 0)) -> None:
        self.stage = stage
        self.grid = grid
        self.block = block
        super().__init__(f"{stage}: {message} (grid={grid}, block={block})")


class IllegalAccess(HarnessError):
    """A stage read or wrote outside a buffer, or read memory that was never written.

    The CPU model raises it from its checked buffers; the CUDA backend raises it for a sticky
    illegal-address error, naming the stage whose kernel was running.
    """

    def __init__(self, stage: str, buffer: str, index: int, size: int,
                 kind: str = "out-of-bounds") -> None:
        self.stage = stage
        self.buffer = buffer
        self.index = index
        self.size = size
        self.kind = kind
        super().__init__(
            f"{stage}: {kind} access to '{buffer}' at index {index} (size {size})")


class BackendUnavailable(HarnessError):
    """The requested backend cannot run here (no GPU, no CUDA toolkit, a failed build)."""


class SanitizerUnavailable(HarnessError):
    """compute-sanitizer cannot check anything here: the executable is missing, the tool name
    is unknown, there is no GPU or the device is not supported, or the replay never reached
    CUDA. Raised by `harness.sanitizer` with one line that says which."""


class IsolationError(HarnessError):
    """A call run in a child process (`harness.isolation`) did not return a result: the child
    died (`kind` "crash": a signal, `os._exit`, a sticky CUDA error that took the process down),
    ran past its time-out ("timeout", the child is killed) or raised ("error").

    Only that call fails; the next call gets a fresh child.
    """

    def __init__(self, kind: str, message: str, output: str = "") -> None:
        self.kind = kind
        self.output = output
        super().__init__(message)


class ConfigError(HarnessError):
    """A configuration value outside its domain (CUDA-graph capture sizes, a padding mode, an
    option that needs another backend); `option` names it."""

    def __init__(self, option: str, message: str) -> None:
        self.option = option
        super().__init__(f"{option}: {message}")


class CodecError(HarnessError):
    """A case the fuzzer's byte codec (`harness.fuzz.codec`) cannot write exactly: a field
    outside the codec's domain (an explicit tensor over its element cap, sizes over its work
    limits, a list longer than it holds). `field` names the first such field."""

    def __init__(self, field: str, message: str) -> None:
        self.field = field
        super().__init__(f"fuzz codec, field '{field}': {message}")


class PromotionRefused(HarnessError):
    """The promoted case does not meet its new expectations (the fixed chain still finds
    something): promoting it would add a failing test. `report` holds the replay's report."""

    def __init__(self, message: str, report: str) -> None:
        self.report = report
        super().__init__(message)
