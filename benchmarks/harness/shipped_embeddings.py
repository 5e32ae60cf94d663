"""Build the package's shipped embeddings: the default embedder's vectors of ImageNet-1k's class texts.

``inject()`` embeds the texts of a head's old classes on its first call for a model; for ImageNet-1k heads (most timm
checkpoints) these texts are always the same, so the package ships their vectors
(``classifier_injection.cache.shipped_path``) in the embedding cache's file format. Both texts a class can get are
included: its WordNet definition (``"{name}: {definition}"``) and its name alone (used when no new class has a
definition). The vectors are what the embedder's ``encode`` returns, as the cache stores them.

    HF_HUB_OFFLINE=1 .venv/bin/python -m benchmarks.harness.shipped_embeddings
"""

from __future__ import annotations

import json

import timm

from classifier_injection.cache import shipped_path
from classifier_injection.descriptors import (
    default_config_for,
    describe_classes,
    seen_class_names,
    seen_class_wnids,
)
from classifier_injection.embedders import Embedder, default_embedder
from classifier_injection.serialization import atomic_save_safetensors

IMAGENET_CLASSES = 1000


def imagenet_texts(embedder: Embedder) -> list[str]:
    """Every text ``inject()`` embeds for the old classes of an ImageNet-1k head with ``embedder``'s default config."""
    # An ImageNet-1k head without label names (no weights needed): timm's metadata names its classes.
    model = timm.create_model("resnet18", pretrained=False)
    config = default_config_for(embedder)
    names = seen_class_names(model, IMAGENET_CLASSES)
    definitions, _ = describe_classes(names, None, config, wnids=seen_class_wnids(model, IMAGENET_CLASSES))
    texts = [
        text
        for descriptions in (definitions, [None] * len(names))
        for name, description in zip(names, descriptions, strict=True)
        for text in config.texts(name, description)
    ]
    return list(dict.fromkeys(texts))


def main() -> None:
    embedder = default_embedder(show_progress=True)
    texts = imagenet_texts(embedder)
    vectors = embedder.encode(texts).detach().float().cpu().contiguous()
    path = shipped_path(embedder.id)
    metadata = {"embedder": embedder.id, "texts": json.dumps(texts)}
    atomic_save_safetensors({"vectors": vectors}, path, metadata, overwrite=True)
    print(f"{len(texts)} texts of {embedder.id} -> {path} ({path.stat().st_size / 2**20:.1f} MiB)")


if __name__ == "__main__":
    main()
