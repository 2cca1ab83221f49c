#!/usr/bin/env bash
# The SmolLM2-135M benchmark pair on the lent GPU machine, step by step.
# Each step is one `device` call (≤ 10 min); state lives in /tmp/pair while the
# machine stays warm (≤ 30 min a machine). Run from the repository root.
#
# Set-up: vLLM 0.32 + the project + the target, either as benchmarks/gpu/session.sh does
# (`recv qNN` per part, then `install`: target at /tmp/gpu/smollm2, used when present), or
# with the older kit below (`setup`: .gpu/kit.sh, the GGUF halves, the gguf wheel).
#
# Issue 16, a drafter that pays (the intended H200 recipe; every step resumable):
#   bash benchmarks/smollm2/gpu.sh data-bg      # 60 k Magpie conversations, 8 parts, 4 engines
#   bash benchmarks/smollm2/gpu.sh data-wait    # poll ≤ 9 min; brings back parts (a tar) + meta
#   (next machine) bash benchmarks/smollm2/gpu.sh data-in    # carry .gpu/data60k: the parts back in
#   bash benchmarks/smollm2/gpu.sh probe        # 40 steps of the recipe: steps/s, peak memory
#   bash benchmarks/smollm2/gpu.sh big-bg       # the recipe, steps sized by the probe to 22 min
#   bash benchmarks/smollm2/gpu.sh big-wait     # poll ≤ 9 min; brings back the bf16 export
#   (next machine) bash benchmarks/smollm2/gpu.sh big-in; ... big-bg  # warm restart, same steps
#   bash benchmarks/smollm2/gpu.sh variants-bg NAME:STEPS:"ARGS" ...   # ablations side by side
#   bash benchmarks/smollm2/gpu.sh variants-wait NAME ...
#   bash benchmarks/smollm2/gpu.sh eval NAME TAG [args]   # + training_TAG.json for scale_table.py
# What comes back is carried in again from the ignored .gpu/ (CARRY): .gpu/data60k/ (the
# parts and data.meta.json, ≈ 25 MB) and .gpu/big/ (config.json, training.json, the
# weights in two pieces, their sha256), each in its own call: with the repository's own
# ~26 MB, the two together are over the 64 MiB a call carries.
# The scale table (benchmarks/smollm2/scale_table.py, run here): the final recipe `big`
# (steps S from the probe), the same recipe at S/16 and S/4 (variants-bg SEQ16:$((S/16))
# SEQ4:$((S/4)): own schedules, ≥ 10× apart), the DFlash-like ablation at the final
# recipe (R0:S:"--markov-rank 0"), and architectures at a lighter recipe side by side
# (e.g. L1:2000:"--num-layers 1 --batch-size 16 --anchors 128", L3, R64, R128, gated, rnn
# likewise); then eval each (T 0 and 1, γ 7) and
#   python benchmarks/smollm2/scale_table.py OUT/eval_*.json --readme benchmarks/README.md
#
# The committed pair (2026-11-22, H100), as it was made:
#   bash benchmarks/smollm2/gpu.sh setup         # kit + project + target (≈ 1 min after parts)
#   bash benchmarks/smollm2/gpu.sh data          # Magpie prompts + regenerated answers (4.6 min)
#   bash benchmarks/smollm2/gpu.sh data-carried  # or: the data of an earlier machine
#   bash benchmarks/smollm2/gpu.sh pair-bg; bash benchmarks/smollm2/gpu.sh wait-pair
#   bash benchmarks/smollm2/gpu.sh eval-all      # ours, ablation, upstream
#   (train NAME STEPS [args] / eval NAME TAG [args] are the single steps)
set -euo pipefail
export PYTHONPATH=/tmp/site:${PYTHONPATH:-} VLLM_USE_FLASHINFER_SAMPLER=0 PYTHONUNBUFFERED=1
P=${P:-/tmp/pair}
CARRY=${CARRY:-.gpu}  # where carried inputs lie in the working tree (data60k/, big/)
if [ -z "${TGT:-}" ]; then
  if [ -f /tmp/gpu/smollm2/config.json ]; then TGT=/tmp/gpu/smollm2; else TGT=$P/smollm2-135m-instruct; fi
