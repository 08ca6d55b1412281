"""The built-in demonstration: trigger-shaped cases run on the fixed chain and each variant.

The cases are the shapes of the four production incidents (normal routing; NaN rows from
CUDA-graph padding on both top-k paths; garbage padding slots of an expert-parallel receive
buffer; more than 256 tokens with duplicate ids; a token count whose experts launch crosses
grid.y = 65535; every LoRA slot active beside base-model tokens, one adapter disabled; forged
LoRA ids). The demo runs each on the fixed chain and with each variant alone (and with the pair
of vLLM issue 39244) and reports which check caught what. It knows nothing about which case
triggers which variant: it runs the whole matrix.
"""

from __future__ import annotations

import textwrap
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from harness.api import execute
from harness.bugs import VARIANTS, BugSet
from harness.case import Fault, MoECase, Overrides, Patch
from harness.chain.target import Target


def _nan_rows(first: int, last: int, value: str = "nan") -> tuple[Patch, ...]:
    return tuple(Patch("gating_logits", "row", value, row=r) for r in range(first, last))


def demo_cases() -> dict[str, MoECase]:
    """The named demo cases, smallest first."""
    return {
        "normal": MoECase(64, 64, 8, renormalize=True, seed=1),
        "graph-padding-nan": MoECase(32, 64, 4, seed=2, patches=_nan_rows(24, 32)),
        "graph-padding-fallback": MoECase(32, 60, 4, scoring="sigmoid", seed=3,
                                          patches=_nan_rows(28, 30) + _nan_rows(30, 32, "inf")),
        "ep-padding-slots": MoECase(64, 32, 2, seed=4, ep_size=4, max_tokens_per_rank=24),
        "over-256-duplicates": MoECase(
            512, 64, 8, seed=5, patches=_nan_rows(480, 512),
            faults=(Fault("gating", "topk_ids", "duplicate", rows=(3, 300, 301)),)),
        "huge-token-count": MoECase(50_000, 512, 22, hidden_size=4, block_size=16, seed=6),
        "lora-all-slots": MoECase(64, 8, 2, seed=7, max_loras=4,
                                  adapter_enabled=(True, True, False, True)),
        "lora-forged-ids": MoECase(
            64, 8, 2, seed=8, max_loras=4,
            overrides=Overrides(lora_ids=torch.tensor([-1, 0, 1, 4, 5], dtype=torch.int32))),
    }


def demo_configs() -> dict[str, BugSet]:
    """The fixed chain, each variant alone, and the pair of vLLM issue 39244."""
    configs = {"fixed": BugSet()}
    configs.update({name: BugSet.of([name]) for name in VARIANTS})
    configs["topk-nan-argmax+sort-duplicate-break"] = BugSet.of(
        ["topk-nan-argmax", "sort-duplicate-break"])
    return configs


@dataclass
class DemoReport:
    """cells[config][case] = the signatures found (empty = clean)."""

    cases: list[str]
    configs: list[str]
    cells: dict[str, dict[str, list[str]]] = field(default_factory=dict)
    seconds: float = 0.0

    def caught(self, config: str) -> bool:
        return any(self.cells[config][c] for c in self.cases)

    @property
    def ok(self) -> bool:
        """Every variant caught somewhere, the fixed chain clean everywhere."""
        fixed_clean = not self.caught("fixed")
        return fixed_clean and all(self.caught(c) for c in self.configs if c != "fixed")

    def lines(self, width: int = 80) -> list[str]:
        """The report as plain text within `width` columns: the cases numbered, a matrix of
        configurations x cases ('x' = a finding, '·' = clean), then each finding's checks."""
        name_w = max(len(c) for c in self.configs)
        out = ["demo cases:"]
        out += [f"  {i} {case}" for i, case in enumerate(self.cases, 1)]
        out.append("")
        head = " ".join(str(i) for i in range(1, len(self.cases) + 1))
        out.append(f"{'configuration':<{name_w}}  {head}  result")
        for cfg in self.configs:
            marks = " ".join(("x" if self.cells[cfg][c] else "·").ljust(len(str(i)))
                             for i, c in enumerate(self.cases, 1))
            caught = self.caught(cfg)
            verdict = ("FINDINGS" if caught else "clean") if cfg == "fixed" else (
                "caught" if caught else "NOT CAUGHT")
            out.append(f"{cfg:<{name_w}}  {marks}  {verdict}")
        for cfg in self.configs:
            hits = [(i, c) for i, c in enumerate(self.cases, 1) if self.cells[cfg][c]]
            if not hits:
                continue
            out += ["", f"{cfg}:"]
            for i, case in hits:
                out += textwrap.wrap(f"{i} {case}: {', '.join(self.cells[cfg][case])}", width,
                                     initial_indent="  ", subsequent_indent="      ",
                                     break_on_hyphens=False)
        return out


def run_demo(target: Target | str = "cpu",
             progress: Callable[[str, str], None] | None = None,
             cases: dict[str, MoECase] | None = None,
             configs: dict[str, BugSet] | None = None) -> DemoReport:
    """Run every demo case under every configuration on `target` (`cases` / `configs`: a
    part of the matrix instead, default all of `demo_cases()` / `demo_configs()`)."""
    import time

    start = time.perf_counter()
    cases = demo_cases() if cases is None else cases
    configs = demo_configs() if configs is None else configs
    report = DemoReport(list(cases), list(configs))
    for cname, bugs in configs.items():
        report.cells[cname] = {}
        for case_name, case in cases.items():
            if progress:
                progress(cname, case_name)
            result = execute(case, target, bugs)
            report.cells[cname][case_name] = [f.signature for f in result.findings]
    report.seconds = time.perf_counter() - start
    return report
