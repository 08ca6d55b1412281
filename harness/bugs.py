"""The registry of bug variants: historical MoE bugs that can be switched back on.

Fixed behaviour is the default. A variant is switched on by name (`--bug NAME`), several at
once where they compose (vLLM issue 39244 is `topk-nan-argmax` + `sort-duplicate-break`).
Stages ask `bugs.on("name")`; nothing else in the harness branches on a variant's name, and the
fuzzer never sees which variants are on.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from harness.errors import UnknownVariant


@dataclass(frozen=True)
class BugVariant:
    """One historical bug: where it lives and what it breaks."""

    name: str
    stage: str
    origin: str
    description: str
    #: the signatures of the findings this variant produces on its own trigger cases (the
    #: demo's, the tests' and corpus/bugs/; kept exact by tests/test_demo.py and
    #: tests/test_invariants.py), used by the demo, replay and the corpus expectations, never
    #: by the fuzzer's search.
    signatures: tuple[str, ...]


VARIANTS: dict[str, BugVariant] = {
    v.name: v
    for v in (
        BugVariant(
            "topk-nan-argmax", "gating", "vLLM PR 39391 (issue 39244)",
            "no NaN/Inf clamp before the arg-max on the warp and fallback paths: a NaN row "
            "never wins a strict '>' comparison and yields duplicate expert ids [0, 0, ...]",
            ("gating:unique-ids", "gating:weights-finite"),
        ),
        BugVariant(
            "a2a-unsanitized-padding", "dispatch", "SGLang PR 24850",
            "the receive buffer's padding slots beyond recv_counters keep garbage expert ids "
            "instead of being sanitized to -1",
            ("dispatch:padding-sanitized",),
        ),
        BugVariant(
            "sort-duplicate-break", "sort_align", "FlashInfer three-step sort (vLLM issue 39244)",
            "the three-step sort's per-block prefix breaks after a token's first matching slot, "
            "so a duplicate expert id leaves its permutation entry unset (T > 256 only)",
            ("sort_align:permutation-bijection", "sort_align:no-poison",
             "finalize:illegal-access"),
        ),
        BugVariant(
            "grid-y-overflow", "experts", "vLLM PR 43599",
            "the experts kernel is launched over all token tiles at once: grid.y exceeds 65535 "
            "above ~378k tokens at E=512, K=22, block 128",
            ("experts:launch-config",),
        ),
        BugVariant(
            "lora-grid-off-by-one", "lora_align", "vLLM PR 40131",
            "the LoRA align kernels launch max_loras blocks for max_loras + 1 slots: with every "
            "adapter active and base-model tokens present, the last slot is never written",
            ("lora_align:adapter-tokens", "lora_align:no-poison"),
        ),
        BugVariant(
            "lora-id-unchecked", "lora_align", "vLLM PR 40131",
            "a slot's lora_id >= max_loras is not rejected: adapter_enabled and the output rows "
            "are indexed out of bounds",
            ("lora_align:illegal-access",),
        ),
        BugVariant(
            "lora-disabled-adapter", "lora_align", "vLLM PR 40131",
            "the count-and-sort kernel does not check adapter_enabled: a disabled adapter's slot "
            "is sorted with its never-written offsets",
            ("lora_align:illegal-access",),
        ),
    )
}


@dataclass(frozen=True)
class BugSet:
    """An immutable set of enabled variants, validated against the registry."""

    names: frozenset[str] = frozenset()

    @classmethod
    def of(cls, names: Iterable[str] = ()) -> BugSet:
        names = frozenset(names)
        for name in sorted(names):
            if name not in VARIANTS:
                raise UnknownVariant(name, sorted(VARIANTS))
        return cls(names)

    def on(self, name: str) -> bool:
        if name not in VARIANTS:  # a typo in a stage would silently mean "fixed"
            raise UnknownVariant(name, sorted(VARIANTS))
        return name in self.names

    def __bool__(self) -> bool:
        return bool(self.names)

    def __iter__(self):
        return iter(sorted(self.names))

    def __str__(self) -> str:
        return ",".join(sorted(self.names)) or "fixed"


FIXED = BugSet()
