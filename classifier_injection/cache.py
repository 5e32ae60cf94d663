"""On-disk caches: text embeddings keyed by (embedder id, text), and the library injector's fits.

Injecting into an ImageNet head embeds the descriptors of its 1000 seen classes every time; with the cache
only texts never seen before are encoded. One safetensors file per embedder id holds a ``[n, d]`` float32
matrix and, in its (string) metadata, the JSON list of the ``n`` texts. Nothing is unpickled on load. The package
ships such a file for the default embedder and ImageNet-1k's class texts (:data:`SHIPPED_DIR`), read for the texts a
cache lacks, so even a first injection into an ImageNet-1k head embeds only the new names.

The cache trusts the embedder id: an id must change whenever the vectors would (different model or weights).
So only embedders that declare ``cacheable = True`` are cached (the library's sentence-transformers and
open_clip embedders with real weights do); others, e.g. a randomly initialised text tower or a user's own
embedder whose id may not say which weights it runs, are encoded every time.

:class:`FitCache` keeps a trained injector, keyed by everything its fit reads (the head, the old classes'
descriptors, the new ones' only if the fit uses them, the injector's class, settings, device and seed, the library
version and the source that runs the fit): injecting into a head that was injected into before skips the fit and
gets the rows a fresh fit would give.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

import torch

from ._version import __version__
from .serialization import atomic_save_safetensors, read_safetensors

__all__ = [
    "CachedEmbedder",
    "EmbeddingCache",
    "FitCache",
    "default_cache_dir",
    "fit_key",
    "reads_new_descriptors",
    "resolve_cache",
    "shipped_path",
    "source_digest",
]

_logger = logging.getLogger(__name__)

#: Environment variable that overrides where embeddings are cached.
CACHE_ENV = "CLASSIFIER_INJECTION_CACHE"


def default_cache_dir() -> Path:
    """``$CLASSIFIER_INJECTION_CACHE``, else ``$XDG_CACHE_HOME/classifier_injection/embeddings`` (``~/.cache``)."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "classifier_injection" / "embeddings"


#: Package data: the default embedder's vectors of the texts that describe ImageNet-1k's classes, so that a first
#: injection into an ImageNet-1k head need not embed its 1000 classes (built by
#: ``python -m benchmarks.harness.shipped_embeddings``; read-only, same format as a cache file).
SHIPPED_DIR = Path(__file__).resolve().parent / "data" / "embeddings"


def _file_name(embedder_id: str) -> str:
    """The name of the file holding ``embedder_id``'s vectors (a hash: ids may contain any character)."""
    return hashlib.sha256(embedder_id.encode("utf-8")).hexdigest()[:24] + ".safetensors"


def _read_vectors(path: Path, embedder_id: str) -> tuple[dict[str, int], torch.Tensor]:
    """The texts (text -> row) and vectors of a file of ``embedder_id``'s vectors; empty if missing or unreadable."""
    if not path.is_file():
        return {}, torch.zeros(0, 0)
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            vectors = f.get_tensor("vectors")
        texts = json.loads(metadata.get("texts", "[]"))
        if metadata.get("embedder") != embedder_id or len(texts) != len(vectors):
            raise ValueError("header does not match its content")
    except Exception as err:  # a corrupt or foreign file
        _logger.warning("ignoring unreadable embedding file %s (%s)", path, err)
        return {}, torch.zeros(0, 0)
    return {t: i for i, t in enumerate(texts)}, vectors


def shipped_path(embedder_id: str) -> Path:
    """Where the package keeps the vectors it ships for ``embedder_id`` (the file exists for the default embedder)."""
    return SHIPPED_DIR / _file_name(embedder_id)


@functools.cache
def _shipped(embedder_id: str) -> tuple[dict[str, int], torch.Tensor]:
    """The vectors of ``embedder_id`` shipped in :data:`SHIPPED_DIR` (empty for other embedders)."""
    return _read_vectors(shipped_path(embedder_id), embedder_id)


