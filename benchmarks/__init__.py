"""Benchmarks: runnable scripts that print a table and write their section of docs/benchmarks.md.

``python -m benchmarks`` (or ``make bench``) runs them all and regenerates the whole report.
"""
