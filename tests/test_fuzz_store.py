"""The findings store: one reproducer per signature, metadata, atomic files, reload."""

from __future__ import annotations

from harness import corpus
from harness.case import MoECase, Patch
from harness.findings import Finding
from harness.fuzz.store import FindingStore, signature_dir

CASE = MoECase(8, 8, 2, seed=3, patches=(Patch("gating_logits", "row", "nan", row=1),))
OTHER = MoECase(16, 8, 2, seed=4)
UNIQUE = Finding("gating", "unique-ids", "duplicate ids in a row", "legal", {"rows": [1]})
POISON = Finding("sort_align", "no-poison", "poison in sorted_token_ids")


def test_first_reproducer_is_stored_with_metadata(tmp_path):
    store = FindingStore(tmp_path, "cpu", ["topk-nan-argmax"], seed=7)
    stored = store.record(CASE, UNIQUE, seconds=1.5, executions=42)
    assert stored is not None and stored.path.parent == tmp_path / "gating__unique-ids"
    case, meta = corpus.load(stored.path)
    assert corpus.content_hash(case) == corpus.content_hash(CASE)
    assert meta.origin == "fuzz" and meta.signature == "gating:unique-ids"
    assert meta.expected("cpu", ["topk-nan-argmax"]) == "gating:unique-ids"
    extra = meta.extra
    assert (extra["seconds_to_find"], extra["executions_to_find"], extra["seed"]) == (1.5, 42, 7)
    assert extra["variants"] == ["topk-nan-argmax"] and extra["role"] == "reproducer"


def test_dedup_by_signature(tmp_path):
    store = FindingStore(tmp_path)
    assert store.record(CASE, UNIQUE, 1.0, 10) is not None
    assert store.record(OTHER, UNIQUE, 2.0, 20) is None  # same signature, other case
    assert store.record(CASE, POISON, 1.0, 10) is not None  # same case, other signature
    assert [f.signature for f in store.findings()] == ["gating:unique-ids", "sort_align:no-poison"]
    assert len(list((tmp_path / signature_dir(UNIQUE.signature)).glob("*.json"))) == 1


def test_reload_knows_earlier_findings(tmp_path):
    FindingStore(tmp_path, seed=1).record(CASE, UNIQUE, 3.25, 99)
    (tmp_path / "corpus").mkdir()  # libFuzzer's byte corpus beside the findings is ignored
    (tmp_path / "corpus" / "0a1b").write_bytes(b"\x01\x02")
    (tmp_path / "gating__unique-ids" / "broken.json").write_text("{not json")
    again = FindingStore(tmp_path)
    assert UNIQUE.signature in again and len(again) == 1
    f = again.get(UNIQUE.signature)
    assert f.earlier and (f.seconds, f.executions) == (3.25, 99)
    assert again.record(OTHER, UNIQUE, 1.0, 1) is None


def test_minimized_form_replaces_the_previous_one(tmp_path):
    store = FindingStore(tmp_path)
    store.record(CASE, UNIQUE, 1.0, 1)
    first = store.record_minimized(UNIQUE.signature, OTHER, runs=5, seconds=0.1)
    smaller = MoECase(2, 8, 2)
    second = store.record_minimized(UNIQUE.signature, smaller, runs=9, seconds=0.2)
    assert not first.minimized.exists() and second.minimized.exists()
    case, meta = corpus.load(second.minimized)
    assert case.num_tokens == 2 and meta.extra["role"] == "minimized"
    assert meta.extra["minimized_from"] == second.path.stem
    reloaded = FindingStore(tmp_path).get(UNIQUE.signature)
    assert reloaded.minimized == second.minimized and reloaded.path == second.path
    assert corpus.content_hash(FindingStore(tmp_path).load_case(UNIQUE.signature, True)) == \
        corpus.content_hash(smaller)


def test_status_json_round_trip(tmp_path):
    stored = FindingStore(tmp_path).record(CASE, UNIQUE, 1.0, 1)
    assert type(stored).from_json(stored.to_json()) == stored


def test_a_store_opened_before_another_process_stored_adopts_its_reproducer(tmp_path):
    mine = FindingStore(tmp_path, run="mine")
    theirs = FindingStore(tmp_path, run="theirs")
    first = theirs.record(CASE, UNIQUE, 1.0, 10)
    adopted = mine.record(OTHER, UNIQUE, 2.0, 20)  # found independently, stored second
    assert adopted.path == first.path and adopted.run == "theirs" and not adopted.earlier
    assert (adopted.seconds, adopted.executions) == (2.0, 20)  # the finder's own numbers
    assert len(list((tmp_path / signature_dir(UNIQUE.signature)).glob("*.json"))) == 1
    assert [p.name for p in tmp_path.iterdir()] == [signature_dir(UNIQUE.signature)]  # no
    # staged directories left behind


def _race(directory: str, seed: int, barrier, results) -> None:
    store = FindingStore(directory, run=f"p{seed}")  # opened before anyone stored
    barrier.wait()
    stored = store.record(MoECase(8 + seed, 8, 2, seed=seed), UNIQUE, 1.0, seed)
    results.put((stored.run, str(stored.path)))


def test_processes_racing_for_one_signature_store_it_once(tmp_path):
    import multiprocessing

    ctx = multiprocessing.get_context("fork")
    barrier, results = ctx.Barrier(6), ctx.Queue()
    procs = [ctx.Process(target=_race, args=(str(tmp_path), s, barrier, results))
             for s in range(1, 7)]
    for p in procs:
        p.start()
    got = [results.get(timeout=60) for _ in procs]
    for p in procs:
        p.join(30)
    files = list((tmp_path / signature_dir(UNIQUE.signature)).glob("*.json"))
    assert len(files) == 1 and {path for _, path in got} == {str(files[0])}
    assert len({run for run, _ in got}) == 1  # everyone names the one who stored it
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
def test_a_minimised_legal_case_makes_the_finding_legal_everywhere(tmp_path):
    """One truth: a finding first met out of contract whose minimised form is legal is legal
    in the store's entry, in the minimised file and after a reload."""
    import torch

    from harness.case import Overrides

    ids = torch.tensor([[0, 0]] * 8, dtype=torch.int32)
    ooc = MoECase(8, 8, 2, seed=3, overrides=Overrides(topk_ids=ids))
    assert ooc.severity == "out-of-contract" and CASE.severity == "legal"
    store = FindingStore(tmp_path)
    store.record(ooc, Finding("gating", "unique-ids", "dup", ooc.severity), 1.0, 5)
    assert store.get("gating:unique-ids").severity == "out-of-contract"
    stored = store.record_minimized("gating:unique-ids", CASE, runs=3, seconds=0.1)
    _, meta = corpus.load(stored.minimized)
    assert stored.severity == meta.extra["severity"] == "legal"
    assert FindingStore(tmp_path).get("gating:unique-ids").severity == "legal"
