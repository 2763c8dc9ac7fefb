"""The rollingq benchmark suite (``pytest benchmarks/``); see ``benchmarks/README.md``.

A package so that its helpers import as ``benchmarks._arith`` etc. from the
suite and from ``tests/test_bench_arithmetic.py``.
"""
