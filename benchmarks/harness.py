"""The benchmark harness: descriptor matrices, one injector run on one fold, and the protocol's metrics.

Protocol (see ``benchmarks/README.md``): a real ImageNet-1k head (``benchmarks.data.head_data``) and one photo
per class. Fold ``k`` holds out 200 classes (``benchmarks.data.fold_classes``); an injector sees only the 800
seen rows ``[W | b]`` and the descriptors of all 1000 classes, and predicts the 200 held-out rows.

* ZSL: top-1 on the held-out photos among the 200 held-out classes only (mean over classes; with one photo
  per class this is plain accuracy).
* GZSL: the extended 1000-way head, the 800 real rows plus the 200 injected rows at their original
  positions. S: accuracy on the 800 seen photos, U: on the 200 held-out photos, H = 2SU / (S + U).
* cosine: mean cosine between the injected and the true weight vectors (``W`` part of the rows; a
  calibration only rescales rows, so this is the same before and after it).
* ORACLE: the same metrics with the true rows (:func:`oracle`).

Other modules call :func:`evaluate_rows`, :func:`descriptor_matrix`, :func:`run_method` and :func:`oracle`:
keep their names and signatures.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F

from benchmarks.data import CACHE, EMBEDDINGS, HeadData
from classifier_injection.calibration import CalibrationContext, copying_factory, fit_calibration, get_calibration

__all__ = [
    "DESCRIPTOR_SOURCES",
    "descriptor_matrix",
    "descriptor_pair",
    "evaluate_conse",
    "evaluate_rows",
    "fold_descriptors",
    "fold_matrix",
    "oracle",
    "run_conse",
    "run_method",
    "seen_mask",
]

DESCRIPTOR_CACHE = CACHE / "descriptors"


def seen_mask(num_classes: int, held_out: np.ndarray) -> torch.Tensor:
    """Boolean mask ``[num_classes]``: True for the seen classes of a fold."""
    mask = torch.ones(num_classes, dtype=torch.bool)
    mask[torch.as_tensor(np.asarray(held_out), dtype=torch.long)] = False
    return mask


def _check_fold(data: HeadData, held_out: np.ndarray) -> torch.Tensor:
    held = torch.as_tensor(np.asarray(held_out), dtype=torch.long)
    if held.dim() != 1 or len(held) == 0 or len(torch.unique(held)) != len(held):
        raise ValueError(f"held_out must be a 1-D array of distinct class indices, got shape {tuple(held.shape)}")
    if held.min() < 0 or held.max() >= len(data.rows):
        raise ValueError(f"held_out indices must lie in [0, {len(data.rows)}), got {held.min()}..{held.max()}")
    return held


def _gzsl(correct: torch.Tensor, seen: torch.Tensor) -> dict[str, float]:
    s = 100 * correct[seen].float().mean().item()
    u = 100 * correct[~seen].float().mean().item()
    return {"seen": s, "unseen": u, "h": 2 * s * u / (s + u) if s + u > 0 else 0.0}


@torch.no_grad()
def evaluate_rows(data: HeadData, held_out: np.ndarray, new_rows: torch.Tensor) -> dict[str, float]:
    """ZSL, GZSL (S, U, H) in percent and the mean row cosine of ``new_rows`` injected for ``held_out``.

    Args:
        data: the head and its photo features.
        held_out: the held-out class indices (sorted, as :func:`benchmarks.data.fold_classes` returns them);
            row ``i`` of ``new_rows`` belongs to class ``held_out[i]``.
        new_rows: the injected rows ``[len(held_out), D + 1]`` (calibrated as they would be injected).

    Returns:
        ``{"zsl", "seen", "unseen", "h", "cosine"}``.
    """
    held = _check_fold(data, held_out)
    if new_rows.shape != (len(held), data.rows.shape[1]):
        raise ValueError(
            f"new_rows must be [{len(held)}, {data.rows.shape[1]}] (one row [W | b] per held-out class), "
            f"got {tuple(new_rows.shape)}"
        )
    new_rows = new_rows.detach().to(data.rows.dtype).cpu()
    seen = seen_mask(len(data.rows), held)
    # ZSL: photos of the held-out classes, scored against the held-out classes only.
    position = torch.full((len(data.rows),), -1, dtype=torch.long)
    position[held] = torch.arange(len(held))
    held_photo = position[data.labels] >= 0
    target = position[data.labels[held_photo]]
    zsl_logits = data.features[held_photo] @ new_rows[:, :-1].T + new_rows[:, -1]
    zsl_correct = (zsl_logits.argmax(1) == target).float()
    # Mean over classes of per-class top-1 (one photo per class here, but keep the definition general).
    hits = torch.zeros(len(held)).index_add_(0, target, zsl_correct)
    counts = torch.zeros(len(held)).index_add_(0, target, torch.ones(len(target)))
    zsl = 100 * (hits[counts > 0] / counts[counts > 0]).mean().item()
    # GZSL: the extended head, real seen rows and injected rows in the original class order.
    full = data.rows.clone()
    full[held] = new_rows
    correct = data.logits(full).argmax(1) == data.labels
    photo_seen = seen[data.labels]
    cosine = F.cosine_similarity(new_rows[:, :-1], data.rows[held, :-1], dim=1).mean().item()
    return {"zsl": zsl, **_gzsl(correct, photo_seen), "cosine": cosine}


def oracle(data: HeadData, held_out: np.ndarray) -> dict[str, float]:
    """The metrics with the true rows of the held-out classes: what a perfect injector would reach."""
    held = _check_fold(data, held_out)
    return evaluate_rows(data, held_out, data.rows[held])


# ---------------------------------------------------------------------------------------------------------------
# Descriptor matrices [1000, d] in ImageNet-1k class order


def _imagenet_names() -> list[str]:
    """Names of the 1000 classes as the library sees them on an ImageNet head (first WordNet lemma)."""
    import timm

    from classifier_injection.descriptors import seen_class_names

    # Architecture only (no weights): the names come from timm's ImageNet metadata of a 1000-class head.
    model = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    return seen_class_names(model, 1000)


def _minilm(config) -> torch.Tensor:
    from classifier_injection.cache import EmbeddingCache
    from classifier_injection.descriptors import embed_classes
    from classifier_injection.embedders import SentenceTransformerEmbedder

    cache = EmbeddingCache(CACHE / "embeddings")  # shared with benchmarks/descriptors.py
    return embed_classes(SentenceTransformerEmbedder(device="cpu"), _imagenet_names(), config, cache=cache)


def _minilm_name() -> torch.Tensor:
    from classifier_injection.descriptors import DescriptorConfig

    return _minilm(DescriptorConfig.from_preset("photo"))  # "a photo of a {name}."


def _minilm_default() -> tuple[torch.Tensor, torch.Tensor]:
    """What :func:`~classifier_injection.inject` builds from names: MiniLM over "{name}: {definition}".

    A pair: every class as a *seen* class (definition of its WordNet id) and as a *new* class (WordNet look-up
    of its name, ambiguous names averaged over their senses), see :func:`fold_descriptors`.
    """
    from benchmarks.descriptors import text_matrices
    from classifier_injection.descriptors import DescriptorConfig
    from classifier_injection.embedders import SentenceTransformerEmbedder

    return text_matrices(SentenceTransformerEmbedder(device="cpu"), DescriptorConfig())


def _minilm_ensemble() -> torch.Tensor:
    from classifier_injection.descriptors import DescriptorConfig

    return _minilm(DescriptorConfig.from_preset("ensemble"))  # the 80 OpenAI CLIP templates, averaged


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


#: Descriptor source name -> builder of the [1000, d] matrix (ImageNet-1k order), or of a pair of them (the
#: classes described as seen classes, and as new classes): see :func:`fold_descriptors`.
DESCRIPTOR_SOURCES: dict[str, Callable[[], torch.Tensor | tuple[torch.Tensor, torch.Tensor]]] = {
    "minilm-default": _minilm_default,
    "minilm-name": _minilm_name,
    "minilm-ensemble": _minilm_ensemble,
    "conceptnet": _shared_vectors("imgnet_cn_list.npy"),
    "wiki2vec": _shared_vectors("imgnet_wiki_list.npy"),
    "glove": _glove,
}


@functools.cache
def descriptor_pair(source: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Descriptors ``[1000, d]`` of the ImageNet-1k classes as seen classes and as new classes.

    The two are the same matrix except for sources that describe a new class differently from a seen one
    (``minilm-default``: by a look-up of its name instead of its WordNet id). Built once and cached in
    ``benchmarks/.cache/descriptors/<source>.safetensors``.
    """
    from safetensors.torch import load_file, save_file

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
    save_file(tensors, str(path))
    return tensors["descriptors"], tensors.get("new_descriptors", tensors["descriptors"])


