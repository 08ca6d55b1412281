"""Run library calls in a child process, so a crash or a hang costs one call, not the caller.

A sticky CUDA error poisons the process that hit it (its context is gone for good) and a kernel
that never returns hangs it. `Isolated` keeps one child Python process (`python -m
harness.isolation`) and sends it calls of "module:function" with JSON arguments; the function's
JSON-ready result comes back. After a crash, a time-out (the child is killed) or a call that
marks its process unusable (`request_restart`), the next call starts a fresh child. The child's
start-up (importing torch, loading kernels) is paid once per child, not once per call.

Protocol: one JSON object per line, on the child's stdin and on a dedicated pipe back. The
child's stdout and stderr go to a log file, so prints from kernels or user code cannot corrupt
a reply, and the tail of that log explains a crash. Nothing is pickled.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import importlib
import json
import os
import select
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Sequence
from typing import Any

from harness.errors import IsolationError

#: characters of the child's output kept in an `IsolationError`
OUTPUT_TAIL = 4000
_restart_requested = False


def request_restart() -> None:
    """Called inside a child: the process is unusable after this call (a sticky CUDA error),
    so the parent starts a fresh child for the next call."""
    global _restart_requested
    _restart_requested = True


#: prctl(2) option: the signal a process gets when its parent dies (Linux)
PR_SET_PDEATHSIG = 1


def die_with_parent(parent_pid: int, sig: int = signal.SIGKILL) -> None:
    """Called first thing in a child process: get `sig` when the parent dies (Linux
    PR_SET_PDEATHSIG), so that a SIGKILLed parent leaves no child behind; exit at once if the
    parent (`parent_pid`) is already gone. Elsewhere (no prctl) a no-op beyond that check."""
    with contextlib.suppress(OSError, AttributeError, TypeError):
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0)
    if os.getppid() != parent_pid:  # the parent died before prctl took effect
        os._exit(1)


def describe_exit(returncode: int | None) -> str:
    """'killed by signal SIGSEGV' or 'exit code 3': how a child process ended, in the words
    every report of the harness uses."""
    if returncode is None:
        return "no exit status"
    if returncode < 0:
        try:
            return f"killed by signal {signal.Signals(-returncode).name}"
        except ValueError:
            return f"killed by signal {-returncode}"
    return f"exit code {returncode}"


class Isolated:
    """One child process at a time, started on the first call and after every failure.

    `env`: the child's environment (default: ours), e.g. with CUDA_VISIBLE_DEVICES pinned;
    `cwd`: its working directory. The child gets our `sys.path`, so it imports what we can.
    `setup`: calls ("module:function", args) every new child makes first (imports, loading
    kernels), within `start_timeout` seconds, so that a call's own time-out measures only
    its own work.
    """

    def __init__(self, env: dict[str, str] | None = None, cwd: str | None = None,
                 setup: Sequence[tuple[str, dict[str, Any]]] = (),
                 start_timeout: float | None = 600.0) -> None:
        self.env = env
        self.cwd = cwd
        self.setup = tuple(setup)
        self.start_timeout = start_timeout
        self._proc: subprocess.Popen | None = None
        self._replies: int | None = None
        self._log = None
        self._buffer = b""
        #: children started so far (a test can see that a crash cost one restart)
        self.starts = 0

    # -- lifecycle ---------------------------------------------------------------------------

    def _start(self) -> None:
        import threading

        # PR_SET_PDEATHSIG fires when the *thread* that started the child ends: only a child
        # of the main thread can use it (others exit when their stdin closes with us)
        parent = [str(os.getpid())] if threading.current_thread() is threading.main_thread() \
            else []
        read_fd, write_fd = os.pipe()
        self._log = tempfile.TemporaryFile(prefix="moe-harness-child-")
        try:
            self._proc = subprocess.Popen(
                [sys.executable, "-m", "harness.isolation", str(write_fd), *parent],
                stdin=subprocess.PIPE, stdout=self._log, stderr=self._log, pass_fds=(write_fd,),
                env=self.env, cwd=self.cwd, close_fds=True)
        except OSError as exc:
            os.close(read_fd)
            raise IsolationError("crash", f"cannot start a child process: {exc}") from None
        finally:
            os.close(write_fd)
        self._replies = read_fd
        self._buffer = b""
        self.starts += 1
        self._send({"sys_path": sys.path})
        for fn, args in self.setup:
            self._exchange(fn, args, self.start_timeout, "setting up a new child: ")

    def close(self) -> None:
        """Stop the child (if any); the next call starts a new one."""
        proc, self._proc = self._proc, None
        if proc is not None:
            with contextlib.suppress(OSError):
                proc.stdin.close()
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if self._replies is not None:
            os.close(self._replies)
            self._replies = None
        if self._log is not None:
            self._log.close()
            self._log = None

    def __enter__(self) -> Isolated:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- calls -------------------------------------------------------------------------------

    def call(self, fn: str, args: dict[str, Any], timeout: float | None = None) -> Any:
        """`fn(**args)` ("module:function") in the child; its JSON-ready return value.

        Raises `IsolationError` when the child dies ("crash"), runs past `timeout` seconds
        ("timeout"; the child is killed) or the function raises ("error"); the child is
        restarted for the next call after a crash or a time-out.
        """
        if self._proc is None or self._proc.poll() is not None:
            self.close()
            self._start()
        return self._exchange(fn, args, timeout)

    def _exchange(self, fn: str, args: dict[str, Any], timeout: float | None,
                  what: str = "") -> Any:
        log_start = os.fstat(self._log.fileno()).st_size
        try:
            self._send({"fn": fn, "args": args})
            reply = self._receive(None if timeout is None else time.monotonic() + timeout)
        except _ChildGone:
            rc = self._proc.wait()
            output = self._output(log_start)
            self.close()
            raise IsolationError("crash", f"{what}the child process running {fn} died "
                                          f"({describe_exit(rc)})", output) from None
        except TimeoutError:
            self._proc.kill()
            output = self._output(log_start)
            self.close()
            raise IsolationError("timeout", f"{what}{fn} did not return within {timeout:g} s;"
                                            " the child process was killed", output) from None
        if reply.get("restart") or (what and not reply["ok"]):
            self.close()
        if not reply["ok"]:
            raise IsolationError("error", what + reply["error"], reply.get("traceback", ""))
        return reply["value"]

    def _send(self, msg: dict[str, Any]) -> None:
        try:
            self._proc.stdin.write((json.dumps(msg) + "\n").encode("utf-8"))
            self._proc.stdin.flush()
        except (BrokenPipeError, OSError):
            raise _ChildGone from None

    def _receive(self, deadline: float | None) -> dict[str, Any]:
        while b"\n" not in self._buffer:
            wait = None if deadline is None else max(0.0, deadline - time.monotonic())
            ready, _, _ = select.select([self._replies], [], [], wait)
            if not ready:
                raise TimeoutError
            chunk = os.read(self._replies, 1 << 16)
            if not chunk:
                raise _ChildGone
            self._buffer += chunk
        line, self._buffer = self._buffer.split(b"\n", 1)
        return json.loads(line)

    def _output(self, start: int) -> str:
        """What the child wrote to stdout/stderr since `start` (its tail)."""
        fd = self._log.fileno()
        size = os.fstat(fd).st_size
        begin = max(start, size - OUTPUT_TAIL)
        return os.pread(fd, size - begin, begin).decode("utf-8", "replace")


class _ChildGone(Exception):
    """Internal: the child's pipes closed (it exited or was killed)."""