fi
mkdir -p $P "${OUT:-/tmp/out}"
OUT=${OUT:-/tmp/out}
DATA=$P/data60k
NSAMPLES=${NSAMPLES:-60000} PART_ROWS=${PART_ROWS:-7500} SHARDS=${SHARDS:-4}
# The intended recipe (issue 16): the committed drafter's architecture (2 layers, vanilla
# Markov head rank 32, confidence head: 22.5 MB bf16, under the 25 MB a committed drafter
# may weigh), γ 7, 256 anchors × 32 sequences a step (≤ 8 k blocks, ≤ 57 k block tokens:
# ~4× the committed pair's 2 k blocks). Memory, estimated: the vocabulary-wide loss terms
# keep ~1.1 MiB per block token for the backward pass (train_sizes.py --memory 2 32 512,
# fp32 on CPU), ≤ 60 GiB, plus ~9 GiB of the target's bf16 logits: under the H200's
# 139 GiB; the probe prints the real peak (raise --batch-size if it is far below).
# lr 1e-3 with 200 warm-up steps, cosine to 10 %, over the 60 k conversations for as
# many steps as 22 minutes hold at the probed speed.
RECIPE=${RECIPE:-"--gamma 7 --num-layers 2 --num-feature-layers 3 --markov-rank 32
  --markov-head-type vanilla --batch-size 32 --anchors 256 --max-len 1024 --lr 1e-3 --warmup 200
  --seed 0 --save-every 500"}
MINUTES=${MINUTES:-22}
# The data plan, given to every train call on $DATA: an incomplete directory is then
# finished with the same recipe instead of being refused for another one.
DATA_PLAN="--num-samples $NSAMPLES --part-rows $PART_ROWS --data-shards $SHARDS --max-num-seqs 1024"

refresh() {  # this checkout's vllm_dspark into /tmp/site (SKIP_INSTALL=1: use it in place)
  [ -n "${SKIP_INSTALL:-}" ] && return 0
  python3 -m pip install -q --no-deps --no-build-isolation --upgrade --target /tmp/site . 2>&1 | grep -v WARNING || true
}

poll() {  # poll NAME [seconds]: wait for $P/NAME.pid to end, at most the given time
  local name=$1 limit=${2:-540} t=0
  while kill -0 "$(cat $P/$name.pid)" 2>/dev/null && [ $t -lt $limit ]; do sleep 5; t=$((t+5)); done
  if kill -0 "$(cat $P/$name.pid)" 2>/dev/null; then echo "$name: still running"; else echo "$name: done"; fi
  tail -n 5 $P/$name.log | tr '\r' '\n' | tail -n 5
}

bring_back() {  # bring_back DIR SUBDIR: a drafter's export to $OUT/SUBDIR; the weights
  # (22.4 MB bf16 for the recipe's drafter) in pieces of 15 MB, under the 16 MiB a file may be
  mkdir -p $OUT/$2
  cp $1/config.json $1/training.json $OUT/$2/
  split -b 15000000 $1/model.safetensors $OUT/$2/model.safetensors.part_
  sha256sum $1/model.safetensors | tee $OUT/$2/model.safetensors.sha256
  cp $1/loss.png $OUT/$2/ 2>/dev/null || true
  python3 -c "import json,sys; r=json.load(open(sys.argv[1])); print({k: r.get(k) for k in ('finished','step','steps','sequences_seen','epochs_seen','seconds','throughput')}); print('val', r['validation'][-1].get('tau_greedy_est'))" $1/training.json
}

case "$1" in
setup)
  bash .gpu/kit.sh install
  python3 -m pip install -q --no-deps --no-compile --target /tmp/site .gpu/gguf-*.whl
  python3 -m pip install -q --no-deps --no-build-isolation --target /tmp/site .
  cat .gpu/gguf_part_* > $P/smollm2.gguf
  python3 -m vllm_dspark.cli build-target smollm2 --gguf $P/smollm2.gguf --out $TGT
  nvidia-smi --query-gpu=name,memory.total --format=csv | tee $OUT/gpu.txt
  ;;
