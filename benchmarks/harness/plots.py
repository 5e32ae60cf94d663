"""PNG plots: a benchmark report's per-method bars and accuracy vs training time, and the calibration trade-off."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from benchmarks.harness.user_regime import SCALES, f1


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


def plot_tradeoff(curves: dict[str, tuple[list[float], list[float]]], knob: tuple[float, ...], path: Path) -> None:
    """S against U of the ``new_class_scale`` knob, one curve per label (``{label: (s, u)}`` over ``knob``)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4.5))
    for label, (s, u) in curves.items():
        ax.plot(u, s, marker="o", label=label)
        default = knob.index(1.0)
        ax.annotate("1.0", (u[default], s[default]), textcoords="offset points", xytext=(4, 4), fontsize=7)
        ax.annotate(str(knob[-1]), (u[-1], s[-1]), textcoords="offset points", xytext=(4, 4), fontsize=7)
    ax.set_xlabel("U: accuracy on new classes (%)")
    ax.set_ylabel("S: accuracy on old classes (%)")
    ax.set_title("new_class_scale trade-off (default calibration)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_user_curves(report: dict, directory: Path) -> list[Path]:
    """``<name>_<model>_K<k>_pr.png``: precision against recall over ``new_class_scale`` per name regime.

    Curves for ICIS (the default) and the strongest baseline of each regime (best F1 at scale 1); the true rows
    as a point.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    for model, by_k in report["user"].items():
        for k, table in by_k.items():
            regimes = [r for r in table if r not in ("ceiling", "planned_draws")]
            fig, axes = plt.subplots(1, len(regimes), figsize=(5.5 * len(regimes), 4.5), squeeze=False)
            for ax, regime in zip(axes[0], regimes, strict=True):
                methods = table[regime]
                baselines = [m for m in methods if m != "icis"]
                shown = [m for m in ("icis",) if m in methods]
                if baselines:
                    shown.append(max(baselines, key=lambda m: f1(methods[m]["summary"])))
                for name in shown:
                    curve = methods[name]["curve"]
                    ax.plot([c["recall"] for c in curve], [c["precision"] for c in curve], marker="o", label=name)
                    default = next(c for c in curve if c["scale"] == 1.0)
                    ax.annotate(
                        "1.0",
                        (default["recall"], default["precision"]),
                        xytext=(4, 4),
                        textcoords="offset points",
                        fontsize=7,
                    )
                ceiling = table["ceiling"]["summary"]
                ax.scatter([ceiling["recall"]], [ceiling["precision"]], marker="*", s=120, color="k", label="true rows")
                ax.set_xlim(0, 100)
                ax.set_ylim(0, 100)
                ax.set_xlabel("recall: new photos top-1 for their class (%)")
                ax.set_ylabel("precision: right when a new class wins (%)")
                ax.set_title(f"{regime}, {ceiling['draws']} draws")
                ax.grid(alpha=0.3)
                ax.legend(fontsize=7)
            fig.suptitle(f"{model}, K = {k}: new_class_scale {SCALES[0]} to {SCALES[-1]}")
            fig.tight_layout()
            written.append(directory / f"{report['name']}_{model}_K{k}_pr.png")
            fig.savefig(written[-1], dpi=110)
            plt.close(fig)
    return written
