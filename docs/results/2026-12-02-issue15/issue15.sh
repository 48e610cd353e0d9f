#!/usr/bin/env bash
# Issue 15 runs (2-core Intel Xeon, AVX-512 VNNI / BF16, idle apart from these commands; run one at a time).
set -euo pipefail
verispec build-llamacpp            # once: llama.cpp's llama-server from the llama-cpp-python 0.3.36 sdist (~9 min)
# 1. the goals run: our methods on the gguf target next to llama.cpp on the same GGUF files, same prompts
verispec bench --dataset humaneval --num-prompts 10 --max-new-tokens 128 \
  --methods ar,sd,sd:gamma=6,sd:draft_vocab=32768,nasd+sd,sd:drafter_backend=gguf,llamacpp-ar,llamacpp-sd,llamacpp-sd:draft_max=16:p_min=0.75,llamacpp-sd:draft_max=8:p_min=0.5 \
  --compare-backends fast --out runs/issue15-final
# 2. the fp32 reference (the dequantized file on oneDNN fp32) on the same prompts: greedy agreement and pass@1
verispec bench --dataset humaneval --num-prompts 10 --max-new-tokens 128 --methods ar --backend fast \
  --no-cost-model --out runs/issue15-fp32ref
# 3. batch invariance of the real target on the gguf backend (chains k = 1..16 and token trees)
verispec invariance --model qwen2.5-coder-1.5b --backends gguf,fast --json runs/issue15-invariance.json
