"""Find, read and grow the classification layer(s) of a timm model.

A head is described by :class:`ClassifierHead`: the module paths of the final affine layer(s) that
produce class logits, their rows ``[W | b]`` (what injectors learn from) and how to grow them.

Exactness of old logits: a larger ``nn.Linear`` computes ``x @ W.T`` with a different kernel tiling,
which changes the last bits of the old logits. Grown layers are therefore replaced by
:class:`SegmentedLinear` / :class:`SegmentedConv2d`: subclasses of the timm layer types whose parameters
keep timm's layout (``weight`` of shape ``[N + K, ...]``) but whose forward pass evaluates the rows in
the segments they were added in. A row slice of a contiguous weight is itself contiguous with the same
strides, so each segment runs exactly the kernel the original layer ran: the old logits are bit-identical.
A plain ``nn.Linear`` loading the same state dict gives the same logits up to float rounding.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "ClassifierHead",
    "SegmentedConv2d",
    "SegmentedLinear",
    "UnsupportedHeadError",
    "find_head",
    "restore_segments",
]


class UnsupportedHeadError(NotImplementedError):
    """The model's classifier is of a kind that cannot be extended (yet), or there is none."""


def _check_segments(segments: Sequence[int], out_features: int) -> tuple[int, ...]:
    segments = tuple(int(s) for s in segments)
    if not segments or any(s <= 0 for s in segments) or sum(segments) != out_features:
        raise ValueError(
            f"segments {segments} must be positive row counts summing to the layer's {out_features} outputs"
        )
    return segments


