"""benchmarks/smollm2/scale_table.py on synthetic eval JSONs and training reports:
rows grouped by architecture and sorted by sequences seen, τ cells T=0 / T=1, the
README block replaced, and clear errors for what cannot be tabled."""

import importlib.util
import json
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
spec = importlib.util.spec_from_file_location(
    "scale_table", os.path.join(ROOT, "benchmarks", "smollm2", "scale_table.py"))
st = importlib.util.module_from_spec(spec)
spec.loader.exec_module(st)

DATASETS = ("gsm8k", "humaneval", "mt-bench")


def _eval(path, tau0, tau1, gamma=7, draft="/elsewhere/draft", impl="vllm-dspark",
          protocol="chain drafting, fixed gamma, no scheduler; tau includes the bonus token"):
    res = {d: {"T=0": {"tau": tau0 + i * 0.1}, "T=1": {"tau": tau1 + i * 0.1}}
           for i, d in enumerate(DATASETS)}
    path.write_text(json.dumps({"gamma": gamma, "draft": draft, "implementation": impl,
                                "protocol": protocol, "num_prompts": 40, "max_tokens": 256,
                                "machine": {"gpu": "1 x NVIDIA H200"}, "results": res}))
    return str(path)


def _training(path, steps, batch=32, layers=2, rank=32, head="vanilla", new=True):
    rep = {"finished": True, "step": steps, "seconds": 600.0, "train_rows": 58000,
           "config": {"batch_size": batch, "anchors": 256, "num_layers": layers,
                      "markov_rank": rank, "markov_head_type": head}}
    if new:  # what the trainer writes now; older reports lack these
        rep.update(sequences_seen=steps * batch, epochs_seen=steps * batch / 58000,
                   draft_config={"num_hidden_layers": layers, "markov_rank": rank,
                                 "markov_head_type": head})
    path.write_text(json.dumps(rep))
    return str(path)


def test_table_groups_by_architecture_and_sorts_by_sequences_seen(tmp_path):
    specs = []
    for tag, steps, kw, taus in [("big", 6000, {}, (3.1, 2.6)), ("small", 500, {}, (1.9, 1.6)),
                                 ("mid", 2000, {}, (2.5, 2.1)),
                                 ("dflash", 6000, {"rank": 0}, (2.8, 2.3)),
                                 ("l1", 2000, {"layers": 1, "new": False}, (2.0, 1.8))]:
        e = _eval(tmp_path / f"eval_{tag}.json", *taus)
        _training(tmp_path / f"training_{tag}.json", steps, **kw)  # found beside the eval
        specs.append(e)
    out = tmp_path / "table.md"
    assert st.main([*specs, "--out", str(out)]) == 0
    text = out.read_text()
    rows = [ln for ln in text.splitlines() if ln.startswith("| ") and "drafter" not in ln]
    assert [r.split(" | ")[0][2:] for r in rows] == ["l1", "dflash", "small", "mid", "big"]
    big = rows[-1].split(" | ")
    assert big[4:7] == ["256 × 32", "192 k", "3.3"]
    assert big[7:10] == ["3.10 / 2.60", "3.20 / 2.70", "3.30 / 2.80"]
    assert big[10].rstrip(" |") == "3.20 / 2.70"  # the mean over the datasets
    assert rows[1].split(" | ")[2:4] == ["none", "0"]  # markov_rank 0: DFlash-like
    assert rows[0].split(" | ")[5] == "64 k"  # an older report: step × batch
    assert "γ = 7" in text and "40 prompts" in text and "H200" in text


def test_explicit_training_paths_labels_and_the_readme_block(tmp_path):
    e = _eval(tmp_path / "a.json", 2.0, 1.7, impl="upstream")
    d = tmp_path / "draft"
    d.mkdir()
    _training(d / "training.json", 100)
    readme = tmp_path / "README.md"
    readme.write_text("before\n<!-- scale-table:smollm2-scale -->\nold\n"
                      "<!-- /scale-table:smollm2-scale -->\nafter\n")
    assert st.main([f"{e}={d}", "--labels", "ours", "--readme", str(readme),
                    "--datasets", "mt-bench", "gsm8k"]) == 0
    text = readme.read_text()
    assert text.startswith("before\n<!-- scale-table:smollm2-scale -->\n") and "old" not in text
    assert text.endswith("<!-- /scale-table:smollm2-scale -->\nafter\n")
    assert "| drafter | layers | head | rank | anchors × batch | sequences seen | epochs | " \
           "mt-bench | gsm8k | mean |" in text
    assert "| ours (upstream vLLM) |" in text and "3.2 k" in text
    # The draft directory named in the eval is the last place looked.
    e2 = _eval(tmp_path / "b.json", 2.0, 1.7, draft=str(d))
    assert st.read_row(e2, 7)["training"] == str(d / "training.json")


@pytest.mark.parametrize("kw, message", [
    ({"gamma": 5}, "γ = 5"),
    ({"protocol": "scheduled"}, "fixed-γ chain protocol"),
])
def test_evals_outside_the_protocol_are_refused(tmp_path, capsys, kw, message):
    e = _eval(tmp_path / "eval_x.json", 2.0, 1.5, **kw)
    _training(tmp_path / "training_x.json", 10)
    assert st.main([e]) == 2
    assert message in capsys.readouterr().err


def test_missing_training_report_and_missing_marker(tmp_path, capsys):
    e = _eval(tmp_path / "eval_y.json", 2.0, 1.5)
    assert st.main([e]) == 2
    err = capsys.readouterr().err
    assert "training_y.json" in err and "=PATH" in err
    _training(tmp_path / "training_y.json", 10)
    (tmp_path / "R.md").write_text("no markers\n")
    assert st.main([e, "--readme", str(tmp_path / "R.md")]) == 2
    assert "add the two markers" in capsys.readouterr().err
