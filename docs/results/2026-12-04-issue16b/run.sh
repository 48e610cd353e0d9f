#!/usr/bin/env bash
# Issue 16, second training run: the default recipe's bigger store (320 standard-library prompts of 448 tokens +
# the target's 32-token completions, 20-minute data budget, the benchmark's own source files left out), then
# Medusa (default recipe: 4000 steps), then an EAGLE-3 layer warm-started from the target's last layer; one bench
# per sampling setting (HumanEval + nl, 10 prompts each, 48 tokens).
set -euo pipefail
cd "$(dirname "$0")/../../.."
verispec train medusa --target qwen2.5-coder-1.5b                      # builds the store (20 min), then trains
STORE=runs/train/medusa-qwen2.5-coder-1.5b/store
verispec train eagle --target qwen2.5-coder-1.5b --store $STORE --warm-start --minutes 30 --steps 700
M='ar,sd,eagle,eagle:tree=chain,eagle:nodes=8:top_k=2,medusa,medusa:tree=chain'
verispec bench --methods "$M" --dataset humaneval,nl --num-prompts 10 --max-new-tokens 48 --out runs/issue16b/greedy
verispec bench --methods ar,sd,eagle,eagle:tree=chain,medusa:tree=chain --dataset humaneval,nl --num-prompts 10 \
  --max-new-tokens 48 --no-cost-model --temperature 0.7 --out runs/issue16b/t07