def descriptor_matrix(source: str) -> torch.Tensor:
    """The one ``[1000, d]`` matrix of a source that describes seen and new classes alike."""
    seen, new = descriptor_pair(source)
    if new is not seen and not torch.equal(new, seen):
        raise ValueError(f"source {source!r} describes new classes differently: use fold_descriptors(source, held)")
    return seen


def fold_matrix(seen: torch.Tensor, new: torch.Tensor, held_out: np.ndarray) -> torch.Tensor:
    """``seen`` with the rows of the held-out classes taken from ``new`` (both ``[num_classes, d]``)."""
    matrix = seen.clone()
    index = torch.as_tensor(np.asarray(held_out), dtype=torch.long)
    matrix[index] = new[index]
    return matrix


def fold_descriptors(source: str, held_out: np.ndarray) -> torch.Tensor:
    """Descriptors ``[1000, d]`` for one fold: the held-out classes described as new classes, the others as seen."""
    return fold_matrix(*descriptor_pair(source), held_out)


# ---------------------------------------------------------------------------------------------------------------
# Running one method on one fold


def run_method(
    data: HeadData,
    held_out: np.ndarray,
    descriptors: torch.Tensor,
    injector,
    calibration=None,
    *,
    seed: int = 0,
) -> dict[str, float]:
    """Fit ``injector`` on the seen classes of a fold, predict and calibrate the held-out rows, evaluate.

    Args:
        data: the head and its photo features.
        held_out: the fold's held-out class indices.
        descriptors: ``[1000, d]`` descriptors of all classes (:func:`fold_descriptors`).
        injector: an unfitted :class:`~classifier_injection.injector.Injector`; the held-out descriptors are
            passed as ``new_descriptors`` (no rows for them), as :func:`~classifier_injection.inject` does.
        calibration: anything :func:`~classifier_injection.calibration.get_calibration` accepts;
            ``None`` is the library default.
        seed: seed of the fit and of the calibration's random choices.

    Returns:
        :func:`evaluate_rows`'s metrics plus ``fit_seconds`` (injector fit), ``predict_seconds`` and
        ``calibration_seconds``.
    """
    held = _check_fold(data, held_out)
    if descriptors.shape[0] != len(data.rows):
        raise ValueError(f"descriptors must have one row per class ({len(data.rows)}), got {descriptors.shape[0]}")
    seen = seen_mask(len(data.rows), held)
    seen_a, new_a, seen_rows = descriptors[seen], descriptors[held], data.rows[seen]
    rule = get_calibration(calibration)
    factory = copying_factory(injector)  # taken before fit: the calibration may refit fresh copies

    start = time.perf_counter()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        injector.fit(seen_a, seen_rows, new_a)
    fit_seconds = time.perf_counter() - start
    start = time.perf_counter()
    predicted = injector.predict(new_a).detach().float().cpu()
    predict_seconds = time.perf_counter() - start

    start = time.perf_counter()
    context = CalibrationContext(
        seen_rows=seen_rows,
        new_rows=predicted,
        seen_descriptors=seen_a,
        new_descriptors=new_a,
        injector_factory=factory,
        seed=seed,
        feature_mean=data.feature_mean,
        feature_source="benchmarks.data.estimated_feature_statistics",
        feature_std=data.feature_std,
    )
    rows = fit_calibration(rule, context)(predicted, seen_rows)
    calibration_seconds = time.perf_counter() - start
    return {
        **evaluate_rows(data, held, rows),
        "fit_seconds": fit_seconds,
        "predict_seconds": predict_seconds,
        "calibration_seconds": calibration_seconds,
    }


