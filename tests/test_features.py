"""Image-free estimate of the head's mean input feature (classifier_injection.features)."""

from __future__ import annotations

import pytest
import timm
import torch
from timm.layers import BatchNormAct2d
from torch import nn

from classifier_injection.features import feature_statistics
from classifier_injection.heads import find_head


class _TinyNet(nn.Module):
    """conv -> BatchNormAct2d -> global average pool -> linear, the ending of timm's EfficientNets."""

    def __init__(self, act: type[nn.Module] = nn.ReLU6, width: int = 12, num_classes: int = 5) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, width, 3, padding=1)
        self.bn = BatchNormAct2d(width, act_layer=act)
        self.classifier = nn.Linear(width, num_classes)
        self.num_classes = num_classes
        self.pretrained_cfg = {"input_size": (3, 16, 16)}

    def get_classifier(self) -> nn.Module:
        return self.classifier

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.conv(x)).mean(dim=(2, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.forward_features(x))


def _calibrated(net: _TinyNet, data: torch.Tensor) -> _TinyNet:
    """Set the BatchNorm's running statistics to the exact ones of ``data`` (what training converges to)."""
    with torch.no_grad():
        out = net.conv(data)
        net.bn.running_mean.copy_(out.mean(dim=(0, 2, 3)))
        net.bn.running_var.copy_(out.var(dim=(0, 2, 3)))
        net.bn.weight.copy_(torch.linspace(0.5, 2.0, len(net.bn.weight)))
        net.bn.bias.copy_(torch.linspace(-1.0, 1.0, len(net.bn.bias)))
    return net.eval()


@pytest.mark.parametrize("act", [nn.ReLU6, nn.SiLU, nn.Identity])
def test_estimate_matches_the_mean_feature_of_the_data_the_statistics_describe(act):
    torch.manual_seed(0)
    data = torch.randn(256, 3, 16, 16)
    net = _calibrated(_TinyNet(act), data)
    stats = feature_statistics(net, find_head(net))
    assert stats is not None and stats.mean.shape == (12,) and "bn" in stats.source
    with torch.no_grad():
        empirical = net.forward_features(data).mean(0)
    # Conv outputs of Gaussian noise are Gaussian: the quadrature is then exact up to sampling noise.
    torch.testing.assert_close(stats.mean, empirical, atol=0.03, rtol=0.03)


def test_model_is_left_as_it_was():
    net = _calibrated(_TinyNet(), torch.randn(64, 3, 16, 16)).train()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    assert feature_statistics(net, find_head(net)) is not None
    assert net.training and net.bn.training, "the modes of every module must be restored"
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items()), "running statistics changed"
    assert not net.bn._forward_hooks and not net.classifier._forward_pre_hooks


@pytest.mark.parametrize("name", ["resnet18", "vit_tiny_patch16_224", "convnext_atto"])
def test_models_whose_head_does_not_read_a_pooled_batchnorm_get_none(name):
    # resnet18 ends in BatchNorm2d(512) but adds the shortcut (in place) before the head: it must not match.
    model = timm.create_model(name, pretrained=False).eval()
    assert feature_statistics(model, find_head(model)) is None


def test_efficientnet_lite_is_supported_and_its_outputs_are_untouched():
    model = timm.create_model("tf_efficientnet_lite0", pretrained=False).eval()
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        before = model(x)
    stats = feature_statistics(model, find_head(model))
    assert stats is not None and stats.source.startswith("bn2 (BatchNormAct2d, ReLU6)")
    assert bool((stats.mean >= 0).all() and (stats.mean <= 6).all()), "ReLU6 outputs lie in [0, 6]"
    with torch.no_grad():
        assert torch.equal(model(x), before)


def test_a_model_that_rejects_the_check_input_gets_none_instead_of_an_error():
    net = _calibrated(_TinyNet(), torch.randn(32, 3, 16, 16))
    net.pretrained_cfg = {"input_size": (5, 16, 16)}  # wrong channel count: the conv raises
    assert feature_statistics(net, find_head(net)) is None
    assert not net.training


def test_spread_is_the_per_position_spread_over_the_square_root_of_the_positions():
    torch.manual_seed(0)
    data = torch.randn(256, 3, 16, 16)
    net = _calibrated(_TinyNet(nn.ReLU6), data)
    stats = feature_statistics(net, find_head(net))
    assert stats is not None and stats.positions == 16 * 16 and stats.std.shape == (12,)
    with torch.no_grad():
        per_position = net.bn(net.conv(data)).std(dim=(0, 2, 3))
    torch.testing.assert_close(stats.std * 16, per_position, atol=0.03, rtol=0.05)
