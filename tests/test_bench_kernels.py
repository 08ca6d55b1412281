"""Tests of tools/bench_kernels.py that need no GPU: it says "no GPU" and exits 0 without one,
its torch-ops column computes what the kernels compute (on the stand-in extension), and its
summary judges the issue's targets from the measured rows."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_cuda_backend import FakeExtension

from harness.backends.cuda_graph import GraphTarget
from harness.case import MoECase

TOOL = Path(__file__).resolve().parents[1] / "tools" / "bench_kernels.py"


def load_tool():
    spec = importlib.util.spec_from_file_location("bench_kernels", TOOL)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.skipif(torch.cuda.is_available(), reason="the real benchmark runs on a GPU")
def test_without_a_gpu_it_says_so_and_exits_0(tmp_path):
    out = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, str(TOOL), "--json", str(out)], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "no GPU" in proc.stdout and proc.stderr == ""
    assert json.loads(out.read_text()) == {"gpu": None, "rows": [], "reason": "no GPU"}


@pytest.mark.parametrize(("T", "E", "K"), [(5, 8, 2), (37, 64, 8), (300, 16, 4)])
def test_torch_column_computes_what_the_kernels_compute(T, E, K):
    bench = load_tool()
    target = GraphTarget((8, 64, 512), device="cpu", ext=FakeExtension())
    case = MoECase(T, E, K, hidden_size=bench.HIDDEN, block_size=bench.BLOCK, renormalize=True,
                   seed=3)
    g = target.prepared(case)
    ref = bench.torch_stages(g)
    o, S = g.out, g.key.capture_size

    weights, ids = ref["gating"]()  # the real rows: the zero padding rows are all ties
    assert torch.equal(ids[:T].int(), o["gating.topk_ids"][:T])
    torch.testing.assert_close(weights[:T], o["gating.topk_weights"][:T])

    order, aligned = ref["sort_align"]()
    sorted_ids = o["sort_align.sorted_token_ids"]
    assert torch.equal(sorted_ids[sorted_ids < S * K].long(), order)
    assert torch.equal(aligned.int(), o["sort_align.aligned_offsets"][1:])

    products = ref["experts"]().reshape(-1, bench.HIDDEN)[:sorted_ids.numel()]
    blocks = o["sort_align.expert_ids"].repeat_interleave(bench.BLOCK)[:sorted_ids.numel()]
    held = (sorted_ids < S * K) & (blocks >= 0)
    torch.testing.assert_close(products[held], o["experts.expert_out"][held])

    torch.testing.assert_close(ref["finalize"](), o["finalize.out"])


def row(T, E, K, gating=(1.0, 2.0), chain=(100.0, 90.0), cov=(10.3, 10.0)):
    return {"T": T, "E": E, "K": K,
            "stages_us": {"gating": {"ours": gating[0], "torch": gating[1]}},
            "chain_us": {"eager_kernels": chain[0], "graph_replay": chain[1]},
            "coverage_us": {"on": cov[0], "no_coverage_build": cov[1],
                            "cost": cov[0] / cov[1] - 1}}


def test_summary_judges_the_targets(capsys):
    bench = load_tool()
    good = bench.summary([row(512, 128, 8), row(64, 128, 8)])
    assert good["gating_slower_than_torch"] == []
    assert good["t512_chain_us"] == {"eager_kernels": 100.0, "graph_replay": 90.0,
                                     "target": 150.0}
    assert good["coverage_cost_max"] == pytest.approx(0.03)
    bench.print_summary(good)
    text = capsys.readouterr().out
    assert "NO" not in text and "eager 100.0 us" in text
    bad = bench.summary([row(512, 128, 8, gating=(3.0, 2.0), chain=(160.0, 90.0),
                             cov=(11.0, 10.0))])
    bench.print_summary(bad)
    text = capsys.readouterr().out
    assert text.count("NO") == 3 and "slower at T=512 E=128" in text
