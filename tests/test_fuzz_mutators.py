"""MoE-aware mutators: each operator's effect, validity, determinism, the ablation switch."""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from harness import geometry
from harness.bugs import VARIANTS
from harness.case import SPECIAL_VALUES, Generated, MoECase, materialize
from harness.demo import demo_cases
from harness.errors import ConfigError
from harness.fuzz import mutators
from harness.fuzz.codec import CAPTURE_SIZES, decode, encode, launch_thresholds, token_cap
from harness.fuzz.mutators import OPERATORS, MutatorConfig, apply, crossover, mutate

BASES = [MoECase(16, 8, 2), MoECase(64, 64, 8, renormalize=True, seed=1),
         MoECase(5, 60, 4, scoring="sigmoid", seed=3), MoECase(1, 1, 1),
         MoECase(300, 16, 4, ep_size=2, max_loras=2, seed=4)]
SEEDS = range(12)


def _outcomes(name: str) -> list[tuple[MoECase, MoECase]]:
    """(before, after) for operator `name` over every base case and seed."""
    out = []
    for base in BASES:
        for seed in SEEDS:
            after = apply(base, name, random.Random(seed))
            after.validate()
            out.append((base, after))
    return out


def _rows_nonfinite(case: MoECase) -> int:
    return int((~torch.isfinite(materialize(case).gating_logits)).any(1).sum())


def test_every_operator_yields_valid_changed_cases():
    for name in set(OPERATORS) - {"simplify"}:  # nothing to drop in the bases
        pairs = _outcomes(name)
        changed = sum(encode(a, strict=False) != encode(b, strict=False) for a, b in pairs)
        assert changed >= len(pairs) // 2, name


@given(st.binary(max_size=300), st.integers(0, 2**32 - 1))
def test_every_operator_keeps_any_decoded_case_valid(data, seed):
    case = decode(data)
    for name in OPERATORS:
        apply(case, name, random.Random(seed)).validate()


@given(st.binary(max_size=300), st.binary(max_size=300), st.integers(0, 2**32 - 1),
       st.integers(1, 5000))
def test_mutate_and_crossover_stay_within_max_size(data, other, seed, max_size):
    for out in (mutate(data, max_size, seed), crossover(data, other, max_size, seed)):
        assert len(out) <= max_size
        decode(out).validate()


def test_special_values_add_a_special_patch():
    for before, after in _outcomes("special_values"):
        assert len(after.patches) == len(before.patches) + 1
        assert after.patches[-1].value in SPECIAL_VALUES


def test_nan_rows_make_rows_non_finite():
    pairs = _outcomes("nan_rows")
    for _, after in pairs:
        assert after.patches and all(p.kind in ("row", "all") for p in after.patches)
    hit = sum(_rows_nonfinite(after) > 0 for _, after in pairs)
    assert hit >= len(pairs) * 0.6  # "huge" rows stay finite


def test_graph_padding_grows_to_a_capture_size_with_padding_rows():
    grown = nan_padded = 0
    for before, after in _outcomes("graph_padding"):
        T0, T = before.num_tokens, after.num_tokens
        if T > T0 and T in CAPTURE_SIZES:
            grown += 1
            padded = [p for p in after.patches if p.row >= T0 and p.target == "gating_logits"]
            if padded and padded[0].value == "nan":
                nan_padded += 1
                logits = materialize(after).gating_logits
                assert bool(logits[T0:].isnan().all()) and _rows_nonfinite(after) >= T - T0
        else:  # the graph-backend form: T 1..3 past a power of two (pads the most rows)
            assert any(T - d >= 1 and (T - d) & (T - d - 1) == 0 for d in (1, 2, 3)), T
    assert grown and nan_padded


def test_tie_storm_makes_ties():
    ties = 0
    for _, after in _outcomes("tie_storm"):
        logits = materialize(after).gating_logits.float()
        top = logits.max(1, keepdim=True).values
        ties += int(((logits == top).sum(1) > 1).any())
    assert ties >= len(BASES) * len(SEEDS) * 0.6


def test_topk_ids_overrides_with_duplicates_out_of_range_and_negative_ids():
    seen = set()
    for _, after in _outcomes("topk_ids"):
        ids = after.overrides.topk_ids
        assert ids is not None and ids.shape == (after.num_tokens, after.topk)
        E = after.num_experts
        if bool((ids < 0).any()):
            seen.add("negative")
        if bool((ids >= E).any()):
            seen.add("out_of_range")
        if after.topk > 1 and bool((ids.sort(1).values.diff(dim=1) == 0).any()):
            seen.add("duplicate")
            if after.num_tokens > 256:
                seen.add("duplicate, T > 256")
        if not after.contract_violations():
            seen.add("valid")
    assert seen == {"negative", "out_of_range", "duplicate", "duplicate, T > 256", "valid"}


