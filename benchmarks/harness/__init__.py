"""The benchmark harness: everything the studies share, and nothing study-specific.

* :mod:`~benchmarks.harness.data`: models, photos, folds, photo features, head data.
* :mod:`~benchmarks.harness.descriptors`: descriptor sources (``[1000, d]`` matrices, seen and new).
* :mod:`~benchmarks.harness.metrics`: ZSL / GZSL / cosine of injected rows, the oracle, ConSE's own rule, bounds.
* :mod:`~benchmarks.harness.methods`: the methods of the tables and :func:`~benchmarks.harness.methods.run_method`
  on the library's :func:`classifier_injection.core.predict_rows`.
* :mod:`~benchmarks.harness.calibration`: a fold's calibration context and the seen-class inner splits.
* :mod:`~benchmarks.harness.research_rules`: calibration rules that lost to the default (kept for their rows).
* :mod:`~benchmarks.harness.results`: ``benchmarks/results/<study>/`` (one JSON, a generated README).
* :mod:`~benchmarks.harness.plots`: PNG plots.

Studies (``benchmarks/studies/``) import the harness and the library, never each other.
"""
