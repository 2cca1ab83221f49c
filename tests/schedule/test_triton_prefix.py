"""The one-launch Triton scheduler == the torch schedulers (``prefix.py``).

On CPU the kernel runs in Triton's interpreter, which must be switched on before
triton is first imported: the CPU run of this file re-runs itself in a child
pytest with TRITON_INTERPRET=1 (so no engine test ever sees the variable). On a
GPU the compiled kernel is checked directly.
"""

import os
import random

import pytest
import torch
from checks import run_in_triton_interpreter

from vllm_dspark.schedule.prefix import (
    async_schedule,
    capacity_budget,
    causal_schedule,
    topk_schedule,
)
from vllm_dspark.schedule.sps import SPSTable

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
RUN_HERE = torch.cuda.is_available() or INTERPRETED


if not RUN_HERE:

    def test_in_triton_interpreter():
        # all passed: none skipped, none failed
        run_in_triton_interpreter(__file__, "not interpreter", r"\d+ passed(, \d+ warnings?)? in ")


@pytest.fixture(scope="module")
def tp():
    assert RUN_HERE, "collected only in the interpreter child or on a GPU"
    import vllm_dspark.schedule.triton_prefix as mod

    assert mod.available(torch.device(DEVICE))
    return mod


DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def tables():
    """A flat-then-dropping GPU-like step curve, a smooth CPU-like curve, and a jagged one."""
    return [
        SPSTable(b=[1, 8, 16, 32, 64, 128], sps=[60, 60, 58, 40, 30, 20], max_capture_size=64),
        SPSTable(b=[1, 2, 4, 8, 16, 32, 64], sps=[50, 45, 38, 28, 18, 10, 5.2]),
        SPSTable(b=[1, 3, 5, 7, 9, 40], sps=[30, 12, 29, 11, 28, 9], max_capture_size=9),
    ]


def random_c(gen, r, gamma, kind):
    if kind == "uniform":
        return torch.rand(r, gamma, generator=gen)
    if kind == "high":
        return 0.6 + 0.4 * torch.rand(r, gamma, generator=gen)
    # quantised: many exact ties, zeros, ones and a NaN
    c = torch.randint(0, 5, (r, gamma), generator=gen).float() / 4
    c[0, -1] = float("nan")
    return c


@pytest.mark.parametrize("kind", ["uniform", "high", "ties"])
def test_kernel_equals_torch(tp, kind):
    gen = torch.Generator().manual_seed({"uniform": 0, "high": 1, "ties": 2}[kind])
    rng = random.Random(3)
    for trial in range(24):
        r, gamma = rng.choice([1, 2, 3, 5, 16, 37]), rng.choice([1, 3, 4, 7])
        table = tables()[trial % 3]
        c = random_c(gen, r, gamma, kind).to(DEVICE)
        c_old = random_c(gen, r, gamma, kind).to(DEVICE)
        cap = torch.randint(0, gamma + 1, (r,), generator=gen).to(DEVICE) if trial % 2 else None
        dense = tp.dense_sps_for(table, r * (gamma + 1), DEVICE)

        want = causal_schedule(c, table, cap)
        got, diag = tp.prefix_lengths(c, dense, tp.CAUSAL, lengths_cap=cap)
        assert got.tolist() == want.lengths.tolist(), (trial, c, cap)
        assert int(diag[0]) == int(want.admitted)
        assert float(diag[1]) == pytest.approx(float(want.tau), rel=1e-12)
        assert float(diag[2]) == pytest.approx(float(want.theta), rel=1e-12)

        k_want = int(capacity_budget(c_old, table, cap))
        _, k_diag = tp.prefix_lengths(c_old, dense, tp.CAPACITY, lengths_cap=cap)
        assert int(k_diag[0]) == k_want

        got_top, _ = tp.prefix_lengths(c, dense, tp.TOPK, budget=k_want, lengths_cap=cap)
        assert got_top.tolist() == topk_schedule(c, k_want, table, cap).lengths.tolist()
        assert got_top.tolist() == async_schedule(c, c_old, table, cap, cap).lengths.tolist()


def test_extra_seconds_is_drafting_time_added_to_every_step(tp):
    gen = torch.Generator().manual_seed(5)
    table = tables()[1]
    for d in (2.0**-9, 2.0**-6, 2.0**-3):  # exact in fp32 (Triton's float scalars)
        c = torch.rand(9, 7, generator=gen).to(DEVICE)
        with_draft = lambda b, d=d: 1.0 / (1.0 / table.sps_many(b) + d)  # noqa: E731
        want = causal_schedule(c, with_draft)
        got, diag = tp.prefix_lengths(c, tp.dense_sps_for(table, 72, DEVICE), tp.CAUSAL,
                                      extra_seconds=d)
        assert got.tolist() == want.lengths.tolist()
        assert float(diag[2]) == pytest.approx(float(want.theta), rel=1e-12)
    # a sunk drafting cost makes verification relatively cheaper: never fewer tokens
    assert int(diag[0]) >= int(causal_schedule(c, table).admitted)


