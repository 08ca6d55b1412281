"""Workers as Ray actors: one campaign over the nodes of a Ray cluster (`fuzz --ray`).

    driver (this process)                       node k: actor `_FuzzActor` (1 GPU or 1 CPU)
      RayWorker i ---- poll() ---------------->   FuzzWorker (harness.fuzz.supervisor)
        <- status, new corpus inputs, new           -> fuzzing process, local corpus and
           findings (reproducer JSON), log bytes       findings directories, libfuzzer.log
        -- add_inputs(other actors' inputs) -->

Each actor supervises one fuzzing process exactly as a local worker does (restarts, rss limit,
process group) in a workspace on its node. Corpus inputs travel through Ray: what a worker's
libFuzzer adds goes to the driver (kept in the campaign's corpus directory, for the next
campaign to resume from) and on to every other actor, whose libFuzzer re-reads its corpus every
`reload_seconds`. With `sync_dir` (a directory every node sees) the actors share
`<sync_dir>/corpus` directly instead, and the driver copies it back. Findings always come back
through Ray and are stored by the driver (`FindingStore`, once per signature; the campaign's
earlier findings are handed to every actor first, so they are not found again). The libFuzzer
logs are mirrored into the campaign's run directory. On cuda each actor asks Ray for one GPU
(`num_gpus=1`; Ray sets CUDA_VISIBLE_DEVICES), otherwise for one CPU.

Ray is an optional dependency (`pip install 'moe-harness[ray]'`), imported only here.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

from harness.errors import ConfigError, HarnessError
from harness.fuzz.campaign import FuzzConfig
from harness.fuzz.rundir import RunDir
from harness.fuzz.store import FindingStore, StoredFinding, signature_dir
from harness.fuzz.supervisor import FuzzWorker, WorkerSpec, WorkerStatus

#: seconds the actors may take to be placed and started
PLACEMENT_TIMEOUT_S = 300.0
#: seconds between copies of the shared corpus (`sync_dir`) back to the campaign's corpus
COPY_BACK_EVERY_S = 5.0


def _ray():
    try:
        import ray
    except ImportError:
        raise ConfigError("ray", "--ray needs Ray: pip install 'moe-harness[ray]'") from None
    return ray


def _write_input(directory: Path, name: str, data: bytes) -> bool:
    """One corpus input, atomically (libFuzzer may be reading the directory); False if it
    was there already."""
    path = directory / name
    if path.exists():
        return False
    tmp = directory / f".{name}.{os.getpid()}.tmp"
    tmp.write_bytes(data)
    os.replace(tmp, path)
    return True


def _inputs(directory: Path) -> set[str]:
    try:
        return {p.name for p in directory.iterdir() if p.is_file() and not p.name.startswith(".")}
    except OSError:
        return set()


class _FuzzActor:
    """The node side of one worker (made a Ray actor class by `ray_workers`)."""

    def __init__(self, spec_json: dict, sync_dir: str | None, seed_inputs: list,
                 earlier: list) -> None:
        config = FuzzConfig.from_json(spec_json["config"])
        self.sync = Path(sync_dir) if sync_dir else None
        run_id, index = spec_json["run_id"], spec_json["index"]
        if self.sync is not None:
            self.workspace = self.sync / run_id / f"w{index}"
            self.workspace.mkdir(parents=True, exist_ok=True)
            corpus = self.sync / "corpus"
        else:
            self.workspace = Path(tempfile.mkdtemp(prefix=f"moe-harness-{run_id}-w{index}-"))
            corpus = self.workspace / "corpus"
        corpus.mkdir(parents=True, exist_ok=True)
        findings = self.workspace / "findings"
        for name, data in seed_inputs:
            _write_input(corpus, name, data)
        for sigdir, name, text in earlier:  # known to the campaign: not new here either
            (findings / sigdir).mkdir(parents=True, exist_ok=True)
            (findings / sigdir / name).write_text(text)
        config = replace(config, corpus_dir=corpus, findings_dir=findings)
        spec = WorkerSpec(index, config, run_id, spec_json["started_at"], spec_json["runs"],
                          spec_json["seed"], spec_json["reload"])
        self.worker = FuzzWorker(spec, self.workspace / "run")
        self.corpus = corpus
        self.known = _inputs(corpus)
        self.sent_findings: set[str] = set()
        self.log_offset = 0
        self.received = 0
        self.node = socket.gethostname()

    def start(self) -> str:
        self.worker.start()
        return self.node

    def _reply(self, status: WorkerStatus) -> dict:
        inputs = []
        if self.sync is None:
            for name in sorted(_inputs(self.corpus) - self.known):
                with contextlib.suppress(OSError):  # replaced by libFuzzer meanwhile
                    inputs.append((name, (self.corpus / name).read_bytes()))
                self.known.add(name)
        findings = []
        for f in status.findings:
            if f.signature not in self.sent_findings:
                with contextlib.suppress(OSError):
                    findings.append((f.to_json(), Path(f.path).read_text()))
                    self.sent_findings.add(f.signature)
        log = b""
        with contextlib.suppress(OSError), open(self.worker.log_path, "rb") as fh:
            fh.seek(self.log_offset)
            log = fh.read()
            self.log_offset += len(log)
        rss = {f"{k}@{self.node}": v for k, v in self.worker.rss().items()}
        from harness.fuzz.stats import rss_mb

        rss[f"w{status.index}/actor@{self.node}"] = round(rss_mb(os.getpid()) or 0.0, 1)
        gpus = None
        if self.worker.spec.config.backend == "cuda":
            from harness import gpus as nvml

            visible = nvml.visible_candidates()
            usage = nvml.usage(visible or [0]) or {}
            gpus = {f"{self.node}:{k}": v for k, v in usage.items()}
        status.synced = self.received
        return {"status": status.to_json(), "inputs": inputs, "findings": findings,
                "log": log, "rss": rss, "gpus": gpus}

    def poll(self) -> dict:
        return self._reply(self.worker.poll())

    def add_inputs(self, inputs: list) -> int:
        """Other workers' new inputs into this worker's corpus (libFuzzer re-reads it)."""
        added = 0
        for name, data in inputs:
            if name not in self.known:
                self.known.add(name)
                with contextlib.suppress(OSError):
                    added += _write_input(self.corpus, name, data)
        self.received += added
        return added

    def stop(self) -> dict:
        reply = self._reply(self.worker.stop())
        if self.sync is None:
            shutil.rmtree(self.workspace, ignore_errors=True)
        return reply


class _Group:
    """The driver's side of all actors: exchange of inputs, the store of record, Ray's
    lifetime (shut down when this process started it)."""

    def __init__(self, ray, config: FuzzConfig, run: RunDir, started_ray: bool) -> None:
        self.ray, self.config, self.run, self.started_ray = ray, config, run, started_ray
        self.store = FindingStore(config.findings_dir, config.backend, config.bugs, config.seed,
                                  run=run.run_id)
        self.ours: dict[str, StoredFinding] = {}
        self.workers: list[RayWorker] = []
        #: what each actor asks Ray for
        self.resources = {"num_gpus": 1, "num_cpus": 1} if config.backend == "cuda" \
            else {"num_cpus": 1}
        self._next_copy = 0.0

    def publish(self, source: int, inputs: list) -> None:
        """New inputs of worker `source`: into the campaign's corpus and to the others."""
        for name, data in inputs:
            with contextlib.suppress(OSError):
                _write_input(self.config.corpus_dir, name, data)
        for w in self.workers:
            if w.index != source and not w.status.done:
                w.actor.add_inputs.remote(inputs)

    def copy_back(self, now: bool = False) -> None:
        """`sync_dir` mode: the shared corpus into the campaign's, every few seconds (`now`:
        at once)."""
        if self.config.sync_dir is None or (time.monotonic() < self._next_copy and not now):
            return
        self._next_copy = time.monotonic() + COPY_BACK_EVERY_S
        shared = self.config.sync_dir / "corpus"
        for name in _inputs(shared) - _inputs(self.config.corpus_dir):
            with contextlib.suppress(OSError):
                _write_input(self.config.corpus_dir, name, (shared / name).read_bytes())

    def record(self, stored_json: dict, text: str) -> StoredFinding | None:
        """A worker's finding into the campaign's store: the campaign's entry for it, None
        for a finding of an earlier campaign."""
        from harness import corpus
        from harness.findings import Finding

        theirs = StoredFinding.from_json(stored_json)
        if theirs.signature in self.ours:
            return self.ours[theirs.signature]
        case, _ = corpus.loads(text)
        stage, check = theirs.signature.split(":", 1)
        mine = self.store.record(case, Finding(stage, check, theirs.message, theirs.severity),
                                 theirs.seconds or 0.0, theirs.executions or 0)
        if mine is not None:
            self.ours[mine.signature] = mine
        return mine

    def closed(self) -> None:
        if all(w.stopped for w in self.workers):
            self.copy_back(now=True)
            if self.started_ray:
                with contextlib.suppress(Exception):
                    self.ray.shutdown()