def _resolve(spec: str):
    module, _, name = spec.partition(":")
    return getattr(importlib.import_module(module), name)


def _child_main(reply_fd: int) -> None:
    """The child's loop: a call per line on stdin, a reply per line on `reply_fd`."""
    global _restart_requested
    replies = os.fdopen(reply_fd, "w", encoding="utf-8")
    for line in sys.stdin:
        msg = json.loads(line)
        if "sys_path" in msg:
            sys.path[:] = msg["sys_path"]
            continue
        _restart_requested = False
        try:
            value = _resolve(msg["fn"])(**msg["args"])
            text = json.dumps({"ok": True, "value": value, "restart": _restart_requested})
        except Exception as exc:
            text = json.dumps({"ok": False, "error": f"{type(exc).__name__}: {exc}",
                               "traceback": traceback.format_exc(),
                               "restart": _restart_requested})
        replies.write(text + "\n")
        replies.flush()
        sys.stdout.flush()
        sys.stderr.flush()


if __name__ == "__main__":
    # run the loop in `harness.isolation` itself, not in this `__main__` copy of it: that is
    # the module whose `request_restart` the called functions import
    from harness import isolation

    if len(sys.argv) > 2:
        isolation.die_with_parent(int(sys.argv[2]))
    isolation._child_main(int(sys.argv[1]))