data-bg)
  # 60 k Magpie prompts written by the target (topic hints: math, code, chat, writing),
  # answers regenerated by the target (T 0.2, top-p 0.9, ≤ 512 tokens), the reference
  # prompt sets excluded (the package's; data.meta.json lists them), seed 0; 8 parts of
  # 7.5 k prompts (≈ 3 MB each), each written whole. A rerun skips the parts written.
  # Time: the committed pair's 10 k took 277 s on an H100 (V1 runner then); at that rate
  # 60 k take ~28 min, so this runs across calls and, if need be, machines (data-wait
  # brings back the parts written so far; data-in + data-bg on the next machine goes on).
  # vLLM's own GPU runner (V2) for this plain generation: the plugin's tools default to V1.
  refresh
  VLLM_USE_V2_MODEL_RUNNER=${VLLM_USE_V2_MODEL_RUNNER:-1} \
  # SHARDS engines side by side (each every SHARDS-th part, its share of GPU_MEM): one
  # engine of this small target is host-bound.
  setsid nohup python3 -m vllm_dspark.cli train --target $TGT --out $P/big --data $DATA \
    --generate-only --num-samples $NSAMPLES --part-rows $PART_ROWS --max-num-seqs 1024 --seed 0 \
    --data-shards $SHARDS --gpu-memory-utilization ${GPU_MEM:-0.6} \
    > $P/data.log 2>&1 < /dev/null & echo $! > $P/data.pid
  ;;
data-wait)
  poll data "${2:-540}"
  # The parts as one tar in pieces of 15 MB (a command brings back at most 8 files).
  mkdir -p $OUT/data60k && tar -cf - -C $DATA --exclude='*.tmp' . \
    | split -b 15000000 -d -a 1 - $OUT/data60k/data.tar.
  cp $DATA/data.meta.json $OUT/data60k/ 2>/dev/null || true
  python3 -c "import json,sys; m=json.load(open(sys.argv[1])); print('complete', m['complete'], m['num_rows'], 'rows', m['answer_tokens'], 'answer tokens', [(p['index'], p['rows'], p['seconds']) for p in m['parts']])" $DATA/data.meta.json || true
  ls -la $OUT/data60k
  ;;
data-in)
  # The parts of an earlier machine: committed in benchmarks/smollm2/data (all 8 parts,
  # 2026-12-02/03, H200), else carried in .gpu/data60k as data-wait brought them back.
  mkdir -p $DATA
  if [ -f $CARRY/data60k/data.tar.0 ]; then cat $CARRY/data60k/data.tar.* | tar -xf - -C $DATA
  else cp benchmarks/smollm2/data/data* $DATA/; fi
  ls $DATA
  ;;
probe)
  # 40 steps of the recipe on a scratch directory: steps/s and peak GPU memory.
  refresh
  rm -rf $P/probe
  python3 -m vllm_dspark.cli train --target $TGT --out $P/probe --data $DATA $DATA_PLAN $RECIPE \
    --steps 40 --warmup 10 --save-every 1000 --log-every 10 2>&1 | tr '\r' '\n' | tail -n 3
  python3 -c "import json; t=json.load(open('$P/probe/training.json'))['throughput']; print(t); print('steps in $MINUTES min:', int(t['steps_per_s']*60*$MINUTES*0.95))"
  cp $P/probe/training.json $OUT/training_probe.json
  ;;
