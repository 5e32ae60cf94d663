"""One module per study; each imports only :mod:`benchmarks.harness` and the library, never another study.

Each runs as ``python -m benchmarks.studies.NAME`` (or ``python -m benchmarks.run NAME``) and records its runs in
``benchmarks/results/NAME/``.
"""
