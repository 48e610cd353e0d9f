"""Benchmark: datasets, runner, report."""
