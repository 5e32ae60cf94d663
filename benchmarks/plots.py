"""PNG plots of a benchmark report: per-method ZSL / S / U / H bars, and accuracy vs training time."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def plot_report(report: dict, directory: Path) -> list[Path]:
    """Write ``<name>_<model>_<source>_metrics.png`` and ``..._time.png`` per table; return the paths."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    written = []
    for model, sources in report["results"].items():
        for source, table in sources.items():
            names = list(table)
            stem = f"{report['name']}_{model}_{source}"
            fig, ax = plt.subplots(figsize=(max(6, 0.9 * len(names) + 2), 4))
            width = 0.2
            x = np.arange(len(names))
            for i, (metric, label) in enumerate((("zsl", "ZSL"), ("seen", "S"), ("unseen", "U"), ("h", "H"))):
                ax.bar(x + (i - 1.5) * width, [table[n]["mean"][metric] for n in names], width, label=label)
            ax.set_xticks(x, names, rotation=35, ha="right")
            ax.set_ylabel("top-1 (%)")
            ax.set_title(f"{model}, {source} (mean over folds)")
            ax.legend(ncol=4, fontsize=8)
            fig.tight_layout()
            written.append(directory / f"{stem}_metrics.png")
            fig.savefig(written[-1], dpi=110)
            plt.close(fig)

            fig, ax = plt.subplots(figsize=(6, 4))
            for name in names:
                if name == "oracle":
                    continue
                mean = table[name]["mean"]
                seconds = max(mean["fit_seconds"], 1e-2)  # log axis: training-free methods at 0.01 s
                ax.scatter(seconds, mean["zsl"], marker="o", color="C0")
                ax.scatter(seconds, mean["h"], marker="^", color="C1")
                ax.annotate(name, (seconds, mean["zsl"]), fontsize=7, xytext=(3, 3), textcoords="offset points")
            ax.scatter([], [], marker="o", color="C0", label="ZSL")
            ax.scatter([], [], marker="^", color="C1", label="H")
            ax.set_xscale("log")
            ax.set_xlabel("injector training time (s, log; 0.01 = no training)")
            ax.set_ylabel("top-1 (%)")
            ax.set_title(f"accuracy vs training time: {model}, {source}")
            ax.legend(fontsize=8)
            fig.tight_layout()
            written.append(directory / f"{stem}_time.png")
            fig.savefig(written[-1], dpi=110)
            plt.close(fig)
    return written
