"""Descriptor sources: ``[1000, d]`` matrices of the ImageNet-1k classes, as seen classes and as new classes.

A seen class is described as :func:`~classifier_injection.inject` describes the head's own classes (by WordNet id);
a held-out class as a user's new class (a look-up of its name). Sources that describe both alike give one matrix.
Built matrices are cached in ``benchmarks/.cache/descriptors`` and text embeddings in ``benchmarks/.cache/embeddings``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F

from benchmarks.harness.data import CACHE, EMBEDDINGS

__all__ = [
    "DESCRIPTOR_CACHE",
    "DESCRIPTOR_SOURCES",
    "concat",
    "conceptnet_matrix",
    "descriptions",
    "descriptor_matrix",
    "descriptor_pair",
    "embedding_cache",
    "fold_descriptors",
    "fold_matrix",
    "imagenet_classes",
    "load_descriptors",
    "text_matrices",
]

DESCRIPTOR_CACHE = CACHE / "descriptors"
EMBEDDING_CACHE = CACHE / "embeddings"


def embedding_cache():
    """The benchmarks' one text-embedding cache (``benchmarks/.cache/embeddings``)."""
    from classifier_injection.cache import EmbeddingCache

    return EmbeddingCache(EMBEDDING_CACHE)


def imagenet_classes() -> tuple[list[str], list[str]]:
    """The 1000 class names (first synonym of timm's descriptions) and WordNet ids, in ImageNet-1k order."""
    from timm.data import ImageNetInfo

    info = ImageNetInfo("imagenet-1k")
    return [d.split(",")[0].strip() for d in info.label_descriptions()], list(info.label_names())


def descriptions(config, new_have_definitions: bool = True):
    """(seen descriptions by WordNet id, new descriptions by name look-up, look-up provenance)."""
    from classifier_injection.descriptors import describe_classes

    names, wnids = imagenet_classes()
    seen, _ = describe_classes(names, None, config, wnids=wnids)
    if new_have_definitions:
        new, records = describe_classes(names, None, config)
    else:  # names that are nowhere in WordNet: every new class falls back to its name
        new, records = [None] * len(names), [{"source": "none"}] * len(names)
    return seen, new, records


