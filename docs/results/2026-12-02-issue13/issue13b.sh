#!/usr/bin/env bash
# issue 13, second tree run: level-by-level tree drafting (commit 047bc38), narrower and deeper trees, T = 0.7
set -x
cd /work/main
python -m verispec bench --methods "ar,sd:gamma=6,sd-tree:tree=2x1x1x1x1x1:gamma=6,sd-tree:tree=2x1x1x1x1x1:gamma=6:verifier=traversal" \
  --dataset humaneval,nl --num-prompts 10 --max-new-tokens 48 --temperature 0.7 --seed 0 --out runs/issue13/T0.7-trees
echo DONE
