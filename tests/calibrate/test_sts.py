"""Sequential Temperature Scaling (paper §3.2.1): metrics, the fit, outcome collection
in plain torch, and `vllm-dspark calibrate` end to end. CPU only, no vLLM."""

import json
import math
import os
import random
import shutil

import numpy as np
import pytest
import torch

from tiny_models import make_drafter, make_oracle_pair
from vllm_dspark.calibrate.collect import (
    _verify_logits, collect_sequence, confidence_logits, continuations, load_pair,
)
from vllm_dspark.calibrate.sts import (
    auroc, cumulative_survival, ece, evaluate, fit_nll, fit_sts,
)
from vllm_dspark.cli import main as cli_main
from vllm_dspark.config import DSparkConfig
from vllm_dspark.decode.draft import sample_block
from vllm_dspark.prompts import chat_prompt_ids

WORDS = "the cat dog runs fast slow red blue green add sum code print list".split()


# ------------------------------------------------------------------ metrics
def test_ece_hand_cases():
    assert ece([0.25] * 4, [1, 0, 0, 0]) == pytest.approx(0.0)
    assert ece([0.9] * 5, [0] * 5) == pytest.approx(0.9)
    # Two bins of two: |0.1 - 0| and |0.9 - 0.5|, each weighted 1/2.
    assert ece([0.1, 0.1, 0.9, 0.9], [0, 0, 1, 0]) == pytest.approx(0.25)
    # 1.0 lands in the last bin, 0.0 in the first; a single bin pools everything.
    assert ece([1.0, 0.0], [1, 0]) == pytest.approx(0.0)
    assert ece([0.2, 0.8], [1, 0], n_bins=1) == pytest.approx(0.0)
    assert math.isnan(ece([], []))


def test_auroc_hand_cases():
    assert auroc([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1]) == pytest.approx(0.75)
    assert auroc([1, 2, 3, 4], [0, 0, 1, 1]) == 1.0
    assert auroc([4, 3, 2, 1], [0, 0, 1, 1]) == 0.0
    assert auroc([0.5] * 6, [0, 1, 0, 1, 1, 0]) == pytest.approx(0.5)
    # Ties count one half: pairs (0.5|0.5)=½, (0.5|0.2)=1, (0.8|0.5)=1, (0.8|0.2)=1.
    assert auroc([0.5, 0.5, 0.2, 0.8], [1, 0, 0, 1]) == pytest.approx(3.5 / 4)
    assert math.isnan(auroc([0.1, 0.9], [1, 1]))
    assert math.isnan(auroc([0.1, 0.9], [0, 0]))


# ------------------------------------------------------------------ fit
def _synthetic(t_true, n=40_000, seed=0):
    """Logits and a cumulative Bernoulli chain s_k = s_{k-1}·Bern(σ(z_k/T_k)), with
    random block lengths (the mask)."""
    rng = np.random.default_rng(seed)
    gamma = len(t_true)
    z = rng.normal(1.5, 2.5, size=(n, gamma))
    c = 1.0 / (1.0 + np.exp(-z / np.asarray(t_true)))
    s = np.cumprod(rng.random((n, gamma)) < c, axis=1).astype(np.int8)
    lengths = np.where(rng.random(n) < 0.8, gamma, rng.integers(1, gamma + 1, n))
    mask = np.arange(gamma)[None] < lengths[:, None]
    return z, s * mask, mask


def test_fit_sts_recovers_known_temperatures():
    t_true = [0.5, 2.0, 1.0, 3.0]
    z, s, mask = _synthetic(t_true)
    temps, report = fit_sts(z, s, mask)
    for got, want in zip(temps, t_true):
        assert abs(got - want) / want < 0.15, (temps, t_true)
    for p in report["positions"]:
        assert p["fitted"] and p["ece_after"] < p["ece_before"], p
        assert p["ece_after"] < 0.02
        assert p["n"] == int(mask[:, p["position"] - 1].sum())
    assert report["mean_ece_after"] < report["mean_ece_before"]
    # The fitted product is what sample_block would feed the scheduler.
    prod = cumulative_survival(z, temps)
    assert prod.shape == z.shape and np.all(np.diff(prod, axis=1) <= 0)


def test_fit_sts_identity_on_calibrated_data_and_sparse_positions():
    z, s, mask = _synthetic([1.0, 1.0, 1.0], n=30_000, seed=1)
    mask[:, 2] = False  # no block reaches position 3: it keeps T = 1
    temps, report = fit_sts(z, s * mask, mask)
    assert all(abs(t - 1.0) < 0.15 for t in temps[:2]), temps
    assert temps[2] == 1.0 and not report["positions"][2]["fitted"]
    assert report["positions"][2]["n"] == 0