big-bg)
  # The recipe for MINUTES (22) of training at the probed speed; after big-in (a warm
  # restart on a new machine) the steps of the carried training.json are kept.
  if [ -n "${STEPS:-}" ]; then
    steps=$STEPS  # sized by the caller (window.sh: the leg shared with the scale points)
  elif [ -f $P/big/training.json ]; then
    steps=$(python3 -c "import json; print(json.load(open('$P/big/training.json'))['steps'])")
  else
    steps=$(python3 -c "import json; t=json.load(open('$P/probe/training.json'))['throughput']; print(int(t['steps_per_s']*60*$MINUTES*0.95))")
  fi
  echo "steps: $steps"
  setsid nohup python3 -m vllm_dspark.cli train --target $TGT --out $P/big --data $DATA $DATA_PLAN $RECIPE \
    --steps "$steps" --max-minutes "${2:-9}" > $P/big.log 2>&1 < /dev/null & echo $! > $P/big.pid
  ;;
big-wait)
  poll big "${2:-560}"
  bring_back $P/big big
  ;;
big-in)
  # The export of an earlier machine (.gpu/big: config.json, model.safetensors,
  # training.json): `big-bg` then warm-restarts from it (fresh optimizer, lr ramp).
  # The weights come as the pieces bring_back wrote (model.safetensors.part_aa, _ab).
  mkdir -p $P/big && cp $CARRY/big/config.json $CARRY/big/training.json $P/big/
  cat $CARRY/big/model.safetensors.part_* > $P/big/model.safetensors
  want=$(cut -d' ' -f1 $CARRY/big/model.safetensors.sha256)
  have=$(sha256sum $P/big/model.safetensors | cut -d' ' -f1)
  [ "$want" = "$have" ] || { echo "big-in: model.safetensors does not match its sha256"; exit 1; }
  echo "big-in: warm restart from step $(python3 -c "import json; print(json.load(open('$P/big/training.json'))['step'])")"
  ;;
variants-bg)
  # variants-bg NAME:STEPS:"ARGS" ...: drafters trained side by side on the data, each
  # with the recipe overridden by ARGS (later options win), e.g.
  #   L1:2000:"--num-layers 1"  L3:2000:"--num-layers 3"  R0:2000:"--markov-rank 0"
  #   R64:2000:"--markov-rank 64"  gated:2000:"--markov-head-type gated"
  shift
  for spec in "$@"; do
    IFS=: read -r name steps extra <<< "$spec"
    # shellcheck disable=SC2086
    setsid nohup python3 -m vllm_dspark.cli train --target $TGT --out $P/$name --data $DATA $DATA_PLAN \
      $RECIPE --steps "$steps" --max-minutes "${VMIN:-9}" $extra > $P/$name.log 2>&1 < /dev/null &
    echo $! > $P/$name.pid
    sleep 2
  done
  ;;
scale-fg)
  # scale-fg STEPS: the scale table's smaller points, the recipe with its own schedule at
  # STEPS/4 and STEPS/16 (SEQ4, SEQ16: ≥ 10× apart with `big` at STEPS), one after the
  # other in the foreground (each as big: the GPU is busy with one), warm-up scaled down.
  s=$2
  for d in 4 16; do
    n=$(( s / d )); w=$(( n / 10 < 200 ? n / 10 : 200 ))
    # shellcheck disable=SC2086
    python3 -m vllm_dspark.cli train --target $TGT --out $P/SEQ$d --data $DATA $DATA_PLAN \
      $RECIPE --steps $n --warmup $w --max-minutes "${VMIN:-9}" > $P/SEQ$d.log 2>&1 < /dev/null
  done
  ;;
variants-wait)
  shift
  for name in "$@"; do poll $name "${VWAIT:-540}"; done
  for name in "$@"; do
    mkdir -p $OUT/$name && cp $P/$name/config.json $P/$name/training.json $OUT/$name/
    cp $P/$name/loss.png $OUT/$name/ 2>/dev/null || true
  done
  ;;
data-carried)
  # The data written by `data` on an earlier machine, carried back (gzip, 4 MB).
  mkdir -p $P/data && gunzip -c .gpu/data.jsonl.gz > $P/data/data.jsonl
  ;;
