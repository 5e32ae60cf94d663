"""How the library's ICIS defaults were chosen: on held-out *seen* classes, never on test photos.

Within the 800 seen classes of fold 0 (lite0 head, MiniLM "a photo of a {name}." descriptors), 160 classes are
held out at random (``RandomState(split)``); each configuration is trained on the other 640 rows and predicts the
160 held-out rows. Image-free scores: mean cosine between predicted and true rows, and row retrieval (the
fraction of held-out classes whose predicted row is closest, by cosine, to its own true row among the 160).
Training time is reported as a ratio to the paper's settings, measured in the same run.

Run: ``.venv/bin/python -m benchmarks.icis_defaults [--splits 1 2 3] [--skip-paper]``
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace

import numpy as np
import torch
import torch.nn.functional as F

from benchmarks.data import ROOT, fold_classes, head_data
from benchmarks.harness import descriptor_matrix
from classifier_injection import ICISConfig, ICISInjector

RESULTS = ROOT / "benchmarks" / "results"

CONFIGS: dict[str, ICISConfig] = {
    "paper (E=2048, batch 16, lr 1e-5)": ICISConfig.paper(),
    "library default": ICISConfig(),
    "default, E=2048": replace(ICISConfig(), latent_dim=2048),
    "default, E=128": replace(ICISConfig(), latent_dim=128),
    "default, centred": replace(ICISConfig(), center=True),
    "default, batch 64, lr 1e-3": replace(ICISConfig(), batch_size=64, lr=1e-3),
}


def score(pred: torch.Tensor, true: torch.Tensor) -> tuple[float, float]:
    cosine = F.cosine_similarity(pred, true).mean().item()
    similarity = F.normalize(pred, dim=1) @ F.normalize(true, dim=1).T
    retrieval = (similarity.argmax(1) == torch.arange(len(true))).float().mean().item()
    return cosine, 100 * retrieval


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--splits", type=int, nargs="+", default=[1])
    parser.add_argument("--skip-paper", action="store_true", help="leave out the (slow) paper settings")
    args = parser.parse_args()

    data = head_data("tf_efficientnet_lite0")
    descriptors = descriptor_matrix("minilm-name")
    seen = np.setdiff1d(np.arange(1000), fold_classes(0))
    rows = []
    for name, config in CONFIGS.items():
        if args.skip_paper and name.startswith("paper"):
            continue
        for split in args.splits:
            val = np.sort(np.random.RandomState(split).choice(seen, 160, replace=False))
            train = np.setdiff1d(seen, val)
            start = time.perf_counter()
            injector = ICISInjector(config, seed=0).fit(descriptors[train], data.rows[train], descriptors[val])
            seconds = time.perf_counter() - start
            cosine, retrieval = score(injector.predict(descriptors[val]), data.rows[val])
            row = dict(config=name, split=split, epochs=len(injector.history), fit_seconds=round(seconds, 2),
                       cosine=round(cosine, 4), retrieval=round(retrieval, 1))  # fmt: skip
            print(json.dumps(row), flush=True)
            rows.append(row)

    paper = [r["fit_seconds"] for r in rows if r["config"].startswith("paper")]
    lines = [
        "# ICIS defaults: held-out seen classes (image-free)",
        "",
        "Command: `.venv/bin/python -m benchmarks.icis_defaults "
        + " ".join(f"--splits {s}" for s in args.splits[:1])
        + "`",
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
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "icis_defaults.json").write_text(json.dumps(rows, indent=1))
    (RESULTS / "icis_defaults.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
