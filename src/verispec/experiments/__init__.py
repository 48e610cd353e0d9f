"""One-command experiments built on the benchmark runner (same timing, counting and reports)."""