def text_matrices(embedder, config, new_have_definitions: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """``(seen, new)`` ``[1000, d]`` matrices of ``embedder`` over the texts ``config`` builds."""
    from classifier_injection.descriptors import embed_classes

    names, _ = imagenet_classes()
    seen_desc, new_desc, _ = descriptions(config, new_have_definitions)
    cache = embedding_cache()
    seen = embed_classes(embedder, names, config, seen_desc, cache=cache)
    new = embed_classes(embedder, names, config, new_desc, cache=cache)
    return seen, new


def conceptnet_matrix() -> torch.Tensor:
    """ConceptNet Numberbatch vectors of the 1000 names (they exist for these names alone), L2-normalised."""
    return _shared_vectors("imgnet_cn_list.npy")()


def concat(*pairs: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Concatenate normalised ``(seen, new)`` matrix pairs, as ``CombinedEmbedder`` does."""
    return tuple(torch.cat([F.normalize(p[i], dim=1) for p in pairs], 1) for i in (0, 1))


def _imagenet_names() -> list[str]:
    """Names of the 1000 classes as the library sees them on an ImageNet head (first WordNet lemma)."""
    import timm

    from classifier_injection.descriptors import seen_class_names

    # Architecture only (no weights): the names come from timm's ImageNet metadata of a 1000-class head.
    model = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    return seen_class_names(model, 1000)


def _minilm(preset: str) -> torch.Tensor:
    from classifier_injection.descriptors import DescriptorConfig, embed_classes
    from classifier_injection.embedders import SentenceTransformerEmbedder

    config = DescriptorConfig.from_preset(preset)
    return embed_classes(SentenceTransformerEmbedder(device="cpu"), _imagenet_names(), config, cache=embedding_cache())


def _minilm_default() -> tuple[torch.Tensor, torch.Tensor]:
    """What :func:`~classifier_injection.inject` builds from names: MiniLM over "{name}: {definition}"."""
    from classifier_injection.descriptors import DescriptorConfig
    from classifier_injection.embedders import SentenceTransformerEmbedder

    return text_matrices(SentenceTransformerEmbedder(device="cpu"), DescriptorConfig())


def _glove() -> torch.Tensor:
    from classifier_injection.descriptors import DescriptorConfig, embed_classes
    from classifier_injection.embedders import WordVectorEmbedder

    vectors = embed_classes(WordVectorEmbedder(), _imagenet_names(), DescriptorConfig.from_preset("name"))
    return F.normalize(vectors, dim=1)


def _shared_vectors(file: str) -> Callable[[], torch.Tensor]:
    def load() -> torch.Tensor:
        path = EMBEDDINGS / file
        if not path.is_file():
            raise FileNotFoundError(f"{path} is missing: the shared data (../shared/data) is needed for this source")
        # L2-normalised rows, as the ICIS paper does with these vectors.
        return F.normalize(torch.from_numpy(np.load(path, allow_pickle=False)).float(), dim=1)

    return load


#: Descriptor source name -> builder of the [1000, d] matrix (ImageNet-1k order), or of a ``(seen, new)`` pair.
DESCRIPTOR_SOURCES: dict[str, Callable[[], torch.Tensor | tuple[torch.Tensor, torch.Tensor]]] = {
    "minilm-default": _minilm_default,
    "minilm-name": lambda: _minilm("photo"),  # "a photo of a {name}."
    "minilm-ensemble": lambda: _minilm("ensemble"),  # the 80 OpenAI CLIP templates, averaged
    "conceptnet": _shared_vectors("imgnet_cn_list.npy"),
    "wiki2vec": _shared_vectors("imgnet_wiki_list.npy"),
    "glove": _glove,
}


@functools.cache
def descriptor_pair(source: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Descriptors ``[1000, d]`` of the ImageNet-1k classes as seen classes and as new classes.

    The two are the same matrix except for sources that describe a new class differently from a seen one
    (``minilm-default``). Built once and cached in ``benchmarks/.cache/descriptors/<source>.safetensors``.
    """
    from safetensors.torch import load_file

    from classifier_injection.serialization import atomic_save_safetensors

    if source not in DESCRIPTOR_SOURCES:
        raise ValueError(f"unknown descriptor source {source!r}; choose one of {sorted(DESCRIPTOR_SOURCES)}")
    path = DESCRIPTOR_CACHE / f"{source}.safetensors"
    if path.is_file():
        stored = load_file(str(path))
        return stored["descriptors"], stored.get("new_descriptors", stored["descriptors"])
    built = DESCRIPTOR_SOURCES[source]()
    seen, new = (built, built) if isinstance(built, torch.Tensor) else built
    tensors = {"descriptors": seen.float().contiguous()}
    if new is not seen:
        tensors["new_descriptors"] = new.float().contiguous()
    for name, matrix in tensors.items():
        if matrix.shape[0] != 1000 or not torch.isfinite(matrix).all():
            raise RuntimeError(f"descriptor source {source!r} gave a {tuple(matrix.shape)} {name} matrix")
    DESCRIPTOR_CACHE.mkdir(parents=True, exist_ok=True)
    atomic_save_safetensors(tensors, path, overwrite=True)
    return tensors["descriptors"], tensors.get("new_descriptors", tensors["descriptors"])


def descriptor_matrix(source: str) -> torch.Tensor:
    """The one ``[1000, d]`` matrix of a source that describes seen and new classes alike."""
    seen, new = descriptor_pair(source)
    if new is not seen and not torch.equal(new, seen):
        raise ValueError(f"source {source!r} describes new classes differently: use fold_descriptors(source, held)")
    return seen


def load_descriptors(source: str) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """A source's one matrix, or ``"default"``: the library's default descriptors as a ``(seen, new)`` pair.

    ``"default"`` is what :func:`~classifier_injection.inject` uses on an ImageNet head (MiniLM over
    "{name}: {definition}", held-out classes looked up by name), built directly (not through the matrix cache).
    """
    if source != "default":
        return descriptor_matrix(source)
    return _minilm_default()


def fold_matrix(seen: torch.Tensor, new: torch.Tensor, held_out: np.ndarray) -> torch.Tensor:
    """``seen`` with the rows of the held-out classes taken from ``new`` (both ``[num_classes, d]``)."""
    matrix = seen.clone()
    index = torch.as_tensor(np.asarray(held_out), dtype=torch.long)
    matrix[index] = new[index]
    return matrix


def fold_descriptors(source: str, held_out: np.ndarray) -> torch.Tensor:
    """Descriptors ``[1000, d]`` for one fold: the held-out classes described as new classes, the others as seen."""
    return fold_matrix(*descriptor_pair(source), held_out)
