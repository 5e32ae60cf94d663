"""Class names and the texts that describe them (descriptors), and their embedding.

A descriptor is built per class from its name (and, when known, a description) with one or more
templates; the class vector is the mean of the L2-normalised embeddings of its texts.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .embedders import Embedder

__all__ = ["DescriptorConfig", "embed_classes", "seen_class_names"]

_WNID = re.compile(r"^n\d{8}$")


@dataclass(frozen=True)
class DescriptorConfig:
    """How class names become texts.

    Attributes:
        templates: format strings with ``{name}`` (and optionally ``{description}``); a class gets one
            text per template and its vector is the mean of their normalised embeddings. A template that
            uses ``{description}`` falls back to ``fallback_template`` for classes without one.
        fallback_template: used for classes without a description when a template needs one.
    """

    templates: tuple[str, ...] = ("a photo of a {name}.",)
    fallback_template: str = "a photo of a {name}."

    def texts(self, name: str, description: str | None = None) -> list[str]:
        texts = []
        for template in self.templates:
            if "{description}" in template and not description:
                template = self.fallback_template
            texts.append(template.format(name=name, description=description or ""))
        return texts

    def to_dict(self) -> dict:
        return {"templates": list(self.templates), "fallback_template": self.fallback_template}


def embed_classes(
    embedder: Embedder,
    names: Sequence[str],
    config: DescriptorConfig | None = None,
    descriptions: Mapping[str, str] | None = None,
) -> torch.Tensor:
    """Class vectors ``[len(names), embedder.dim]``: mean of normalised embeddings of each class's texts."""
    if config is None:
        config = DescriptorConfig(templates=(getattr(embedder, "default_template", None) or "a photo of a {name}.",))
    descriptions = descriptions or {}
    per_class = [config.texts(name, descriptions.get(name)) for name in names]
    flat = [text for texts in per_class for text in texts]
    vectors = F.normalize(embedder.encode(flat).float(), dim=1)
    counts = torch.tensor([len(texts) for texts in per_class])
    owner = torch.repeat_interleave(torch.arange(len(names)), counts)
    summed = torch.zeros(len(names), vectors.shape[1]).index_add_(0, owner, vectors)
    return summed / counts[:, None]


def _readable(names: Sequence[str]) -> bool:
    return all(isinstance(n, str) and n.strip() and not _WNID.match(n) for n in names)


def seen_class_names(model: nn.Module, num_classes: int, class_names: Sequence[str] | None = None) -> list[str]:
    """Human-readable names of the classes a model's head already has.

    Order of preference: ``class_names`` if given; the model's ``pretrained_cfg["label_names"]`` when they
    are readable; timm's ImageNet metadata (first WordNet lemma) for ImageNet-sized heads.
    """
    if class_names is not None:
        names = list(class_names)
        if len(names) != num_classes or not _readable(names):
            raise ValueError(
                f"class_names must be {num_classes} non-empty strings, one per existing class of the head; "
                f"got {len(names)}"
            )
        return names
    cfg = getattr(model, "pretrained_cfg", None) or {}
    label_names = cfg.get("label_names")
    if label_names and len(label_names) == num_classes and _readable(label_names):
        return list(label_names)
    from timm.data import ImageNetInfo, infer_imagenet_subset

    subset = infer_imagenet_subset(model)
    if subset is not None:
        info = ImageNetInfo(subset)
        if info.num_classes() == num_classes:
            return [d.split(",")[0].strip() for d in info.label_descriptions()]
    raise ValueError(
        f"cannot tell the names of the {num_classes} classes this model already has: pass "
        "class_names=[...] (one string per existing class, in head order)"
    )
