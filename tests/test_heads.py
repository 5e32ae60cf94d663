"""Head surgery on every timm head family: find, read, grow, save and reload.

The parametrised test builds small random models (``pretrained=False``, tiny images where the model
allows) whose head layers get random biases, BatchNorm statistics and mixing weights, so that folding
and mixing are not trivially the identity.
"""

from __future__ import annotations

import pytest
import timm
import torch
from torch import nn

from classifier_injection import InjectionConfig, UnsupportedHeadError, find_head, inject, load_injected, save_injected
from classifier_injection.heads import head_segments

from .conftest import FakeEmbedder

N, K = 7, 3
NAMES = [f"class {i}" for i in range(N)]
NEW = ["capybara", "red panda", "okapi"]

#: name -> (expected family, create_model kwargs, image size). At least one per family of
#: ../shared/notes/timm-heads.md (samvit, the heaviest wrapper, is left to the zoo sweep); about a minute
#: on 2 cores. The whole zoo: ``python -m benchmarks.studies.zoo`` (see tests/test_zoo.py).
ARCHS: dict[str, tuple[str, dict, int]] = {
    # plain Linear
    "test_resnet": ("linear", {}, 32),
    "test_vit": ("linear", {"img_size": 32}, 32),
    "test_convnext": ("linear", {}, 32),
    "test_efficientnet": ("linear", {}, 32),
    "test_byobnet": ("linear", {}, 32),
    "test_nfnet": ("linear", {}, 32),
    "test_mambaout": ("linear", {}, 32),
    "test_maxvit": ("linear", {"img_size": 32}, 32),
    "mobilenetv3_small_050": ("linear", {}, 32),
    "regnetx_002": ("linear", {}, 32),
    "efficientvit_b0": ("linear", {}, 64),  # head.classifier.4
    "inception_next_atto": ("linear", {}, 32),  # head.fc2
    "legacy_seresnet18": ("linear", {}, 32),  # last_linear
    "deit_tiny_patch16_224": ("linear", {"img_size": 32}, 32),
    "pit_ti_224": ("linear", {"img_size": 64}, 64),
    "mobilevitv2_050": ("linear", {}, 64),
    "ghostnet_050": ("linear", {}, 32),
    "edgenext_xx_small": ("linear", {}, 64),
    "hgnetv2_b0": ("linear", {}, 32),
    "lcnet_050": ("linear", {}, 32),
    # 1x1 Conv2d
    "dla46_c": ("conv1x1", {}, 32),
    "resnetv2_18": ("conv1x1", {}, 32),
    "dpn48b": ("conv1x1", {}, 32),
    # BatchNorm1d + Linear, single
    "efficientvit_m0": ("norm_linear", {"img_size": 64}, 64),
    "shvit_s1": ("norm_linear", {}, 64),
    "levit_256d": ("norm_linear", {"img_size": 64}, 64),
    "iformer_t": ("norm_linear", {}, 64),  # RepVitClassifier
    # distilled twins: Linear (token pooling, then average pooling), BN + Linear
    "deit_tiny_distilled_patch16_224": ("distilled", {"img_size": 32}, 32),
    "pit_ti_distilled_224": ("distilled", {"img_size": 64}, 64),
    "efficientformer_l1": ("distilled", {}, 224),
    "efficientformerv2_s0": ("distilled", {"img_size": 64}, 64),
    "swiftformer_xs": ("distilled", {}, 64),
    "levit_128s": ("distilled", {"img_size": 64}, 64),
    "levit_conv_128s": ("distilled", {"img_size": 64}, 64),
    "levit_384_s8": ("distilled", {"img_size": 64}, 64),  # cfg lists only head.linear
    "repvit_m0_9": ("distilled", {}, 64),
    "iformer_m_distilled": ("distilled", {}, 64),
    # per-branch heads
    "crossvit_tiny_240": ("multi_branch", {"img_size": 120}, 120),
    "efficientvim_m1": ("multi_branch", {}, 64),
    "efficientvim_m1_dist": ("multi_branch", {}, 64),
    # Linear + auxiliary token head
    "volo_d1_224": ("aux_token", {"img_size": 64}, 64),
    # MLP heads whose last layer is the classifier
    "caformer_s18": ("linear", {}, 64),
    # small wrappers
    "cpubone_nano": ("linear", {}, 64),
    "sequencer2d_s": ("linear", {}, 64),
}


class FixedRows:
    """An injector that returns preset rows: the test then knows exactly which rows must appear."""

    name = "fixed"

    def __init__(self, rows: torch.Tensor) -> None:
        self.rows = rows

    def fit(self, seen_descriptors, seen_rows, new_descriptors=None) -> FixedRows:
        assert seen_rows.shape[1] == self.rows.shape[1]
        return self

    def predict(self, descriptors: torch.Tensor) -> torch.Tensor:
        return self.rows[torch.arange(descriptors.shape[0]) % len(self.rows)]  # one row per descriptor, cycled

    def hparams(self) -> dict:
        return {}


