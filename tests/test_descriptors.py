"""Descriptor configs, WordNet definitions and look-up, class embedding."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from classifier_injection import InjectionConfig
from classifier_injection.cache import EmbeddingCache
from classifier_injection.descriptors import (
    CombinedEmbedder,
    DescriptorConfig,
    describe_classes,
    embed_classes,
    lookup_wordnet,
    openai_templates,
    seen_class_names,
    seen_class_wnids,
    wordnet_definition,
)
from classifier_injection.embedders import PrecomputedEmbedder
from tests.conftest import FakeEmbedder

CAPYBARA = "n02365480"
CRANE_BIRD, CRANE_MACHINE = "n02012849", "n03126707"


# ---------------------------------------------------------------------------------------------------------------
# Configs and texts


def test_texts_fill_templates_and_fall_back_without_description():
    config = DescriptorConfig(templates=("{name}: {description}", "a photo of a {name}."))
    assert config.texts("capybara", "a large rodent.") == ["capybara: a large rodent", "a photo of a capybara."]
    assert config.texts("capybara") == ["capybara", "a photo of a capybara."]
    assert config.needs_descriptions and not DescriptorConfig.from_preset("photo").needs_descriptions


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"templates": ()}, "non-empty tuple"),
        ({"templates": "a photo of a {name}."}, "non-empty tuple"),
        ({"templates": ("a {nmae}",)}, "not a valid format string"),
        ({"fallback_template": "{description}"}, "must not need a description"),
        ({"ambiguous": "guess"}, "ambiguous must be one of"),
    ],
)
def test_config_rejects_bad_values(kwargs, message):
    with pytest.raises(ValueError, match=message):
        DescriptorConfig(**kwargs)


def test_presets():
    ensemble = DescriptorConfig.from_preset("ensemble")
    assert len(ensemble.templates) == 80 == len(openai_templates()) and not ensemble.use_definitions
    assert all("{name}" in t for t in ensemble.templates)
    assert ensemble.to_dict()["templates"] == "80 OpenAI CLIP templates" and ensemble.to_dict()["preset"] == "ensemble"
    assert DescriptorConfig.from_preset("name+definition", ambiguous="first").ambiguous == "first"
    with pytest.raises(ValueError, match="unknown descriptor preset"):
        DescriptorConfig.from_preset("best")


# ---------------------------------------------------------------------------------------------------------------
# WordNet


def test_lookup_finds_unique_lemmas_case_insensitively():
    match = lookup_wordnet("Capybara")
    assert (match.status, match.wnid) == ("found", CAPYBARA)
    assert "rodent" in match.definition and match.definition == wordnet_definition(CAPYBARA)
    assert lookup_wordnet("red_panda").status == "found"
    assert lookup_wordnet("zorblax flumph").status == "not_found"


def test_ambiguous_lemmas_follow_the_policy():
    for policy in ("skip", "headword", "average"):
        match = lookup_wordnet("crane", policy)
        assert match.status == "ambiguous" and match.wnid is None
        assert [c[0] for c in match.candidates] == [CRANE_BIRD, CRANE_MACHINE]
    assert lookup_wordnet("crane", "first").wnid == CRANE_BIRD
    with pytest.raises(ValueError, match=r"names 2 WordNet synsets.*descriptions=\{'crane'"):
        lookup_wordnet("crane", "error")
    # "ram": the sheep's headword, a later lemma of random-access memory: "headword" resolves it, "skip" does not.
    assert lookup_wordnet("ram", "skip").status == "ambiguous"
    headword = lookup_wordnet("ram", "headword")
    assert (headword.status, headword.wnid, len(headword.candidates)) == ("found", "n02412080", 2)


def test_describe_classes_prefers_user_then_wordnet_id_then_lemma():
    config = DescriptorConfig()
    texts, records = describe_classes(
        ["capybara", "crane", "crane", "zorblax", "custom"],
        {"custom": "a made-up animal"},
        config,
        wnids=[None, CRANE_MACHINE, None, None, None],
    )
    assert texts[0] == wordnet_definition(CAPYBARA) and records[0] == {"source": "wordnet-lemma", "wnid": CAPYBARA}
    assert texts[1] == wordnet_definition(CRANE_MACHINE) and records[1]["source"] == "wordnet-id"
    # Ambiguous by default: all senses, averaged when embedded.
    senses = (wordnet_definition(CRANE_BIRD), wordnet_definition(CRANE_MACHINE))
    assert texts[2] == senses and records[2] == {"source": "wordnet-senses", "ambiguous": [CRANE_BIRD, CRANE_MACHINE]}
    assert texts[3] is None and records[3] == {"source": "none"}
    assert texts[4] == "a made-up animal" and records[4] == {"source": "user"}
    skipped, records = describe_classes(["crane"], None, DescriptorConfig(ambiguous="headword"))
    assert skipped == [None] and records == [{"source": "none", "ambiguous": [CRANE_BIRD, CRANE_MACHINE]}]
    off, records = describe_classes(["capybara"], None, DescriptorConfig(use_definitions=False))
    assert off == [None] and records == [{"source": "none"}]
    with pytest.raises(ValueError, match="one entry per name"):
        describe_classes(["a", "b"], wnids=["n02365480"])


class _ImageNetSized(nn.Module):
    def __init__(self, labels=None) -> None:
        super().__init__()
        self.num_classes = 1000
        self.pretrained_cfg = {"label_names": labels} if labels else {}


def test_seen_classes_of_imagenet_heads_have_wordnet_ids():
    wnids = seen_class_wnids(_ImageNetSized(), 1000)
    names = seen_class_names(_ImageNetSized(), 1000)
    assert wnids[0] == "n01440764" and names[0] == "tench" and len(wnids) == 1000
    assert seen_class_wnids(_ImageNetSized(wnids), 1000) == wnids  # label_names given as WordNet ids
    assert seen_class_wnids(_ImageNetSized(), 1000, class_names=[f"c{i}" for i in range(1000)]) is None
    readable = [f"class {i}" for i in range(1000)]
    assert seen_class_wnids(_ImageNetSized(readable), 1000) is None  # a fine-tuned head with its own classes
    model = _ImageNetSized()
    model.num_classes = 10
    assert seen_class_wnids(model, 10) is None


def test_a_head_on_an_imagenet_subset_is_named_and_described_by_its_wordnet_ids():
    subset = ["n01440764", "n02365480"]  # tench, capybara: label_names as WordNet ids, not ImageNet-sized
    model = _ImageNetSized(subset)
    model.num_classes = 2
    assert seen_class_names(model, 2) == ["tench", "capybara"]
    assert seen_class_wnids(model, 2) == subset
    model.pretrained_cfg = {"label_names": ["n01440764", "n99999999"]}  # an id WordNet lacks: no names from it
    with pytest.raises(ValueError, match="class_names"):
        seen_class_names(model, 2)


# ---------------------------------------------------------------------------------------------------------------
# Embedding


def test_embed_classes_is_the_mean_of_normalised_text_embeddings():
    emb = FakeEmbedder(8, cacheable=True)
    config = DescriptorConfig(templates=("{name}", "{name}: {description}"))
    out = embed_classes(emb, ["a", "b"], config, {"a": "first letter"})
    texts = emb.calls[0]
    assert texts == ["a", "a: first letter", "b"]  # "b" (both of b's texts) encoded once
    unit = F.normalize(FakeEmbedder(8, cacheable=True).encode(texts), dim=1)
    assert torch.allclose(out, torch.stack([unit[:2].mean(0), unit[2]]))
    # Descriptions may also be a list aligned with the names (names can repeat, like ImageNet's two cranes).
    aligned = embed_classes(emb, ["crane", "crane"], config, ["a bird", "a machine"])
    assert not torch.allclose(aligned[0], aligned[1])
    with pytest.raises(ValueError, match="one entry"):
        embed_classes(emb, ["a", "b"], config, ["only one"])


def test_embed_classes_uses_each_parts_own_texts_and_the_cache(tmp_path):
    names = ["capybara", "red panda"]
    vectors = PrecomputedEmbedder({"capybara": [1.0, 0.0], "red panda": [0.0, 2.0]}, id="cn")
    sentence = FakeEmbedder(8, cacheable=True)
    combined = CombinedEmbedder([(sentence, DescriptorConfig(templates=("{name}: {description}",))), vectors])
    cache = EmbeddingCache(tmp_path)
    out = embed_classes(combined, names, None, {"capybara": "a rodent"}, cache=cache)
    assert out.shape == (2, 8 + 2)
    assert sentence.calls == [["capybara: a rodent", "red panda"]]  # precomputed part got bare names
    assert torch.allclose(out[:, 8:], torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
    again = embed_classes(combined, names, None, {"capybara": "a rodent"}, cache=cache)
    assert torch.equal(out, again) and len(sentence.calls) == 1  # served from the cache


def test_alternative_descriptions_are_averaged_with_equal_template_weights():
    emb = FakeEmbedder(8, cacheable=True)
    config = DescriptorConfig(templates=("{name}", "{name}: {description}"))
    assert config.texts("crane", ("a bird", "a machine")) == ["crane", "crane", "crane: a bird", "crane: a machine"]
    both = embed_classes(emb, ["crane"], config, [("a bird", "a machine")])
    assert emb.calls[-1] == ["crane", "crane: a bird", "crane: a machine"]  # each distinct text encoded once
    bird, machine = (embed_classes(emb, ["crane"], config, [d]) for d in ("a bird", "a machine"))
    # The mean of the two single-sense class vectors: the name keeps half the weight, as with one sense.
    assert torch.allclose(both, (bird + machine) / 2, atol=1e-6)


def test_default_config_follows_the_embedder():
    vectors = PrecomputedEmbedder({"capybara": [1.0, 0.0]}, id="cn")
    assert torch.allclose(embed_classes(vectors, ["capybara"]), torch.tensor([[1.0, 0.0]]))
    emb = FakeEmbedder(8, cacheable=True)
    embed_classes(emb, ["capybara"], None, {"capybara": "a rodent"})
    assert emb.calls == [DescriptorConfig().texts("capybara", "a rodent")]


# ---------------------------------------------------------------------------------------------------------------
# Wiring into inject()


@pytest.fixture(scope="module")
def imagenet_head() -> nn.Module:
    import timm

    torch.manual_seed(0)
    # A tiny architecture with an ImageNet-1k-sized head and no label names: timm's metadata names the classes.
    return timm.create_model("test_efficientnet", pretrained=False, num_classes=1000).eval()


def _inject(model, names, tmp_path, descriptors=None, **kwargs):
    from classifier_injection import ICISConfig, inject

    embedder = kwargs.pop("embedder", None) or FakeEmbedder(8, cacheable=True)
    icis = ICISConfig(latent_dim=16, max_epochs=1, batch_size=256)
    config = InjectionConfig(descriptors=descriptors, icis=icis, calibration="norm")
    out = inject(model, names, config, embedder=embedder, cache=tmp_path, **kwargs)
    return out, embedder, out.classifier_injection["injections"][-1]


def test_inject_describes_seen_and_new_classes_with_definitions(imagenet_head, tmp_path):
    out, embedder, record = _inject(imagenet_head, ["capybara", "bass", "zorblax"], tmp_path)
    texts = [t for call in embedder.calls for t in call]
    assert f"tench: {wordnet_definition('n01440764')}" in texts  # a seen class, by WordNet id
    assert f"capybara: {wordnet_definition(CAPYBARA)}" in texts  # a new class, by lemma
    assert "zorblax" in texts  # unknown: the name alone
    described = record["descriptions"]
    assert described["capybara"] == {"text": wordnet_definition(CAPYBARA), "source": "wordnet-lemma", "wnid": CAPYBARA}
    # Ambiguous: described by each of its senses (their embeddings averaged), recorded as such.
    bass = described["bass"]
    assert bass["source"] == "wordnet-senses" and len(bass["ambiguous"]) == len(bass["text"]) == 3
    assert all(f"bass: {gloss}" in texts for gloss in bass["text"])
    assert described["zorblax"] == {"text": None, "source": "none"}
    assert record["descriptors"]["templates"] == ["{name}: {description}"] and out.num_classes == 1003
    # The seen classes were cached: a second injection only encodes the new texts.
    _, again, _ = _inject(imagenet_head, ["okapi"], tmp_path)
    assert len(again.calls) == 1 and again.calls[0] == [f"okapi: {lookup_wordnet('okapi').definition}"]


def test_inject_user_descriptions_and_turning_definitions_off(imagenet_head, tmp_path):
    _, embedder, record = _inject(
        imagenet_head, ["capybara"], tmp_path, descriptions={"capybara": "a large South American rodent"}
    )
    assert record["descriptions"]["capybara"] == {"text": "a large South American rodent", "source": "user"}
    assert "capybara: a large South American rodent" in [t for call in embedder.calls for t in call]
    _, embedder, record = _inject(
        imagenet_head,
        ["capybara"],
        tmp_path,
        descriptors=DescriptorConfig.from_preset("photo"),
    )
    texts = [t for call in embedder.calls for t in call]
    assert "a photo of a capybara." in texts and "a photo of a tench." in texts
    assert record["descriptions"] == {} and record["descriptors"]["preset"] == "photo"


def test_inject_accepts_a_combined_embedder(imagenet_head, tmp_path):
    from classifier_injection.embedders import WordVectorEmbedder

    words = WordVectorEmbedder({"capybara": [1.0, 0.0, 0.0], "tench": [0.0, 1.0, 0.0]}, id="toy-words")
    sentence = FakeEmbedder(8, cacheable=True)
    combined = CombinedEmbedder([sentence, words])
    out, _, record = _inject(imagenet_head, ["capybara"], tmp_path, embedder=combined)
    assert record["embedder"] == "combined(fake-8, toy-words)" and out.num_classes == 1001
    assert record["descriptions"]["capybara"]["source"] == "wordnet-lemma"  # the sentence part reads definitions
    assert f"capybara: {wordnet_definition(CAPYBARA)}" in [t for call in sentence.calls for t in call]


def test_inject_without_any_new_description_describes_everything_by_name(imagenet_head, tmp_path, caplog):
    _, embedder, record = _inject(imagenet_head, ["zorblax"], tmp_path)
    texts = [t for call in embedder.calls for t in call]
    assert "tench" in texts and not any(t.startswith("tench: ") for t in texts)  # seen side matches the new side
    assert record["descriptions"] == {"zorblax": {"text": None, "source": "none"}}
    assert "no description for any new class" in caplog.text
    assert "embedder=SentenceTransformerEmbedder('sentence-transformers/all-mpnet-base-v2')" in caplog.text