def test_fit_nll_recovers_known_temperatures():
    t_true = [0.5, 2.0, 1.0, 3.0]
    z, s, mask = _synthetic(t_true)
    temps, report = fit_nll(z, s, mask)
    for got, want in zip(temps, t_true):
        assert abs(got - want) / want < 0.06, (temps, t_true)
    for k, p in enumerate(report["positions"]):
        alive = mask[:, k] & (s[:, k - 1] == 1) if k else mask[:, k]
        assert p["fitted"] and p["conditional_n"] == int(alive.sum())
        assert p["ece_after"] < p["ece_before"] and p["ece_after"] < 0.02, p
    # Identity where the data are calibrated; too few blocks keep T = 1.
    z, s, mask = _synthetic([1.0, 1.0, 1.0], n=30_000, seed=1)
    mask[:, 2] = False
    temps, report = fit_nll(z, s * mask, mask)
    assert all(abs(t - 1.0) < 0.06 for t in temps[:2]), temps
    assert temps[2] == 1.0 and not report["positions"][2]["fitted"]


def test_fit_nll_positions_are_independent_unlike_the_sequential_fit():
    """Maximum likelihood separates over positions (a block's likelihood is the
    product of its conditional terms), so rescaling position 1's logits moves T_1 by
    the same factor and leaves every later temperature as it was; the sequential ECE
    fit of the paper conditions T_k on the fitted T_<k, so T_2 may move."""
    z, s, mask = _synthetic([0.5, 2.0, 1.0], n=20_000, seed=4)
    temps, _ = fit_nll(z, s, mask)
    scaled = z.copy()
    scaled[:, 0] *= 3.0
    again, _ = fit_nll(scaled, s, mask)
    assert again[0] == pytest.approx(3.0 * temps[0], rel=0.02)
    assert again[1:] == temps[1:]


def test_compare_fits_script_on_saved_outcomes(tmp_path):
    """benchmarks/smollm2/compare_fits.py: both fits on an .npz as calibrate saves it,
    the last quarter of the prompts held out, whole prompts."""
    import importlib.util

    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    spec = importlib.util.spec_from_file_location(
        "compare_fits", os.path.join(root, "benchmarks", "smollm2", "compare_fits.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    z, s, mask = _synthetic([0.5, 2.0, 1.0], n=8_000, seed=5)
    prompt = np.repeat(np.arange(8), 1_000)
    np.savez_compressed(tmp_path / "o.npz", z=z, s=s, mask=mask, prompt=prompt)
    res = mod.compare(str(tmp_path / "o.npz"), 0.25)
    assert res["fit_blocks"] == 6_000 and res["held_out_blocks"] == 2_000
    for name in ("sts", "nll"):
        before, after = res[name]["mean_ece_held_out"]
        assert after < before and len(res[name]["held_out"]) == 3, res[name]
    for got, want in zip(res["nll"]["temperatures"], [0.5, 2.0, 1.0]):
        assert abs(got - want) / want < 0.1


def test_temperature_scaling_preserves_single_position_ranking():
    """§3.2.1: temperature scaling is order preserving, so a position's own AUROC
    cannot change (the cumulative product's may, slightly, through earlier T_i)."""
    z, s, mask = _synthetic([0.5, 2.0, 1.0], n=5_000, seed=2)
    for k in range(3):
        rows = mask[:, k]
        # Conditional outcome: survived k given survived k-1.
        alive = rows & (s[:, k - 1] == 1) if k else rows
        base = auroc(1 / (1 + np.exp(-z[alive, k])), s[alive, k])
        for t in (0.5, 1.7, 20.0):  # (T far below 0.5 saturates float64 sigmoids: ties)
            assert auroc(1 / (1 + np.exp(-z[alive, k] / t)), s[alive, k]) == pytest.approx(base)
    _, report = fit_sts(z, s, mask)
    first = report["positions"][0]  # the product is c_1 alone
    assert first["auroc_after"] == pytest.approx(first["auroc_before"])


# ------------------------------------------------------------------ collect
@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    return make_oracle_pair(str(tmp_path_factory.mktemp("cal")), "qwen3", corrupt_fraction=0.3)


@pytest.fixture(scope="module")
def loaded(pair):
    tok, target, drafter = load_pair(*pair, torch.device("cpu"))
    return tok, target, drafter


def _prompts(n, seed=0):
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 8))) for _ in range(n)]


