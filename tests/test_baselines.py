"""Unit tests of the baselines on synthetic problems whose answer is known (fast, no shared data)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from classifier_injection import InjectionConfig, inject
from classifier_injection.baselines import (
    ConSE,
    COSTAInjector,
    MLPInjector,
    RidgeInjector,
    SubRegInjector,
    VGSESMOInjector,
    VGSEWAvgInjector,
)
from classifier_injection.injector import Injector

FAST_MLP = {"hidden_dim": 32, "epochs": 5, "batch_size": 64}


def linear_problem(seen: int = 120, new: int = 20, d: int = 8, row_dim: int = 13, seed: int = 0):
    """Rows that are an exact linear function of the descriptors (plus an intercept)."""
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(seen + new, d, generator=g)
    true_map = torch.randn(d, row_dim, generator=g)
    rows = a @ true_map + torch.randn(row_dim, generator=g)
    return a[:seen], rows[:seen], a[seen:], rows[seen:]


def all_injectors():
    return [
        RidgeInjector(alpha=1e-6),
        COSTAInjector(),
        COSTAInjector(top_k=3),
        VGSEWAvgInjector(),
        VGSESMOInjector(steps=20),
        MLPInjector(**FAST_MLP),
        MLPInjector(loss="mse", **FAST_MLP),
        SubRegInjector(**FAST_MLP),
    ]


@pytest.mark.parametrize("injector", all_injectors(), ids=lambda i: f"{i.name}-{i.hparams()}")
def test_injector_protocol_shapes_and_determinism(injector):
    seen_a, seen_r, new_a, _ = linear_problem()
    assert isinstance(injector, Injector)
    first = injector.fit(seen_a, seen_r, new_a).predict(new_a)
    assert first.shape == (len(new_a), seen_r.shape[1]) and first.dtype == torch.float32
    assert torch.isfinite(first).all()
    again = type(injector)(**injector.hparams()).fit(seen_a, seen_r, new_a).predict(new_a)
    assert torch.equal(first, again)
    assert isinstance(injector.hparams(), dict)


@pytest.mark.parametrize("injector", all_injectors(), ids=lambda i: f"{i.name}-{i.hparams()}")
def test_predict_before_fit_and_wrong_width_fail_clearly(injector):
    seen_a, seen_r, new_a, _ = linear_problem()
    with pytest.raises(RuntimeError, match="before fit"):
        injector.predict(new_a)
    injector.fit(seen_a, seen_r)
    with pytest.raises(ValueError, match=r"descriptors must be \[n, 8\]"):
        injector.predict(torch.randn(3, 5))


def test_fit_rejects_mismatched_inputs():
    with pytest.raises(ValueError, match="one descriptor per row"):
        RidgeInjector().fit(torch.randn(5, 3), torch.randn(4, 7))
    with pytest.raises(ValueError, match="NaN"):
        COSTAInjector().fit(torch.full((5, 3), float("nan")), torch.randn(5, 7))


@pytest.mark.parametrize(
    "factory",
    [
        lambda: RidgeInjector(alpha=0),
        lambda: COSTAInjector(top_k=0),
        lambda: VGSEWAvgInjector(eta=-1),
        lambda: VGSESMOInjector(steps=0),
        lambda: MLPInjector(loss="l1"),
        lambda: MLPInjector(epochs=0),
        lambda: SubRegInjector(reg=-1),
        lambda: ConSE(top_t=0),
    ],
)
def test_bad_hyperparameters_raise(factory):
    with pytest.raises(ValueError):
        factory()


def test_ridge_recovers_an_exact_linear_map():
    seen_a, seen_r, new_a, new_r = linear_problem()
    predicted = RidgeInjector(alpha=1e-8).fit(seen_a, seen_r).predict(new_a)
    torch.testing.assert_close(predicted, new_r, atol=1e-4, rtol=1e-4)


def test_ridge_penalty_shrinks_towards_the_mean_row():
    seen_a, seen_r, new_a, _ = linear_problem()
    predicted = RidgeInjector(alpha=1e9).fit(seen_a, seen_r).predict(new_a)
    torch.testing.assert_close(predicted, seen_r.mean(0).expand_as(predicted), atol=1e-3, rtol=1e-3)


def test_mlps_learn_the_linear_map_better_than_the_mean_row():
    seen_a, seen_r, new_a, new_r = linear_problem(seen=400)
    mean_cos = F.cosine_similarity(seen_r.mean(0, keepdim=True), new_r).mean()
    settings = {"hidden_dim": 64, "epochs": 150, "batch_size": 400, "lr": 1e-2}  # full batch: few, cheap steps
    for injector in (MLPInjector(**settings), SubRegInjector(**settings)):
        cos = F.cosine_similarity(injector.fit(seen_a, seen_r).predict(new_a), new_r).mean()
        assert cos > 0.9 and cos > mean_cos + 0.2, (injector.name, float(cos), float(mean_cos))


def test_subreg_penalty_pulls_weights_into_the_seen_span():
    # Seen weight vectors span only the first 4 of 12 weight dimensions.
    g = torch.Generator().manual_seed(1)
    a = torch.randn(200, 6, generator=g)
    rows = torch.zeros(200, 13)
    rows[:, :4] = a @ torch.randn(6, 4, generator=g)
    new_a = 3 * torch.randn(30, 6, generator=g)  # far from the seen data: the MLP extrapolates

    def outside(reg: float) -> float:
        injector = SubRegInjector(reg=reg, hidden_dim=64, epochs=100, batch_size=200, lr=1e-2).fit(a, rows)
        w = injector.predict(new_a)[:, :-1]
        return float((w - w @ injector.basis @ injector.basis.T).norm(dim=1).mean())

    assert outside(100.0) < 0.5 * outside(0.0)


def test_costa_weights_are_clipped_similarities():
    seen_a = torch.eye(3)
    seen_r = torch.tensor([[1.0, 0.0], [0.0, 1.0], [5.0, 5.0]])
    new_a = torch.tensor([[1.0, 1.0, -1.0]])  # similar to classes 0 and 1, negatively to class 2
    predicted = COSTAInjector().fit(seen_a, seen_r).predict(new_a)
    torch.testing.assert_close(predicted, torch.tensor([[0.5, 0.5]]))
    # top_k=1 keeps only the most similar seen class (a tie between 0 and 1 keeps both).
    top1 = COSTAInjector(top_k=1).fit(seen_a, seen_r).predict(torch.tensor([[2.0, 1.0, 0.0]]))
    torch.testing.assert_close(top1, torch.tensor([[1.0, 0.0]]))


def test_costa_without_similar_class_gives_mean_row():
    seen_a, seen_r = torch.eye(3), torch.randn(3, 4)
    predicted = COSTAInjector().fit(seen_a, seen_r).predict(-torch.ones(1, 3))
    torch.testing.assert_close(predicted, seen_r.mean(0, keepdim=True))


def test_vgse_wavg_sharp_kernel_copies_the_nearest_row():
    seen_a, seen_r, _, _ = linear_problem()
    query = seen_a[[7, 42]] + 0.01
    predicted = VGSEWAvgInjector(eta=500.0).fit(seen_a, seen_r).predict(query)
    torch.testing.assert_close(predicted, seen_r[[7, 42]], atol=1e-3, rtol=1e-3)


def test_vgse_smo_reconstructs_a_seen_descriptor_with_its_own_row():
    seen_a = F.normalize(torch.randn(50, 16, generator=torch.Generator().manual_seed(3)), dim=1)
    seen_r = torch.randn(50, 9, generator=torch.Generator().manual_seed(4))
    injector = VGSESMOInjector(steps=400).fit(seen_a, seen_r)
    weights = injector.weights(seen_a[[5]])
    assert weights.argmax() == 5 and weights[0, 5] > 0.5
    assert injector.reconstruction_loss is not None and injector.reconstruction_loss < 0.2


def test_conse_embedding_and_scores():
    seen_a = torch.eye(4)
    conse = ConSE(top_t=2)
    logits = torch.tensor([[10.0, 10.0, -10.0, -10.0]])
    torch.testing.assert_close(conse.embed(logits, seen_a), torch.tensor([[0.5, 0.5, 0.0, 0.0]]))
    candidates = torch.tensor([[1.0, 1.0, 0.0, 0.0], [0.0, 0.0, 1.0, 1.0]])
    scores = conse.scores(logits, seen_a, candidates)
    assert scores.shape == (1, 2) and scores[0, 0] > 0.99 and abs(scores[0, 1]) < 1e-6
    with pytest.raises(ValueError, match="seen_logits must be"):
        conse.embed(torch.randn(1, 3), seen_a)


def test_conse_gzsl_keeps_the_head_unless_a_new_class_wins():
    seen_a = torch.eye(3)
    new_a = torch.tensor([[1.0, 1.0, 0.0]])  # between seen classes 0 and 1
    seen_labels, new_labels = torch.tensor([0, 1, 2]), torch.tensor([3])
    logits = torch.tensor(
        [
            [10.0, 9.9, -9.0],  # torn between 0 and 1: the new class (their midpoint) wins
            [10.0, -9.0, -9.0],  # clearly class 0
            [-9.0, -9.0, 10.0],  # clearly class 2
        ]
    )
    predicted = ConSE(top_t=2).predict_gzsl(logits, seen_a, new_a, seen_labels, new_labels)
    assert predicted.tolist() == [3, 0, 2]


def test_baselines_plug_into_inject(resnet, embedder):
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        before = resnet(x)
    for injector in (RidgeInjector(), VGSEWAvgInjector()):
        out = inject(
            resnet,
            ["capybara", "red panda"],
            embedder=embedder,
            injector=injector,
            config=InjectionConfig(calibration="norm"),
        )
        with torch.no_grad():
            after = out(x)
        assert after.shape == (2, 12) and torch.equal(after[:, :10], before)
        record = out.classifier_injection["injections"][-1]
        assert record["method"] == injector.name and record["hparams"] == injector.hparams()


def test_vgse_smo_solves_the_new_classes_during_fit():
    seen_a, seen_r, new_a, _ = linear_problem()
    transductive = VGSESMOInjector(steps=20).fit(seen_a, seen_r, new_a)
    assert transductive._solved is not None
    inductive = VGSESMOInjector(steps=20).fit(seen_a, seen_r)
    torch.testing.assert_close(transductive.predict(new_a), inductive.predict(new_a))
    # Other descriptors are optimised at predict time.
    assert transductive.predict(new_a[:3] + 1).shape == (3, seen_r.shape[1])
