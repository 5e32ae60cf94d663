"""Find, read and grow the classification layer(s) of any timm model.

A timm "classifier" is not always one ``nn.Linear``. :func:`find_head` describes every head as a
:class:`ClassifierHead`: a list of final affine layers (``nn.Linear`` or 1x1 ``nn.Conv2d``) whose outputs
are mixed into the class logits as

    logits = sum_l c_l * reduce_l(layer_l(norm_l(x_l)))

where ``c_l`` is a mixing coefficient, ``norm_l`` an optional ``BatchNorm1d`` folded into the rows and
``reduce_l`` is the identity except for volo's token head (max over tokens). Layers that read the same
input tensor form one *input group*. The rows ICIS learns from are the rows of this sum, one block per
group plus one bias: ``[sum_{l in g1} c_l W_l | sum_{l in g2} c_l W_l | ... | sum_l c_l b_l]``; they see the
concatenation of the group inputs (:meth:`ClassifierHead.features`). For every family except volo,
``features @ W.T + b`` equals the model's logits up to float rounding (tested).

Treatment per family:

* ``linear`` / ``conv1x1``: one layer (resnet ``fc``, vit ``head``, convnext ``head.fc``, dla/resnetv2
  1x1 convs, caformer's MLP head ``head.fc.fc2``, cpubone/samvit/sequencer wrappers unwrapped to the
  final layer). A 1x1 conv is a Linear on its channels.
* ``norm_linear``: ``BatchNorm1d -> Linear`` (levit/repvit/iformer/shvit/efficientvit_msra ``NormLinear``).
  The BatchNorm is folded in eval mode (``W' = W * s``, ``b' = b + W (beta - mean * s)`` with
  ``s = gamma / sqrt(var + eps)``), so the rows multiply the pooled features themselves. New rows are
  unfolded before they are stored (``W = W' / s``, ``b = b' - W (beta - mean * s)``), so the state dict keeps
  timm's layout and the old rows and the BatchNorm are untouched: old logits stay bit-identical in train
  and eval mode; the new rows mean what ICIS predicted in eval mode (where BN uses running statistics).
  A feature with ``s == 0`` is constant after the BatchNorm: the new rows get 0 there.
* ``distilled``: twin heads ``head`` + ``head_dist`` (deit/pit distilled, efficientformer(v2), swiftformer,
  levit, repvit/iformer distilled) whose eval logits are ``(head + head_dist) / 2``. When both read the
  same features (average pooling) they form one group: the rows are the mean of the twin rows, and both
  twins receive the *same* new rows, so each twin alone (timm's distilled-training mode) also scores the
  new classes as ICIS predicted. When they read different tokens (token pooling: deit, pit: class token
  and distillation token) the rows are ``[W/2 | W_dist/2 | (b + b_dist)/2]`` over the two tokens, and
  each twin receives its own half of one predicted row: the eval logits are exactly the predicted row
  applied to both tokens.
* ``multi_branch``: one head per branch, logits averaged (crossvit, different widths) or softmax-weighted
  (efficientvim, weights ``softmax(model.weights)``; distilled efficientvim mixes ``heads`` and
  ``heads_dist`` per branch, halved). Each branch is one group: ICIS predicts one row over all branches,
  which is split per branch and divided by the branch's mixing weight; the mixed logits equal the row.
* ``aux_token``: volo, ``head(cls) + 0.5 * max_t aux_head(tokens)``. The rows are
  ``[W | W_aux / 2 | b + b_aux / 2]`` and each layer gets its block back (times 2 for ``aux_head``). The max
  is not linear, so :meth:`ClassifierHead.features` is refused for this family; growing is still exact
  for the old logits (the max is taken per class).

Refused with :class:`UnsupportedHeadError`: models without ``get_classifier`` or with ``num_classes == 0``
(encoders, ``Identity`` heads), heads whose affine layer is not found, and CLIP-style projection heads
(image-text embeddings, not classes) unless ``find_head(model, allow_projection=True)``.

Exactness of old logits: a larger ``nn.Linear`` computes ``x @ W.T`` with a different kernel tiling,
which changes the last bits of the old logits. Grown layers are therefore replaced by
:class:`SegmentedLinear` / :class:`SegmentedConv2d`: subclasses of the timm layer types whose parameters
keep timm's layout (``weight`` of shape ``[N + K, ...]``) but whose forward pass evaluates the rows in
the segments they were added in. A row slice of a contiguous weight is itself contiguous with the same
strides, so each segment runs exactly the kernel the original layer ran. Every mixing above is
elementwise per class, so the old logits of the model are bit-identical. A plain ``nn.Linear`` loading
the same state dict gives the same logits up to float rounding.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "ClassifierHead",
    "HeadLayer",
    "SegmentedConv2d",
    "SegmentedLinear",
    "UnsupportedHeadError",
    "find_head",
    "head_segments",
    "restore_segments",
]

#: Substrings of architecture names / pretrained tags of image-text (CLIP-style) models whose head is an
#: embedding projection, not a classifier.
_PROJECTION_MARKERS = (
    "clip",
    "siglip",
    "openai",
    "laion",
    "datacomp",
    "dfn",
    "merged2b",
    "webli",
    "pe_core",
    "_mci",
)


class UnsupportedHeadError(NotImplementedError):
    """The model's classifier is of a kind that cannot be extended, or there is none."""


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
        # Static slices over the Python tuple (not torch.split): traceable by fx, torch.export, ONNX and
        # TorchScript, and each slice is the same view split() returns, so the kernels are unchanged.
        outputs = []
        bias = self.bias
        start = 0
        for size in self.segments:
            stop = start + size
            outputs.append(F.linear(x, self.weight[start:stop], None if bias is None else bias[start:stop]))
            start = stop
        return torch.cat(outputs, dim=-1)

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
            return self._conv_forward(x, self.weight, self.bias)  # nn.Conv2d.forward, in a scriptable form
        outputs = []
        bias = self.bias
        start = 0
        for size in self.segments:  # static slices, as in SegmentedLinear.forward
            stop = start + size
            outputs.append(self._conv_forward(x, self.weight[start:stop], None if bias is None else bias[start:stop]))
            start = stop
        return torch.cat(outputs, dim=1)

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