data)
  # The exact data recipe of the committed pair: 10k Magpie prompts written by the target
  # (topic hints: math, code, chat, writing), answers regenerated by the target (T=0.2,
  # top-p 0.9, ≤512 tokens), evaluation prompts excluded. Seed 0. (It wrote one
  # data.jsonl then; the generator now writes parts: data/data-00000.jsonl.gz.)
  python3 -m vllm_dspark.cli train --target $TGT --out $P --data $P/data --generate-only \
    --num-samples 10000 --seed 0
  cp $P/data/data.meta.json $OUT/
  ;;
train)
  name=$2 steps=$3; shift 3
  python3 -m vllm_dspark.cli train --target $TGT --out $P/$name --data $P/data \
    --gamma 7 --num-layers 2 --num-feature-layers 3 --batch-size 16 --anchors 128 \
    --max-len 1024 --lr 1e-3 --warmup 100 --seed 0 --steps "$steps" --save-every 500 "$@"
  ;;
pair-bg)
  # The committed pair, exactly as trained (2026-11-22, H100): ours (vanilla Markov
  # head, rank 32) and the DFlash-like ablation (markov_rank 0), same recipe, side
  # by side on one GPU; both finished their 1000 steps in ~4 min.
  setsid nohup bash $0 train dspark-smollm2 1000 --markov-rank 32 --max-minutes 8.4 \
    > $P/ours.log 2>&1 < /dev/null & echo $! > $P/ours.pid
  setsid nohup bash $0 train dflash-ablation 1000 --markov-rank 0 --max-minutes 8.1 \
    > $P/abl.log 2>&1 < /dev/null & echo $! > $P/abl.pid
  ;;
wait-pair)
  for n in ours abl; do while kill -0 $(cat $P/$n.pid) 2>/dev/null; do sleep 3; done; done
  tail -2 $P/ours.log $P/abl.log
  for n in dspark-smollm2 dflash-ablation; do
    mkdir -p $OUT/$n && cp $P/$n/config.json $P/$n/training.json $OUT/$n/
    split -b 15000000 $P/$n/model.safetensors $OUT/$n/model.part_
    sha256sum $P/$n/model.safetensors
  done
  ;;
eval)
  # eval NAME TAG [args]: acceptance on 40 prompts of each reference set (the package's),
  # T=0 and T=1, chain drafting at the draft's γ, no scheduler. The drafter's
  # training.json comes back beside the eval as training_TAG.json, which
  # benchmarks/smollm2/scale_table.py reads (sequences seen, architecture).
  name=$2 tag=$3; shift 3
  python3 -m vllm_dspark.cli eval --target $TGT \
    --draft $P/$name --datasets gsm8k humaneval math500 mbpp mt-bench --num-prompts 40 \
    --max-tokens 256 --temperatures 0 1 --seed 0 --out $OUT/eval_$tag.json "$@"
  cp $P/$name/training.json $OUT/training_$tag.json
  ;;
eval-all)
  # As run for benchmarks/smollm2/results: ours (V1 runner, this plugin) and the
  # ablation side by side, then upstream vLLM's own DSpark (V2 runner, plugin
  # disabled) on our drafter alone (beside the other two its KV cache did not fit).
  m="--gpu-memory-utilization 0.25 --num-prompts 24"
  bash $0 eval dspark-smollm2 ours $m > $P/ev_ours.log 2>&1 & a=$!
  sleep 5; bash $0 eval dflash-ablation ablation $m > $P/ev_abl.log 2>&1 & b=$!
  wait $a $b || true
  bash $0 eval dspark-smollm2 upstream --upstream --gpu-memory-utilization 0.6 \
    --num-prompts 24 > $P/ev_up.log 2>&1 || true
  tail -n 12 $P/ev_ours.log $P/ev_abl.log $P/ev_up.log
  ;;
*) echo "unknown step $1"; exit 2 ;;
esac