class RayWorker:
    """The engine's handle of one actor (`harness.fuzz.engine.Worker`): never blocks on a
    poll (the actor's reply is collected when it is there)."""

    def __init__(self, group: _Group, actor, spec: WorkerSpec) -> None:
        self.group, self.actor, self.index = group, actor, spec.index
        self.log_path = group.run.worker(spec.index) / "libfuzzer.log"
        self.status = WorkerStatus(spec.index)
        self.stopped = False
        self.pid = None
        self._rss: dict[str, float] = {}
        self.gpus: dict | None = None
        self._pending = None
        self.node = ""
        #: what the driver itself has to say about this worker
        self._events: list[str] = []

    def start(self) -> None:
        ray = self.group.ray
        try:
            self.node = ray.get(self.actor.start.remote(), timeout=PLACEMENT_TIMEOUT_S)
        except ray.exceptions.GetTimeoutError:
            raise ConfigError("ray", f"worker {self.index} could not be placed within "
                              f"{PLACEMENT_TIMEOUT_S:.0f} s: the cluster has "
                              f"{ray.available_resources()} free, each worker needs "
                              f"{self.group.resources}") from None

    def _take(self, reply: dict) -> None:
        with open(self.log_path, "ab") as log:
            log.write(reply["log"])
        if reply["inputs"]:
            self.group.publish(self.index, reply["inputs"])
        for stored_json, text in reply["findings"]:
            try:
                self.group.record(stored_json, text)
            except HarnessError as exc:  # a reproducer that did not travel whole
                self._events.append(f"worker {self.index}: finding "
                                    f"{stored_json['signature']} not stored: {exc}")
        status = WorkerStatus.from_json(reply["status"])
        status.events += self._events
        mine = []
        for f in status.findings:  # the campaign's stored entries, with this worker's numbers
            entry = self.group.ours.get(f.signature)
            if entry is not None:
                mine.append(replace(entry, seconds=f.seconds, executions=f.executions))
        status.findings = mine
        self.status, self._rss, self.gpus = status, reply["rss"], reply["gpus"]

    def poll(self) -> WorkerStatus:
        ray = self.group.ray
        self.group.copy_back()
        if self.stopped or self.status.done:
            return self.status
        if self._pending is None:
            self._pending = self.actor.poll.remote()
        ready, _ = ray.wait([self._pending], timeout=0)
        if ready:
            ref, self._pending = self._pending, None
            try:
                self._take(ray.get(ref))
            except ray.exceptions.RayError as exc:
                self._lost(exc)
        return self.status

    def _lost(self, exc: Exception) -> None:
        event = (f"worker {self.index}: its Ray actor on {self.node or '?'} was lost "
                 f"({type(exc).__name__}); the others go on")
        self._events.append(event)
        self.status.events.append(event)
        self.status.done, self.status.reason = True, "actor lost"

    def stop(self, grace: float = 10.0) -> WorkerStatus:
        ray = self.group.ray
        if not self.stopped:
            self.stopped = True
            try:
                self._take(ray.get(self.actor.stop.remote(), timeout=grace + 60))
            except (ray.exceptions.RayError, TimeoutError) as exc:
                if not self.status.done:
                    self._lost(exc)
            with contextlib.suppress(Exception):
                ray.kill(self.actor)
            self.status.done = True
            self.group.closed()
        return self.status

    def rss(self) -> dict[str, float]:
        return dict(self._rss)


