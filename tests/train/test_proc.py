"""A process that owns an engine leaves once its output is written: exit_now ends its
children without waiting on them, and run_until_done ends a child (and what it
started) that hangs after its output is complete."""

import subprocess
import sys
import textwrap
import time

import psutil

from vllm_dspark.train.proc import run_until_done


def _gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def _wait_gone(pid: int, timeout: float = 10.0) -> bool:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if _gone(pid):
            return True
        time.sleep(0.1)
    return False


def test_exit_now_ends_the_children_and_skips_teardown(tmp_path):
    # The child starts a "engine" process that ignores SIGTERM and registers an atexit
    # hook that would hang (a stand-in for an engine shutdown that never returns).
    script = tmp_path / "child.py"
    script.write_text(textwrap.dedent(f"""
        import atexit, multiprocessing, signal, sys, time
        from vllm_dspark.train.proc import exit_now

        def engine():
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
            time.sleep(600)

        if __name__ == "__main__":
            p = multiprocessing.get_context("spawn").Process(target=engine)
            p.start()
            open({str(tmp_path / 'pid')!r}, "w").write(str(p.pid))
            atexit.register(time.sleep, 600)
            print("output written", flush=True)
            exit_now(0, "test")
    """))
    t0 = time.time()
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert time.time() - t0 < 60
    assert "output written" in proc.stdout and "ended the engine's processes" in proc.stderr
    assert _wait_gone(int((tmp_path / "pid").read_text()))


def test_run_until_done_ends_a_child_that_hangs_after_its_output(tmp_path):
    marker = tmp_path / "done"
    script = tmp_path / "hang.py"
    script.write_text(textwrap.dedent(f"""
        import subprocess, sys, time
        g = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
        open({str(tmp_path / 'pid')!r}, "w").write(str(g.pid))
        open({str(marker)!r}, "w").write("complete")
        time.sleep(600)  # a teardown that never returns
    """))
    t0 = time.time()
    rc = run_until_done([sys.executable, str(script)], marker.exists, grace_s=1.0,
                        poll_s=0.1, what="test")
    assert rc == 0 and time.time() - t0 < 30
    assert _wait_gone(int((tmp_path / "pid").read_text()))


def test_run_until_done_returns_the_exit_status_and_cleans_its_session(tmp_path):
    script = tmp_path / "fail.py"
    script.write_text(textwrap.dedent(f"""
        import subprocess, sys
        g = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
        open({str(tmp_path / 'pid')!r}, "w").write(str(g.pid))
        sys.exit(3)
    """))
    rc = run_until_done([sys.executable, str(script)], lambda: False, poll_s=0.1)
    assert rc == 3
    assert _wait_gone(int((tmp_path / "pid").read_text()))
