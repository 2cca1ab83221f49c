"""The plugin's log lines go through vLLM's logging setup; the one start-up line.

vLLM 0.32 configures the ``vllm`` logger only (``vllm/logger.py``: a handler with its
format, the level of ``VLLM_LOGGING_LEVEL`` or ``--log-level``, propagation off; or the
user's ``VLLM_LOGGING_CONFIG_PATH`` dictConfig; or nothing with
``VLLM_CONFIGURE_LOGGING=0``). Loggers named ``vllm_dspark.*`` sit outside that tree,
so their records reached Python's last-resort handler (warnings only, bare format) or
nowhere. ``setup()`` (called by ``register()`` in every vLLM process) gives the
``vllm_dspark`` logger one handler that hands each record to the ``vllm`` logger when
that logger is enabled for the record's level: the same handlers, format, level and
stream as vLLM's own lines, whatever configuration vLLM applied, also after it
reconfigures (each engine process does). Engine-free: imports no vLLM.

``describe_choice`` is the INFO line each engine logs once at start-up: what the
plugin chose (runner, heads, confidence head and STS, scheduler, SPS source, gate).
"""

from __future__ import annotations

import logging
from typing import Any

NAME = "vllm_dspark"


class _ThroughVllm(logging.Handler):
    """Hands ``vllm_dspark.*`` records to the ``vllm`` logger (its level, its handlers)."""

    def emit(self, record: logging.LogRecord) -> None:
        target = logging.getLogger("vllm")
        if target.disabled or not target.isEnabledFor(record.levelno):
            return
        if not hasattr(record, "vllm_process_name"):  # vLLM's record factory not yet set
            record.vllm_process_name = record.processName
        target.handle(record)


def setup() -> logging.Logger:
    """Route the ``vllm_dspark`` logger through vLLM's (idempotent; returns it). A logger
    the user configured already (handlers of its own) is left alone."""
    logger = logging.getLogger(NAME)
    if not logger.handlers:
        logger.addHandler(_ThroughVllm())
        logger.propagate = False  # vLLM's "vllm" logger does not propagate either
        if logger.level == logging.NOTSET:
            logger.setLevel(logging.DEBUG)  # the "vllm" logger's level decides
    return logger


def get_logger(name: str) -> logging.Logger:
    """A ``vllm_dspark.*`` logger that goes through vLLM's setup."""
    setup()
    return logging.getLogger(name)


# --------------------------------------------------------------------------- start-up line
def _heads(cfg) -> str:
    if cfg.markov_rank == 0:
        seq = "no sequential head (DFlash-like)"
    else:
        seq = f"{cfg.markov_head_type} Markov head (rank {cfg.markov_rank})"
    if not cfg.enable_confidence_head:
        return f"{seq}, confidence head off"
    conf = "confidence head on" + (" (with Markov embedding)"
                                   if cfg.confidence_head_with_markov else "")
    sts = cfg.sts_temperatures
    sts_text = f"STS on ({len(sts)} positions)" if sts else "STS off (no dspark_sts_temperatures)"
    return f"{seq}, {conf}, {sts_text}"


def describe_choice(runner: str, cfg, *, gamma: int, scheduler: str, sps: str | None = None,
                    gate: bool | None = None, draft_sample_method: str | None = None) -> str:
    """One line saying what the plugin chose for an engine.

    ``runner``: "V1" or "V2"; ``cfg``: the draft's ``DSparkConfig``; ``gamma``: γ;
    ``scheduler``: the verification mode in effect (fixed, causal, async, or the V2
    runner's own name for its rule); ``sps``: where SPS(B) comes from (None: not used);
    ``gate``: the draft gate on or off (None: not applicable, e.g. fixed);
    ``draft_sample_method``: vLLM's knob (greedy / probabilistic), when known.
    ``choice_from_settings`` / ``choice_from_scheduler`` give scheduler, sps and gate.
    """
    parts = [f"runner {runner}", f"γ={gamma}", _heads(cfg)]
    if draft_sample_method:
        parts.append(f"drafts {draft_sample_method}")
    parts.append(f"scheduler {scheduler}")
    if sps is not None:
        parts.append(f"SPS {sps}")
    if gate is not None:
        parts.append("draft gate " + ("on" if gate else "off"))
    return "vllm-dspark: " + ", ".join(parts)


def choice_from_settings(settings) -> dict[str, Any]:
    """``scheduler``, ``sps`` and ``gate`` for ``describe_choice`` from the knobs alone
    (``schedule.verification.read_settings``), before an engine has built its scheduler."""
    from vllm_dspark.schedule.sps import cache_dir
    from vllm_dspark.schedule.verification import SPS_ENV

    if settings.mode == "fixed":
        return {"scheduler": "fixed", "sps": None, "gate": None}
    if settings.sps == "profile":
        sps = f"profiled at start-up (cached in {cache_dir()})"
    else:
        sps = f"from {settings.sps} ({SPS_ENV})"
    return {"scheduler": settings.mode, "sps": sps, "gate": settings.draft_cost is None}


def choice_from_scheduler(sched) -> dict[str, Any]:
    """The same from a built ``VerificationScheduler`` (after warm-up): the mode in effect
    (``fixed`` after the async-scheduling fall-back) and where its SPS table came from."""
    if sched.mode == "fixed" or sched.sps is None:
        return {"scheduler": "fixed", "sps": None, "gate": None}
    return {"scheduler": sched.mode, "sps": getattr(sched, "sps_source", None) or "given",
            "gate": sched.gate is not None}
