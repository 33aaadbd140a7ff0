"""Benchmark harness: stowage against CNCF Distribution's proxy, nginx and direct pulls.

Run with ``uv run --group bench python bench/run.py`` (see docs/benchmarks.md).
"""