@torch.no_grad()
def evaluate_conse(data: HeadData, held_out: np.ndarray, descriptors: torch.Tensor, conse) -> dict[str, float]:
    """ConSE by its own rule (it injects no rows); same keys as :func:`evaluate_rows`, ``cosine`` is NaN.

    ZSL: :meth:`~classifier_injection.baselines.ConSE.scores` against the held-out classes' descriptors.
    GZSL: the photo's embedding is matched against all 1000 descriptors; if a held-out class wins, ConSE
    predicts it, otherwise the original head's top seen class (:meth:`~classifier_injection.baselines.ConSE.
    predict_gzsl`).
    """
    held = _check_fold(data, held_out)
    seen = seen_mask(len(data.rows), held)
    seen_rows = data.rows[seen]
    seen_logits = data.logits(seen_rows)  # [photos, 800]
    seen_idx = torch.nonzero(seen).squeeze(1)
    is_held_photo = ~seen[data.labels]
    zsl_scores = conse.scores(seen_logits[is_held_photo], descriptors[seen], descriptors[held])
    zsl = 100 * (held[zsl_scores.argmax(1)] == data.labels[is_held_photo]).float().mean().item()
    prediction = conse.predict_gzsl(seen_logits, descriptors[seen], descriptors[held], seen_idx, held)
    return {"zsl": zsl, **_gzsl(prediction == data.labels, seen[data.labels]), "cosine": float("nan")}


def run_conse(data: HeadData, held_out: np.ndarray, descriptors: torch.Tensor, conse) -> dict[str, float]:
    """:func:`evaluate_conse` with timing (ConSE has no training: ``fit_seconds`` is 0)."""
    start = time.perf_counter()
    result = evaluate_conse(data, held_out, descriptors, conse)
    return {**result, "fit_seconds": 0.0, "calibration_seconds": 0.0, "eval_seconds": time.perf_counter() - start}
