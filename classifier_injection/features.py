"""What the head's input looks like on average, estimated from the model's own statistics (no image).

Rows predicted from text share a large component with the *average* feature the head sees: a new row
that blends many old rows keeps their common part while their specific parts cancel, so once it is rescaled
it scores high on every image and wins far too often. The old rows' biases were trained against that
component; a new row's bias must be set against it too, which needs the mean feature ``E[x]``.

Many timm CNNs (EfficientNet, MobileNetV2, MixNet, ...) end in ``BatchNorm (+ activation) -> global average
pool -> classifier``. In eval mode the BatchNorm output of channel ``c`` has mean ``beta_c`` and standard
deviation ``|gamma_c| * sqrt(var_c / (var_c + eps))`` over the data it was trained on (that is what the
running statistics normalise); taking it as Gaussian, ``E[x_c] = E[act(beta_c + sigma_c z)]``, ``z ~ N(0, 1)``,
computed by Gauss-Hermite quadrature with the layer's own activation.

The same quadrature gives the per-position standard deviation ``s_c`` of each channel after the activation;
``s_c / sqrt(H * W)`` is what the pooled feature's spread would be if the ``H x W`` positions were independent.
They are not (neighbouring positions are correlated), so
:class:`~classifier_injection.calibration.SynthesizedCalibration` scales it by its ``spread``.

:func:`feature_statistics` finds the last ``BatchNorm2d`` as wide as the head's input and *checks* with one
forward pass on a random input that the head reads exactly its pooled output; otherwise (residual sums,
LayerNorm heads, ...) it returns ``None`` and calibration falls back to the old rows' mean bias.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from .heads import ClassifierHead

__all__ = ["FeatureStatistics", "feature_statistics"]

_logger = logging.getLogger(__name__)

#: Gauss-Hermite nodes for E[f(z)], z ~ N(0, 1) (probabilists' weights, normalised).
_NODES, _WEIGHTS = np.polynomial.hermite_e.hermegauss(64)
_WEIGHTS = _WEIGHTS / _WEIGHTS.sum()


@dataclass(frozen=True)
class FeatureStatistics:
    """Estimated per-feature statistics of the head's input.

    Attributes:
        mean: ``[in_features]`` float32 on the CPU.
        source: how it was estimated, e.g. ``"bn2 (BatchNormAct2d, ReLU6)"`` (recorded in provenance).
        std: ``[in_features]`` float32: the per-position standard deviation after the activation divided by
            ``sqrt(positions)``, the pooled feature's spread were the positions independent (see the module doc).
        positions: ``H * W`` of the normalisation layer's output in the check forward pass.
    """

    mean: torch.Tensor
    source: str
    std: torch.Tensor | None = None
    positions: int | None = None


def _last_wide_batchnorm(model: nn.Module, width: int) -> tuple[str, nn.BatchNorm2d] | None:
    found = None
    for path, module in model.named_modules():
        if isinstance(module, nn.BatchNorm2d) and module.num_features == width and module.running_var is not None:
            found = (path, module)
    return found


def _activation(norm: nn.BatchNorm2d) -> nn.Module:
    """The activation a timm ``BatchNormAct2d`` applies after normalising (identity for a plain BatchNorm2d)."""
    act = getattr(norm, "act", None)
    return act if isinstance(act, nn.Module) else nn.Identity()


@torch.no_grad()
def _pooled_positions(model: nn.Module, head: ClassifierHead, norm: nn.Module) -> int | None:
    """One eval-mode forward pass on a random input: the number of positions ``H * W`` of ``norm``'s output
    when the head sees their spatial mean, ``None`` otherwise."""
    param = next(model.parameters())
    size = tuple((getattr(model, "pretrained_cfg", None) or {}).get("input_size") or (3, 224, 224))
    generator = torch.Generator().manual_seed(0)
    image = torch.randn(1, *size, generator=generator).to(param.device, param.dtype)
    seen: list[torch.Tensor] = []

    # The hook returns None (a returned value would replace the module's output) and keeps a clone (timm
    # blocks add the shortcut to a norm's output in place, as resnet does, which would fake a match).
    def keep_output(_module: nn.Module, _inputs: tuple, output: torch.Tensor) -> None:
        if not seen:
            seen.append(output.detach().clone())

    handle = norm.register_forward_hook(keep_output)
    modes = {m: m.training for m in model.modules()}
    try:
        model.eval()
        features = head.capture(model, image)[0].float()
    except (RuntimeError, ValueError, TypeError, AssertionError, IndexError) as err:
        # Inputs of another size or kind (set by the user, not in pretrained_cfg): no estimate, no failure.
        _logger.info("no feature statistics: the check forward pass on a %s input failed (%s)", tuple(size), err)
        return None
    finally:
        for module, training in modes.items():
            module.training = training
        handle.remove()
    if not seen or seen[0].dim() != 4:
        return None
    pooled = seen[0].float().mean(dim=(2, 3))
    if features.dim() == 4:  # 1x1 conv classifier
        features = features.mean(dim=(2, 3))
    if features.shape != pooled.shape:
        return None
    atol = 1e-3 * float(pooled.abs().max().clamp_min(1e-6))
    return seen[0].shape[2] * seen[0].shape[3] if torch.allclose(features, pooled, rtol=1e-3, atol=atol) else None


def feature_statistics(model: nn.Module, head: ClassifierHead) -> FeatureStatistics | None:
    """Estimate the mean and spread of the features the head's rows see, or ``None`` when the model hides them.

    Supported: heads with one input group fed by ``BatchNorm2d`` (with or without timm's fused activation) and
    global average pooling (checked by a forward pass on one random input, in eval mode; the model's modes
    are restored and nothing in it changes).
    """
    if len(head.group_widths) != 1:
        return None
    found = _last_wide_batchnorm(model, head.in_features)
    positions = _pooled_positions(model, head, found[1]) if found is not None else None
    if positions is None:
        return None
    path, norm = found
    var = norm.running_var.detach().double().cpu()
    gamma = norm.weight.detach().double().cpu() if norm.weight is not None else torch.ones_like(var)
    beta = norm.bias.detach().double().cpu() if norm.bias is not None else torch.zeros_like(var)
    sigma = gamma.abs() * torch.sqrt(var / (var + norm.eps))
    points = beta[:, None] + sigma[:, None] * torch.from_numpy(_NODES)[None]  # [D, nodes]
    act = _activation(norm)
    param = next(act.parameters(), None)  # PReLU and friends: evaluate where their weights live
    values = act(points.to(param.device, param.dtype)) if param is not None else act(points)
    values, weights = values.double().cpu(), torch.from_numpy(_WEIGHTS)[None]
    mean = (values * weights).sum(dim=1)
    std = ((values - mean[:, None]).square() * weights).sum(dim=1).sqrt() / positions**0.5
    source = f"{path} ({type(norm).__name__}, {type(act).__name__}): Gaussian running statistics"
    return FeatureStatistics(mean=mean.float(), source=source, std=std.float(), positions=positions)
