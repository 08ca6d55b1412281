"""Fuzz throughput: where one fuzz execution's time goes, and checked cases per second.

    python tools/bench_fuzz_throughput.py [--backend cpu|cuda] [--cases 300] [--max-tokens 64]
        [--seed 1] [--batch 16] [--stackable-only] [--no-atheris] [--no-worker] [--json OUT]

A pool of `--cases` fuzz inputs is made the way a campaign makes them: the repository seeds
(`corpus/seeds`) mutated by `harness.fuzz.mutators.mutate`, stacked, keeping the inputs whose
case has T <= `--max-tokens` (the issue's "mixed small shapes"). Every input then goes through
the path of the fuzz child (`executor.run_input`: decode, materialise, the chain, every
invariant, feature extraction) once, with each part timed:

    mutate        the custom mutator (decode + operator + encode; libFuzzer calls it per run)
    decode        codec.decode
    materialise   case.materialize (inside run_case)
    chain         the stages on the target (run_case minus materialise)
    invariants    invariants.check minus the oracle
    oracle        harness.oracle's functions called by the invariants
    features      features.features
    worker json   the cuda path's JSON to and from the worker (payload and reply encoded and
                  decoded here, in-process; the pipe and the worker's dispatch are in the next)
    worker ipc    (with the worker) a worker round trip minus the in-process run, on cpu

Then the end-to-end rate: mutate + run_input over the pool, in-process (cpu) or through the
worker (cuda, or cpu with the worker), and, unless `--no-atheris`, the same loop inside
`atheris.Fuzz` in a subprocess with atheris' Python instrumentation of the harness on and off
(the fuzz child's `python_coverage`). The table gives ms per execution and the share of the
sum. With `--batch B` > 1 (cpu), the same pool through `harness.fuzz.batch.BatchExecutor`
(checked cases per second: each input's case and its B - 1 siblings; inputs outside the
stack's domain run alone), in-process and inside atheris, and the share of inputs stacked.
Numbers depend on the machine's load: run on a quiet machine, and say when it was not.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import dataclasses
import functools
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PARTS = ("mutate", "decode", "materialise", "chain", "invariants", "oracle", "features",
         "worker json")


def input_pool(n: int, seed: int, max_tokens: int, limits,
               stackable: bool = False) -> list[bytes]:
    """`n` fuzz inputs: the repository seeds mutated (stacked, as a campaign does) with
    T <= max_tokens, deterministic in `seed`; `stackable`: only inputs a batch stacks
    (`harness.chain.stacked.unstackable`, fixed chain, B = 16)."""
    from harness import corpus
    from harness.bugs import BugSet
    from harness.chain import stacked
    from harness.fuzz import codec, mutators

    config = mutators.MutatorConfig(limits=limits)
    parents = []
    for path in sorted((ROOT / "corpus" / "seeds").glob("*.json")):
        case, _ = corpus.load(path)
        parents.append(codec.encode(case, strict=False, limits=limits))
    rng = random.Random(seed)
    pool: list[bytes] = []
    small = [p for p in parents if codec.decode(p, limits).num_tokens <= max_tokens]
    while len(pool) < n:
        data = mutators.mutate(rng.choice(small + pool[-64:]), 4096, rng.randrange(2**31),
                               config)
        case = codec.decode(data, limits)
        if case.num_tokens <= max_tokens and not (
                stackable and stacked.unstackable(case, BugSet(), 16) is not None):
            pool.append(data)
    return pool


class Clock:
    """Accumulated seconds per part; `wrap` times a function (outermost call only)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self._depth: dict[str, int] = defaultdict(int)

    def wrap(self, part: str, fn):
        @functools.wraps(fn)
        def timed(*args, **kwargs):
            self._depth[part] += 1
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self._depth[part] -= 1
                if self._depth[part] == 0:
                    self.seconds[part] += time.perf_counter() - start
        return timed


@contextlib.contextmanager
def instrumented(clock: Clock):
    """Patch materialize and the oracle's public functions with `clock`'s timers."""
    import harness.oracle as oracle
    from harness.chain import runner

    saved = [(runner, "materialize", runner.materialize)]
    runner.materialize = clock.wrap("materialise", runner.materialize)
    for name in dir(oracle):
        fn = getattr(oracle, name)
        if callable(fn) and getattr(fn, "__module__", "") == "harness.oracle" \
                and not isinstance(fn, type):
            saved.append((oracle, name, fn))
            setattr(oracle, name, clock.wrap("oracle", fn))
    try:
        yield
    finally:
        for module, name, fn in saved:
            setattr(module, name, fn)