def test_greedy_outcomes_match_direct_comparison(loaded):
    tok, target, drafter = loaded
    gamma = drafter.cfg.block_size
    prompt_ids = [chat_prompt_ids(tok, p) for p in _prompts(3)]
    answers = continuations(tok, target, prompt_ids, temperature=0.0, max_new_tokens=40, seed=0)
    total, survived = 0, 0
    for p_ids, ans in zip(prompt_ids, answers):
        ids = torch.tensor(p_ids + ans)
        z, s, m = collect_sequence(target, drafter, ids, len(p_ids), stop_ids=(0,))
        assert z.shape == (len(ans) - 1, gamma) and torch.isfinite(z).all()
        # Consistency: masks are prefixes, survival is cumulative and masked.
        assert (m[:, 1:] <= m[:, :-1]).all() and (s[:, 1:] <= s[:, :-1]).all()
        assert (s <= m).all() and m[:, 0].all()
        hs = target(input_ids=ids[None], output_hidden_states=True).hidden_states
        feats = torch.cat([hs[i + 1] for i in drafter.cfg.target_layer_ids], -1)
        for a, p in enumerate(range(len(p_ids), len(ids) - 1)):
            states = drafter.draft_block_states(feats[:, :p], ids[p:p + 1], gamma)
            block = sample_block(drafter.base_logits(states), states, ids[p:p + 1], None,
                                 drafter.markov_head, drafter.confidence_head)
            torch.testing.assert_close(torch.sigmoid(z[a]), block.confidence[0])
            want, alive = [], True
            for k in range(gamma):
                if p + k + 1 >= len(ids):
                    break
                alive = alive and int(block.tokens[0, k]) == int(ids[p + k + 1])
                want.append(alive)
            assert m[a].sum() == len(want)
            assert s[a, :len(want)].tolist() == want, (p, block.tokens, ids[p + 1:p + gamma + 1])
            total, survived = total + 1, survived + int(want[0])
    assert 0 < survived < total  # the corrupted rows are rejected, the others accepted


def test_verification_pass_equals_prefix_forward(loaded):
    """The one-pass 4-D-masked verification = the target run on prefix + drafts."""
    _, target, _ = loaded
    torch.manual_seed(0)
    ids = torch.randint(4, 300, (30,))
    out = target(input_ids=ids[None], use_cache=True)
    anchors = torch.tensor([5, 11, 28])
    drafts = torch.randint(4, 300, (3, 4))
    got = _verify_logits(target, out.past_key_values, 30, anchors, drafts, out.logits[0, anchors])
    assert out.past_key_values.get_seq_length() == 30  # cropped back
    for a, p in enumerate(anchors.tolist()):
        ref = target(input_ids=torch.cat([ids[:p + 1], drafts[a, :3]])[None]).logits[0, p:]
        torch.testing.assert_close(got[a], ref, rtol=1e-4, atol=1e-4)


def test_sampled_oracle_accepts_everything(tmp_path):
    """Uncorrupted oracle: q == p at T > 0, so rejection sampling accepts every draft."""
    target_dir, draft_dir = make_oracle_pair(str(tmp_path), "qwen3", corrupt_fraction=0.0)
    tok, target, drafter = load_pair(target_dir, draft_dir, torch.device("cpu"))
    prompt_ids = [chat_prompt_ids(tok, p) for p in _prompts(2, seed=3)]
    answers = continuations(tok, target, prompt_ids, temperature=1.0, max_new_tokens=30, seed=1)
    g = torch.Generator().manual_seed(0)
    for p_ids, ans in zip(prompt_ids, answers):
        ids = torch.tensor(p_ids + ans)
        _, s, m = collect_sequence(target, drafter, ids, len(p_ids), temperature=1.0,
                                   stop_ids=(0,), generator=g)
        assert m.any() and torch.equal(s, m)


def test_confidence_logits_match_sample_block(loaded):
    _, _, drafter = loaded
    torch.manual_seed(1)
    hidden = torch.randn(3, 4, 64)
    anchors = torch.tensor([5, 6, 7])
    block = sample_block(drafter.base_logits(hidden), hidden, anchors, None,
                         drafter.markov_head, drafter.confidence_head,
                         sts_temperatures=[2.0, 0.5])
    z = confidence_logits(drafter, hidden, anchors, block.tokens)
    temps = torch.tensor([2.0, 0.5, 1.0, 1.0])
    torch.testing.assert_close(torch.sigmoid(z / temps), block.confidence)


# ------------------------------------------------------------------ CLI
@pytest.fixture()
def cli_setup(pair, tmp_path):
    target, draft = pair
    local = tmp_path / "draft"
    shutil.copytree(draft, local)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"turns": [p]}) + "\n" for p in _prompts(8, seed=5)))
    return target, str(local), str(prompts), tmp_path


def _cli(target, draft, prompts, *extra):
    return cli_main(["calibrate", "--target", target, "--draft", draft, "--prompts", prompts,
                     "--num-prompts", "8", "--max-new-tokens", "32", "--min-blocks", "50",
                     *extra])


