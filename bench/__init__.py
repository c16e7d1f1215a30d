"""Benchmarks: scripts that measure ssechat against its peers (not tests; never run in CI).

``python -m bench`` (or ``make bench``) runs them; see bench/RESULTS.md.
"""