def test_recv_counters_at_the_edges():
    seen = set()
    for _, after in _outcomes("recv_counters"):
        rc = after.overrides.recv_counters
        assert rc is not None and rc.shape == (after.ep_size, after.ep_size)
        if after.num_experts >= 2:
            assert after.ep_size >= 2
        M = after.recv_slots
        seen |= {name for name, hit in (("zero", rc == 0), ("max", rc == M),
                                         ("max+1", rc == M + 1), ("negative", rc < 0),
                                         ("inside", (rc > 0) & (rc < M))) if bool(hit.any())}
    assert seen == {"zero", "max", "max+1", "negative", "inside"}


def test_lora_ids_forged():
    seen = set()
    for _, after in _outcomes("lora_ids"):
        L = after.max_loras
        ids = after.overrides.lora_ids
        assert L >= 1 and ids is not None and ids.shape == (L + 1,)
        if bool((ids >= L).any()):
            seen.add(">= max_loras")
        if bool((ids == L).any()):
            seen.add("= max_loras")
        if bool((ids < -1).any()):
            seen.add("< -1")
    assert seen == {">= max_loras", "= max_loras", "< -1"}


def test_lora_all_active_uses_every_slot_beside_base_tokens():
    for _, after in _outcomes("lora_all_active"):
        t = materialize(after)
        L = after.max_loras
        assert L >= 1
        assert set(t.token_lora_mapping.tolist()) == set(range(-1, L))
        assert sorted(t.lora_ids.tolist()) == list(range(-1, L))


def test_disable_adapter():
    for _, after in _outcomes("disable_adapter"):
        assert after.max_loras >= 1 and after.adapter_enabled is not None
        assert not all(after.adapter_enabled)


def test_fault_at_a_boundary():
    for before, after in _outcomes("fault"):
        assert len(after.faults) == min(len(before.faults) + 1, mutators.MAX_FAULTS)
        assert after.severity == "fault"


def test_switch_experts_path_toggles_warp_and_fallback():
    for before, after in _outcomes("switch_experts_path"):
        assert (geometry.uses_warp_path(before.num_experts)
                != geometry.uses_warp_path(after.num_experts))


def test_token_threshold_puts_t_at_a_boundary():
    for _, after in _outcomes("token_threshold"):
        T = after.num_tokens
        at = [256, 257, 512, *CAPTURE_SIZES] + [t for _, t in launch_thresholds(
            after.num_experts, after.topk, after.block_size, after.ep_size)]
        assert any(abs(T - a) <= 1 for a in at) or T == token_cap(
            after.num_experts, after.topk, after.ep_size), T


def test_launch_limit_reaches_the_unchunked_grid_y_limit():
    crossed = 0
    for _, after in _outcomes("launch_limit"):
        E, K, bs, ep = after.num_experts, after.topk, after.block_size, after.ep_size
        assert isinstance(after.logits, Generated)
        rows = ep * after.recv_slots
        launches = geometry.experts_launches(rows, K, math.ceil(E / ep), bs, 1, chunked=False)
        crossed += any(ln.grid[1] > 65535 for ln in launches)
    assert crossed >= len(BASES) * len(SEEDS) // 3


@pytest.mark.parametrize("name,check", [
    ("switch_dtype", lambda a, b: a.dtype != b.dtype),
    ("resize", lambda a, b: (a.num_tokens, a.num_experts, a.topk, a.hidden_size, a.ep_size,
                             a.max_loras, a.block_size) != (
        b.num_tokens, b.num_experts, b.topk, b.hidden_size, b.ep_size, b.max_loras,
        b.block_size)),
    ("reseed", lambda a, b: a.seed != b.seed),
    ("ep_layout", lambda a, b: True),
])
def test_simple_operators(name: str, check: Callable[[MoECase, MoECase], bool]):
    pairs = _outcomes(name)
    assert sum(check(a, b) for a, b in pairs) >= len(pairs) * 0.6


def test_simplify_drops_something():
    case = demo_cases()["over-256-duplicates"]
    for seed in SEEDS:
        after = apply(case, "simplify", random.Random(seed))
        assert len(after.patches) + len(after.faults) == len(case.patches) + len(case.faults) - 1


def test_mutate_is_deterministic_and_respects_max_size():
    data = encode(demo_cases()["lora-all-slots"])
    outs = [mutate(data, 4096, seed) for seed in range(40)]
    assert outs == [mutate(data, 4096, seed) for seed in range(40)]
    assert len(set(outs)) > 30
    for seed in range(40):
        assert len(mutate(data, 24, seed)) <= 24
        decode(mutate(data, 24, seed)).validate()


