"""Layer kernels: drop-in replacements for `nn.Linear` that compute with packed or reduced-precision weights.

onednn.py (FastLinear: oneDNN pre-packed fp32 or bf16 weights), int8.py (torch dynamic int8), int4.py (Int4Linear:
4-bit group weights), q4kernel.py (verispec's AVX-512 VNNI 4-bit x int8 kernel, built on first use), cpu.py (what
the CPU can run). A backend (`verispec.backends`) decides which layers of a model get which kernel.
"""