def _earlier(store: FindingStore) -> list[tuple[str, str, str]]:
    out = []
    for f in store.findings():
        with contextlib.suppress(OSError):
            out.append((signature_dir(f.signature), f.path.name, f.path.read_text()))
    return out


def connect(config: FuzzConfig) -> bool:
    """Join (or, for "local", start) the Ray cluster `config.ray`; True if this call started
    or joined it (and the campaign should leave it at the end), False if this process was
    already connected."""
    ray = _ray()
    if ray.is_initialized():
        return False
    if config.ray == "local":
        path = os.pathsep.join(p for p in sys.path if p and os.path.exists(p))
        ray.init(num_cpus=max(os.cpu_count() or 1, config.workers or 1),
                 include_dashboard=False, log_to_driver=False,
                 runtime_env={"env_vars": {"PYTHONPATH": path}})
    else:
        try:
            ray.init(address=config.ray, log_to_driver=False)
        except (ConnectionError, RuntimeError, ValueError) as exc:
            raise ConfigError("ray", f"cannot connect to the Ray cluster at {config.ray!r}: "
                                     f"{exc}") from None
    return True


def ray_workers(config: FuzzConfig, specs: list[WorkerSpec], run: RunDir,
                started_ray: bool) -> list[RayWorker]:
    """An actor per spec on the connected Ray cluster (`connect`), each with the campaign's
    corpus and earlier findings; `started_ray`: shut Ray down when the last one stops."""
    ray = _ray()
    group = _Group(ray, config, run, started_ray)
    if config.sync_dir is not None:
        shared = config.sync_dir / "corpus"
        shared.mkdir(parents=True, exist_ok=True)
        for name in _inputs(config.corpus_dir) - _inputs(shared):
            _write_input(shared, name, (config.corpus_dir / name).read_bytes())
        seed_inputs: list = []
    else:
        seed_inputs = [(p.name, p.read_bytes()) for p in sorted(config.corpus_dir.iterdir())
                       if p.is_file() and not p.name.startswith(".")]
    earlier = _earlier(group.store)
    resources = group.resources
    actor_class = ray.remote(_FuzzActor)
    for spec in specs:
        spec_json = {"config": spec.config.to_json(), "run_id": spec.run_id,
                     "index": spec.index, "started_at": spec.started_at, "runs": spec.runs,
                     "seed": spec.seed, "reload": spec.reload}
        actor = actor_class.options(**resources).remote(
            json.loads(json.dumps(spec_json)),
            None if config.sync_dir is None else str(config.sync_dir), seed_inputs, earlier)
        group.workers.append(RayWorker(group, actor, spec))
    return group.workers