def breakdown(pool: list[bytes], target, limits,
              stages: dict[str, float]) -> dict[str, float]:
    """Seconds per execution of each part, over `pool` (after a warm-up pass); `stages`
    receives the chain's seconds per stage (summed over the pool)."""
    from harness import invariants
    from harness.bugs import FIXED
    from harness.chain.runner import chain_mode, run_case
    from harness.fuzz import codec, features, mutators
    from harness.fuzz.worker import Outcome

    mconfig = mutators.MutatorConfig(limits=limits)
    clock = Clock()
    for warm in (True, False):
        clock.seconds.clear()
        stages.clear()
        with instrumented(clock):
            for i, data in enumerate(pool[: 20] if warm else pool):
                t0 = time.perf_counter()
                mutators.mutate(data, 4096, i, mconfig)
                t1 = time.perf_counter()
                case = codec.decode(data, limits)
                t2 = time.perf_counter()
                result = run_case(case, target, FIXED)
                t3 = time.perf_counter()
                for stage, sec in result.seconds.items():
                    stages[stage] += sec
                with chain_mode():
                    result.findings = invariants.check(result)
                t4 = time.perf_counter()
                feats = features.features(result)
                t5 = time.perf_counter()
                payload = {"target": "cuda", "bugs": [], "device_coverage": True,
                           "graph": False, "stage_file": "/tmp/x",
                           "data": base64.b64encode(data).decode("ascii"),
                           "limits": dataclasses.asdict(limits)}
                json.loads(json.dumps({"fn": "harness.fuzz.worker:execute_json",
                                             "args": payload}))
                reply = Outcome(list(result.findings), feats).to_json()
                Outcome.from_json(json.loads(json.dumps({"ok": True, "value": reply}))["value"])
                t6 = time.perf_counter()
                s = clock.seconds
                s["mutate"] += t1 - t0
                s["decode"] += t2 - t1
                s["chain"] += t3 - t2
                s["invariants"] += t4 - t3
                s["features"] += t5 - t4
                s["worker json"] += t6 - t5
        s = dict(clock.seconds)
    s["chain"] -= s.get("materialise", 0.0)
    s["invariants"] -= s.get("oracle", 0.0)
    return {part: s.get(part, 0.0) / len(pool) for part in PARTS}


def end_to_end(pool: list[bytes], executor, limits, rounds: int = 1) -> float:
    """Checked cases per second of mutate + run_input over the pool (a batch counts its
    cases)."""
    from harness.fuzz import mutators

    mconfig = mutators.MutatorConfig(limits=limits)
    for data in pool[:10]:  # warm-up
        executor.run_input(data, limits)
    start = time.perf_counter()
    n = 0
    for _ in range(rounds):
        for i, data in enumerate(pool):
            mutators.mutate(data, 4096, i, mconfig)
            n += executor.run_input(data, limits)[1].cases_run
    return n / (time.perf_counter() - start)


def make_executor(backend: str, batch: int):
    """The fuzz child's executor: batched (cpu, batch > 1) or one case per input."""
    from harness.backends import resolve_target
    from harness.fuzz import worker

    if batch > 1:
        from harness.fuzz.batch import BatchConfig, BatchExecutor

        return BatchExecutor(resolve_target(backend), config=BatchConfig(size=batch))
    return worker.make_executor(backend)


def _atheris_child(args: argparse.Namespace) -> None:
    """Inside a subprocess: the end-to-end loop inside atheris.Fuzz, instrumented or not."""
    import atheris

    from harness.fuzz.engine import INSTRUMENTED, NOT_INSTRUMENTED, codec_limits

    if args.atheris_child == "on":
        with atheris.instrument_imports(include=INSTRUMENTED, exclude=NOT_INSTRUMENTED):
            import harness.api
            import harness.backends.cpu
            import harness.fuzz.codec
            import harness.fuzz.features
            import harness.fuzz.worker
            import harness.invariants
            import harness.oracle  # noqa: F401
    from harness.fuzz import mutators

    limits = codec_limits(args.backend)
    pool = [base64.b64decode(x) for x in json.loads(Path(args.pool).read_text())]
    executor = make_executor(args.backend, args.batch)
    executor.start()
    mconfig = mutators.MutatorConfig(limits=limits)
    state = {"i": 0, "start": None, "cases": 0}
    total = 2 * len(pool)  # the first pass warms up (shapes, caches), the second is timed

    def one(_: bytes) -> None:
        i = state["i"]
        if i == len(pool):
            state["start"], state["cases"] = time.perf_counter(), 0
        data = pool[i % len(pool)]
        mutators.mutate(data, 4096, i, mconfig)
        state["cases"] += executor.run_input(data, limits)[1].cases_run
        state["i"] = i + 1
        if state["i"] == total:
            rate = state["cases"] / (time.perf_counter() - state["start"])
            Path(args.out).write_text(json.dumps({"rate": rate}))
            executor.close()
            os._exit(0)

    atheris.Setup(["bench", "-runs=1000000000", "-seed=1"], one)
    atheris.Fuzz()