class EmbeddingCache:
    """Embeddings on disk, one file per embedder id.

    Args:
        directory: where the files live; created on first write. Default: :func:`default_cache_dir`.
    """

    def __init__(self, directory: str | os.PathLike | None = None) -> None:
        self.directory = Path(directory).expanduser() if directory is not None else default_cache_dir()
        # In-memory copy of each file read, so repeated look-ups in one process do not re-read it.
        self._loaded: dict[str, tuple[dict[str, int], torch.Tensor]] = {}

    def path(self, embedder_id: str) -> Path:
        """File holding the vectors of ``embedder_id`` (a hash of the id: ids may contain any character)."""
        return self.directory / _file_name(embedder_id)

    def _load(self, embedder_id: str) -> tuple[dict[str, int], torch.Tensor]:
        if embedder_id not in self._loaded:
            # A corrupt or foreign file is ignored: it is rewritten on the next put.
            self._loaded[embedder_id] = _read_vectors(self.path(embedder_id), embedder_id)
        return self._loaded[embedder_id]

    def get(self, embedder_id: str, texts: Sequence[str]) -> tuple[torch.Tensor | None, list[int]]:
        """Cached vectors of ``texts``: ``(vectors [n, d] with zeros where missing, missing indices)``.

        Texts this cache lacks are looked up in the vectors shipped with the package (:data:`SHIPPED_DIR`).
        Returns ``(None, all indices)`` when nothing is cached or shipped for ``embedder_id``.
        """
        stores = [store for store in (self._load(embedder_id), _shipped(embedder_id)) if store[0]]
        if not stores:
            return None, list(range(len(texts)))
        dim = stores[0][1].shape[1]
        stores = [(index, vectors) for index, vectors in stores if vectors.shape[1] == dim]
        out = torch.zeros(len(texts), dim)
        missing = []
        for i, text in enumerate(texts):
            for index, vectors in stores:
                if text in index:
                    out[i] = vectors[index[text]]
                    break
            else:
                missing.append(i)
        return out, missing

    def put(self, embedder_id: str, texts: Sequence[str], vectors: torch.Tensor) -> None:
        """Add ``vectors [n, d]`` of ``texts`` (existing entries are kept) and rewrite the file atomically."""
        vectors = vectors.detach().float().cpu()
        if vectors.dim() != 2 or len(vectors) != len(texts):
            raise ValueError(f"need one vector per text: got {len(texts)} texts and vectors {tuple(vectors.shape)}")
        index, old = self._load(embedder_id)
        if index and old.shape[1] != vectors.shape[1]:
            raise ValueError(
                f"embedder {embedder_id!r} returned {vectors.shape[1]}-d vectors but the cache holds "
                f"{old.shape[1]}-d ones: the id must change when the model does (or clear {self.path(embedder_id)})"
            )
        new = {t: i for i, t in enumerate(texts) if t not in index}
        if not new:
            return
        all_texts = [*index, *new]
        matrix = torch.cat([old, vectors[list(new.values())]]) if index else vectors[list(new.values())]
        matrix = matrix.contiguous()
        metadata = {"embedder": embedder_id, "texts": json.dumps(all_texts)}
        atomic_save_safetensors({"vectors": matrix}, self.path(embedder_id), metadata, overwrite=True)
        self._loaded[embedder_id] = ({t: i for i, t in enumerate(all_texts)}, matrix)

    def __repr__(self) -> str:
        return f"EmbeddingCache({str(self.directory)!r})"


class CachedEmbedder:
    """Wrap an embedder so that texts it has already embedded are read from an :class:`EmbeddingCache`.

    Same ``id`` and ``dim`` as the wrapped embedder (provenance is unchanged); embedders without
    ``cacheable = True`` pass straight through.
    """

    def __init__(self, embedder, cache: EmbeddingCache | None = None) -> None:
        self.embedder = embedder
        self.cache = cache if cache is not None else EmbeddingCache()

    @property
    def id(self) -> str:
        return self.embedder.id

    @property
    def dim(self) -> int:
        return self.embedder.dim

    def encode(self, texts: Sequence[str]) -> torch.Tensor:
        texts = list(texts)
        if getattr(self.embedder, "cacheable", False) is not True:
            return self.embedder.encode(texts)
        cached, missing = self.cache.get(self.id, texts)
        if not missing:
            return cached
        # Encode each distinct missing text once, in first-seen order (deterministic batches).
        todo = list(dict.fromkeys(texts[i] for i in missing))
        fresh = self.embedder.encode(todo).detach().float().cpu()
        try:
            self.cache.put(self.id, todo, fresh)
        except OSError as err:  # a read-only or broken cache folder must not stop the injection
            _logger.warning("could not write the embedding cache %s (%s): continuing without it", self.cache, err)
        if cached is None:
            cached = torch.zeros(len(texts), fresh.shape[1])
        row = {t: i for i, t in enumerate(todo)}
        for i in missing:
            cached[i] = fresh[row[texts[i]]]
        return cached

    def __getattr__(self, name: str):
        # Template hints (default_template) and other attributes of the wrapped embedder stay visible.
        if name == "embedder":
            raise AttributeError(name)
        return getattr(self.embedder, name)

    def __repr__(self) -> str:
        return f"CachedEmbedder({self.embedder!r}, {self.cache!r})"


def resolve_cache(cache: EmbeddingCache | str | os.PathLike | bool | None) -> EmbeddingCache | None:
    """``True``: the default cache; ``False`` / ``None``: no cache; a path: a cache there; or a cache as is."""
    if cache is True:
        return EmbeddingCache()
    if cache is False or cache is None:
        return None
    if isinstance(cache, EmbeddingCache):
        return cache
    if isinstance(cache, (str, os.PathLike)):
        return EmbeddingCache(cache)
    raise TypeError(
        f"cache must be True (the default folder), False (off), a directory or an EmbeddingCache, "
        f"got {type(cache).__name__}"
    )