def test_cli_writes_temperatures(cli_setup, capsys):
    target, draft, prompts, tmp = cli_setup
    report, plot = tmp / "r.json", tmp / "r.png"
    assert _cli(target, draft, prompts, "--out-json", str(report), "--plot", str(plot)) == 0
    printed = capsys.readouterr().out
    assert "ECE before" in printed and "AUROC after" in printed
    cfg = DSparkConfig.from_dir(draft)
    assert cfg.sts_temperatures is not None and len(cfg.sts_temperatures) == cfg.block_size
    rep = json.loads(report.read_text())
    assert rep["temperatures"] == pytest.approx(cfg.sts_temperatures, rel=1e-5)
    assert rep["blocks"] >= 50 and len(rep["sts"]["positions"]) == cfg.block_size
    assert rep["sts"]["mean_ece_after"] <= rep["sts"]["mean_ece_before"] + 1e-9
    # default --holdout 0.25: the last 2 of 8 prompts are evaluated, not fitted on
    held = rep["heldout"]
    assert "held out:" in printed and held["prompts"] == 2 and held["n_blocks"] > 0
    assert rep["blocks"] == rep["sts"]["n_blocks"]
    assert [p["temperature"] for p in held["positions"]] == rep["temperatures"]
    assert rep["plot_data"] == "held out"
    assert plot.read_bytes()[:4] == b"\x89PNG"
    with open(os.path.join(draft, "config.json.bak")) as f:
        assert "dspark_sts_temperatures" not in json.load(f)

    # Dry run at T > 0: report only, config untouched.
    before = open(os.path.join(draft, "config.json")).read()
    report2 = tmp / "dry.json"
    outcomes = tmp / "outcomes.npz"
    assert _cli(target, draft, prompts, "--dry-run", "--temperature", "0.8", "--fit", "sts",
                "--out-json", str(report2), "--save-outcomes", str(outcomes)) == 0
    assert open(os.path.join(draft, "config.json")).read() == before
    rep2 = json.loads(report2.read_text())
    assert rep2["config_written"] is None and rep2["collection"]["temperature"] == 0.8
    assert rep["fit"] == "nll" and rep2["fit"] == "sts"  # the default, the paper's
    assert "fitted (sts)" in capsys.readouterr().out
    saved = np.load(outcomes)
    assert saved["z"].shape == saved["s"].shape == saved["mask"].shape
    assert saved["prompt"].shape == (saved["z"].shape[0],) and saved["prompt"].max() == 7
    assert rep2["heldout"]["prompts"] == 2
    assert rep2["previous_temperatures"] == pytest.approx(cfg.sts_temperatures)


def test_cli_errors(cli_setup, pair):
    target, draft, prompts, tmp = cli_setup
    no_head = str(tmp / "nohead")
    make_drafter(pair[0], no_head, confidence=False)
    with pytest.raises(SystemExit, match="no confidence head"):
        _cli(target, no_head, prompts)
    with pytest.raises(SystemExit, match="does not exist"):
        _cli(target, draft, str(tmp / "missing.jsonl"))
    for bad in ("1", "-0.1"):
        with pytest.raises(SystemExit, match=f"--holdout {float(bad)} is not a fraction"):
            _cli(target, draft, prompts, "--holdout", bad)
    with pytest.raises(SystemExit, match="too few outcomes"):
        _cli(target, draft, prompts, "--num-prompts", "1", "--min-blocks", "100000")
    assert "dspark_sts_temperatures" not in json.load(open(os.path.join(draft, "config.json")))


def test_holdout_split_keeps_whole_prompts():
    from vllm_dspark.calibrate.collect import Outcomes

    prompt = np.array([0, 0, 1, 1, 1, 2, 3, 3])
    z = np.arange(16, dtype=np.float64).reshape(8, 2)
    o = Outcomes(z=z, s=np.zeros((8, 2), np.int8), mask=np.ones((8, 2), bool), prompt=prompt)
    fit, held = o.split(0.25)  # ⌈0.25 · 4⌉ = 1 prompt: the last
    assert fit.prompt.tolist() == [0, 0, 1, 1, 1, 2] and held.prompt.tolist() == [3, 3]
    assert held.z.tolist() == z[6:].tolist()
    fit, held = o.split(0.5)
    assert held.prompt.tolist() == [2, 3, 3]
    assert o.split(0.0) == (o, None)
    assert o.split(0.99)[1].prompt.min() == 1  # at least one prompt is always fitted on
    one = Outcomes(z=z, s=o.s, mask=o.mask, prompt=np.zeros(8, int))
    assert one.split(0.25)[1] is None


def test_evaluate_is_the_fit_report_on_the_same_data():
    rng = np.random.default_rng(3)
    z = rng.normal(1.0, 2.0, size=(400, 3))
    s = np.cumprod(rng.random((400, 3)) < 1 / (1 + np.exp(-z / 2)), axis=1).astype(np.int8)
    temps, report = fit_sts(z, s)
    again = evaluate(z, s, None, temps)
    for a, b in zip(report["positions"], again["positions"]):
        assert {k: b[k] for k in b} == {k: a[k] for k in b}