def _one_edit(a: bytes, b: bytes) -> bool:
    """b is a with one byte changed, inserted or erased."""
    if len(a) == len(b):
        return sum(x != y for x, y in zip(a, b, strict=True)) <= 1
    short, long = sorted((a, b), key=len)
    return len(long) == len(short) + 1 and any(
        long[:i] + long[i + 1:] == short for i in range(len(long)))


def test_disabled_config_does_only_byte_mutation(monkeypatch):
    def boom(*args):
        raise AssertionError("a structured operator ran")

    monkeypatch.setattr(mutators, "OPERATORS", {name: boom for name in OPERATORS})
    monkeypatch.setattr(mutators, "decode", boom)
    config = MutatorConfig(enabled=False)
    data = encode(MoECase(64, 64, 8))
    for seed in range(50):
        out = mutate(data, 4096, seed, config)
        assert _one_edit(data, out), seed
        crossover(data, data[::-1], 4096, seed, config)


def test_single_operator_config():
    data = encode(MoECase(16, 8, 2))
    config = MutatorConfig.only("disable_adapter")
    for seed in range(10):
        case = decode(mutate(data, 4096, seed, config))
        assert case.adapter_enabled is not None and not all(case.adapter_enabled)


def test_config_is_checked():
    with pytest.raises(ConfigError, match="unknown mutation operator"):
        MutatorConfig(weights={"no_such": 1.0})
    with pytest.raises(ConfigError):
        MutatorConfig(weights={"fault": -1.0})
    with pytest.raises(ConfigError):
        MutatorConfig(byte_probability=1.5)
    with pytest.raises(ConfigError):
        MutatorConfig(max_stack=0)


def test_crossover_mixes_two_cases():
    a, b = MoECase(16, 8, 2, max_loras=3, dtype="fp16"), MoECase(300, 60, 4, ep_size=2)
    sizes, dtypes = set(), set()
    for seed in range(30):
        child = decode(crossover(encode(a), encode(b), 4096, seed))
        child.validate()
        sizes.add((child.num_tokens, child.num_experts))
        dtypes.add(child.dtype)
    assert sizes == {(16, 8), (300, 60)} and dtypes == {"fp16", "fp32"}


def test_mutation_chains_from_empty_reach_every_trigger_class():
    """Generic operators from an empty input reach each class of trigger (no run needed)."""
    classes: dict[str, Callable[[MoECase], bool]] = {
        "nan rows, legal": lambda c: c.severity == "legal" and _rows_nonfinite(c) > 0,
        "duplicate ids with T > 256": lambda c: c.num_tokens > 256 and (
            "duplicate expert ids in a token's topk_ids" in c.contract_violations()
            or any(f.kind == "duplicate" and f.tensor == "topk_ids" for f in c.faults)),
        "receive padding slots": lambda c: c.ep_size > 1 or (
            c.max_tokens_per_rank or 0) > c.tokens_per_rank,
        "recv_counters below the buffer": lambda c: c.overrides.recv_counters is not None and bool(
            (c.overrides.recv_counters < c.recv_slots).any()),
        "grid.y past 65535 unchunked": lambda c: any(
            ln.grid[1] > 65535 for ln in geometry.experts_launches(
                c.ep_size * c.recv_slots, c.topk, math.ceil(c.num_experts / c.ep_size),
                c.block_size, 1, chunked=False)),
        "every LoRA slot active with base tokens": lambda c: c.max_loras > 0 and set(
            materialize(c).lora_ids.tolist()) == set(range(-1, c.max_loras)),
        "lora_id >= max_loras": lambda c: c.overrides.lora_ids is not None and bool(
            (c.overrides.lora_ids >= c.max_loras).any()),
        "disabled adapter": lambda c: c.adapter_enabled is not None and not all(
            c.adapter_enabled),
    }
    first: dict[str, int] = {}
    rng = random.Random(0)
    corpus = [b""]
    for step in range(1500):
        data = mutate(rng.choice(corpus), 8192, rng.randrange(2**32))
        case = decode(data)
        corpus.append(data)
        for name, hit in classes.items():
            if name not in first and hit(case):
                first[name] = step
        if len(first) == len(classes):
            break
    print("first mutation reaching each trigger class:", first)
    assert set(first) == set(classes)


def test_no_variant_names_in_the_fuzzer_modules():
    root = Path(mutators.__file__).parent
    for module in ("codec.py", "mutators.py", "features.py"):
        text = (root / module).read_text()
        for name in VARIANTS:
            assert name not in text, (module, name)