def atheris_rates(pool: list[bytes], backend: str, repeats: int = 2,
                  batch: int = 1) -> dict[str, float]:
    """{"on": rate, "off": rate}: the loop inside atheris.Fuzz with and without atheris'
    instrumentation of the harness (each in a fresh process, best of `repeats`)."""
    out: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="moe-bench-") as tmp:
        pool_file = Path(tmp) / "pool.json"
        pool_file.write_text(json.dumps([base64.b64encode(d).decode() for d in pool]))
        for mode in ("off", "on") * repeats:  # alternating, the best of each: a loaded
            result = Path(tmp) / f"{mode}.json"      # machine only ever slows a run down
            proc = subprocess.run(
                [sys.executable, __file__, "--backend", backend, "--atheris-child", mode,
                 "--pool", str(pool_file), "--out", str(result), "--batch", str(batch)],
                capture_output=True, text=True, cwd=ROOT,
                env={**os.environ, "PYTHONPATH": str(ROOT)})
            if not result.exists():
                raise SystemExit(f"the atheris run ({mode}) failed:\n{proc.stderr[-2000:]}")
            out[mode] = max(out.get(mode, 0.0), json.loads(result.read_text())["rate"])
            result.unlink()
    return out


def _table(parts: dict[str, float]) -> list[str]:
    total = sum(parts.values())
    lines = [f"{'part':<14}{'ms/exec':>10}{'share':>9}"]
    for part, s in parts.items():
        lines.append(f"{part:<14}{s * 1e3:>10.3f}{s / total:>8.1%}")
    lines.append(f"{'sum':<14}{total * 1e3:>10.3f}{1:>8.0%}  ({1 / total:.0f} exec/s)")
    return lines


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--backend", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--cases", type=int, default=300)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--batch", type=int, default=1, help="cases per input (cpu: batched)")
    p.add_argument("--stackable-only", action="store_true",
                   help="a pool of inputs the batch stacks (its own throughput)")
    p.add_argument("--no-atheris", action="store_true")
    p.add_argument("--no-worker", action="store_true")
    p.add_argument("--json", type=Path)
    p.add_argument("--atheris-child", choices=("on", "off"), help=argparse.SUPPRESS)
    p.add_argument("--pool", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.atheris_child:
        _atheris_child(args)
        return 0

    import torch

    from harness.backends import resolve_target
    from harness.fuzz import worker
    from harness.fuzz.engine import codec_limits

    limits = codec_limits(args.backend)
    pool = input_pool(args.cases, args.seed, args.max_tokens, limits, args.stackable_only)
    target = resolve_target(args.backend)
    report: dict = {"backend": args.backend, "cases": len(pool), "max_tokens": args.max_tokens,
                    "load_average": os.getloadavg(), "threads": torch.get_num_threads()}
    stages: dict[str, float] = defaultdict(float)
    parts = breakdown(pool, target, limits, stages)
    in_process = worker.InProcessExecutor(target)
    rates = {"in-process": end_to_end(pool, in_process, limits)}
    if not args.no_worker:
        with worker.WorkerExecutor(args.backend) as ex:
            ex.start()
            rates["worker"] = end_to_end(pool, ex, limits)
        parts["worker ipc"] = max(0.0, 1 / rates["worker"] - 1 / rates["in-process"]
                                  - parts["worker json"])
    if not args.no_atheris:
        ath = atheris_rates(pool, args.backend)
        rates["atheris, python_coverage off"] = ath["off"]
        rates["atheris, python_coverage on"] = ath["on"]
    if args.batch > 1:
        batched = make_executor(args.backend, args.batch)
        rates[f"batched B={args.batch}, in-process"] = end_to_end(pool, batched, limits)
        report["stacked_share"] = batched.batches / max(1, batched.batches + batched.alone)
        report["check_mismatches"] = batched.mismatches
        if not args.no_atheris:
            ath = atheris_rates(pool, args.backend, batch=args.batch)
            rates[f"batched B={args.batch}, atheris, coverage off"] = ath["off"]
            rates[f"batched B={args.batch}, atheris, coverage on"] = ath["on"]
    report.update(parts_ms={k: v * 1e3 for k, v in parts.items()}, rates=rates,
                  stages_ms={k: v * 1e3 / len(pool) for k, v in stages.items()})

    print(f"backend {args.backend}: {len(pool)} inputs, T <= {args.max_tokens}, "
          f"load average {report['load_average'][0]:.2f}")
    print("\n".join(_table(parts)))
    print("(worker json / ipc: the cuda path's cost per execution, measured here)")
    print("chain by stage, ms/exec: " + ", ".join(
        f"{k} {v * 1e3 / len(pool):.3f}" for k, v in sorted(stages.items(), key=lambda kv: -kv[1])))
    print("\nend to end (mutate + run_input), cases/s:")
    for name, rate in rates.items():
        print(f"  {name:<44}{rate:>8.1f}")
    if args.batch > 1:
        print(f"  inputs stacked: {report['stacked_share']:.0%} (the rest run alone); "
              f"check mismatches: {report['check_mismatches']}")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
