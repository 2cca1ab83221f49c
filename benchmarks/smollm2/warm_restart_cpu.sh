#!/usr/bin/env bash
# What a warm restart costs (CPU, the tests' tiny bigram target): 300 steps in one run,
# against 150 steps, then a restart from the bf16 export alone (no train_state.pt: fresh
# AdamW, lr ramped over --rewarmup steps) to 300, and against the exact resume from
# train_state.pt. Prints the final validation loss of each. ≈ 10 min on 2 idle cores.
#
#   bash benchmarks/smollm2/warm_restart_cpu.sh [WORKDIR]
set -euo pipefail
W=${1:-/tmp/warm_restart_cpu}
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
mkdir -p "$W" && cd "$W"
export VLLM_CPU_KVCACHE_SPACE=1
python - "$ROOT" <<'EOF'
import json, random, sys
sys.path.insert(0, sys.argv[1] + "/tests")
from tiny_models import make_oracle_pair
make_oracle_pair(".", "qwen3", 0.0)
words = "the cat dog runs fast slow red blue green add sum code print list".split()
rng = random.Random(5)
with open("prompts.jsonl", "w") as f:
    for _ in range(800):
        f.write(json.dumps({"turns": [" ".join(rng.choice(words) for _ in range(rng.randint(3, 8)))]}) + "\n")
EOF
T=qwen3-bigram-target-s1
[ -f data/data.meta.json ] || python -m vllm_dspark.cli train --target $T --out . --data data \
  --prompts prompts.jsonl --generate-only --num-samples 800 --part-rows 400 \
  --max-answer-tokens 64 --answer-temperature 0 --max-len 256 > data.log 2>&1
C="--target $T --data data --gamma 4 --num-layers 1 --markov-rank 16 --batch-size 4 --anchors 16
   --max-len 256 --lr 3e-3 --warmup 5 --save-every 1000 --log-every 10 --steps 300"
run() { python -m vllm_dspark.cli train --out "$@" > /dev/null 2>&1; }
rm -rf one half exact warm*
run one $C
run half $C --pause-at 150
cp -r half exact && run exact $C
for rw in 0 5 10 20 50 150; do
  cp -r half warm$rw && rm warm$rw/train_state.pt && run warm$rw $C --rewarmup $rw
done
python - <<'EOF'
import json, os
base = json.load(open("one/training.json"))["validation"][-1]["loss"]
names = ["one", "exact"] + sorted((n for n in os.listdir(".") if n.startswith("warm")),
                                  key=lambda n: int(n[4:]))
for n in names:
    r = json.load(open(f"{n}/training.json"))
    v = r["validation"][-1]["loss"]
    what = ("one run" if n == "one" else "exact resume at 150" if n == "exact"
            else f"warm restart at 150, rewarmup {r['config']['rewarmup']}")
    print(f"{what:36s} val loss {v:.4f} ({100 * (v / base - 1):+.1f}%)")
EOF