def _is_affine(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or _is_1x1_conv(module)


def _out_features(layer: nn.Module) -> int:
    return layer.out_features if isinstance(layer, nn.Linear) else layer.out_channels


def _in_features(layer: nn.Module) -> int:
    return layer.in_features if isinstance(layer, nn.Linear) else layer.in_channels


def _segments_of(layer: nn.Module) -> tuple[int, ...]:
    return getattr(layer, "segments", (_out_features(layer),))


def _weight_2d(layer: nn.Module) -> torch.Tensor:
    weight = layer.weight.detach()
    return weight[:, :, 0, 0] if weight.dim() == 4 else weight


def _segmented_copy(layer: nn.Module, segments: Sequence[int]) -> nn.Module:
    """An empty segmented layer of the same type, input width, bias, device and dtype as ``layer``."""
    kwargs = {"bias": layer.bias is not None, "device": layer.weight.device, "dtype": layer.weight.dtype}
    if isinstance(layer, nn.Linear):
        return SegmentedLinear(layer.in_features, segments, **kwargs)
    return SegmentedConv2d(layer.in_channels, segments, **kwargs)


def _grown_layer(layer: nn.Module, new_weight: torch.Tensor, new_bias: torch.Tensor) -> nn.Module:
    """A segmented copy of ``layer`` with rows ``new_weight [K, in]`` / ``new_bias [K]`` as a new segment.

    A layer without bias stays without bias (its old logits come from the same kernel); ``new_bias`` is
    then dropped.
    """
    weight = layer.weight.detach()
    new_w = new_weight.to(device=weight.device, dtype=weight.dtype)
    if weight.dim() == 4:
        new_w = new_w[:, :, None, None]
    grown = _segmented_copy(layer, (*_segments_of(layer), new_weight.shape[0]))
    num_old = weight.shape[0]
    with torch.no_grad():  # slice by slice: a head of 22k rows is not concatenated first
        grown.weight[:num_old].copy_(weight)
        grown.weight[num_old:].copy_(new_w)
        if layer.bias is not None:
            grown.bias[:num_old].copy_(layer.bias.detach())
            grown.bias[num_old:].copy_(new_bias)
    for param in grown.parameters():
        param.requires_grad_(layer.weight.requires_grad)
    grown.train(layer.training)
    return grown


def _layer_share(
    rows: torch.Tensor,
    columns: tuple[int, int],
    group_total: torch.Tensor,
    bias_total: torch.Tensor,
    norm: tuple[torch.Tensor, torch.Tensor] | None,
    dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One layer's ``(weight, bias)`` in ``dtype`` for float64 ``rows [K, D + 1]`` (see :meth:`ClassifierHead.grow`)."""
    weight = rows[:, columns[0] : columns[1]] / group_total
    bias = rows[:, -1] / bias_total
    if norm is not None:
        scale, shift = norm
        safe = torch.where(scale == 0, torch.ones_like(scale), scale)
        weight = torch.where(scale == 0, torch.zeros_like(weight), weight / safe)
        bias = bias - weight @ shift
    return weight.to(dtype), bias.to(dtype)


def _set_submodule(model: nn.Module, path: str, module: nn.Module) -> None:
    parent_path, _, name = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    if isinstance(parent, (nn.Sequential, nn.ModuleList)) and name.isdigit():
        parent[int(name)] = module
    else:
        setattr(parent, name, module)


#: Classes folded at a time by :meth:`ClassifierHead.rows`.
_ROW_BLOCK = 2048


def _f64(tensor: torch.Tensor) -> torch.Tensor:
    """A float64 copy on the CPU (meta stays meta): row arithmetic never depends on the accelerator."""
    tensor = tensor.detach()
    return tensor.double() if tensor.is_meta else tensor.to("cpu", torch.float64)


def _bn_scale_shift(bn: nn.BatchNorm1d) -> tuple[torch.Tensor, torch.Tensor]:
    """Eval-mode BatchNorm as ``y = x * scale + shift`` (float64, CPU)."""
    if bn.running_mean is None or bn.running_var is None:
        raise UnsupportedHeadError("a BatchNorm1d without running statistics cannot be folded into the classifier")
    var, mean = _f64(bn.running_var), _f64(bn.running_mean)
    gamma = _f64(bn.weight) if bn.weight is not None else torch.ones_like(var)
    beta = _f64(bn.bias) if bn.bias is not None else torch.zeros_like(var)
    scale = gamma / torch.sqrt(var + bn.eps)
    return scale, beta - mean * scale


@dataclass(frozen=True)
class HeadLayer:
    """One affine layer that produces class logits.

    Attributes:
        path: module path of the ``nn.Linear`` / 1x1 ``nn.Conv2d`` (e.g. ``"head.fc"``, ``"head_dist.linear"``).
        kind: ``"linear"`` or ``"conv1x1"``.
        in_features: width of the layer's input.
        group: index of the input group (layers of one group read the same tensor).
        norm_path: module path of a ``BatchNorm1d`` applied right before the layer (folded), or ``None``.
        reduce: ``None``, or ``"token_max"`` for a head applied to tokens whose logits are maxed over tokens.
    """

    path: str
    kind: str
    in_features: int
    group: int = 0
    norm_path: str | None = None
    reduce: str | None = None

    @property
    def entry_path(self) -> str:
        """The module whose input is the features the rows see (the BatchNorm if folded)."""
        return self.norm_path or self.path


@dataclass(frozen=True)
class ClassifierHead:
    """The layer(s) of a timm model that produce its class logits, and how to read and grow them.

    Attributes:
        family: ``"linear"``, ``"conv1x1"``, ``"norm_linear"``, ``"distilled"``, ``"multi_branch"`` or
            ``"aux_token"`` (see the module docstring).
        num_classes: number of class logits (rows of every layer).
        layers: the affine layers, in module order.
        mixing: how layer outputs combine: ``"single"``, ``"mean"``, ``"volo"``, ``"efficientvim"``.
    """

    family: str
    num_classes: int
    layers: tuple[HeadLayer, ...]
    mixing: str = "single"

    # ----------------------------------------------------------------------------- description
    @property
    def paths(self) -> tuple[str, ...]:
        return tuple(layer.path for layer in self.layers)

    @property
    def path(self) -> str:
        """Module path of the layer, or the comma-joined paths of all layers of a multi-layer head."""
        return ",".join(self.paths)

    @property
    def group_widths(self) -> tuple[int, ...]:
        widths: dict[int, int] = {}
        for layer in self.layers:
            widths.setdefault(layer.group, layer.in_features)
        return tuple(widths[g] for g in sorted(widths))

    @property
    def in_features(self) -> int:
        """Width of the features the rows see (the sum of the input groups' widths)."""
        return sum(self.group_widths)

    def layer(self, model: nn.Module) -> nn.Module:
        """The affine layer of a single-layer head (use :attr:`layers` for multi-layer heads)."""
        if len(self.layers) != 1:
            raise ValueError(f"this {self.family} head has {len(self.layers)} layers ({self.path}): use .layers")
        return model.get_submodule(self.layers[0].path)

    def coefficients(self, model: nn.Module) -> list[torch.Tensor]:
        """The mixing coefficient ``c_l`` of each layer, as 0-d float64 tensors on the CPU (meta if the model is)."""
        device = "meta" if model.get_submodule(self.layers[0].path).weight.is_meta else "cpu"
        n = len(self.layers)
        if self.mixing == "single":
            return [torch.ones((), dtype=torch.float64, device=device)]
        if self.mixing == "mean":
            return [torch.full((), 1.0 / n, dtype=torch.float64, device=device)] * n
        if self.mixing == "volo":
            return [
                torch.full((), 1.0 if layer.reduce is None else 0.5, dtype=torch.float64, device=device)
                for layer in self.layers
            ]
        if self.mixing == "efficientvim":
            coefficients = []
            distilled = any(layer.path.startswith("heads_dist.") for layer in self.layers)
            for layer in self.layers:
                attr = "weights_dist" if layer.path.startswith("heads_dist.") else "weights"
                weights = _f64(getattr(model, attr)).softmax(-1)
                coefficients.append(weights[int(layer.path.rsplit(".", 1)[1])] * (0.5 if distilled else 1.0))
            return coefficients
        raise ValueError(f"unknown mixing {self.mixing!r}")

    # ----------------------------------------------------------------------------- rows
    def _folded(self, model: nn.Module, layer: HeadLayer, classes: slice) -> tuple[torch.Tensor, torch.Tensor]:
        """``(W', b')`` of one layer's rows ``classes`` in float64, with its BatchNorm folded in."""
        module = model.get_submodule(layer.path)
        weight = _f64(_weight_2d(module)[classes])
        bias = _f64(module.bias[classes]) if module.bias is not None else weight.new_zeros(weight.shape[0])
        if layer.norm_path is not None:
            scale, shift = _bn_scale_shift(model.get_submodule(layer.norm_path))
            bias = bias + weight @ shift
            weight = weight * scale
        return weight, bias

    def rows(self, model: nn.Module) -> torch.Tensor:
        """The rows ``[W | b]``, shape ``[num_classes, in_features + 1]``, float32 on the CPU (meta if the model is).

        Folded in float64 a block of classes at a time, so a large head never exists in float64 whole.
        """
        coefficients = self.coefficients(model)
        device = coefficients[0].device
        rows = torch.empty(self.num_classes, self.in_features + 1, dtype=torch.float32, device=device)
        for start in range(0, self.num_classes, _ROW_BLOCK):
            classes = slice(start, start + _ROW_BLOCK)
            blocks: dict[int, torch.Tensor] = {}
            bias = None
            for layer, c in zip(self.layers, coefficients, strict=True):
                weight, b = self._folded(model, layer, classes)
                blocks[layer.group] = blocks[layer.group] + c * weight if layer.group in blocks else c * weight
                bias = c * b if bias is None else bias + c * b
            rows[classes] = torch.cat([*(blocks[g] for g in sorted(blocks)), bias[:, None]], dim=1)
        return rows

    # ----------------------------------------------------------------------------- features and logits
    def capture(self, model: nn.Module, *args, **kwargs) -> tuple[torch.Tensor, ...]:
        """Run ``model(*args, **kwargs)`` and return what each layer of the head received (its entry input).

        The model runs in its current mode, without gradients. Returns one tensor per layer, in
        :attr:`layers` order, suitable for :meth:`logits`.
        """
        captured: dict[int, torch.Tensor] = {}
        handles = []
        for i, layer in enumerate(self.layers):

            def hook(_module, inputs, i=i):
                captured.setdefault(i, inputs[0].detach())

            handles.append(model.get_submodule(layer.entry_path).register_forward_pre_hook(hook))
        try:
            with torch.no_grad():
                model(*args, **kwargs)
        finally:
            for handle in handles:
                handle.remove()
        missing = [self.layers[i].path for i in range(len(self.layers)) if i not in captured]
        if missing:
            raise RuntimeError(f"the forward pass did not reach {missing}: is the model in a distilled-training mode?")
        return tuple(captured[i] for i in range(len(self.layers)))

    def features(self, model: nn.Module, *args, **kwargs) -> torch.Tensor:
        """The features ``[B, in_features]`` the rows see, for a batch ``model(*args, **kwargs)``.

        ``features @ rows[:, :-1].T + rows[:, -1]`` are the model's logits up to float rounding.
        1x1 conv inputs with a spatial extent are averaged over it (exact when the model average-pools
        after the classifier, as a 1x1 conv commutes with average pooling).
        """
        if self.mixing == "volo":
            raise ValueError(
                "volo's logits take a max over tokens of aux_head: they are not rows @ features; "
                "use capture() and logits() instead"
            )
        inputs = self.capture(model, *args, **kwargs)
        by_group: dict[int, torch.Tensor] = {}
        for layer, x in zip(self.layers, inputs, strict=True):
            if layer.kind == "conv1x1":
                x = x.mean(dim=(2, 3))
            by_group.setdefault(layer.group, x)
        return torch.cat([by_group[g] for g in sorted(by_group)], dim=1)

    def example_features(self, model: nn.Module, batch: int = 4, seed: int = 0) -> tuple[torch.Tensor, ...]:
        """Random inputs for :meth:`logits` (one per layer, shared within a group), on the head's device/dtype."""
        generator = torch.Generator().manual_seed(seed)
        by_group: dict[int, torch.Tensor] = {}
        inputs = []
        for layer in self.layers:
            if layer.group not in by_group:
                shape = (batch, 3, layer.in_features) if layer.reduce == "token_max" else (batch, layer.in_features)
                weight = model.get_submodule(layer.path).weight
                by_group[layer.group] = torch.randn(*shape, generator=generator).to(weight.device, weight.dtype)
            inputs.append(by_group[layer.group])
        return tuple(inputs)

    def logits(self, model: nn.Module, features: Sequence[torch.Tensor]) -> torch.Tensor:
        """The head's logits for per-layer inputs (from :meth:`capture` or :meth:`example_features`).

        BatchNorms run in eval mode (running statistics; nothing is updated), whatever the model's mode.
        """
        if isinstance(features, torch.Tensor):
            features = (features,) * len(self.layers)
        if len(features) != len(self.layers):
            raise ValueError(f"features must hold one tensor per layer ({len(self.layers)}), got {len(features)}")
        total = None
        for layer, x, c in zip(self.layers, features, self.coefficients(model), strict=True):
            module = model.get_submodule(layer.path)
            if layer.norm_path is not None:
                bn = model.get_submodule(layer.norm_path)
                x = F.batch_norm(x, bn.running_mean, bn.running_var, bn.weight, bn.bias, False, 0.0, bn.eps)
            if layer.kind == "conv1x1":
                out = module(x[:, :, None, None] if x.dim() == 2 else x)
                out = out[:, :, 0, 0] if out.shape[-2:] == (1, 1) else out.mean(dim=(2, 3))
            else:
                out = module(x)
            if layer.reduce == "token_max":
                out = out.max(dim=1)[0]
            out = out * c.to(out) if self.mixing != "single" else out
            total = out if total is None else total + out
        return total

    # ----------------------------------------------------------------------------- growth
    def grow(self, model: nn.Module, new_rows: torch.Tensor) -> Callable[[], None]:
        """Append ``new_rows`` (``[K, in_features + 1]``, in the space of :meth:`rows`) to every layer, in place.

        Each layer gets the block of its input group divided by the group's total mixing weight, and the
        bias divided by the total mixing weight, so the mixed logits of the new classes equal ``new_rows``
        applied to :meth:`features`. BatchNorms are unfolded (see the module docstring). Nested
        ``num_classes`` attributes of head wrappers are updated (the model's own is the caller's).

        Returns a function that undoes the growth (puts the original layers and attributes back).
        """
        if not isinstance(new_rows, torch.Tensor) or new_rows.dim() != 2 or new_rows.shape[1] != self.in_features + 1:
            shape = tuple(new_rows.shape) if isinstance(new_rows, torch.Tensor) else type(new_rows).__name__
            raise ValueError(f"new_rows must have shape [K, {self.in_features + 1}], got {shape}")
        if new_rows.shape[0] == 0:
            raise ValueError("new_rows is empty: give at least one row")
        if not new_rows.is_meta and not torch.isfinite(new_rows).all():
            raise ValueError("new_rows contains NaN or infinite values")
        coefficients = self.coefficients(model)
        device = coefficients[0].device
        offsets, start = {}, 0
        for g, width in enumerate(self.group_widths):
            offsets[g] = (start, start + width)
            start += width
        group_total: dict[int, torch.Tensor] = {}
        for layer, c in zip(self.layers, coefficients, strict=True):
            group_total[layer.group] = group_total[layer.group] + c if layer.group in group_total else c
        bias_total = sum(coefficients[1:], coefficients[0])

        grown = []
        for layer in self.layers:
            old = model.get_submodule(layer.path)
            norm = _bn_scale_shift(model.get_submodule(layer.norm_path)) if layer.norm_path is not None else None
            # In blocks of rows, each cast to the layer's dtype: thousands of new rows in float64 weigh twice as much.
            blocks = [
                _layer_share(
                    block.detach().to(device=device, dtype=torch.float64),
                    offsets[layer.group],
                    group_total[layer.group],
                    bias_total,
                    norm,
                    old.weight.dtype,
                )
                for block in new_rows.split(_ROW_BLOCK)
            ]
            weight, bias = torch.cat([w for w, _ in blocks]), torch.cat([b for _, b in blocks])
            grown.append((layer.path, old, _grown_layer(old, weight, bias)))

        num_new = new_rows.shape[0]
        wrappers = self._wrappers_with_num_classes(model)
        for path, _old, new in grown:
            _set_submodule(model, path, new)
        for wrapper in wrappers:
            wrapper.num_classes = self.num_classes + num_new

        def undo() -> None:
            for path, old, _new in grown:
                _set_submodule(model, path, old)
            for wrapper in wrappers:
                wrapper.num_classes = self.num_classes

        return undo

    def _wrappers_with_num_classes(self, model: nn.Module) -> list[nn.Module]:
        """Modules between the model and the layers (exclusive) whose ``num_classes`` is the head's."""
        found: dict[int, nn.Module] = {}
        for layer in self.layers:
            parts = layer.path.split(".")
            for i in range(1, len(parts)):
                module = model.get_submodule(".".join(parts[:i]))
                if getattr(module, "num_classes", None) == self.num_classes:
                    found[id(module)] = module
        return list(found.values())


# --------------------------------------------------------------------------------- discovery
def _classifier_candidates(model: nn.Module) -> list[nn.Module]:
    """Modules named by ``pretrained_cfg["classifier"]`` and returned by ``get_classifier()``."""
    candidates: list[nn.Module] = []
    keys = (getattr(model, "pretrained_cfg", None) or {}).get("classifier") or ()
    for key in (keys,) if isinstance(keys, str) else keys:
        try:
            candidates.append(model.get_submodule(key))
        except AttributeError:
            continue  # cfg keys of another head variant (e.g. a distilled key on a plain model)
    classifier = model.get_classifier()
    candidates.extend(classifier if isinstance(classifier, (tuple, list)) else [classifier])
    return [c for c in candidates if isinstance(c, nn.Module)]


def _unwrap(candidate: nn.Module, num_classes: int) -> list[nn.Module]:
    """The affine layers with ``num_classes`` outputs inside ``candidate`` (itself if it is one)."""
    if _is_affine(candidate):
        return [candidate] if _out_features(candidate) == num_classes else []
    return [m for m in candidate.modules() if _is_affine(m) and _out_features(m) == num_classes]


def _norm_before(model: nn.Module, path: str) -> str | None:
    """Path of the BatchNorm1d of a ``NormLinear``-style parent (``bn -> [dropout] -> layer``), if any."""
    parent_path, _, name = path.rpartition(".")
    if not parent_path:
        return None
    parent = model.get_submodule(parent_path)
    children = list(parent.named_children())
    if not children or children[-1][0] != name or not isinstance(children[0][1], nn.BatchNorm1d):
        return None
    if not all(isinstance(m, (nn.Dropout, nn.Identity)) for _, m in children[1:-1]):
        return None
    # The class must be one that applies its children in order (nn.Sequential or timm's NormLinear).
    if not (isinstance(parent, nn.Sequential) or type(parent).__name__ in ("NormLinear", "BN_Linear")):
        return None
    return f"{parent_path}.{children[0][0]}"


def _is_projection(model: nn.Module, num_classes: int) -> bool:
    """Whether the head is a CLIP-style embedding projection (its outputs are not classes)."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    if cfg.get("label_names") or cfg.get("num_classes") != num_classes:
        return False  # labelled, or re-headed by the user: classes
    try:
        from timm.data import infer_imagenet_subset

        if infer_imagenet_subset(model) is not None:
            return False
    except (ImportError, ValueError, KeyError, AttributeError):
        pass
    name = f"{cfg.get('architecture') or type(model).__name__}.{cfg.get('tag') or ''}".lower()
    return any(marker in name for marker in _PROJECTION_MARKERS)


def _describe(model: nn.Module, paths: list[str], num_classes: int) -> tuple[str, str, list[HeadLayer]]:
    """Family, mixing and layer descriptions of the affine layers at ``paths``."""
    modules = [model.get_submodule(p) for p in paths]
    kinds = ["linear" if isinstance(m, nn.Linear) else "conv1x1" for m in modules]
    norms = [_norm_before(model, p) for p in paths]

    def layers(groups: Sequence[int], reduce: Sequence[str | None] | None = None) -> list[HeadLayer]:
        reduce = reduce or [None] * len(paths)
        return [
            HeadLayer(p, k, _in_features(m), g, n, r)
            for p, k, m, g, n, r in zip(paths, kinds, modules, groups, norms, reduce, strict=True)
        ]

    name = type(model).__name__
    if len(paths) == 1:
        family = "norm_linear" if norms[0] else kinds[0]
        return family, "single", layers([0])
    if set(paths) == {"head", "aux_head"}:  # volo
        groups = [1 if p == "aux_head" else 0 for p in paths]  # block order: head, then aux_head
        return "aux_token", "volo", layers(groups, [None if p == "head" else "token_max" for p in paths])
    if isinstance(getattr(model, "weights", None), nn.Parameter) and all(
        p.startswith(("heads.", "heads_dist.")) for p in paths
    ):  # efficientvim: softmax-weighted per-branch heads (+ distilled twins per branch)
        return "multi_branch", "efficientvim", layers([int(p.rsplit(".", 1)[1]) for p in paths])
    parents = {p.rpartition(".")[0] for p in paths}
    if len(parents) == 1 and isinstance(model.get_submodule(parents.pop()), nn.ModuleList):
        # crossvit: one head per branch (different widths), logits averaged
        return "multi_branch", "mean", layers(list(range(len(paths))))
    if len(paths) == 2 and "head_dist" in paths[1].split(".") and paths[1].replace("head_dist", "head") == paths[0]:
        # Twin heads averaged in eval mode. Token pooling reads the class and distillation tokens
        # (deit, pit); average pooling feeds both twins the same pooled features.
        shared = getattr(model, "global_pool", "avg") != "token"
        return "distilled", "mean", layers([0, 0] if shared else [0, 1])
    raise UnsupportedHeadError(
        f"{name} produces its {num_classes} logits with {len(paths)} layers ({', '.join(paths)}) combined in a way "
        "this library does not know; please report the architecture"
    )


def find_head(model: nn.Module, *, allow_projection: bool = False) -> ClassifierHead:
    """Locate the layer(s) of a timm model that produce its class logits.

    The candidates are the union of ``pretrained_cfg["classifier"]`` and ``get_classifier()`` (the cfg alone
    misses twins, e.g. ``levit_384_s8``), each unwrapped to its final affine layer(s) with ``num_classes``
    outputs.

    Args:
        model: a timm classification model.
        allow_projection: also accept a CLIP-style projection head (its outputs are embedding dimensions,
            not classes, so extending it rarely makes sense).

    Raises:
        UnsupportedHeadError: the model has no classifier (encoder, ``num_classes=0``), a projection head,
            or a head of a kind not supported.
    """
    name = type(model).__name__
    if not isinstance(model, nn.Module) or not hasattr(model, "get_classifier"):
        if hasattr(getattr(model, "module", None), "get_classifier"):
            raise UnsupportedHeadError(
                f"{name} wraps the classifier: pass model.module (wrap the injected model again afterwards)"
            )
        raise UnsupportedHeadError(f"{name} has no get_classifier(): pass a timm classification model")
    num_classes = getattr(model, "num_classes", None)
    classifier = model.get_classifier()
    if (
        not isinstance(num_classes, int)
        or num_classes <= 0
        or classifier is None
        or isinstance(classifier, nn.Identity)
    ):
        raise UnsupportedHeadError(
            f"{name} has no classifier to extend (num_classes={num_classes}, get_classifier() is "
            f"{type(classifier).__name__}): create it with a classification head, "
            "e.g. timm.create_model(name, num_classes=N), and train or load that head first"
        )
    if not allow_projection and _is_projection(model, num_classes):
        raise UnsupportedHeadError(
            f"{name}'s head is a CLIP-style projection to a {num_classes}-d image-text embedding, not a classifier "
            "over classes: use a classification checkpoint, or pass allow_projection=True to extend it anyway"
        )
    layers: dict[int, nn.Module] = {}
    for candidate in _classifier_candidates(model):
        for layer in _unwrap(candidate, num_classes):
            layers[id(layer)] = layer
    paths = [path for path, module in model.named_modules() if id(module) in layers]
    if not paths:
        kinds = sorted({type(c).__name__ for c in _classifier_candidates(model)})
        raise UnsupportedHeadError(
            f"{name}'s classifier ({', '.join(kinds)}) has no nn.Linear or 1x1 nn.Conv2d with num_classes="
            f"{num_classes} outputs: only affine classifiers can be extended"
        )
    family, mixing, head_layers = _describe(model, paths, num_classes)
    return ClassifierHead(family=family, num_classes=num_classes, layers=tuple(head_layers), mixing=mixing)


# --------------------------------------------------------------------------------- segments (I/O)
def head_segments(model: nn.Module, head: ClassifierHead) -> tuple[int, ...]:
    """Row counts of the segments of the head's layers (one entry for a never-injected head).

    All layers of a head grow together, so they share one segmentation.
    """
    segments = {_segments_of(model.get_submodule(p)) for p in head.paths}
    if len(segments) != 1:
        raise ValueError(f"the layers of this head ({head.path}) have different segments {sorted(segments)}")
    return segments.pop()


def restore_segments(model: nn.Module, head: ClassifierHead, segments: Sequence[int]) -> None:
    """Re-create the segmented layout recorded at save time, so reloaded old logits stay bit-identical."""
    for path in head.paths:
        layer = model.get_submodule(path)
        layer_segments = _check_segments(segments, _out_features(layer))
        if len(layer_segments) == 1 or _segments_of(layer) == layer_segments:
            continue
        new = _segmented_copy(layer, layer_segments)
        new.load_state_dict(layer.state_dict())
        for param, old in zip(new.parameters(), layer.parameters(), strict=True):
            param.requires_grad_(old.requires_grad)
        new.train(layer.training)
        _set_submodule(model, path, new)
