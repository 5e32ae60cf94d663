"""Injected models export like any timm model: fx, timm's fx feature extraction, torch.export, TorchScript, ONNX
(timm's exporter and torch's default one).

One tiny model per head family. Every path is traced or exported on one input and checked on another against
eager mode. Tolerances: fx, feature extraction, ``torch.export``, ``torch.jit.script`` and ``torch.jit.trace`` run
the same CPU kernels as eager mode, so they must be ``torch.equal``; onnxruntime and ``torch.compile`` (inductor)
use their own kernels and are checked to 1e-5 of the largest logit magnitude.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import pytest
import timm
import torch
from timm.models import create_feature_extractor, get_graph_node_names

from classifier_injection import ICISConfig, InjectionConfig, find_head, inject

from .conftest import FakeEmbedder

N = 5
NAMES = [f"class {i}" for i in range(N)]
NEW = ["capybara", "red panda"]
#: Largest difference allowed from other kernels (onnxruntime, inductor), relative to the largest logit.
KERNEL_RTOL = 1e-5

#: name -> (head family, create_model kwargs, image size)
ARCHS: dict[str, tuple[str, dict, int]] = {
    "test_resnet": ("linear", {}, 32),
    "dla46_c": ("conv1x1", {}, 32),
    "deit_tiny_distilled_patch16_224": ("distilled", {"img_size": 32}, 32),  # token-pooled twins
    "repvit_m0_9": ("distilled", {}, 64),  # BatchNorm+Linear twins
    "levit_256d": ("norm_linear", {"img_size": 64}, 64),
}


class Case:
    """An injected tiny model, the base model's logits and the eager logits on a check input."""

    def __init__(self, name: str) -> None:
        family, kwargs, size = ARCHS[name]
        torch.manual_seed(0)
        base = timm.create_model(name, pretrained=False, num_classes=N, **kwargs).eval()
        g = torch.Generator().manual_seed(1)
        self.example = torch.randn(2, 3, size, size, generator=g)
        self.check = torch.randn(2, 3, size, size, generator=g)
        self.model = inject(
            base,
            NEW,
            embedder=FakeEmbedder(),
            class_names=NAMES,
            config=InjectionConfig(icis=ICISConfig(latent_dim=32, max_epochs=5, batch_size=8), calibration="norm"),
        )
        assert find_head(self.model).family == family
        with torch.no_grad():
            self.base_logits = base(self.check)
            self.eager = self.model(self.check)

    def fresh(self) -> torch.nn.Module:
        """A private copy of the injected model (tracing may leave state behind, e.g. levit's bias cache)."""
        return copy.deepcopy(self.model)


@pytest.fixture(scope="module", params=list(ARCHS))
def case(request) -> Case:
    return Case(request.param)


def _run(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return fn(x)


def _assert_close_to_eager(out: torch.Tensor, eager: torch.Tensor) -> None:
    scale = eager.abs().max().item()
    torch.testing.assert_close(out, eager, rtol=0, atol=KERNEL_RTOL * scale)


def test_eager_old_logits_are_bit_identical(case):
    assert case.eager.shape == (2, N + len(NEW))
    assert torch.equal(case.eager[:, :N], case.base_logits)


def test_fx_symbolic_trace(case):
    graph = torch.fx.symbolic_trace(case.fresh())
    assert torch.equal(_run(graph, case.check), case.eager)


def test_timm_fx_feature_extraction(case):
    model = case.fresh()
    nodes = get_graph_node_names(model)[1]
    extractor = create_feature_extractor(model, return_nodes={nodes[0]: "first", nodes[-1]: "logits"})
    out = _run(extractor, case.check)
    assert torch.equal(out["logits"], case.eager) and out["first"].shape[0] == 2


def test_torch_export(case):
    program = torch.export.export(case.fresh(), (case.example,))
    assert torch.equal(_run(program.module(), case.check), case.eager)


def test_torch_jit_script(case):
    scripted = torch.jit.script(case.fresh())
    assert torch.equal(_run(scripted, case.check), case.eager)


def test_torch_jit_trace(case):
    with torch.no_grad():
        traced = torch.jit.trace(case.fresh(), (case.example,))
    assert torch.equal(_run(traced, case.check), case.eager)


def test_timm_onnx_export_runs_in_onnxruntime(case, tmp_path):
    """timm's exporter (TorchScript-based, dynamic batch, ONNX checker): a batch of another size runs too."""
    ort = pytest.importorskip("onnxruntime")
    from timm.utils.onnx import onnx_export

    path = tmp_path / "model.onnx"
    onnx_export(case.fresh(), str(path), example_input=case.example, input_names=["x"], output_names=["logits"])
    _assert_close_to_eager(_onnxruntime_logits(ort, path, case.check), case.eager)
    _assert_close_to_eager(_onnxruntime_logits(ort, path, case.check[:1]), case.eager[:1])


def test_torch_onnx_export_default_exporter_runs_in_onnxruntime(tmp_path):
    """torch's default (dynamo) exporter, on one family: it exports through ``torch.export``, tested on every one."""
    ort = pytest.importorskip("onnxruntime")
    case = Case("deit_tiny_distilled_patch16_224")
    path = tmp_path / "model.onnx"
    torch.onnx.export(case.fresh(), (case.example,), str(path), input_names=["x"], output_names=["logits"])
    _assert_close_to_eager(_onnxruntime_logits(ort, path, case.check), case.eager)


def _onnxruntime_logits(ort: ModuleType, path: Path, x: torch.Tensor) -> torch.Tensor:
    """The logits onnxruntime computes for ``x`` (input ``"x"``) with the model exported to ``path``."""
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (out,) = session.run(None, {"x": x.numpy()})
    return torch.from_numpy(out)


def test_torch_compile():
    case = Case("test_resnet")
    compiled = torch.compile(case.fresh())
    _assert_close_to_eager(_run(compiled, case.check), case.eager)
