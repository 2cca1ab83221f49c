#!/usr/bin/env bash
# One GPU window's work for issues 15 and 16, run in the background on the machine so that
# no step waits on the next `device` call (the machine goes back after 30 s idle):
#
#   1. the round profile at c = 1 (benchmarks/gpu_round_profile.py; the GPU alone), then
#      the tree kernels' timings (benchmarks/tree_kernels_gpu.py);
#   2. the GPU tests (session.sh tests-bg) and the issue-16 data (gpu.sh data-in: the
#      committed parts; data-bg: the missing ones, 4 engines) side by side: correctness
#      and throughput, no timing; the tests run on through the training;
#   3. the issue-16 training recipe: probe, then `big` until DEADLINE (epoch seconds) less
#      90 s and EVAL_S, its schedule sized to that leg (a later machine can warm-restart
#      it: gpu.sh big-in + big-bg), then the scale table's points at 1/4 and 1/16 of its
#      steps (gpu.sh scale-fg); then each new drafter's τ through vLLM (gpu.sh eval).
#
#   DEADLINE=$(( $(date +%s) + 1200 )) bash benchmarks/gpu/window.sh start   # after install
#   bash benchmarks/gpu/window.sh poll [seconds] [what...]   # wait, then copy back results
#
# `poll` copies what is ready into $OUT: the profile JSON, the test log, the data (tar pieces
# + meta), the drafter's export and its eval ("what" picks: profile kernels tests data big
# eval trainings scale; `trainings`: the training.json of each evaluated drafter).
# Seen (2026-12-03): each profiled configuration costs ~2.3 min (engine start with graph
# capture), so the profile of 4 configurations alone takes ~9 min — PROFILE=0 / KERNELS=0
# skip it / the kernel timings. The machine goes back after 30 s without a call: keep a
# `poll` in flight the whole window (a bare machine starts over from the parts).
# Seen (2026-12-03 evening): a pause on this side longer than 30 s between calls (here an
# interrupted turn) loses the machine and everything on it — the `big` run of that window
# had finished (1053 steps) and was lost before `poll big` brought it back. Bring `big`
# back the moment it finishes (poll 1 big), before waiting on the scale points.
# Seen (2026-12-04): the recipe alone runs at 3.53 steps/s (the 1.671 probe had the GPU
# tests beside it), so `big` sized by PROBE_SPS=1.671 took 6 of the leg's ~19 minutes:
# size the leg with PROBE_SPS=3.5. Engines beside a 48 GB training run: the GPU tests at
# gpu_memory_utilization 0.5 failed vLLM's start-up check (free >= utilization x total;
# they now use 0.12 with a fixed 1 GiB KV cache), and eval engines at 0.1 got a negative
# KV budget (the profile counts the others' growth): eval runs at 0.2, staggered. One
# command brings back at most 8 files: `poll eval` copies the eval JSONs, not the
# training JSONs of the same tags (`poll 1 big` brought big's).
# Next window for issue 16 (the scale points exist): one longer `big`, the GPU tests beside it,
#   SCALE=0 PROFILE=0 KERNELS=0 PROBE_SPS=3.3 EVAL_S=240 DEADLINE=... window.sh start
# (3.3: the 3.53 measured alone, less what the tests beside it now take; an unfinished
# schedule still exports its weights when --max-minutes stops it).
# On an H100 (80 GB) the tests and a 48 GB training do not fit side by side: TESTS_ALONE=1
# runs the tests first, alone, TEST_WORKERS (3) files at a time; WARM_FROM=DIR continues
# an earlier drafter of the recipe (DIR: config.json, training.json, model.safetensors)
# instead of training `big` from scratch:
#   TESTS_ALONE=1 WARM_FROM=models/dspark-smollm2-135m PROFILE_CONFIGS=ours-tree SCALE=0 \
#     KERNELS=0 PROBE_SPS=3.3 EVAL_S=240 DEADLINE=... window.sh start
# Seen (2026-12-07, fourth session, H100): the whole GPU test list, 3 files at a time on
# the GPU alone, took ~25 min (104 of 105 done when the budget ended, 101 passed: log
# benchmarks/results/gpu_tests_v2_h100_2026-12-07b.log), all of a window that starts
# ~21 min before its budget ends. So the next window runs only the tests still owed (the
# two fixed ones, the tree case not reached, the served endpoint with the gate now on by
# default), then the sweep (the new default `ours` against `ours-nogate`, the graph patch
# against `ours-vllm-graphs`, tree mode since its changes), in one call after install:
#   TESTS_ALONE=1 TEST_WORKERS=2 TEST_K="graph_safe or tree_greedy or server" PROFILE=0 \
#     KERNELS=0 SCALE=0 SWEEP_ARGS="--configs plain upstream ours ours-nogate \
#       ours-vllm-graphs ours-tree --concurrency 1 8 32 64 128 --temperatures 0 1 \
#       --repeats 2 --min-seconds 2 --kv-gib 2.5" \
#     WARM_FROM=models/dspark-smollm2-135m PROBE_SPS=3.3 EVAL_S=240 DEADLINE=... window.sh start
# then `poll S tests`, `poll S sweep` (the training leg follows only if time is left).
# Seen (2026-12-07, evening, H100): that plan's tests took 7.6 min (18 passed, log
# benchmarks/results/gpu_tests_v2_h100_2026-12-07c.log), its sweep ~8 min (results/
# gpu_sweep_h100_2026-12-07b.*); the data leg then found the sweep's orphaned engine cores
# holding 28 GB (the sweep's engines now end their process groups). The gate drafted
# nearly every step where plain was faster (why: unmeasured; the skipped step's cost or
# the gate's learning speed). Since then: a skipped step skips the draft metadata build,
# tree mode captures its attention in the target's FULL graphs, the tree walk is one
# Triton launch. So the next window: the GPU tests of those changes (the chi-square with
# the gate and with trees, tree greedy on FULL and PIECEWISE graphs, the SmolLM2 tree
# pair, the FULL-graph and walk kernels, the tree step on CUDA), the profile at C = 128
# of plain / ours-skip / ours-nogate, then the sweep (ours-skip, the gate's skip share and
# trace; ours-tree on FULL graphs against ours-tree-piecewise at C <= 8):
#   PROFILE=1 PROFILE_CONFIGS="plain ours-skip ours-nogate" PROFILE_ARGS="--concurrency 128" \
#     TESTS_ALONE=1 TEST_WORKERS=2 KERNELS=0 SCALE=0 \
#     TEST_K="(sampled and (gate or tree)) or tree_greedy or decodes_to_dense or walk_over_draws or full_graph" \
#     SWEEP_ARGS="--configs plain upstream ours ours-nogate ours-skip ours-tree \
#       ours-tree-piecewise --cap ours-tree=8 ours-tree-piecewise=8 --concurrency 1 8 32 64 \
#       128 --temperatures 0 1 --repeats 2 --min-seconds 2 --kv-gib 2.5" \
#     WARM_FROM=models/dspark-smollm2-135m PROBE_SPS=3.3 EVAL_S=240 DEADLINE=... window.sh start
# (the profile first: ~2.3 min a configuration; drop it if the window is short).
# Seen (2026-12-07, sixth session): no machine came (H100 nor H200: 9 failed starts in
# 70 min cost 1 550 of the 1 800 s), so that plan is still owed, now with the tree
# step's host syncs removed (tree rows from V2's host counts, checks in the first step
# only, one compaction launch for all layers, ancestor masks built in the draft graph);
# add "or many_layers" to TEST_K. A window too short for the parts can still check the
# kernels on a bare machine: `bash benchmarks/gpu/session.sh kernel-tests` (one call).
# Issue 16's architecture rows (ARCH=1 below: seven drafters side by side at a light
# recipe, then their τ) need ~15 min after the install: a window of their own, e.g.
#   TESTS_ALONE=1 TEST_WORKERS=3 TEST_K="..." PROFILE=0 KERNELS=0 SCALE=0 ARCH=1 \
#     DEADLINE=... window.sh start      # then poll S tests, poll S arch
set -uo pipefail
export PYTHONPATH=/tmp/site:${PYTHONPATH:-} VLLM_USE_FLASHINFER_SAMPLER=0 PYTHONUNBUFFERED=1
G=/tmp/gpu; L=$G/window; mkdir -p $L
export OUT_KEEP=$L/out; mkdir -p $OUT_KEEP