def test_lengths_are_prefixes_with_ties(tp):
    # Every confidence 1 (a = 1 everywhere): ties decided row-major, as the stable sort.
    table = SPSTable(b=[1, 4, 5, 64], sps=[10, 10, 7.4, 1])
    c = torch.ones(3, 4, device=DEVICE)
    dense = tp.dense_sps_for(table, 15, DEVICE)
    got, diag = tp.prefix_lengths(c, dense, tp.CAUSAL)
    want = causal_schedule(c, table)
    assert got.tolist() == want.lengths.tolist() == [1, 0, 0]
    got, _ = tp.prefix_lengths(c, dense, tp.TOPK, budget=6)
    assert got.tolist() == [4, 2, 0]


def test_empty_and_all_zero(tp):
    table = tables()[1]
    dense = tp.dense_sps_for(table, 64, DEVICE)
    got, diag = tp.prefix_lengths(torch.zeros(4, 7, device=DEVICE), dense, tp.CAUSAL)
    assert got.tolist() == [0, 0, 0, 0] and diag.tolist() == [0.0, 4.0, 4.0 * table.sps_at(4)]
    got, _ = tp.prefix_lengths(torch.zeros(0, 7, device=DEVICE), dense, tp.CAUSAL)
    assert got.numel() == 0


def test_bad_sizes(tp):
    dense = tp.dense_sps_for(tables()[1], 8, DEVICE)
    with pytest.raises(ValueError, match="needs 17"):
        tp.prefix_lengths(torch.rand(4, 3, device=DEVICE), dense)
    assert tp.fits(256, 7) and tp.fits(1024, 16) and not tp.fits(2048, 16)
    with pytest.raises(ValueError, match="exceed one program"):
        tp.prefix_lengths(torch.rand(2048, 16, device=DEVICE), dense)


if torch.cuda.is_available():

    def test_graphed_decider_equals_torch(tp):
        gen = torch.Generator().manual_seed(7)
        for mode, table in [(tp.CAUSAL, tables()[0]), (tp.CAUSAL, tables()[2]),
                            (tp.TOPK, tables()[1])]:
            dec = tp.GraphedDecider(table, 7, 64, "cuda", mode)
            for r in (64, 3, 17, 3):  # graphs per R, replayed with new inputs
                c = torch.rand(r, 7, generator=gen).cuda()
                if mode == tp.CAUSAL:
                    want = causal_schedule(c, table).lengths.tolist()
                    assert dec.decide(c) == want
                    d = 2.0**-7
                    with_d = lambda b, d=d, t=table: 1.0 / (1.0 / t.sps_many(b) + d)  # noqa: E731
                    assert dec.decide(c, extra_seconds=d) == \
                        causal_schedule(c, with_d).lengths.tolist()
                else:
                    assert dec.decide(c, budget=r) == topk_schedule(c, r, table).lengths.tolist()


    @pytest.mark.parametrize("mode", ["causal", "async"])
    def test_engine_scheduler_on_cuda_matches_cpu_with_narrow_blocks(mode):
        """The engine's VerificationScheduler on CUDA (graphed kernels, fixed width γ)
        decides as on CPU (torch) when the proposer drafts narrower blocks
        (draft_width): the GPU path pads them with survival 0."""
        from vllm_dspark.schedule.verification import Settings, VerificationScheduler

        table = tables()[2]
        gen = torch.Generator().manual_seed(3)
        scheds = {}
        for dev in ("cpu", "cuda"):
            sched = VerificationScheduler(Settings(mode, "t", draft_cost=2.0**-7), sps=table)
            sched.gamma, sched.max_requests = 7, 64
            scheds[dev] = sched
        for r, width in [(64, 7), (17, 3), (17, 1), (40, 7), (3, 5)]:
            c = torch.rand(r, width, generator=gen)
            got = scheds["cuda"].lengths(c.cuda())
            assert got == scheds["cpu"].lengths(c)
            assert max(got) <= width
        assert scheds["cuda"]._deciders  # the graphed path ran


if not RUN_HERE:  # on CPU the interpreter child collects these, not this process
    for _name in [n for n in list(globals()) if n.startswith("test_")]:
        if _name != "test_in_triton_interpreter":
            del globals()[_name]
