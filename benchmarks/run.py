"""The one entry point of the benchmarks: the main benchmark, or any study by name.

    HF_HUB_OFFLINE=1 .venv/bin/python -m benchmarks.run [--quick] [--stages ...] [--fresh] ...   # the main benchmark
    HF_HUB_OFFLINE=1 .venv/bin/python -m benchmarks.run STUDY [options]                             # another study

``STUDY`` is a module of ``benchmarks/studies`` (``python -m benchmarks.run STUDY --help`` lists its options; the
same as ``python -m benchmarks.studies.STUDY``). Without a study name the arguments go to the main benchmark
(:mod:`benchmarks.studies.benchmark`).
"""

from __future__ import annotations

import importlib
import sys

STUDIES = (
    "benchmark",
    "calibration",
    "calibration_bias",
    "calibration_shift",
    "confusions",
    "descriptors",
    "icis_defaults",
    "left_out",
    "operating_point",
    "photo_wins",
    "prototype_rates",
    "row_bound",
    "row_identity",
    "row_signals",
    "scaling",
    "seeds",
    "uncertainty_gate",
    "zoo",
)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] in STUDIES:
        study, argv = argv[0], argv[1:]
        module = importlib.import_module(f"benchmarks.studies.{study}")
        module.main(argv, prog=f"benchmarks.run {study}")
        return
    if argv and argv[0] in ("-h", "--help"):
        print(__doc__.strip() + "\n\nStudies: " + ", ".join(STUDIES) + "\n\nThe main benchmark's options:\n")
    importlib.import_module("benchmarks.studies.benchmark").main(argv, prog="benchmarks.run")


if __name__ == "__main__":
    main()
