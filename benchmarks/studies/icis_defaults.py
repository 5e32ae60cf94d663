"""How the library's ICIS defaults were chosen: on held-out *seen* classes, never on test photos.

Within the 800 seen classes of fold 0 (lite0 head, MiniLM descriptors: "a photo of a {name}." by default,
``--descriptors default`` for the library's "{name}: {definition}", new classes described by a look-up of their
name as :func:`~classifier_injection.inject` does), 160 classes are
held out at random (``RandomState(split)``); each configuration is trained on the other 640 rows and predicts the
160 held-out rows. Image-free scores: mean cosine between predicted and true rows, and row retrieval (the
fraction of held-out classes whose predicted row is closest, by cosine, to its own true row among the 160), and
the cosine of a predicted row to its nearest kept row (a new row that looks like an old class steals its photos).
Training time is reported as a ratio to the paper's settings, measured in the same run.

Run: ``.venv/bin/python -m benchmarks.studies.icis_defaults [--splits 1 2 3] [--skip-paper] [--descriptors default]
[--configs NAME ...] [--out icis_defaults]`` (results: ``benchmarks/results/icis_defaults/``)
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import replace

import numpy as np
import torch
import torch.nn.functional as F

from benchmarks.harness.data import fold_classes, head_data
from benchmarks.harness.descriptors import load_descriptors
from benchmarks.harness.methods import lite0_feature_statistics
from benchmarks.harness.research_injectors import FeatureSeparatedICIS, SeparatedICIS
from benchmarks.harness.results import command_line, record, study_parser
from classifier_injection import ICISConfig, ICISInjector

STUDY = "icis_defaults"

CONFIGS: dict[str, ICISConfig] = {
    "paper (E=2048, batch 16, lr 1e-5)": ICISConfig.paper(),
    "library default": ICISConfig(),
    "default, E=2048": replace(ICISConfig(), latent_dim=2048),
    "default, E=128": replace(ICISConfig(), latent_dim=128),
    "default, centred": replace(ICISConfig(), center=True),
    "default, batch 64, lr 1e-3": replace(ICISConfig(), batch_size=64, lr=1e-3),
    "linear row decoder, no dropout (paper's decoder)": replace(ICISConfig(), row_decoder="linear", dropout=0.0),
    "linear row decoder, dropout 0.3": replace(ICISConfig(), row_decoder="linear"),
    "mixture row decoder, no dropout": replace(ICISConfig(), dropout=0.0),
    "mixture row decoder, dropout 0.5": replace(ICISConfig(), dropout=0.5),
    "mixture, E=1024": replace(ICISConfig(), latent_dim=1024),
    "fixed 30 epochs": replace(ICISConfig(), max_epochs=30, early_stop_slope=0.0),
    "fixed 40 epochs": replace(ICISConfig(), max_epochs=40, early_stop_slope=0.0),
    "fixed 50 epochs": replace(ICISConfig(), max_epochs=50, early_stop_slope=0.0),
    "lr 6e-3, fixed 30 epochs": replace(ICISConfig(), lr=6e-3, max_epochs=30, early_stop_slope=0.0),
    "lr 1e-2, fixed 20 epochs": replace(ICISConfig(), lr=1e-2, max_epochs=20, early_stop_slope=0.0),
    "batch 128": replace(ICISConfig(), batch_size=128),
    "batch 64": replace(ICISConfig(), batch_size=64),
    "batch 64, lr 1.5e-3": replace(ICISConfig(), batch_size=64, lr=1.5e-3),
    "batch 64, fixed 25 epochs": replace(ICISConfig(), batch_size=64, max_epochs=25, early_stop_slope=0.0),
    "batch 64, fixed 35 epochs": replace(ICISConfig(), batch_size=64, max_epochs=35, early_stop_slope=0.0),
    "batch 64, lr 1.5e-3, fixed 35 epochs": replace(
        ICISConfig(), batch_size=64, lr=1.5e-3, max_epochs=35, early_stop_slope=0.0
    ),
    "batch 32, fixed 20 epochs": replace(ICISConfig(), batch_size=32, max_epochs=20, early_stop_slope=0.0),
    "batch 32, fixed 15 epochs": replace(ICISConfig(), batch_size=32, max_epochs=15, early_stop_slope=0.0),
    "batch 32, fixed 25 epochs": replace(ICISConfig(), batch_size=32, max_epochs=25, early_stop_slope=0.0),
    "batch 16, fixed 12 epochs": replace(ICISConfig(), batch_size=16, max_epochs=12, early_stop_slope=0.0),
    "batch 128, fixed 40 epochs": replace(ICISConfig(), batch_size=128, max_epochs=40, early_stop_slope=0.0),
    "without the row encoder's terms (W->W, W->A)": replace(ICISConfig(), row_encoder=False),
    "without the new classes' descriptors": replace(ICISConfig(), include_new_descriptors=False),
    "with the new classes' descriptors": replace(ICISConfig(), include_new_descriptors=True),
}

#: Injectors that are not an ICISConfig: the separation term (``research_injectors.SeparatedICIS``).
VARIANTS: dict[str, Callable[[], ICISInjector]] = {
    "separation 1, scale 10, own row left out": lambda: SeparatedICIS(1.0, 10.0, leave_out=True),
    "separation 0.3, scale 10, own row left out": lambda: SeparatedICIS(0.3, 10.0, leave_out=True),
    "separation 1, scale 10, own row kept": lambda: SeparatedICIS(1.0, 10.0, leave_out=False),
    "separation 1, scale 30, own row left out": lambda: SeparatedICIS(1.0, 30.0, leave_out=True),
    "feature separation 1": lambda: FeatureSeparatedICIS(*lite0_feature_statistics(), weight=1.0),
    "feature separation 0.3": lambda: FeatureSeparatedICIS(*lite0_feature_statistics(), weight=0.3),
}


def score(pred: torch.Tensor, true: torch.Tensor) -> tuple[float, float]:
    cosine = F.cosine_similarity(pred, true).mean().item()
    similarity = F.normalize(pred, dim=1) @ F.normalize(true, dim=1).T
    retrieval = (similarity.argmax(1) == torch.arange(len(true))).float().mean().item()
    return cosine, 100 * retrieval


def nearest_kept_cosine(pred: torch.Tensor, kept: torch.Tensor) -> float:
    """Mean cosine of each predicted row to its nearest kept row: how much a new row looks like an old class."""
    return (F.normalize(pred, dim=1) @ F.normalize(kept, dim=1).T).max(1).values.mean().item()


def main(argv: Sequence[str] | None = None, prog: str = "benchmarks.studies.icis_defaults") -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = study_parser(prog, __doc__)
    parser.add_argument("--splits", type=int, nargs="+", default=[1])
    parser.add_argument("--skip-paper", action="store_true", help="leave out the (slow) paper settings")
    parser.add_argument("--descriptors", choices=["minilm-name", "default"], default="minilm-name")
    parser.add_argument("--configs", nargs="+", choices=[*CONFIGS, *VARIANTS], default=list(CONFIGS))
    parser.add_argument("--out", default="icis_defaults", help="run name in benchmarks/results/icis_defaults")
    args = parser.parse_args(argv)

    data = head_data("tf_efficientnet_lite0")
    loaded = load_descriptors(args.descriptors)
    seen_descriptors, new_descriptors = loaded if isinstance(loaded, tuple) else (loaded, loaded)
    seen = np.setdiff1d(np.arange(1000), fold_classes(0))
    rows = []
    for name in args.configs:
        if args.skip_paper and name.startswith("paper"):
            continue
        for split in args.splits:
            val = np.sort(np.random.RandomState(split).choice(seen, 160, replace=False))
            train = np.setdiff1d(seen, val)
            start = time.perf_counter()
            new = new_descriptors[val]
            injector = VARIANTS[name]() if name in VARIANTS else ICISInjector(CONFIGS[name], seed=0)
            injector.fit(seen_descriptors[train], data.rows[train], new)
            seconds = time.perf_counter() - start
            predicted = injector.predict(new)
            cosine, retrieval = score(predicted, data.rows[val])
            nearest = nearest_kept_cosine(predicted, data.rows[train])
            row = dict(config=name, split=split, epochs=len(injector.history), fit_seconds=round(seconds, 2),
                       cosine=round(cosine, 4), retrieval=round(retrieval, 1),
                       nearest_kept=round(nearest, 4))  # fmt: skip
            print(json.dumps(row), flush=True)
            rows.append(row)

    paper = [r["fit_seconds"] for r in rows if r["config"].startswith("paper")]
    lines = [
        "# ICIS defaults: held-out seen classes (image-free)",
        "",
        "| config | split | epochs | fit s | speed-up vs paper | row cosine | row retrieval % |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        ratio = f"{np.mean(paper) / r['fit_seconds']:.1f}x" if paper else "-"
        lines.append(
            f"| {r['config']} | {r['split']} | {r['epochs']} | {r['fit_seconds']} | {ratio} | {r['cosine']} | "
            f"{r['retrieval']} |"
        )
    lines += ["", "Means over the splits (nearest kept: cosine of a predicted row to its nearest kept row):", ""]
    lines += ["| config | row cosine | row retrieval % | nearest kept | fit s |", "|---|---|---|---|---|"]
    for name in dict.fromkeys(r["config"] for r in rows):
        mine = [r for r in rows if r["config"] == name]
        means = [np.mean([r[k] for r in mine]) for k in ("cosine", "retrieval", "nearest_kept", "fit_seconds")]
        lines.append(f"| {name} | {means[0]:.4f} | {means[1]:.1f} | {means[2]:.3f} | {means[3]:.1f} |")
    table = "\n".join(lines) + "\n"
    record(STUDY, args.out, rows, table, command_line(prog, argv), title="How the ICIS defaults were chosen")
    print(table)


if __name__ == "__main__":
    main()
