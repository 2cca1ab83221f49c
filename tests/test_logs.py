"""The plugin's log lines go through vLLM's logging setup; the start-up line says what it chose."""

import os
import re
import subprocess
import sys

from conftest import requires_vllm
from vllm_dspark import logs
from vllm_dspark.config import DSparkConfig
from vllm_dspark.schedule.verification import Settings, VerificationScheduler, read_settings

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DRAFT = os.path.join(ROOT, "models", "dspark-smollm2-135m")

# vLLM's text format (vllm/logger.py): "(process pid=N) LEVEL MM-DD HH:MM:SS [file:line] msg"
VLLM_LINE = r"^\(\S+ pid=\d+\) {level} \d\d-\d\d \d\d:\d\d:\d\d \[{file}:\d+\] {msg}$"

CHILD = """
import logging
import vllm_dspark
from vllm.config.logging import LoggingConfig
from vllm.logger import configure_logging

configure_logging(LoggingConfig())  # what LLM(...) and vllm serve do in each process
vllm_dspark.register()              # vLLM's general_plugins entry point
logging.getLogger("vllm_dspark.engine.something").info("plugin info")
logging.getLogger("vllm_dspark.schedule.gate").debug("plugin debug")
logging.getLogger("vllm_dspark").warning("plugin warning")
logging.getLogger("vllm.child").info("vllm info")
configure_logging(LoggingConfig(log_level="WARNING"))  # vLLM reconfigures (--log-level)
logging.getLogger("vllm_dspark.engine.something").info("after: plugin info")
logging.getLogger("vllm_dspark.engine.something").warning("after: plugin warning")
"""


def run_child(**env):
    e = {k: v for k, v in os.environ.items() if not k.startswith("VLLM_LOGGING")}
    e.update(VLLM_LOGGING_COLOR="0", **env)
    p = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True, env=e,
                       timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    return (p.stdout + p.stderr).splitlines()


def line(lines, msg):
    found = [x for x in lines if x.endswith("] " + msg)]
    return found[0] if found else None


@requires_vllm
def test_plugin_loggers_use_vllms_format_and_level():
    lines = run_child()  # VLLM_LOGGING_LEVEL unset: INFO
    ours = line(lines, "plugin info")
    assert ours is not None, lines[-20:]
    assert re.match(VLLM_LINE.format(level="INFO", file="<string>", msg="plugin info"), ours)
    theirs = line(lines, "vllm info")
    assert re.match(VLLM_LINE.format(level="INFO", file="<string>", msg="vllm info"), theirs)
    assert ours.split(" ", 2)[:2] == theirs.split(" ", 2)[:2]  # same process prefix
    assert line(lines, "plugin warning").split()[2] == "WARNING"
    assert line(lines, "plugin debug") is None
    # After vLLM reconfigures (a new level), the plugin follows it.
    assert line(lines, "after: plugin info") is None
    assert line(lines, "after: plugin warning") is not None
    assert sum(x.endswith("] plugin info") for x in lines) == 1  # no second (root) handler


@requires_vllm
def test_plugin_loggers_honour_VLLM_LOGGING_LEVEL():
    lines = run_child(VLLM_LOGGING_LEVEL="DEBUG")
    debug = line(lines, "plugin debug")
    assert debug is not None and " DEBUG " in debug
    lines = run_child(VLLM_LOGGING_LEVEL="ERROR")
    assert line(lines, "plugin info") is None and line(lines, "plugin warning") is None


def test_setup_is_idempotent():
    logger = logs.setup()
    handlers = list(logger.handlers)
    assert logs.setup() is logger and logger.handlers == handlers
    assert logs.get_logger("vllm_dspark.x").name == "vllm_dspark.x"


# --------------------------------------------------------------------------- start-up line
def test_the_start_up_line_says_what_was_chosen(tmp_path, monkeypatch):
    monkeypatch.setenv("VLLM_DSPARK_CACHE", str(tmp_path))
    cfg = DSparkConfig.from_dir(DRAFT)
    text = logs.describe_choice("V1", cfg, gamma=7, draft_sample_method="probabilistic",
                                **logs.choice_from_settings(read_settings(cfg, {})))
    assert text == (
        "vllm-dspark: runner V1, γ=7, vanilla Markov head (rank 32), confidence head on "
        "(with Markov embedding), STS on (7 positions), drafts probabilistic, scheduler "
        f"causal, SPS profiled at start-up (cached in {tmp_path / 'sps'}), draft gate on")
    assert "\n" not in text

    fixed = logs.describe_choice("V2", cfg, gamma=4, **logs.choice_from_settings(
        read_settings(cfg, {"VLLM_DSPARK_SCHEDULER": "fixed"})))
    assert fixed.endswith("runner V2, γ=4, vanilla Markov head (rank 32), confidence head on "
                          "(with Markov embedding), STS on (7 positions), scheduler fixed")
    paper = logs.choice_from_settings(Settings("async", "/t/sps.json", draft_cost=0.0))
    assert paper == {"scheduler": "async", "sps": "from /t/sps.json (VLLM_DSPARK_SPS)",
                     "gate": False}

    raw = DSparkConfig.from_dict({**cfg.raw, "dspark_sts_temperatures": None})
    assert "STS off (no dspark_sts_temperatures)" in logs.describe_choice(
        "V1", raw, gamma=7, scheduler="causal")
    plain = DSparkConfig.from_dict({**cfg.raw, "markov_rank": 0, "enable_confidence_head":
                                    False, "dspark_sts_temperatures": None})
    assert "no sequential head (DFlash-like), confidence head off, scheduler fixed" in \
        logs.describe_choice("V1", plain, gamma=7, scheduler="fixed")


def test_the_start_up_line_from_a_built_scheduler():
    from vllm_dspark.schedule.sps import SPSTable

    sched = VerificationScheduler(Settings("causal", "profile", draft_cost=None),
                                  sps=SPSTable(b=[1, 8], sps=[100.0, 90.0]))
    sched.sps_source = "from the cache /c/sps/x.json"
    assert logs.choice_from_scheduler(sched) == {
        "scheduler": "causal", "sps": "from the cache /c/sps/x.json", "gate": True}
    sched.mode = "fixed"  # the async-scheduling fall-back
    assert logs.choice_from_scheduler(sched) == {"scheduler": "fixed", "sps": None, "gate": None}