case "$1" in
start)
  : "${DEADLINE:?set DEADLINE (epoch seconds) for the training leg}"
  setsid nohup bash -c '
    set -x
    [ "${PROFILE:-1}" = 1 ] && OUT=$OUT_KEEP bash benchmarks/gpu/session.sh profile > '$L'/profile.log 2>&1
    # KERNEL_ARGS narrows the timing (e.g. the split cases: --requests 1 8), KERNEL_JSON names it.
    [ "${KERNELS:-1}" = 1 ] && timeout ${KERNELS_S:-150} python3 benchmarks/tree_kernels_gpu.py --reps 20 ${KERNEL_ARGS:-} --out $OUT_KEEP/${KERNEL_JSON:-tree_kernels_h200.json} > '$L'/kernels.log 2>&1
    if [ "${TESTS_ALONE:-0}" = 1 ]; then
      # The GPU tests before the training, on the GPU alone, TEST_WORKERS files at a time:
      # the 80 GB of an H100 hold the 48 GB training run or the ~12 engines of one test, not both.
      TEST_WORKERS=${TEST_WORKERS:-3} bash benchmarks/gpu/session.sh tests-bg
      while kill -0 $(cat '$G'/tests.pid) 2>/dev/null; do sleep 5; done
      echo tests-done
    else
      bash benchmarks/gpu/session.sh tests-bg
    fi
    # SWEEP_ARGS: a gpu_sweep.py run on the GPU alone after the tests (timings), e.g.
    #   SWEEP_ARGS="--configs plain upstream ours ours-vllm-graphs --concurrency 32 64 128"
    if [ -n "${SWEEP_ARGS:-}" ]; then
      bash benchmarks/gpu/session.sh sweep-bg $SWEEP_ARGS
      while kill -0 $(cat '$G'/sweep.pid) 2>/dev/null; do sleep 5; done
      cp '$G'/gpu_sweep_h200* '$G'/sweep.log $OUT_KEEP/ 2>/dev/null
      echo sweep-done
    fi
    [ -f /tmp/pair/data60k/data.meta.json ] || bash benchmarks/smollm2/gpu.sh data-in
    # ARCH=1: the architecture rows of the scale table (issue 16), after the tests and the
    # sweep and instead of the `big` leg: the drafters of ARCH_SPECS side by side at a light
    # recipe (ARCH_RECIPE over the recipe, ARCH_STEPS each, own schedules), for the
    # minutes left before DEADLINE less ARCH_EVAL_S and 90 s (an unfinished schedule
    # still exports its weights; the table says at which step), then the τ of each
    # through vLLM (chain, γ 7, T 0 and 1), side by side. `poll S arch` brings back
    # one tar: each eval_<name>.json with its training_<name>.json.
    if [ "${ARCH:-0}" = 1 ]; then
      # 8 sequences x 128 anchors: ~1/8 of the recipe block tokens (~6 GB a run, by the
      # 48 GB of the recipe), so the seven fit an H100 side by side.
      specs=${ARCH_SPECS:-"A-L2R32:: A-L1::--num-layers_1 A-L3::--num-layers_3 A-R64::--markov-rank_64 A-R128::--markov-rank_128 A-gated::--markov-head-type_gated A-rnn::--markov-head-type_rnn"}
      arch_min=$(( ('$DEADLINE' - $(date +%s) - 90 - ${ARCH_EVAL_S:-420}) / 60 ))
      echo "architecture leg: $arch_min min of training"
      if [ $arch_min -ge 2 ]; then
        runs=()
        for spec in $specs; do
          name=${spec%%::*}; extra=$(echo "${spec#*::}" | tr _ " ")
          runs+=("$name:${ARCH_STEPS:-1500}:${ARCH_RECIPE:---batch-size 8 --anchors 128 --warmup 100} $extra")
        done
        VMIN=$arch_min SKIP_INSTALL=1 bash benchmarks/smollm2/gpu.sh variants-bg "${runs[@]}"
        for spec in $specs; do
          while kill -0 $(cat /tmp/pair/${spec%%::*}.pid) 2>/dev/null; do sleep 5; done
        done
        echo arch-trained
        i=0
        for spec in $specs; do
          name=${spec%%::*}
          [ -f /tmp/pair/$name/model.safetensors ] || continue
          OUT=$OUT_KEEP SKIP_INSTALL=1 bash benchmarks/smollm2/gpu.sh eval $name $name \
            --gpu-memory-utilization 0.11 > '$L'/eval_$name.log 2>&1 &
          sleep 10
        done
        wait
        tar -cf $OUT_KEEP/arch.tar -C $OUT_KEEP $(cd $OUT_KEEP && ls eval_A-*.json training_A-*.json 2>/dev/null)
      fi
      echo arch-done
    fi
    # The data is complete in the repository (data-bg then finds nothing to write); 3
    # shards put parts 2 and 6, the two once missing, on different engines (k % 3).
    SHARDS=${DATA_SHARDS:-3} GPU_MEM=0.35 bash benchmarks/smollm2/gpu.sh data-bg
    while kill -0 $(cat /tmp/pair/data.pid) 2>/dev/null; do sleep 5; done
    # PROBE_SPS (steps/s, measured before) skips the probe: 1.671 at the recipe on an
    # H200 (2026-12-03 evening, GPU tests beside it; peak 47 GB).
    if [ -n "${PROBE_SPS:-}" ]; then
      mkdir -p /tmp/pair/probe
      echo "{\"throughput\": {\"steps_per_s\": $PROBE_SPS}}" > /tmp/pair/probe/training.json
    else
      OUT=$OUT_KEEP bash benchmarks/smollm2/gpu.sh probe > '$L'/probe.log 2>&1
    fi
    # The leg ends EVAL_S before the deadline (less 90 s to bring results back). It holds
    # `big` and the two smaller points of the scale table (the same recipe at 1/4 and 1/16
    # of its steps, own schedules), one after the other: the steps of big are sized so all
    # three finish their schedules in the leg at the probed speed (1 + 1/4 + 1/16).
    # SCALE=0 (the scale table has its three points since 2026-12-04): `big` alone takes
    # the whole leg.
    leg=$(( '$DEADLINE' - $(date +%s) - 90 - ${EVAL_S:-210} ))
    share=1.3125; [ "${SCALE:-1}" = 0 ] && share=1
    steps=$(python3 -c "import json; t=json.load(open(\"/tmp/pair/probe/training.json\"))[\"throughput\"]; print(int(t[\"steps_per_s\"] * $leg * 0.93 / $share))")
    # WARM_FROM (a drafter directory of this recipe, e.g. the committed one): `big` warm-
    # restarts from its bf16 export (trainer doc) and trains the steps of the leg on top of it.
    if [ -n "${WARM_FROM:-}" ] && [ ! -f /tmp/pair/big/training.json ]; then
      mkdir -p /tmp/pair/big
      cp $WARM_FROM/config.json $WARM_FROM/training.json $WARM_FROM/model.safetensors /tmp/pair/big/
    fi
    prev=0
    [ -f /tmp/pair/big/training.json ] && prev=$(python3 -c "import json; print(json.load(open(\"/tmp/pair/big/training.json\"))[\"step\"])")
    steps=$(( prev + steps ))
    echo "training leg: $leg s, big: $steps steps (from step $prev)"
    if [ $leg -ge 120 ]; then
      STEPS=$steps SKIP_INSTALL=1 bash benchmarks/smollm2/gpu.sh big-bg $(( leg / 60 + 1 ))
      echo started-big
      while kill -0 $(cat /tmp/pair/big.pid) 2>/dev/null; do sleep 5; done
      [ "${SCALE:-1}" = 1 ] && SKIP_INSTALL=1 bash benchmarks/smollm2/gpu.sh scale-fg $steps
      echo scale-done
    fi
    # τ of each new drafter through vLLM (V2, the plugin; chain at γ 7, T 0 and 1), side
    # by side, and of `big` through upstream vLLM (plugin disabled): four engines at 0.2 of
    # the GPU each, started 15 s apart (the GPU tests may still hold 0.12 + 1 GiB).
    for pair in big:final big:final-upstream SEQ4:seq4 SEQ16:seq16; do
      [ -f /tmp/pair/${pair%%:*}/model.safetensors ] || continue
      up=""; [ "${pair##*-}" = upstream ] && up=--upstream
      OUT=$OUT_KEEP SKIP_INSTALL=1 bash benchmarks/smollm2/gpu.sh eval ${pair%%:*} ${pair##*:} \
        --gpu-memory-utilization 0.2 $up > '$L'/eval_${pair##*:}.log 2>&1 &
      sleep 15
    done
    wait
    echo eval-done
  ' > $L/window.log 2>&1 < /dev/null &
  echo $! > $L/window.pid; echo "window started (pid $(cat $L/window.pid))" ;;
poll)
  limit=${2:-500}; shift 2 2>/dev/null || shift
  t=0
  while [ $t -lt $limit ]; do
    ready=1
    for w in "$@"; do
      case $w in
        profile) [ -f $OUT_KEEP/gpu_round_profile_h200.json ] || ready=0 ;;
        tests) kill -0 "$(cat $G/tests.pid 2>/dev/null)" 2>/dev/null && ready=0 ;;
        data) kill -0 "$(cat /tmp/pair/data.pid 2>/dev/null)" 2>/dev/null && ready=0 ;;
        big) { [ -f /tmp/pair/big.pid ] && ! kill -0 "$(cat /tmp/pair/big.pid)" 2>/dev/null; } || ready=0 ;;
        eval) grep -q eval-done $L/window.log || ready=0 ;;
        sweep) grep -q sweep-done $L/window.log || ready=0 ;;
        arch) grep -q arch-done $L/window.log || ready=0 ;;
      esac
    done
    [ $ready = 1 ] && break
    sleep 5; t=$((t+5))
  done
  tail -n 15 $L/window.log
  for w in "$@"; do
    case $w in
      profile) cp $OUT_KEEP/gpu_round_profile_h200.json $L/profile.log $OUT/ 2>/dev/null; tail -n 8 $L/profile.log ;;
      tests) cp $G/tests.log $OUT/gpu_tests_v2_h200.log 2>/dev/null; tail -n 30 $G/tests.log
             [ -d $G/failures ] && tar -cf $OUT/gpu_test_failures.tar -C $G failures ;;
      data) bash benchmarks/smollm2/gpu.sh data-wait 1; tail -n 5 /tmp/pair/data.log ;;
      big) bash benchmarks/smollm2/gpu.sh big-wait 1; cp $OUT_KEEP/training_probe.json $OUT/ 2>/dev/null ;;
      eval) cp $OUT_KEEP/eval_*.json $OUT/ 2>/dev/null; tail -n 6 $L/eval_*.log ;;
      trainings) cp $OUT_KEEP/training_*.json $OUT/ 2>/dev/null; ls $OUT_KEEP ;;
      scale) for d in 4 16; do tail -n 2 /tmp/pair/SEQ$d.log | tr '\r' '\n' | tail -n 2; done ;;
      kernels) cp $OUT_KEEP/tree_kernels_*.json $L/kernels.log $OUT/ 2>/dev/null; tail -n 5 $L/kernels.log ;;
      sweep) cp $OUT_KEEP/gpu_sweep_h200* $OUT_KEEP/sweep.log $OUT/ 2>/dev/null; tail -n 12 $OUT_KEEP/sweep.log ;;
      arch) cp $OUT_KEEP/arch.tar $OUT/ 2>/dev/null; tail -n 3 $L/eval_A-*.log 2>/dev/null
            for f in /tmp/pair/A-*.log; do echo "$f: $(tail -c 300 $f | tr '\r' '\n' | tail -n 1)"; done ;;
    esac
  done
  nvidia-smi --query-gpu=memory.used,utilization.gpu --format=csv,noheader ;;
esac
