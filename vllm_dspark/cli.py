"""``vllm-dspark``: the plugin's command line.

Each subcommand lives in the module that does the work; that module exposes
``add_arguments(parser)`` and ``run(args) -> int``. Imports are lazy so that
``vllm-dspark --help`` does not import vLLM or torch.
"""

from __future__ import annotations

import argparse
import importlib
import sys

SUBCOMMANDS = {
    "build-target": ("vllm_dspark.targets", "build a benchmark target model (HF dir) from GGUF"),
    "train": ("vllm_dspark.train.cli", "train a DSpark drafter against a target"),
    "eval": ("vllm_dspark.eval.acceptance", "measure acceptance (τ, per position) through vLLM"),
    "calibrate": ("vllm_dspark.calibrate.cli",
                  "fit STS confidence temperatures (paper §3.2.1) on held-out prompts"),
    "profile": ("vllm_dspark.schedule.profile_cli",
                "measure the target's SPS(B) table for the verification scheduler"),
}


def require_positive(args: argparse.Namespace, *names: str) -> None:
    """One clear error for the first of ``--names`` below 1 (counts, sizes, steps)."""
    for name in names:
        if getattr(args, name) < 1:
            raise SystemExit(f"error: --{name.replace('_', '-')} must be >= 1.")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="vllm-dspark", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (mod_name, help_text) in SUBCOMMANDS.items():
        p = sub.add_parser(name, help=help_text)
        if argv and argv[0] == name:  # import only the module that is asked for
            importlib.import_module(mod_name).add_arguments(p)
    args = parser.parse_args(argv)
    mod = importlib.import_module(SUBCOMMANDS[args.command][0])
    return int(mod.run(args) or 0)


if __name__ == "__main__":
    raise SystemExit(main())
