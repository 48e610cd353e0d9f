#!/usr/bin/env bash
# Issue 14 goals: one bench run per drafter pair (the cascade / staged / layer-skip rows with the 0.5B; uag with
# SmolLM2-135M), HumanEval + nl, 10 prompts each, 48 tokens, greedy; then the OSD A/B.
set -euo pipefail
cd "$(dirname "$0")/.."
verispec bench --methods ar,sd,cascade,cascade:horizontal=2,staged,layer-skip \
  --dataset humaneval,nl --num-prompts 10 --max-new-tokens 48 --no-cost-model --out runs/issue14/main
verispec bench --methods ar,uag --drafter smollm2-135m --dataset humaneval,nl --num-prompts 10 --max-new-tokens 48 \
  --no-cost-model --out runs/issue14/uag
# rerun of layer-skip after the prefill fix (a13bd91): the first run's layer-skip row had a misaligned drafter cache
verispec bench --methods ar,layer-skip --dataset humaneval,nl --num-prompts 10 --max-new-tokens 48 --no-cost-model \
  --out runs/issue14/layer-skip