@functools.cache
def source_digest(modules: tuple[str, ...], injector_type: type) -> str | None:
    """A hash of the library version, the package's ``modules`` (paths such as ``"icis.py"``) and the source of
    ``injector_type``'s classes, or ``None`` when a source cannot be read (then nothing may be cached)."""
    package = Path(__file__).resolve().parent
    files = {package / module for module in modules}
    for cls in injector_type.__mro__:  # a user's subclass that changes the fit changes the key
        module = sys.modules.get(cls.__module__)
        source = getattr(module, "__file__", None)
        if source and source.endswith(".py"):
            files.add(Path(source))
    h = hashlib.sha256(__version__.encode())
    try:
        for path in sorted(files):
            h.update(path.read_bytes())
    except OSError:
        return None
    return h.hexdigest()


def _hash_tensor(h: hashlib._Hash, tensor: torch.Tensor | None) -> None:
    """Feed ``tensor``'s shape and float32 bytes to ``h`` (without copying them)."""
    if tensor is None:
        h.update(b"none")
        return
    data = tensor.detach().float().cpu().contiguous()
    h.update(str(tuple(data.shape)).encode())
    h.update(data.numpy())


#: ``hparams()`` entries that report a fit's outcome rather than a setting.
_FIT_RESULTS = frozenset({"epochs_trained"})


def fit_key(
    injector: object, modules: tuple[str, ...], description: dict, tensors: Sequence[torch.Tensor | None]
) -> str | None:
    """A cache key for work fixed by ``injector``'s fit, or ``None`` when it cannot be cached safely.

    The key covers the injector's class and settings (not what its last fit gave), ``description``, ``tensors`` and
    :func:`source_digest` of ``modules``. Only injectors that declare ``cacheable = True`` get one.
    """
    if getattr(injector, "cacheable", False) is not True or not callable(getattr(injector, "hparams", None)):
        return None
    code = source_digest(modules, type(injector))
    if code is None:
        return None
    settings = {k: v for k, v in injector.hparams().items() if k not in _FIT_RESULTS}
    payload = {"injector": [type(injector).__module__, type(injector).__qualname__, settings], **description}
    h = hashlib.sha256(code.encode())
    h.update(json.dumps(payload, sort_keys=True, default=str).encode())
    for tensor in tensors:
        _hash_tensor(h, tensor)
    return h.hexdigest()[:32]


#: Modules whose code decides a fit's rows, besides the injector's own (seeding and the fit's inputs).
_FIT_MODULES = ("core.py", "injector.py", "icis.py", "baselines.py")


def reads_new_descriptors(injector: object) -> bool:
    """Whether ``injector``'s fit may depend on the new classes' descriptors (unless it declares it does not)."""
    return getattr(injector, "reads_new_descriptors", True) is not False


class FitCache:
    """Trained injectors on disk, one safetensors file per fit (weights and JSON metadata, no copy of the head).

    Only injectors that declare ``cacheable = True`` (their fit is fixed by their class, ``hparams()``, device and
    seed) and can export and restore their weights (``fit_state()`` / ``load_fit_state()``, as ICIS does) are
    cached. A fit that does not read the new classes' descriptors (``reads_new_descriptors``, an option of ICIS) is
    keyed without them, so injecting other classes into the same head reuses it. A damaged file is ignored and
    rewritten; nothing is unpickled.

    Args:
        directory: where the files live; created on first write.
    """

    def __init__(self, directory: str | os.PathLike) -> None:
        self.directory = Path(directory).expanduser()

    def key(
        self,
        injector: object,
        seen_rows: torch.Tensor,
        seen_descriptors: torch.Tensor,
        new_descriptors: torch.Tensor,
        seed: int,
    ) -> str | None:
        """The key of ``injector``'s fit on these inputs, or ``None`` when it cannot be cached safely."""
        if not all(callable(getattr(injector, name, None)) for name in ("fit_state", "load_fit_state")):
            return None
        description = {"seed": seed, "device": str(getattr(injector, "device", None))}
        new = new_descriptors if reads_new_descriptors(injector) else None
        return fit_key(injector, _FIT_MODULES, description, (seen_rows, seen_descriptors, new))

    def path(self, key: str) -> Path:
        return self.directory / f"{key}.safetensors"

    def restore(
        self,
        key: str,
        injector: object,
        seen_descriptors: torch.Tensor,
        seen_rows: torch.Tensor,
    ) -> bool:
        """Load the fit stored under ``key`` into ``injector``; ``False`` (injector untouched) when there is none."""
        path = self.path(key)
        if not path.is_file():
            return False
        try:
            tensors, metadata = read_safetensors(path)
            injector.load_fit_state(tensors, metadata, path, seen_descriptors, seen_rows)
        except (OSError, ValueError) as err:  # damaged or foreign: refit, the put rewrites it
            _logger.warning("ignoring unreadable fit cache %s (%s)", path, err)
            return False
        return True

    def put(self, key: str, injector: object) -> None:
        """Store ``injector``'s fit atomically; a folder that cannot be written only warns."""
        tensors, metadata = injector.fit_state(with_basis=False)
        try:
            atomic_save_safetensors(tensors, self.path(key), metadata, overwrite=True)
        except OSError as err:  # a read-only or broken cache folder must not stop the injection
            _logger.warning("could not write the fit cache %s (%s): continuing without it", self, err)

    def __repr__(self) -> str:
        return f"FitCache({str(self.directory)!r})"
