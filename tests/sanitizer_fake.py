"""A stand-in for compute-sanitizer, for tests of `harness.sanitizer` without a GPU.

It runs the application it is given (the replay process), forwards its output line by line,
and behaves as FAKE_MODE says:
  errors        at every "CASE:STAGE" of FAKE_ERROR_AT, when that stage's marker passes, print
                a text record and keep its XML twin; write the XML (--save) at the end
  truncate      as errors, but the XML file is cut in the middle of its last record
  unsupported   print the tool's "device not supported" line and exit 1, running nothing
  hang-startup  sleep before starting anything
and, in any mode, sleeps when case FAKE_HANG_CASE starts (the application keeps running),
kills the application when case FAKE_KILL_CASE starts, and after case FAKE_LOSE_CONTEXT_CASE
ends does what the replay does when its CUDA context is lost (memcheck's default on an invalid
access): the "context-lost" marker, the application gone, exit code 3.
FAKE_KERNEL_<STAGE> names the kernel of a stage's record (default: our kernel of the stage);
FAKE_ONLY_WITH_BUGS: print records only for cases replayed with bug variants on;
FAKE_PY_FRAMES: the records' host backtraces end in the replay's Python frames (the stage
method, `moe_harness_case_<i>`), as compute-sanitizer 2025 writes them.
"""

import json
import os
import signal
import subprocess
import sys
import time

KERNELS = {"gating": "void moe_harness::(anonymous namespace)::topk_gating_warp<float>"
                     "(const float *, int)",
           "sort_align": "void moe_harness::(anonymous namespace)::sort_merge(const int *, int)",
           "lora_align": "lora_count_and_sort(const int *, int)",
           "dispatch": "void at::native::index_elementwise_kernel<128, 4>(long)"}


def record(kernel: str, address: int,
           py_frames: list[tuple[str, str, int]] = ()) -> tuple[list[str], str]:
    """A memcheck record as compute-sanitizer 2025.2 writes it: text (the nearest allocation
    is only there) and XML (the headline has "is out of bounds" appended); `py_frames`
    (function, path, line), innermost first, end its host backtrace."""
    text = [
        "Invalid __global__ write of size 4 bytes",
        f"    at {kernel}+0x1d0 in kernel.cu:42",
        "    by thread (3,0,0) in block (1,0,0)",
        f"    Access to {hex(address)} is out of bounds",
        f"    and is 4 bytes after the nearest allocation at {hex(address - 1028)} of size "
        "1,024 bytes",
        "    Saved host backtrace up to driver entry point at kernel launch time",
        "        Host Frame: launch_kernel [0x1234] in libmoe.so",
        *(f"        Host Frame: {f} in {os.path.basename(path)}:{line}"
          for f, path, line in py_frames),
    ]
    xml = (
        "<record><kind>Precise</kind><level>Error</level>"
        "<who><threadIdx><x>3</x><y>0</y><z>0</z></threadIdx>"
        "<blockIdx><x>1</x><y>0</y><z>0</z></blockIdx></who>"
        "<what><text>Invalid __global__ write of size 4 bytes is out of bounds</text>"
        "<space>__global__</space><size>4</size><direction>write</direction>"
        f"<error>out of bounds</error><address>{hex(address)}</address></what>"
        f"<where><func>{kernel.replace('<', '&lt;').replace('>', '&gt;')}</func>"
        "<path>/src/kernel.cu</path><line>42</line><pc>0x1d0</pc></where>"
        "<hostStack><saveLocation>kernel launch time</saveLocation>"
        "<frame><func>launch_kernel</func><pc>0x1234</pc><module>libmoe.so</module></frame>"
        + "".join(f"<frame><func>{f}</func><path>{path}</path><line>{line}</line></frame>"
                  for f, path, line in py_frames)
        + "</hostStack></record>")
    return text, xml


def main() -> int:
    args = sys.argv[1:]
    if args == ["--help"]:
        print("  --xml                                 Emit error output to file in XML format.")
        return 0
    save = args[args.index("--save") + 1]
    app = args[args.index("-m") - 1:]
    mode = os.environ.get("FAKE_MODE", "errors")
    hang_case = int(os.environ.get("FAKE_HANG_CASE", "-1"))
    kill_case = int(os.environ.get("FAKE_KILL_CASE", "-1"))
    lose_case = int(os.environ.get("FAKE_LOSE_CONTEXT_CASE", "-1"))
    at = {x for x in os.environ.get("FAKE_ERROR_AT", "").split(",") if x}
    with open(app[-1]) as f:  # the replay's manifest
        manifest = json.load(f)
    bugs_of = {c["index"]: c.get("bugs", manifest["bugs"]) for c in manifest["cases"]}
    if os.environ.get("FAKE_ONLY_WITH_BUGS"):
        at = {x for x in at if bugs_of.get(int(x.split(":")[0]))}
    print("========= COMPUTE-SANITIZER", flush=True)
    if mode == "unsupported":
        print("========= Error: Device not supported", flush=True)
        return 1
    if mode == "hang-startup":
        time.sleep(120)
    records = []
    lost = False
    proc = subprocess.Popen(app, stdout=subprocess.PIPE, text=True)
    for line in proc.stdout:
        sys.stdout.write(line)
        sys.stdout.flush()
        if not line.startswith("@@moe-harness "):
            continue
        m = json.loads(line[len("@@moe-harness "):])
        if m["ev"] == "stage" and f"{m['i']}:{m['stage']}" in at:
            kernel = os.environ.get(f"FAKE_KERNEL_{m['stage'].upper()}") or KERNELS[m["stage"]]
            frames = [(m["stage"], "/repo/harness/backends/cuda.py", 372),
                      (f"moe_harness_case_{m['i']}", "/repo/harness/sanitizer/child.py", 150),
                      ("replay", "/repo/harness/sanitizer/child.py", 180)]
            text, xml = record(kernel, 0x7F0000001000 + 0x10000 * len(records),
                               frames if os.environ.get("FAKE_PY_FRAMES") else [])
            for t in text:
                print(f"========= {t}")
            print("=========", flush=True)
            records.append(xml)
        if m["ev"] == "case" and m["i"] == hang_case:
            time.sleep(120)
        if m["ev"] == "case" and m["i"] == kill_case:
            os.kill(proc.pid, signal.SIGKILL)
        if m["ev"] == "case-end" and m["i"] == lose_case:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
            print("@@moe-harness " + json.dumps({"ev": "context-lost", "i": lose_case}),
                  flush=True)
            lost = True
            break
    rc = 3 if lost else proc.wait()
    doc = ('<?xml version="1.0" encoding="utf-8"?>\n<ComputeSanitizerOutput>'
           + "".join(records) + "</ComputeSanitizerOutput>\n")
    if mode == "truncate":
        doc = doc[:doc.rfind("<record>") + 60]
    with open(save, "w") as f:
        f.write(doc)
    print(f"========= ERROR SUMMARY: {len(records)} errors", flush=True)
    return rc


if __name__ == "__main__":
    sys.exit(main())
