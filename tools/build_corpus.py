"""Write the repository corpus (corpus/seeds, corpus/bugs) from the hand-chosen cases below.

    python tools/build_corpus.py [--root corpus] [--backend cpu]

Every case is replayed against its expectations first (`harness.corpus.expect`); a case that does
not meet them is reported and nothing is written for it. Files are written with
`harness.corpus.save` (content-hashed names, atomic; re-running is idempotent). The pytest
plugin replays them in every test run (`moe_corpus = corpus` in pyproject.toml).

Seeds are legal cases, clean on the fixed chain, that together reach every path of every
stage (tests/test_repo_corpus.py checks it from the coverage counters). Each bug directory
holds the smallest reproducer we found of its variant: that variant's finding with it, clean
without it.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass

import torch

from harness import corpus
from harness.backends import resolve_target
from harness.case import Fault, Generated, MoECase, Overrides, Patch
from harness.corpus import expect, explain
from harness.corpus.format import CaseMeta, Expectation


def _rows(first: int, last: int, value: str = "nan") -> tuple[Patch, ...]:
    return tuple(Patch("gating_logits", "row", value, row=r) for r in range(first, last))


def _i32(*values: int) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.int32)


@dataclass(frozen=True)
class Entry:
    directory: str
    case: MoECase
    note: str
    #: (variants, expected outcome) besides the fixed chain's "clean"
    expect: tuple[tuple[tuple[str, ...], str], ...] = ()


SEEDS = [
    Entry("seeds", MoECase(16, 8, 2, seed=1),
          "warp top-k (E=8), softmax, single-block sort, one experts launch, EP 1, no LoRA"),
    Entry("seeds", MoECase(16, 6, 2, scoring="sigmoid", renormalize=True, dtype="bf16",
                           correction_bias=Generated(seed=2, scale=0.1), seed=2),
          "fallback top-k (E=6 is not a warp size), sigmoid with correction bias, "
          "renormalised, bf16"),
    Entry("seeds", MoECase(16, 8, 2, seed=3, patches=_rows(12, 14) + _rows(14, 16, "inf")),
          "CUDA-graph padding rows: NaN and +Inf logits on the warp path (the fixed kernel "
          "clamps them)"),
    Entry("seeds", MoECase(16, 12, 3, dtype="fp16", seed=4, patches=_rows(13, 16)),
          "CUDA-graph padding rows: NaN logits on the fallback path (E=12), fp16"),
    Entry("seeds", MoECase(16, 8, 2, logits=Generated(seed=5, distribution="quantized"),
                           seed=5),
          "coarse logits: ties between experts (lowest index wins)"),
    Entry("seeds", MoECase(300, 16, 4, seed=6),
          "three-step sort (T=300 > 256 rows)"),
    Entry("seeds", MoECase(32, 8, 2, ep_size=4, max_tokens_per_rank=12, seed=7,
                           expert_to_rank=(0, 1, 2, 3, 3, 2, 1, 0)),
          "EP 4, interleaved expert placement, receive buffers with padding slots"),
    Entry("seeds", MoECase(2, 32, 32, hidden_size=1, block_size=1, ep_size=2,
                           max_tokens_per_rank=1024, seed=8),
          "chunked experts launch: receive buffers sized for 1,024 tokens per rank give "
          "2,048 rows x K=32 at block 1 = 65,536 m-blocks > 65,535: two launches per rank"),
    Entry("seeds", MoECase(16, 8, 2, max_loras=3, adapter_enabled=(True, False, True),
                           seed=9),
          "LoRA on: three adapters, one disabled, base-model tokens"),
]

BUGS = [
    Entry("bugs/topk-nan-argmax",
          MoECase(1, 2, 2, patches=_rows(0, 1)),
          "one NaN row, warp path: the arg-max never picks a NaN, ids [0, 0]",
          ((("topk-nan-argmax",), "gating:unique-ids"),)),
    Entry("bugs/topk-nan-argmax",
          MoECase(1, 3, 2, patches=_rows(0, 1)),
          "one NaN row, fallback path (E=3): ids [0, 0]",
          ((("topk-nan-argmax",), "gating:unique-ids"),)),
    Entry("bugs/a2a-unsanitized-padding",
          MoECase(1, 2, 1, ep_size=2),
          "EP 2 with one token: receive slots beyond recv_counters keep garbage expert ids",
          ((("a2a-unsanitized-padding",), "dispatch:padding-sanitized"),)),
    Entry("bugs/sort-duplicate-break",
          MoECase(257, 2, 2, faults=(Fault("gating", "topk_ids", "duplicate", rows=(0,)),)),
          "T=257 (three-step sort) with one token's ids duplicated upstream",
          ((("sort-duplicate-break",), "sort_align:permutation-bijection"),)),
    Entry("bugs/grid-y-overflow",
          MoECase(1, 32, 32, hidden_size=1, block_size=1, ep_size=2, max_tokens_per_rank=1024),
          "one token in EP receive buffers sized for 1,024 tokens per rank: 65,536 m-blocks "
          "in one unchunked launch (grid.y > 65,535)",
          ((("grid-y-overflow",), "experts:launch-config"),)),
    Entry("bugs/lora-grid-off-by-one",
          MoECase(2, 1, 1, max_loras=1, overrides=Overrides(token_lora_mapping=_i32(-1, 0))),
          "the one adapter active beside a base-model token: 2 slots, 1 block",
          ((("lora-grid-off-by-one",), "lora_align:adapter-tokens"),)),
    Entry("bugs/lora-id-unchecked",
          MoECase(1, 1, 1, max_loras=1, overrides=Overrides(lora_ids=_i32(-1, 2))),
          "lora_id 2 with max_loras 1 (out of contract): adapter_enabled read out of bounds",
          ((("lora-id-unchecked",), "lora_align:illegal-access"),)),
    Entry("bugs/lora-disabled-adapter",
          MoECase(1, 1, 1, max_loras=1, adapter_enabled=(False,),
                  overrides=Overrides(token_lora_mapping=_i32(0))),
          "one token of a disabled adapter: sorted with never-written offsets",
          ((("lora-disabled-adapter",), "lora_align:illegal-access"),)),
    Entry("bugs/topk-nan-argmax+sort-duplicate-break",
          MoECase(257, 2, 2, patches=_rows(0, 1)),
          "vLLM issue 39244: a NaN row gives duplicate ids, which break the three-step sort "
          "(T=257); either variant alone is not enough for the sort to break",
          ((("topk-nan-argmax",), "gating:unique-ids"),
           (("sort-duplicate-break",), "clean"),
           (("sort-duplicate-break", "topk-nan-argmax"), "sort_align:permutation-bijection"))),
]


def meta_of(entry: Entry) -> CaseMeta:
    expect = (Expectation(None, (), "clean"),
              *(Expectation(None, bugs, outcome) for bugs, outcome in entry.expect))
    signature = next((o for _, o in reversed(entry.expect) if o != "clean"), None)
    return CaseMeta(origin="hand", signature=signature, expect=expect, note=entry.note)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", default="corpus")
    parser.add_argument("--backend", default="cpu")
    args = parser.parse_args(argv)
    target = resolve_target(args.backend)
    bad = 0
    for entry in SEEDS + BUGS:
        if entry.case.severity != "legal" and entry.directory == "seeds":
            print(f"not legal: {entry.note}", file=sys.stderr)
            bad += 1
            continue
        meta = meta_of(entry)
        results = expect.run_checks(entry.case, target,
                                    expect.checks_for(meta, args.backend))
        if not all(r.ok for r in results):
            print(explain.explain(entry.directory, args.backend, entry.case, results),
                  file=sys.stderr)
            bad += 1
            continue
        path = corpus.save(entry.case, f"{args.root}/{entry.directory}", meta)
        took = sum(r.seconds for r in results)
        print(f"{path}  ({took:.2f} s)  {entry.note}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
