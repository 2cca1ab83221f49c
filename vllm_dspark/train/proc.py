"""Processes that own a vLLM engine: leave once the work is written, never wait on teardown.

A vLLM engine can hang in its shutdown after the work is done (seen on an H200: a
data script's output was complete at 2 min and the process still alive 8 min later).
The data generator therefore writes its output, then ``exit_now``: it flushes, ends
the engine's processes (SIGTERM, then SIGKILL after a few seconds) and leaves with
``os._exit``, skipping interpreter and engine teardown. Its parent runs it with
``run_until_done``: in a session of its own, ended as a whole (the engine's processes
included) once the child has exited, or once its output is complete and the child is
still alive ``grace_s`` later.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence


def _descendants() -> list:
    try:
        import psutil
    except ImportError:  # vLLM depends on psutil; without it, multiprocessing's own view
        import multiprocessing

        return [_MpChild(p) for p in multiprocessing.active_children()]
    return psutil.Process().children(recursive=True)


class _MpChild:
    def __init__(self, p):
        self.p, self.pid = p, p.pid

    def terminate(self):
        self.p.terminate()

    def kill(self):
        self.p.kill()

    def is_running(self):
        return self.p.is_alive()


def end_children(timeout: float = 5.0) -> list[int]:
    """SIGTERM every descendant of this process, SIGKILL those left after ``timeout``;
    returns their pids."""
    kids = _descendants()
    for k in kids:
        try:
            k.terminate()
        except Exception:  # already gone
            pass
    deadline = time.time() + timeout
    while time.time() < deadline and any(_alive(k) for k in kids):
        time.sleep(0.1)
    for k in kids:
        if _alive(k):
            try:
                k.kill()
            except Exception:
                pass
    return [k.pid for k in kids]


def _alive(k) -> bool:
    try:
        if not k.is_running():
            return False
        status = getattr(k, "status", None)
        return status is None or status() != "zombie"
    except Exception:
        return False


def exit_now(code: int, what: str = "vllm-dspark") -> None:
    """Flush, end this process's children (a vLLM engine's), and leave without teardown."""
    sys.stdout.flush()
    sys.stderr.flush()
    pids = end_children()
    if pids:
        print(f"{what}: output written; ended the engine's processes {pids} without "
              "waiting for its shutdown", file=sys.stderr, flush=True)
    os._exit(code)


def _kill_group(pgid: int, sig: int) -> bool:
    try:
        os.killpg(pgid, sig)
        return True
    except (ProcessLookupError, PermissionError):
        return False


def run_until_done(cmd: Sequence[str], done: Callable[[], bool], *, grace_s: float = 60.0,
                   poll_s: float = 0.5, env: dict | None = None, what: str = "child") -> int:
    """Run ``cmd`` in its own session; return its exit status, or 0 if ``done()`` held and
    it was still alive ``grace_s`` later (then the whole session is ended). Whatever the
    child leaves in its session (an engine process) is killed when it returns."""
    proc = subprocess.Popen(list(cmd), env=env, start_new_session=True)
    done_since = None
    try:
        while True:
            rc = proc.poll()
            if rc is not None:
                return rc
            if done_since is None and done():
                done_since = time.time()
            if done_since is not None and time.time() - done_since > grace_s:
                print(f"{what}: output complete, but the process is still alive "
                      f"{grace_s:.0f}s later; ending it (pid {proc.pid} and its session)",
                      file=sys.stderr, flush=True)
                _kill_group(proc.pid, signal.SIGTERM)
                try:
                    proc.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    _kill_group(proc.pid, signal.SIGKILL)
                    proc.wait()
                return 0
            time.sleep(poll_s)
    except BaseException:
        _kill_group(proc.pid, signal.SIGKILL)
        proc.wait()
        raise
    finally:
        _kill_group(proc.pid, signal.SIGKILL)  # survivors in its session (engine processes)
