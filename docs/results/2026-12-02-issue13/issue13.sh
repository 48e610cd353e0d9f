#!/usr/bin/env bash
# issue 13 goals run: HumanEval + prose (nl), 10 prompts each, 48 new tokens; three conditions, one bench run each
set -x
cd /work/main
BASE="ar,sd:gamma=3,sd,sd:gamma=6,sd:policy=cost:gamma_max=8,sd:policy=cost:gamma_max=8:estimate=entropy,sd:policy=egag:gamma_max=8"
TREES="sd-tree:tree=2x2x1x1,sd-tree:tree=2x2x1x1:verifier=traversal"
python -m verispec bench --methods "$BASE,$TREES" --dataset humaneval,nl --num-prompts 10 --max-new-tokens 48 \
  --temperature 0.7 --seed 0 --out runs/issue13/T0.7
python -m verispec bench --methods "$BASE,sd-tree:tree=2x2x1x1" --dataset humaneval,nl --num-prompts 10 \
  --max-new-tokens 48 --no-cost-model --out runs/issue13/greedy
python -m verispec bench --methods "ar,sd:gamma=3,sd,sd:gamma=6,sd:policy=cost:gamma_max=8,$TREES" --dataset humaneval,nl \
  --num-prompts 10 --max-new-tokens 48 --temperature 1.0 --seed 0 --no-cost-model --out runs/issue13/T1.0
for d in greedy T1.0; do cp runs/issue13/T0.7/cost.json runs/issue13/$d/ && python -m verispec report runs/issue13/$d; done
echo DONE
