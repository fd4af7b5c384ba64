"""Sections of ``scripts/benchmark.py``: one module per measurement, one for the report.

Each section module has ``run(options) -> dict`` returning JSON-ready results for dagprune
(and, where the section compares tools, for the peers run through :mod:`benchmarks.peers`).
"""
