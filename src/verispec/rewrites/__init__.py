"""Model rewrites that keep a model's computation and change how it is carried out: fuse.py (q/k/v and gate/up
projections as one linear each) and lean.py (a drafter forward without transformers' per-call machinery)."""