class SegmentedLinear(nn.Linear):
    """``nn.Linear`` whose rows are evaluated in segments, so rows added later never perturb old logits.

    State dict layout is the plain ``nn.Linear`` one (``weight [out, in]``, ``bias [out]``).
    """

    def __init__(self, in_features: int, segments: Sequence[int], bias: bool = True, device=None, dtype=None):
        segments = tuple(segments)
        super().__init__(in_features, sum(segments), bias=bias, device=device, dtype=dtype)
        self.segments = _check_segments(segments, self.out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if len(self.segments) == 1:
            return F.linear(x, self.weight, self.bias)
        weights = self.weight.split(self.segments, dim=0)
        biases = self.bias.split(self.segments, dim=0) if self.bias is not None else [None] * len(weights)
        return torch.cat([F.linear(x, w, b) for w, b in zip(weights, biases, strict=True)], dim=-1)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, segments={self.segments}"


class SegmentedConv2d(nn.Conv2d):
    """1x1 ``nn.Conv2d`` classifier evaluated in output-channel segments (see :class:`SegmentedLinear`)."""

    def __init__(self, in_channels: int, segments: Sequence[int], bias: bool = True, device=None, dtype=None):
        segments = tuple(segments)
        super().__init__(in_channels, sum(segments), kernel_size=1, bias=bias, device=device, dtype=dtype)
        self.segments = _check_segments(segments, self.out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if len(self.segments) == 1:
            return super().forward(x)
        weights = self.weight.split(self.segments, dim=0)
        biases = self.bias.split(self.segments, dim=0) if self.bias is not None else [None] * len(weights)
        return torch.cat([self._conv_forward(x, w, b) for w, b in zip(weights, biases, strict=True)], dim=1)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, segments={self.segments}"


def _is_1x1_conv(module: nn.Module) -> bool:
    return (
        isinstance(module, nn.Conv2d)
        and module.kernel_size == (1, 1)
        and module.stride == (1, 1)
        and module.groups == 1
        and module.dilation == (1, 1)
    )


def _out_features(layer: nn.Module) -> int:
    return layer.out_features if isinstance(layer, nn.Linear) else layer.out_channels


def _segments_of(layer: nn.Module) -> tuple[int, ...]:
    return getattr(layer, "segments", (_out_features(layer),))


def _layer_rows(layer: nn.Module) -> torch.Tensor:
    """``[W | b]`` of a Linear or 1x1 Conv2d as float32 on the CPU, shape ``[out, in + 1]``."""
    weight = layer.weight.detach()
    if weight.dim() == 4:
        weight = weight[:, :, 0, 0]
    bias = layer.bias.detach() if layer.bias is not None else weight.new_zeros(weight.shape[0])
    return torch.cat([weight, bias[:, None]], dim=1).float().cpu()


def _grown_layer(layer: nn.Module, new_rows: torch.Tensor) -> nn.Module:
    """A segmented copy of ``layer`` with ``new_rows`` (``[K, in + 1]``) appended as a new segment.

    A layer without bias stays without bias (its old logits come from the same kernel); the bias
    column of ``new_rows`` is then dropped.
    """
    weight = layer.weight.detach()
    dtype, device = weight.dtype, weight.device
    new_w = new_rows[:, :-1].to(device=device, dtype=dtype)
    segments = (*_segments_of(layer), new_rows.shape[0])
    has_bias = layer.bias is not None
    if isinstance(layer, nn.Linear):
        grown = SegmentedLinear(layer.in_features, segments, bias=has_bias, device=device, dtype=dtype)
    else:
        grown = SegmentedConv2d(layer.in_channels, segments, bias=has_bias, device=device, dtype=dtype)
        new_w = new_w[:, :, None, None]
    with torch.no_grad():
        grown.weight.copy_(torch.cat([weight, new_w], dim=0))
        if has_bias:
            new_b = new_rows[:, -1].to(device=device, dtype=dtype)
            grown.bias.copy_(torch.cat([layer.bias.detach(), new_b], dim=0))
    for param in grown.parameters():
        param.requires_grad_(layer.weight.requires_grad)
    grown.train(layer.training)
    return grown


def _set_submodule(model: nn.Module, path: str, module: nn.Module) -> None:
    parent_path, _, name = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    if isinstance(parent, (nn.Sequential, nn.ModuleList)) and name.isdigit():
        parent[int(name)] = module
    else:
        setattr(parent, name, module)


def _module_path(model: nn.Module, module: nn.Module) -> str | None:
    for path, candidate in model.named_modules():
        if candidate is module:
            return path
    return None


@dataclass(frozen=True)
class ClassifierHead:
    """The final affine layer of a timm classifier.

    Attributes:
        path: module path of the layer inside the model (e.g. ``"classifier"``, ``"head.fc"``).
        family: ``"linear"`` or ``"conv1x1"``.
        num_classes: number of rows (class logits) the layer produces.
        in_features: width of the layer's input (the features the rows see).
    """

    path: str
    family: str
    num_classes: int
    in_features: int

    def layer(self, model: nn.Module) -> nn.Module:
        return model.get_submodule(self.path)

    def rows(self, model: nn.Module) -> torch.Tensor:
        """The rows ``[W | b]`` as float32 on the CPU, shape ``[num_classes, in_features + 1]``."""
        return _layer_rows(self.layer(model))

    def example_features(self, model: nn.Module, batch: int = 4, seed: int = 0) -> torch.Tensor:
        """Random inputs for :meth:`logits` on the layer's device and dtype (used to verify growth)."""
        weight = self.layer(model).weight
        features = torch.randn(batch, self.in_features, generator=torch.Generator().manual_seed(seed))
        return features.to(device=weight.device, dtype=weight.dtype)

    def logits(self, model: nn.Module, features: torch.Tensor) -> torch.Tensor:
        """The head layer's output for ``features`` of shape ``[B, in_features]``."""
        layer = self.layer(model)
        if self.family == "conv1x1":
            return layer(features[:, :, None, None])[:, :, 0, 0]
        return layer(features)

    def grow(self, model: nn.Module, new_rows: torch.Tensor) -> Callable[[], None]:
        """Append ``new_rows`` (``[K, in_features + 1]``) to the layer of ``model``, in place.

        Returns a function that undoes the growth (puts the original layer back).
        """
        if new_rows.dim() != 2 or new_rows.shape[1] != self.in_features + 1:
            raise ValueError(f"new_rows must have shape [K, {self.in_features + 1}], got {tuple(new_rows.shape)}")
        old_layer = self.layer(model)
        _set_submodule(model, self.path, _grown_layer(old_layer, new_rows))
        return lambda: _set_submodule(model, self.path, old_layer)


def find_head(model: nn.Module) -> ClassifierHead:
    """Locate the classification layer of a timm model.

    Raises:
        UnsupportedHeadError: the model has no classifier, or one of a kind not supported.
    """
    if not hasattr(model, "get_classifier"):
        raise UnsupportedHeadError(f"{type(model).__name__} has no get_classifier(): pass a timm classification model")
    classifier = model.get_classifier()
    name = type(model).__name__
    if classifier is None or isinstance(classifier, nn.Identity) or getattr(model, "num_classes", 1) == 0:
        raise UnsupportedHeadError(
            f"{name} has no classifier to extend (num_classes={getattr(model, 'num_classes', None)}): "
            "create it with a classification head, e.g. timm.create_model(name, num_classes=N)"
        )
    if isinstance(classifier, nn.Linear):
        family, in_features, num_classes = "linear", classifier.in_features, classifier.out_features
    elif _is_1x1_conv(classifier):
        family, in_features, num_classes = "conv1x1", classifier.in_channels, classifier.out_channels
    else:
        raise UnsupportedHeadError(
            f"{name}.get_classifier() is a {type(classifier).__name__}; only nn.Linear and 1x1 nn.Conv2d "
            "classifiers are supported"
        )
    path = _module_path(model, classifier)
    if path is None:
        raise UnsupportedHeadError(f"{name}.get_classifier() is not a submodule of the model")
    return ClassifierHead(path=path, family=family, num_classes=num_classes, in_features=in_features)


def restore_segments(model: nn.Module, head: ClassifierHead, segments: Sequence[int]) -> None:
    """Re-create the segmented layout recorded at save time, so reloaded old logits stay bit-identical."""
    layer = head.layer(model)
    segments = _check_segments(segments, _out_features(layer))
    if len(segments) == 1:
        return
    device, dtype = layer.weight.device, layer.weight.dtype
    if isinstance(layer, nn.Linear):
        new = SegmentedLinear(layer.in_features, segments, bias=layer.bias is not None, device=device, dtype=dtype)
    else:
        new = SegmentedConv2d(layer.in_channels, segments, bias=layer.bias is not None, device=device, dtype=dtype)
    new.load_state_dict(layer.state_dict())
    new.train(layer.training)
    _set_submodule(model, head.path, new)


def head_segments(model: nn.Module, head: ClassifierHead) -> tuple[int, ...]:
    """Row counts of the segments of the head layer (one entry for a never-injected head)."""
    return _segments_of(head.layer(model))