def _randomise_head(model: nn.Module) -> None:
    """Non-trivial biases, BatchNorm statistics and mixing weights in the head (timm inits them to 0/1)."""
    g = torch.Generator().manual_seed(1)
    head = find_head(model)
    with torch.no_grad():
        for layer in head.layers:
            module = model.get_submodule(layer.path)
            module.bias.copy_(torch.randn(module.bias.shape, generator=g))
            if layer.norm_path:
                bn = model.get_submodule(layer.norm_path)
                bn.running_mean.copy_(torch.randn(bn.running_mean.shape, generator=g))
                bn.running_var.copy_(torch.rand(bn.running_var.shape, generator=g) + 0.5)
                bn.weight.copy_(torch.rand(bn.weight.shape, generator=g) + 0.5)
                bn.bias.copy_(torch.randn(bn.bias.shape, generator=g))
        for name in ("weights", "weights_dist"):  # efficientvim's branch mixing
            if isinstance(getattr(model, name, None), nn.Parameter):
                getattr(model, name).copy_(torch.randn(getattr(model, name).shape, generator=g))


def _build(name: str, **kwargs) -> nn.Module:
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, num_classes=N, **kwargs).eval()
    _randomise_head(model)
    return model


def _apply_rows(features: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    return features @ rows[:, :-1].T + rows[:, -1]


@pytest.mark.parametrize("name", list(ARCHS))
def test_inject_every_head_family(name, tmp_path):
    family, kwargs, size = ARCHS[name]
    model = _build(name, **kwargs)
    head = find_head(model)
    assert head.family == family
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        before = model(x)
    rows = head.rows(model)
    assert rows.shape == (N, head.in_features + 1)
    if family != "aux_token":
        # The rows and the captured features reproduce the model's logits.
        features = head.features(model, x)
        assert features.shape == (2, head.in_features)
        torch.testing.assert_close(_apply_rows(features, rows), before, rtol=1e-4, atol=1e-4)

    new_rows = 0.1 * torch.randn(K, head.in_features + 1, generator=torch.Generator().manual_seed(3))
    injected = inject(
        model,
        NEW,
        embedder=FakeEmbedder(),
        class_names=NAMES,
        injector=FixedRows(new_rows),
        config=InjectionConfig(calibration="none"),
    )
    with torch.no_grad():
        assert torch.equal(model(x), before), "the user's model was modified"
        after = injected(x)
    assert after.shape == (2, N + K)
    assert torch.equal(after[:, :N], before)
    shared = {t.data_ptr() for t in injected.state_dict().values() if t.numel()}
    assert not shared & {t.data_ptr() for t in model.state_dict().values() if t.numel()}, "tensors shared"

    grown = find_head(injected)
    assert (grown.family, grown.paths, grown.num_classes) == (family, head.paths, N + K)
    grown_rows = grown.rows(injected)
    assert torch.equal(grown_rows[:N], rows)
    torch.testing.assert_close(grown_rows[N:], new_rows, rtol=1e-4, atol=1e-5)
    if family == "aux_token":
        # volo: head(cls) + 0.5 * max_t aux_head(tokens) with the row blocks [W | W_aux / 2 | b].
        inputs = dict(zip(grown.paths, grown.capture(injected, x), strict=True))
        d = inputs["head"].shape[-1]
        expected = _apply_rows(inputs["head"], torch.cat([new_rows[:, :d], new_rows[:, -1:]], dim=1))
        expected = expected + (inputs["aux_head"] @ new_rows[:, d:-1].T).max(dim=1)[0]
        torch.testing.assert_close(after[:, N:], expected, rtol=1e-4, atol=1e-4)
    else:
        torch.testing.assert_close(after[:, N:], _apply_rows(features, new_rows), rtol=1e-4, atol=1e-4)

    assert injected.num_classes == N + K
    assert injected.pretrained_cfg["num_classes"] == N + K
    assert injected.pretrained_cfg["label_names"] == NAMES + NEW

    loaded = load_injected(save_injected(injected, tmp_path / "model"))
    with torch.no_grad():
        assert torch.equal(loaded(x), after)
    assert loaded.pretrained_cfg["label_names"] == NAMES + NEW


@pytest.mark.parametrize("name", ["levit_128s", "efficientvim_m1_dist", "crossvit_tiny_240", "cpubone_nano"])
def test_inject_twice_save_and_reload_with_plain_timm(name, tmp_path):
    _, kwargs, size = ARCHS[name]
    model = _build(name, **kwargs)
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        before = model(x)
    dim = find_head(model).in_features + 1
    once = inject(model, NEW[:2], embedder=FakeEmbedder(), class_names=NAMES, injector=FixedRows(torch.randn(2, dim)))
    twice = inject(once, NEW[2:], embedder=FakeEmbedder(), injector=FixedRows(torch.randn(1, dim)))
    assert head_segments(twice, find_head(twice)) == (N, 2, 1)
    with torch.no_grad():
        out_once, out_twice = once(x), twice(x)
    assert torch.equal(out_twice[:, :N], before) and torch.equal(out_twice[:, : N + 2], out_once)

    path = save_injected(twice, tmp_path / "model")
    reloaded = load_injected(path)
    assert head_segments(reloaded, find_head(reloaded)) == (N, 2, 1)
    plain = timm.create_model(f"local-dir:{path}", pretrained=True).eval()
    with torch.no_grad():
        assert torch.equal(reloaded(x), out_twice)
        torch.testing.assert_close(plain(x), out_twice, rtol=1e-4, atol=1e-4)
    assert plain.pretrained_cfg["label_names"] == NAMES + NEW


RESET_ARCHS = ["test_resnet", "levit_128s", "repvit_m0_9", "efficientvim_m1", "sequencer2d_s"]


@pytest.mark.parametrize("name", RESET_ARCHS)
def test_reset_classifier_still_works_after_injection(name):
    _, kwargs, size = ARCHS[name]
    model = _build(name, **kwargs)
    dim = find_head(model).in_features + 1
    injected = inject(model, NEW, embedder=FakeEmbedder(), class_names=NAMES, injector=FixedRows(torch.randn(K, dim)))
    injected.reset_classifier(5)
    with torch.no_grad():
        assert injected(torch.randn(1, 3, size, size)).shape == (1, 5)
    assert find_head(injected).num_classes == 5


def test_nested_num_classes_follow_growth():
    # RepVitClassifier keeps its own num_classes; undo restores it.
    model = _build("repvit_m0_9")
    head = find_head(model)
    undo = head.grow(model, torch.randn(2, head.in_features + 1))
    assert model.head.num_classes == N + 2
    undo()
    assert model.head.num_classes == N and model.head.head.l.out_features == N


def test_batchnorm_fold_matches_model_and_handles_zero_scale():
    model = _build("levit_256d", img_size=64)
    head = find_head(model)
    bn = model.get_submodule(head.layers[0].norm_path)
    with torch.no_grad():
        bn.weight[:5] = 0  # these features are constant after the BatchNorm
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        before = model(x)
    features, rows = head.features(model, x), head.rows(model)
    torch.testing.assert_close(_apply_rows(features, rows), before, rtol=1e-4, atol=1e-4)
    new_rows = torch.randn(2, head.in_features + 1)
    head.grow(model, new_rows)
    with torch.no_grad():
        after = model(x)
    assert torch.equal(after[:, :N], before)
    assert torch.equal(model.get_submodule(head.layers[0].path).weight[N:, :5], torch.zeros(2, 5))
    # What the new rows say about the constant features is dropped; the rest is exact.
    reachable = new_rows.clone()
    reachable[:, :5] = 0
    torch.testing.assert_close(after[:, N:], _apply_rows(features, reachable), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", ["levit_256d", "deit_tiny_distilled_patch16_224", "resnetv2_18"])
def test_rows_folded_in_blocks_equal_rows_folded_whole(name, monkeypatch):
    from classifier_injection import heads

    _, kwargs, _ = ARCHS[name]
    model = _build(name, **kwargs)
    whole = find_head(model).rows(model)
    monkeypatch.setattr(heads, "_ROW_BLOCK", 3)  # N = 10: blocks of 3, 3, 3 and 1 classes
    assert torch.equal(find_head(model).rows(model), whole)


@pytest.mark.parametrize("name", ["levit_256d", "deit_tiny_distilled_patch16_224", "resnetv2_18"])
def test_rows_grown_in_blocks_equal_rows_grown_whole(name, monkeypatch):
    from classifier_injection import heads

    _, kwargs, _ = ARCHS[name]
    head = find_head(_build(name, **kwargs))
    new_rows = torch.randn(7, head.in_features + 1, generator=torch.Generator().manual_seed(2))

    def grown_parameters() -> list[torch.Tensor]:
        model = _build(name, **kwargs)
        head.grow(model, new_rows)
        return [p for layer in head.layers for p in model.get_submodule(layer.path).parameters()]

    whole = grown_parameters()
    monkeypatch.setattr(heads, "_ROW_BLOCK", 3)  # 7 new rows: blocks of 3, 3 and 1
    assert all(torch.equal(a, b) for a, b in zip(grown_parameters(), whole, strict=True))


def test_old_logits_bit_identical_in_train_mode_too():
    model = _build("levit_128s", img_size=64)
    head = find_head(model)
    model.train()
    x = torch.randn(4, 3, 64, 64)
    torch.manual_seed(5)
    with torch.no_grad():
        before = model(x)
    head.grow(model, torch.randn(2, head.in_features + 1))
    torch.manual_seed(5)
    with torch.no_grad():
        after = model(x)
    assert torch.equal(after[:, :N], before)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_heads(dtype):
    model = _build("levit_128s", img_size=64).to(dtype)
    x = torch.randn(2, 3, 64, 64, dtype=dtype)
    with torch.no_grad():
        before = model(x)
    dim = find_head(model).in_features + 1
    injected = inject(model, NEW, embedder=FakeEmbedder(), class_names=NAMES, injector=FixedRows(torch.randn(K, dim)))
    with torch.no_grad():
        after = injected(x)
    assert after.dtype == dtype and torch.equal(after[:, :N], before)


def test_grow_rejects_wrong_shapes():
    model = _build("test_resnet")
    head = find_head(model)
    with pytest.raises(ValueError, match=rf"new_rows must have shape \[K, {head.in_features + 1}\]"):
        head.grow(model, torch.randn(2, head.in_features))
    with pytest.raises(ValueError, match="empty"):
        head.grow(model, torch.randn(0, head.in_features + 1))
    with pytest.raises(ValueError, match="NaN"):
        head.grow(model, torch.full((1, head.in_features + 1), float("nan")))
    with pytest.raises(ValueError, match=r"use \.layers"):
        find_head(_build("levit_128s", img_size=64)).layer(model)


def _meta(name: str, **kwargs) -> nn.Module:
    with torch.device("meta"):
        return timm.create_model(name, pretrained=False, **kwargs)


@pytest.mark.parametrize(
    ("name", "kwargs", "match"),
    [
        ("resnet18", {"num_classes": 0}, "no classifier to extend"),
        ("aimv2_1b_patch14_224", {}, "no classifier to extend"),  # num_classes=0 config
        ("deepseek_vit_412m_enc", {}, "get_classifier"),  # encoder only
        ("vit_medium_patch16_clip_224", {}, "CLIP-style projection"),
        ("resnet50_clip", {}, "CLIP-style projection"),
    ],
)
def test_refuses_models_without_classes(name, kwargs, match):
    with pytest.raises(UnsupportedHeadError, match=match):
        find_head(_meta(name, **kwargs))


def test_projection_accepted_on_request_and_classes_kept_when_reheaded():
    head = find_head(_meta("vit_medium_patch16_clip_224"), allow_projection=True)
    assert head.paths == ("head",) and head.num_classes == 512
    # The same architecture with a head of the user's own classes is a classifier.
    assert find_head(_meta("vit_medium_patch16_clip_224", num_classes=37)).num_classes == 37


def test_refuses_identity_head_and_non_timm_modules():
    model = _build("test_resnet")
    model.reset_classifier(0)
    with pytest.raises(UnsupportedHeadError, match="no classifier to extend"):
        find_head(model)
    with pytest.raises(UnsupportedHeadError, match="get_classifier"):
        find_head(nn.Linear(3, 4))


def test_refuses_unknown_multi_layer_heads():
    class TwoHeads(nn.Module):
        num_classes = 4

        def __init__(self) -> None:
            super().__init__()
            self.pretrained_cfg: dict = {}
            self.a, self.b = nn.Linear(3, 4), nn.Linear(3, 4)

        def get_classifier(self):
            return self.a, self.b

    with pytest.raises(UnsupportedHeadError, match="combined in a way"):
        find_head(TwoHeads())


def test_inject_refuses_projection_heads_unless_allowed():
    torch.manual_seed(0)
    model = timm.create_model("vit_xsmall_patch16_clip_224", pretrained=False, img_size=32).eval()
    num_dims = model.num_classes  # 512 embedding dimensions, not classes
    names = [f"dim {i}" for i in range(num_dims)]
    dim = find_head(model, allow_projection=True).in_features + 1
    with pytest.raises(UnsupportedHeadError, match="allow_projection=True"):
        inject(model, NEW, embedder=FakeEmbedder(), class_names=names, injector=FixedRows(torch.randn(K, dim)))
    injected = inject(
        model,
        NEW,
        embedder=FakeEmbedder(),
        class_names=names,
        injector=FixedRows(torch.randn(K, dim)),
        config=InjectionConfig(calibration="none", allow_projection=True),
    )
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(injected(x)[:, :num_dims], model(x))
    # Once extended (labelled outputs), the model is a classifier: saving finds its head.
    assert find_head(injected).num_classes == num_dims + K
