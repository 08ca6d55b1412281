"""harness.sanitizer.report against compute-sanitizer 2025.2 output captured on an H100 from
our own kernels (tests/fixtures/sanitizer/): clean runs of memcheck, initcheck
and racecheck; memcheck on lora-disabled-adapter (a wild write in lora_align), on
topk-nan-argmax + sort-duplicate-break (an illegal read in finalize, 282 errors of which the
default print limit kept 100) and on lora-id-unchecked with redzones on (nothing for memcheck
to see: the write lands in a guard band); the text output of each run, and a text-only run.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from harness.sanitizer.report import (
    CASE_FRAME_PREFIX,
    STAGES,
    error_kind,
    kernel_base_name,
    kernel_stages,
    parse_text,
    parse_xml,
    same_record,
    stage_of_kernel,
    with_place,
)

FIX = Path(__file__).parent / "fixtures" / "sanitizer"


def xml(name: str, tool: str = "memcheck"):
    return parse_xml(FIX / name, tool)


def text(name: str, tool: str = "memcheck"):
    return parse_text((FIX / name).read_text(), tool)


@pytest.mark.parametrize("name,tool", [("clean_memcheck.xml", "memcheck"),
                                       ("clean_initcheck.xml", "initcheck"),
                                       ("clean_racecheck.xml", "racecheck"),
                                       ("unchecked_memcheck.xml", "memcheck")])
def test_clean_xml_has_no_reports(name, tool):
    out = xml(name, tool)
    assert out.reports == [] and not out.truncated and out.problem is None


@pytest.mark.parametrize("name", ["clean_memcheck.out", "clean_initcheck.out", "race.out",
                                  "unchecked.out"])
def test_clean_text_has_no_reports(name):
    out = text(name)
    assert out.reports == [] and out.problems == []
    assert out.error_summary in (0, None)


def test_disabled_adapter_write_in_lora_align():
    out = xml("disabled_memcheck.xml")
    assert not out.truncated and len(out.reports) == 12
    writes, api = out.reports[:10], out.reports[10:]
    for r in writes:
        assert (r.kind, r.kernel, r.stage, r.record_kind) == (
            "invalid-global-write-out-of-bounds", "lora_count_and_sort", "lora_align", "Precise")
        assert (r.access_size, r.block, r.location, r.error) == (
            4, (3, 0, 0), "lora_align.cu:173", "out of bounds")
        assert r.address is not None and r.thread is not None and r.thread[1:] == (0, 0)
        assert any(f.startswith("lora_align in cuda.py") for f in r.host_frames)
        assert r.signature == ("memcheck:invalid-global-write-out-of-bounds:"
                               "lora_count_and_sort@lora_align")
    assert writes[0].thread == (10, 0, 0) and writes[0].address == 0x7FCD2DB765F4
    # the API errors that follow: no kernel, the stage from the Python frames (synchronize
    # called from CudaTarget.lora_align)
    assert [r.kind for r in api] == ["api-error-cudaErrorLaunchFailure"] * 2
    assert all(r.kernel is None and r.stage == "lora_align" for r in api)


def test_text_of_the_same_run_matches_the_xml_record_for_record():
    x, t = xml("disabled_memcheck.xml"), text("disabled.out")
    assert t.error_summary == 12 and len(t.reports) == 12
    for a, b in zip(x.reports, t.reports, strict=True):
        assert same_record(a.message, b.message)
        assert (a.kind, a.kernel, a.stage, a.block, a.thread, a.address) == (
            b.kind, b.kernel, b.stage, b.block, b.thread, b.address)
    near = t.reports[0].nearest  # only the text has it
    assert (near.distance, near.side, near.address, near.size) == (
        3_368_589_836, "before", 0x7FCDF6800000, 120)
    assert x.reports[0].nearest is None
    placed = with_place(x.reports[0], 0, None, "markers", t.reports[0])
    assert placed.nearest == near and placed.case == 0 and placed.stage == "lora_align"


def test_text_only_run_parses_the_same_kinds():
    t = text("disabled_text.out")
    assert {(r.kind, r.kernel, r.stage) for r in t.reports} == {
        ("invalid-global-write-out-of-bounds", "lora_count_and_sort", "lora_align"),
        ("api-error-cudaErrorLaunchFailure", None, "lora_align")}


def test_nan_pair_is_an_illegal_read_in_finalize():
    out = xml("pair_memcheck.xml")
    assert not out.truncated and len(out.reports) == 100  # the default --print-limit 100
    assert {r.signature for r in out.reports} == {
        "memcheck:invalid-global-read-out-of-bounds:finalize_unpermute_reduce@finalize"}
    assert {r.location for r in out.reports} == {"experts.cu:102"}
    t = text("pair.out")
    assert t.error_summary == 282 and len(t.reports) == 100
    assert t.problems == ["182 errors were not printed. Use --print-limit option to adjust "
                          "the number of printed errors"]


def test_truncated_xml_keeps_every_complete_record():
    data = (FIX / "disabled_memcheck.xml").read_text()
    step = max(1, len(data) // 97)
    for cut in range(0, len(data) - 30, step):
        out = parse_xml(data[:cut], "memcheck")
        assert out.truncated, cut
        assert len(out.reports) == data[:cut].count("</record>"), cut
    whole = data.index("</record>", data.index("</record>") + 1) + len("</record>")
    out = parse_xml(data[:whole + 40], "memcheck")
    assert len(out.reports) == 2 and "cut short" in out.problem
    assert out.reports[1].kernel == "lora_count_and_sort"


@pytest.mark.parametrize("junk", [b"", b"   \n", b"not xml at all", b"\x00\xff\xfe",
                                  b"<ComputeSanitizerOutput><record><kind>Pre"])
def test_garbage_is_truncated_never_an_exception(junk, tmp_path):
    out = parse_xml(junk, "memcheck")
    assert out.truncated and out.reports == []
    assert parse_xml(tmp_path / "missing.xml", "memcheck").truncated


def test_case_frame_in_the_host_stack_names_the_case():
    """The replay runs case i in a Python frame named moe_harness_case_<i>; a record whose
    backtrace has it is placed there whatever the markers say."""
    data = (FIX / "disabled_memcheck.xml").read_text()
    frame = (f"<frame><func>{CASE_FRAME_PREFIX}5</func><path>/x/harness/sanitizer/child.py"
             "</path><line>9</line></frame>")
    data = data.replace("</hostStack>", frame + "</hostStack>", 1)
    first = parse_xml(data, "memcheck").reports[0]
    assert (first.case, first.mapped_by) == (5, "host-frames")
    assert with_place(first, 1, "gating", "markers").case == 5
    assert with_place(first, 1, "gating", "markers").stage == "lora_align"
    second = parse_xml(data, "memcheck").reports[1]
    assert second.case is None and with_place(second, 1, None, "markers").case == 1


def test_kernel_table_covers_every_global_in_the_sources():
    table = kernel_stages()
    sources = "".join(p.read_text() for p in (Path(__file__).parents[1] / "kernels").glob(
        "*.cu"))
    assert len(table) == sources.count("__global__")
    assert set(table.values()) <= {*STAGES, "selftest"}
    assert (table["finalize_unpermute_reduce"], table["a2a_sanitize"], table["sort_merge"],
            table["lora_count_and_sort"]) == ("finalize", "dispatch", "sort_align", "lora_align")


def test_kernel_table_from_other_sources(tmp_path):
    (tmp_path / "experts.cu").write_text(
        "template <typename T>\n__global__ void __launch_bounds__(f(2) * 3)\n"
        "experts_tile(T* x) {}\n__global__ void finalize_sum(float* y) {}\n")
    (tmp_path / "a2a_sanitize.cu").write_text("__global__ void clear_slots(int* ids) {}\n")
    assert kernel_stages(tmp_path) == {"experts_tile": "experts", "finalize_sum": "finalize",
                                       "clear_slots": "dispatch"}


@pytest.mark.parametrize("func,name", [
    ("void moe_harness::(anonymous namespace)::topk_gating_warp<float, 8>(const float *, int)",
     "topk_gating_warp"),
    ("moe_harness::<unnamed>::lora_count_and_sort(const int *, int)+0x13d0",
     "lora_count_and_sort"),
    ("finalize_unpermute_reduce", "finalize_unpermute_reduce"),
    ("void at::native::vectorized_elementwise_kernel<4, at::native::FillFunctor<int>, "
     "std::array<char *, 1>>(int, T2, T3)", "vectorized_elementwise_kernel"),
])
def test_kernel_base_name(func, name):
    assert kernel_base_name(func) == name


def test_stage_of_a_foreign_kernel_is_unknown():
    assert stage_of_kernel("void at::native::index_elementwise_kernel<128, 4>(long)") is None
    assert stage_of_kernel(None) is None


@pytest.mark.parametrize("message,kind", [
    ("Invalid __global__ write of size 4 bytes is out of bounds",
     "invalid-global-write-out-of-bounds"),
    ("Invalid __global__ read of size 8 bytes is misaligned", "invalid-global-read-misaligned"),
    ("Uninitialized __global__ memory read of size 4 bytes",
     "uninitialized-global-memory-read"),
    ('Program hit cudaErrorLaunchFailure (error 719) due to "unspecified launch failure" on '
     "CUDA API call to cudaDeviceSynchronize.", "api-error-cudaErrorLaunchFailure"),
    ("Error: Race reported between Write access at 0x1a0 in k(int *) and Read access at 0x2b0 "
     "in k(int *) [512 hazards]", "race-write-read"),
    ("Barrier error detected. Divergent thread(s) in warp",
     "barrier-error-detected-divergent-thread-in-warp"),
])
def test_error_kinds(message, kind):
    assert error_kind(message) == kind
