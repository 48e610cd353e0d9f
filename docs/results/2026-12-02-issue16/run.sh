#!/usr/bin/env bash
# Issue 16: trained drafters on this CPU. One feature store (the target's own completions of 160 standard-library
# prompts: 96 prompt + 48 generated tokens each, 22,839 tokens), then Medusa, EAGLE-1 and blockwise heads on it,
# then one bench run per sampling setting (HumanEval + nl, 10 prompts each, 48 tokens).
set -euo pipefail
cd "$(dirname "$0")/../../.."
verispec train medusa --target qwen2.5-coder-1.5b --minutes 55 --data-minutes 25      # builds the store, then trains
STORE=runs/train/medusa-qwen2.5-coder-1.5b/store
verispec train eagle --target qwen2.5-coder-1.5b --store $STORE --fusion eagle1 --minutes 12
verispec train blockwise --target qwen2.5-coder-1.5b --store $STORE --minutes 8
M='ar,sd,medusa,medusa:tree=0;0.0;1;2;0.1;0.0.0,medusa:tree=chain,blockwise,eagle,eagle:tree=chain,eagle:nodes=6:top_k=2'
verispec bench --methods "$M" --dataset humaneval,nl --num-prompts 10 --max-new-tokens 48 --no-cost-model \
  --out runs/issue16/greedy
# after the int4 drafting weights (weights=auto: int4 for folders): the trained drafters again, then T = 0.7
verispec bench --methods ar,medusa,medusa:tree=chain,blockwise,eagle,eagle:tree=chain --dataset humaneval,nl \
  --num-prompts 10 --max-new-tokens 48 --no-cost-model --out runs/issue16/greedy-int4
verispec bench --methods ar,sd,medusa:tree=chain,eagle:tree=chain,eagle --dataset humaneval,nl --num-prompts 10 \
  --max-new-tokens 48 --no-cost-model --temperature 0.7 --out runs/issue16/t07
