"""Calibration rules: norm matching, the leave-classes-out simulation, logit matching, the trade-off knob."""

from __future__ import annotations

import dataclasses
import inspect
import math

import pytest
import torch
import torch.nn.functional as F

from classifier_injection.calibration import (
    CalibrationContext,
    LogitMatchCalibration,
    NoCalibration,
    NormCalibration,
    ScaledCalibration,
    SimulatedCalibration,
    SynthesizedCalibration,
    apply_new_class_scale,
    fit_calibration,
    get_calibration,
)
from classifier_injection.calibration.simulation import prototype_gzsl_curve
from classifier_injection.core import copying_factory
from tests.conftest import FakeEmbedder, LeastSquares, synthetic_head


def test_norm_calibration_sets_norms_and_biases():
    _, rows = synthetic_head()
    new = torch.randn(3, rows.shape[1])
    out = NormCalibration(factor=2.0, bias_shift=1.0)(new, rows)
    mean_norm = rows[:, :-1].norm(dim=1).mean()
    torch.testing.assert_close(out[:, :-1].norm(dim=1), torch.full((3,), 2 * mean_norm.item()))
    torch.testing.assert_close(out[:, -1], torch.full((3,), (rows[:, -1].mean() + rows[:, -1].std()).item()))
    # Directions are kept.
    torch.testing.assert_close(F.normalize(out[:, :-1], dim=1), F.normalize(new[:, :-1], dim=1))
    assert torch.equal(NoCalibration()(new, rows), new)


@pytest.mark.parametrize("bad", [0.0, -1.0, math.nan, math.inf])
def test_norm_calibration_rejects_bad_factor(bad):
    with pytest.raises(ValueError, match="factor"):
        NormCalibration(factor=bad)


def test_rows_of_wrong_width_are_rejected():
    _, rows = synthetic_head()
    with pytest.raises(ValueError, match="same D"):
        NormCalibration()(torch.randn(2, rows.shape[1] + 1), rows)


def test_prototype_curve_is_monotone_and_perfect_rows_win():
    _, rows = synthetic_head(num=30)
    rows[:, :-1] = 2 * F.normalize(rows[:, :-1], dim=1)  # equal norms: true rows keep theirs when normalised
    held = torch.tensor([1, 5, 9, 20])
    factors = [0.05, 0.5, 1.0, 2.0, 8.0]
    perfect = prototype_gzsl_curve(rows, held, rows[held], factors)
    # True rows at their own norm scale compete like the old ones: every prototype is won by its own row.
    assert perfect[2, 0] == 100.0 and perfect[2, 1] == 100.0
    assert perfect[0, 1] == 0.0  # vanishing new rows never win
    noisy = rows[held] + 2.0 * torch.randn(len(held), rows.shape[1], generator=torch.Generator().manual_seed(1))
    curve = prototype_gzsl_curve(rows, held, noisy, factors)
    assert (curve[1:, 0] <= curve[:-1, 0]).all(), "seen accuracy can only drop as new rows grow"
    assert curve[-1, 0] < 100.0 and curve[0, 0] == 100.0


def test_simulation_picks_a_larger_factor_for_worse_predictions_and_is_deterministic():
    descriptors, rows = synthetic_head(num=60)
    context = CalibrationContext(
        seen_rows=rows, new_rows=rows[:2], seen_descriptors=descriptors, injector_factory=LeastSquares, seed=3
    )
    rule = SimulatedCalibration(repeats=2)
    fitted = rule.fit(context)
    assert isinstance(fitted, ScaledCalibration) and fitted.name == "simulate"
    assert fitted.factor in rule.factors
    assert fitted == rule.fit(context), "same context and seed must give the same calibration"
    # The simulation can be run once and reused by rules that differ only in how they choose.
    curve = rule.simulated_curve(context)
    assert curve.shape == (len(rule.factors), 3) and rule.fit(context) == fitted
    loose = SimulatedCalibration(repeats=2, tolerance=0.5)
    assert loose.fit(context).factor == loose.factors[loose.choose(curve)] <= fitted.factor
    assert {"simulated_S", "simulated_U", "simulated_H"} <= set(fitted.diagnostics)
    assert fitted.bias == pytest.approx(rows[:, -1].mean().item())
    # Predictions mixed with noise point worse: they need a larger norm to win their own classes.
    noisy = SimulatedCalibration(repeats=2).fit(
        CalibrationContext(
            seen_rows=rows,
            new_rows=rows[:2],
            seen_descriptors=descriptors + 0.8 * torch.randn(descriptors.shape, generator=torch.Generator()),
            injector_factory=LeastSquares,
            seed=3,
        )
    )
    assert noisy.factor > fitted.factor
    out = fitted(torch.randn(4, rows.shape[1]), rows)
    torch.testing.assert_close(
        out[:, :-1].norm(dim=1), torch.full((4,), fitted.factor * rows[:, :-1].norm(dim=1).mean().item())
    )


def test_simulation_needs_its_context():
    descriptors, rows = synthetic_head()
    rule = SimulatedCalibration()
    with pytest.raises(ValueError, match="injector_factory"):
        rule.fit(CalibrationContext(seen_rows=rows, new_rows=rows[:1], seen_descriptors=descriptors))
    with pytest.raises(ValueError, match="seen_descriptors has"):
        rule.fit(
            CalibrationContext(
                seen_rows=rows, new_rows=rows[:1], seen_descriptors=descriptors[:5], injector_factory=LeastSquares
            )
        )
    with pytest.raises(RuntimeError, match="fitted first"):
        rule(rows[:1], rows)

    class OneRow(LeastSquares):
        def predict(self, descriptors):
            return super().predict(descriptors)[:1]  # one row, whatever it is asked for

    with pytest.raises(ValueError, match=r"one row \[W \| b\] per descriptor"):
        rule.fit(
            CalibrationContext(seen_rows=rows, new_rows=rows[:1], seen_descriptors=descriptors, injector_factory=OneRow)
        )
    with pytest.raises(ValueError, match="at least 3"):
        rule.fit(
            CalibrationContext(
                seen_rows=rows[:2], new_rows=rows[:1], seen_descriptors=descriptors[:2], injector_factory=LeastSquares
            )
        )
    for bad in (dict(holdout_fraction=1.0), dict(repeats=0), dict(factors=()), dict(factors=(1.0, -2.0))):
        with pytest.raises(ValueError):
            SimulatedCalibration(**bad)


def test_logit_match_is_invariant_to_the_predicted_norm():
    _, rows = synthetic_head()
    new = torch.randn(5, rows.shape[1], generator=torch.Generator().manual_seed(2))
    rule = LogitMatchCalibration(top_k=3, margin=1.5)
    fitted = rule.fit(CalibrationContext(seen_rows=rows, new_rows=new))
    assert fitted.factor == pytest.approx(rule.fit(CalibrationContext(seen_rows=rows, new_rows=10 * new)).factor)
    torch.testing.assert_close(rule(new, rows), fitted(new, rows))
    # The rule's definition: the new rows' median top-k response is margin x the old rows' median.
    out = fitted(new, rows)
    protos = F.normalize(rows[:, :-1], dim=1)
    old = rows[:, :-1] @ protos.T
    old.fill_diagonal_(-math.inf)
    target = old.topk(3, dim=1).values.mean(1).median()
    response = (out[:, :-1] @ protos.T).topk(3, dim=1).values.mean(1).median()
    assert response.item() == pytest.approx(1.5 * target.item(), rel=1e-4)
    # A larger margin gives a larger factor.
    assert LogitMatchCalibration(top_k=3, margin=3.0).fit(CalibrationContext(rows, new)).factor > fitted.factor


def test_scaled_calibration_checks_row_count_and_serialises():
    _, rows = synthetic_head()
    fitted = ScaledCalibration(name="x", factor=2.0, bias=0.1, row_scales=(1.0, 2.0), diagnostics={"a": 1})
    out = fitted(torch.randn(2, rows.shape[1]), rows)
    assert out[1, :-1].norm() == pytest.approx(2 * out[0, :-1].norm().item(), rel=1e-5)
    assert fitted.to_dict()["row_scales"] == [1.0, 2.0]
    with pytest.raises(ValueError, match="fitted for 2"):
        fitted(torch.randn(3, rows.shape[1]), rows)


def test_get_calibration_and_fit_calibration():
    assert isinstance(get_calibration(None), SynthesizedCalibration)
    assert isinstance(get_calibration("simulate"), SimulatedCalibration)
    assert isinstance(get_calibration("logit-match"), LogitMatchCalibration)
    assert isinstance(get_calibration("norm"), NormCalibration)
    with pytest.raises(ValueError, match="unknown calibration"):
        get_calibration("magic")
    with pytest.raises(TypeError, match="calibration must be"):
        get_calibration(3)
    _, rows = synthetic_head()
    norm = NormCalibration()
    assert fit_calibration(norm, CalibrationContext(rows, rows[:1])) is norm


def test_new_class_scale_multiplies_logits_and_rejects_bad_values():
    rows = torch.randn(3, 5)
    torch.testing.assert_close(apply_new_class_scale(rows, 2.0), 2 * rows)
    for bad in (0, -1.0, math.nan, True, "2"):
        with pytest.raises(ValueError, match="new_class_scale"):
            apply_new_class_scale(rows, bad)


def test_copying_factory_gives_independent_fresh_injectors():
    template = LeastSquares(shrink=0.5)
    factory = copying_factory(template)
    first, second = factory(), factory()
    assert first is not second and first is not template and first.shrink == 0.5


@pytest.fixture(scope="module")
def tiny_model():
    import timm

    return timm.create_model("test_resnet", pretrained=False, num_classes=12).eval()


def test_inject_fits_the_default_rule_and_records_it(tiny_model):
    from classifier_injection import ICISConfig, InjectionConfig, find_head, inject

    names = [f"class {i}" for i in range(12)]
    icis = ICISConfig(latent_dim=16, max_epochs=3)
    kwargs = dict(embedder=FakeEmbedder(8), class_names=names)
    model = inject(tiny_model, ["capybara", "red panda"], InjectionConfig(icis=icis, calibration="simulate"), **kwargs)
    record = model.classifier_injection["injections"][-1]
    calibration = record["calibration"]
    assert calibration["name"] == "simulate" and calibration["factor"] > 0
    assert {"bias", "diagnostics"} <= set(calibration) and record["new_class_scale"] == 1.0
    boosted = inject(
        tiny_model,
        ["capybara", "red panda"],
        InjectionConfig(icis=icis, calibration="simulate", new_class_scale=2.0),
        **kwargs,
    )
    head = find_head(model)
    rows, boosted_rows = head.rows(model)[12:], head.rows(boosted)[12:]
    torch.testing.assert_close(boosted_rows, 2 * rows)
    norm = inject(
        tiny_model, ["capybara"], InjectionConfig(icis=icis, calibration=NormCalibration(factor=1.5)), **kwargs
    )
    assert norm.classifier_injection["injections"][-1]["calibration"] == {
        "factor": 1.5,
        "bias_shift": 0.0,
        "name": "norm",
    }
    with pytest.raises(ValueError, match="new_class_scale"):
        inject(tiny_model, ["capybara"], InjectionConfig(icis=icis, new_class_scale=-1.0), **kwargs)
    record = inject(tiny_model, ["capybara"], InjectionConfig(icis=icis), **kwargs).classifier_injection
    default = record["injections"][-1]["calibration"]
    # resnets add the shortcut after their last BatchNorm: no feature statistics, so the default rule falls back to
    # the row-prototype simulation and the mean old bias.
    assert default["name"] == "simulate" and default["factor"] > 0
    assert default["diagnostics"]["fallback_from"] == "synthesize"
    assert default["diagnostics"]["bias_rule"] == "mean" and default["biases"] is None


def test_feature_mean_biases_give_new_rows_the_old_rows_mean_logit_on_the_mean_feature():
    from classifier_injection.calibration import feature_mean_biases

    _, rows = synthetic_head()
    mu = torch.rand(rows.shape[1] - 1)
    new_w = torch.randn(3, rows.shape[1] - 1)
    biases = feature_mean_biases(new_w, rows, mu)
    old_mean_logit = (rows[:, :-1] @ mu + rows[:, -1]).mean()
    torch.testing.assert_close(new_w @ mu + biases, old_mean_logit.expand(3), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="feature_mean must be"):
        feature_mean_biases(new_w, rows, torch.rand(3))


@pytest.mark.parametrize("rule", [SimulatedCalibration(), LogitMatchCalibration()])
def test_rules_set_biases_against_the_feature_mean_when_they_have_it(rule):
    descriptors, rows = synthetic_head(num=60)
    new = rows[:3] + 0.1
    mu = torch.rand(rows.shape[1] - 1)
    common = dict(seen_descriptors=descriptors, injector_factory=LeastSquares, seed=0)
    with_mean = rule.fit(CalibrationContext(rows, new, feature_mean=mu, feature_source="test", **common))
    without = rule.fit(CalibrationContext(rows, new, **common))
    assert with_mean.factor == without.factor, "the bias rule must not change the chosen scale"
    assert with_mean.diagnostics["bias_rule"] == "feature-mean" and with_mean.diagnostics["feature_source"] == "test"
    assert without.diagnostics["bias_rule"] == "mean" and without.biases is None
    out = with_mean(new, rows)
    torch.testing.assert_close(out[:, -1], torch.tensor(with_mean.biases))
    torch.testing.assert_close(
        out[:, :-1] @ mu + out[:, -1], (rows[:, :-1] @ mu + rows[:, -1]).mean().expand(3), rtol=1e-4, atol=1e-4
    )
    assert with_mean.to_dict()["biases"] == list(with_mean.biases)
    forced = type(rule)(bias="mean").fit(CalibrationContext(rows, new, feature_mean=mu, **common))
    assert forced.biases is None and forced.diagnostics["bias_rule"] == "mean"
    with pytest.raises(ValueError, match="fitted for 3"):
        with_mean(torch.randn(2, rows.shape[1]), rows)
    with pytest.raises(ValueError, match="bias must be one of"):
        type(rule)(bias="median")


def test_inject_estimates_the_feature_mean_of_models_that_show_it():
    import timm

    from classifier_injection import ICISConfig, InjectionConfig, inject

    model = timm.create_model("tf_efficientnet_lite0", pretrained=False, num_classes=12).eval()
    names = [f"class {i}" for i in range(12)]
    out = inject(
        model,
        ["capybara"],
        embedder=FakeEmbedder(8),
        class_names=names,
        config=InjectionConfig(icis=ICISConfig(latent_dim=16, max_epochs=3)),
    )
    calibration = out.classifier_injection["injections"][-1]["calibration"]
    assert calibration["name"] == "synthesize", "the default rule runs on models that show their statistics"
    assert calibration["diagnostics"]["bias_rule"] == "feature-mean"
    assert calibration["diagnostics"]["feature_source"].startswith("bn2 (BatchNormAct2d")
    assert len(calibration["biases"]) == 1
    # What a user adding one class can expect, from the simulation on features confused with their neighbours.
    expected = out.classifier_injection["injections"][-1]["expected"]
    assert expected["new_classes"] == 1 and expected["simulated_new_classes"] == 1
    assert expected["new_class_scale"] == 1.0 and 0 <= expected["recall"] <= 100
    assert calibration["diagnostics"]["expected"]["new_classes"][0] == 1


#: An expected-rates table as the ``synthesize`` rule records it (precision falls as the scale grows).
EXPECTED_TABLE = {
    "new_classes": [1, 10],
    "scales": [0.5, 0.8, 1.0, 1.2],
    "recall": [[0.0, 10.0, 40.0, 60.0], [0.0, 12.0, 45.0, 70.0]],
    "precision": [[None, 90.0, 60.0, 30.0], [None, 50.0, 30.0, 10.0]],
    "stolen_per_class": [[0.0, 0.0, 0.3, 1.4], [0.0, 0.1, 1.0, 6.3]],
}


def test_target_precision_picks_the_scale_the_simulation_expects_to_reach_it(tmp_path, monkeypatch):
    import timm

    from classifier_injection import ICISConfig, InjectionConfig, find_head, inject

    # A random model's simulation expects nothing worth choosing from: the rule's table is given.
    monkeypatch.setattr(SynthesizedCalibration, "expected", lambda self, context, factor: EXPECTED_TABLE)
    torch.manual_seed(0)
    model = timm.create_model("tf_efficientnet_lite0", pretrained=False, num_classes=12).eval()
    kwargs = dict(embedder=FakeEmbedder(8), class_names=[f"class {i}" for i in range(12)], cache=tmp_path)
    icis = ICISConfig(latent_dim=16, max_epochs=3)
    plain = inject(model, ["capybara", "okapi"], InjectionConfig(icis=icis), **kwargs)
    out = inject(model, ["capybara", "okapi"], InjectionConfig(icis=icis, target_precision=0.75), **kwargs)
    record = out.classifier_injection["injections"][-1]
    # 2 new classes read the table's 1-class curve: 90 % at scale 0.8, 60 % at 1.0, so 75 % at 0.9.
    assert record["target_precision"] == 0.75 and record["new_class_scale"] == pytest.approx(0.9)
    assert record["expected"]["precision"] == pytest.approx(75.0) and record["expected"]["simulated_new_classes"] == 1
    rows, plain_rows = find_head(out).rows(out)[12:], find_head(plain).rows(plain)[12:]
    torch.testing.assert_close(rows, plain_rows * record["new_class_scale"], rtol=0, atol=0)
    assert "expected_precision" not in record["reliability"]["okapi"]  # the per-class rates hold at scale 1 only
    loose = inject(model, ["capybara", "okapi"], InjectionConfig(icis=icis, target_precision=0.4), **kwargs)
    assert loose.classifier_injection["injections"][-1]["new_class_scale"] == 1.0  # reached above 1: kept at 1
    # Models without feature statistics have no expected rates: a clear error before any work, the model untouched.
    resnet = timm.create_model("resnet18", pretrained=False, num_classes=12).eval()
    before = {k: v.clone() for k, v in resnet.state_dict().items()}
    monkeypatch.setattr(FakeEmbedder, "encode", lambda self, texts: pytest.fail("embedded before the check"))
    with pytest.raises(ValueError, match=r"target_precision needs the expected rates.*set new_class_scale instead"):
        inject(resnet, ["capybara"], InjectionConfig(icis=icis, target_precision=0.3), inplace=True, **kwargs)
    assert resnet.num_classes == 12 and all(torch.equal(v, resnet.state_dict()[k]) for k, v in before.items())


def test_scale_for_precision_is_the_largest_scale_that_reaches_the_target():
    from classifier_injection import api
    from classifier_injection.calibration.reliability import scale_for_precision

    table = EXPECTED_TABLE
    assert scale_for_precision(table, 10, 40.0) == (pytest.approx(0.9), True)  # between 0.8 (50 %) and 1.0 (30 %)
    assert scale_for_precision(table, 10, 30.0) == (1.0, True)
    assert scale_for_precision(table, 1, 20.0) == (1.0, True)  # reached at 1.2, but never above the balance
    assert scale_for_precision(table, 10, 80.0) == (0.8, False)  # out of reach: the most precise scale
    assert scale_for_precision(None, 10, 30.0) is None
    assert scale_for_precision({**table, "precision": [[None] * 4] * 2}, 10, 30.0) is None
    with pytest.warns(UserWarning, match="no new_class_scale is expected to reach precision 80% for 10 new"):
        assert api._scale_for_target(table, 10, 0.8) == 0.8
    with pytest.raises(ValueError, match="target_precision needs the expected rates"):
        api._scale_for_target(None, 10, 0.3)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"target_precision": 1.5}, r"target_precision must be a fraction in \(0, 1\)"),
        ({"target_precision": True}, "target_precision must be a fraction"),
        ({"target_precision": 30}, "target_precision must be a fraction"),
        ({"target_precision": 0.3, "new_class_scale": 1.2}, "leave new_class_scale at 1"),
        ({"target_precision": 0.3, "calibration": "norm"}, "needs the expected rates of the 'synthesize' calibration"),
    ],
)
def test_target_precision_config_errors(kwargs, message):
    from classifier_injection import InjectionConfig

    with pytest.raises(ValueError, match=message):
        InjectionConfig(**kwargs)
    config = InjectionConfig(target_precision=0.3)
    assert InjectionConfig.from_dict(config.to_dict()) == config


def _context_with_statistics(num: int = 60, seed: int = 3, **extra) -> CalibrationContext:
    descriptors, rows = synthetic_head(num=num)
    dim = rows.shape[1] - 1
    return CalibrationContext(
        seen_rows=rows,
        new_rows=rows[:2] + 0.1,
        seen_descriptors=descriptors,
        injector_factory=LeastSquares,
        seed=seed,
        feature_mean=torch.rand(dim, generator=torch.Generator().manual_seed(1)),
        feature_source="test",
        feature_std=torch.full((dim,), 0.1),
        **extra,
    )


def test_synthesized_features_climb_to_the_requested_confidence_and_are_deterministic():
    from classifier_injection.calibration import synthesize_features

    context = _context_with_statistics()
    rows, mean, spread = context.seen_rows, context.feature_mean, 3.8 * context.feature_std
    features, labels = synthesize_features(rows, mean, spread, confidence=0.5, samples=3, seed=0)
    assert features.shape == (3 * len(rows), rows.shape[1] - 1) and labels.tolist()[:4] == [0, 0, 0, 1]
    probs = torch.softmax(features @ rows[:, :-1].T + rows[:, -1], dim=1)
    assert (probs[torch.arange(len(labels)), labels] >= 0.5).all()
    again, _ = synthesize_features(rows, mean, spread, confidence=0.5, samples=3, seed=0)
    torch.testing.assert_close(features, again, rtol=0, atol=0)
    with pytest.raises(ValueError, match="feature_mean and feature_spread"):
        synthesize_features(rows, mean[:3], spread, confidence=0.5)


@pytest.mark.parametrize("max_steps", [2000, 3])  # 3: the features stop before they arrive
def test_the_climb_on_the_logits_follows_the_climb_in_feature_space(max_steps):
    from classifier_injection.calibration import synthesize_features

    context = _context_with_statistics()
    rows, mean, spread = context.seen_rows.double(), context.feature_mean.double(), 3.8 * context.feature_std.double()
    step_size = inspect.signature(synthesize_features).parameters["step_size"].default
    features, labels = synthesize_features(rows, mean, spread, confidence=0.5, samples=3, seed=0, max_steps=max_steps)
    # The reference: each feature steps along the normalised w_c - p @ W, logits recomputed from the feature.
    weights, biases = rows[:, :-1], rows[:, -1]
    expected = mean + spread * torch.randn(len(labels), len(mean), generator=torch.Generator().manual_seed(0))
    step = float(spread.norm()) * step_size
    for _ in range(max_steps):
        probs = torch.softmax(expected @ weights.T + biases, dim=1)
        climbing = probs[torch.arange(len(labels)), labels] < 0.5
        if not climbing.any():
            break
        direction = torch.nn.functional.normalize(weights[labels] - probs @ weights, dim=1)
        expected[climbing] += step * direction[climbing]
    torch.testing.assert_close(features.double(), expected, rtol=0, atol=1e-5)


def test_a_second_context_on_the_same_head_reuses_the_synthesised_features(monkeypatch):
    from classifier_injection.calibration import simulation

    calls = []
    real = simulation.synthesize_features
    monkeypatch.setattr(simulation, "synthesize_features", lambda *a, **k: calls.append(1) or real(*a, **k))
    first = simulation.simulated_features(_context_with_statistics(), 3.8, 0.3, 2)
    again = simulation.simulated_features(_context_with_statistics(), 3.8, 0.3, 2)  # another injection, same head
    assert len(calls) == 1 and again[0] is first[0]
    other_seed = simulation.simulated_features(_context_with_statistics(seed=4), 3.8, 0.3, 2)
    other_head = simulation.simulated_features(_context_with_statistics(num=61), 3.8, 0.3, 2)
    assert len(calls) == 3 and other_seed[0].shape == first[0].shape and len(other_head[0]) == 2 * 61


def test_synthetic_curve_scores_perfect_rows_and_old_classes_fall_as_new_rows_grow():
    from classifier_injection.calibration import synthesize_features, synthetic_gzsl_curve

    context = _context_with_statistics()
    rows, mean = context.seen_rows, context.feature_mean
    features, labels = synthesize_features(rows, mean, 3.8 * context.feature_std, confidence=0.3, samples=4)
    held, factors = torch.arange(10), [0.01, 1.0, 100.0]
    # The held-out classes' true rows, with the kept rows' mean norm and feature-mean biases.
    curve = synthetic_gzsl_curve(rows, held, rows[:10], factors, features, labels, mean)
    assert curve.shape == (3, 3)
    assert curve[0, 1] == 0 and curve[2, 0] < curve[0, 0], "tiny rows never win, huge rows steal old classes"
    assert curve[1, 2] > 0
    blurred = synthetic_gzsl_curve(
        rows, held, rows[:10].mean(0, keepdim=True).expand(10, -1), factors, features, labels, mean
    )
    assert blurred[1, 1] < curve[1, 1], "identical rows cannot tell the new classes apart"


def test_synthesize_rule_keeps_the_largest_factor_within_its_budget_and_falls_back_without_statistics():
    from classifier_injection.calibration import default_calibration

    context = _context_with_statistics()
    tight = SynthesizedCalibration(max_seen_drop=0.5, floor_tolerance=None)
    loose = SynthesizedCalibration(max_seen_drop=30.0, floor_tolerance=None)
    fitted_tight, fitted_loose = tight.fit(context), loose.fit(context)
    assert fitted_tight.name == "synthesize" and fitted_tight.factor in tight.factors
    assert fitted_tight.factor < fitted_loose.factor, "a larger budget allows a larger scale"
    assert fitted_tight == tight.fit(context), "deterministic given the context's seed"
    assert {"synthesized_features", "simulated_S", "bias_rule", "feature_source"} <= set(fitted_tight.diagnostics)
    # The floor: never below what `simulate` picks from the same simulated injection.
    tight_no_offset = SynthesizedCalibration(max_seen_drop=0.5, offset=0.0, floor_tolerance=None).fit(context)
    floored = SynthesizedCalibration(max_seen_drop=0.5, floor_tolerance=0.1, offset=0.0).fit(context)
    simulated = SimulatedCalibration().fit(context)
    assert floored.factor == max(tight_no_offset.factor, simulated.factor)
    assert floored.diagnostics["floor_factor"] == simulated.factor
    assert floored.diagnostics["budget_factor"] == tight_no_offset.factor
    assert fitted_tight.diagnostics["bias_rule"] == "feature-mean" and len(fitted_tight.biases) == 2
    without = dataclasses.replace(context, feature_mean=None, feature_std=None)
    fallback = tight.fit(without)
    assert fallback.name == "simulate" and fallback.diagnostics["fallback_from"] == "synthesize"
    assert fallback.factor == SimulatedCalibration().fit(dataclasses.replace(without)).factor
    assert get_calibration("synthesize") == SynthesizedCalibration() == default_calibration()
    with pytest.raises(RuntimeError, match="fitted first"):
        tight(context.seen_rows[:1], context.seen_rows)
    bad_values = (dict(confidence=1.0), dict(spread=0.0), dict(max_seen_drop=-1.0), dict(samples=0), dict(repeats=0))
    for bad in (*bad_values, dict(floor_tolerance=1.0, offset=0.0), dict(offset=math.inf)):
        with pytest.raises(ValueError):
            SynthesizedCalibration(**bad)
    with pytest.raises(ValueError, match="left_out_correction"):
        SynthesizedCalibration(left_out_correction=math.nan)


def test_synthesize_floor_is_carried_over_an_offset_at_the_same_simulated_cost():
    """With an offset, the floor factor (chosen without one) becomes the largest factor whose simulated old-class
    accuracy *with* the offset is still that of the floor without it, on the same features and injections."""
    context = _context_with_statistics()
    rule = SynthesizedCalibration(max_seen_drop=0.5, floor_tolerance=0.1, offset=2.0)
    fitted = rule.fit(context)
    diagnostics = fitted.diagnostics
    with_offset = rule.simulated_curve(context)
    without = dataclasses.replace(rule, offset=0.0, floor_tolerance=None).simulated_curve(context)
    target = without[rule.factors.index(diagnostics["floor_factor"]), 0]
    carried = rule.factors.index(diagnostics["floor_factor_with_offset"])
    assert with_offset[carried, 0] >= target or carried == 0
    assert (with_offset[carried + 1 :, 0] < target).all(), "no larger factor keeps that accuracy"
    assert diagnostics["floor_factor"] == SimulatedCalibration().fit(context).factor
    assert fitted.factor == max(diagnostics["budget_factor"], diagnostics["floor_factor_with_offset"])
    assert fitted == rule.fit(context), "deterministic given the context's seed"
    no_offset = SynthesizedCalibration(floor_tolerance=0.1, offset=0.0).fit(context)
    assert "floor_factor_with_offset" not in no_offset.diagnostics


def test_synthesize_offset_is_simulated_and_added_to_the_new_rows_biases():
    """The offset (a prior for new classes, in logits) costs simulated old-class accuracy at every factor, and the
    fitted new rows get exactly the feature-mean biases plus the offset."""
    from classifier_injection.calibration import synthesize_features, synthetic_gzsl_curve

    context = _context_with_statistics()
    seen_rows, mean = context.seen_rows, context.feature_mean
    features, labels = synthesize_features(seen_rows, mean, 3.8 * context.feature_std, 0.3, samples=4)
    held, predicted = torch.tensor([0, 3]), seen_rows[[0, 3]] + 0.1 * torch.randn(2, seen_rows.shape[1])
    factors = (0.5, 1.0, 1.5)
    plain = synthetic_gzsl_curve(seen_rows, held, predicted, factors, features, labels, mean)
    boosted = synthetic_gzsl_curve(seen_rows, held, predicted, factors, features, labels, mean, offset=3.0)
    assert (boosted[:, 0] <= plain[:, 0]).all() and (boosted[:, 1] >= plain[:, 1]).all()
    assert (boosted[:, 0] < plain[:, 0]).any()
    rule = SynthesizedCalibration(factors=(1.0,), offset=2.0)
    with_offset, without = rule.fit(context), dataclasses.replace(rule, offset=0.0).fit(context)
    assert with_offset.factor == without.factor == 1.0 and with_offset.diagnostics["offset"] == 2.0
    assert torch.allclose(torch.tensor(with_offset.biases), torch.tensor(without.biases) + 2.0)
    rows = with_offset(context.new_rows, seen_rows)
    assert torch.allclose(rows[:, -1], torch.tensor(with_offset.biases, dtype=rows.dtype))


def test_rules_fitted_on_one_context_share_its_simulation():
    """The simulated injections and synthesised features are computed once per context, whatever the rules."""
    fits = []

    class Counting(LeastSquares):
        def fit(self, *args, **kwargs):
            fits.append(1)
            return super().fit(*args, **kwargs)

    context = dataclasses.replace(_context_with_statistics(), injector_factory=Counting)
    first = SynthesizedCalibration().fit(context)
    SimulatedCalibration().fit(context)
    SynthesizedCalibration(offset=0.0, max_seen_drop=2.0).fit(context)
    assert len(fits) == 1, "one simulated injection for every rule with the same hold-out"
    fresh = dataclasses.replace(context)
    assert SynthesizedCalibration().fit(fresh) == first and len(fits) == 2, "a new context simulates anew"


def test_large_heads_are_simulated_on_a_seeded_subset_of_their_classes(monkeypatch):
    from classifier_injection.calibration import simulation

    monkeypatch.setattr(simulation, "MAX_SIMULATED_CLASSES", 30)
    context = _context_with_statistics(num=60)
    subset = simulation.simulated_head(context)
    assert len(subset.seen_rows) == 30 and simulation.simulated_head(context) is subset, "memoised per context"
    assert len(subset.seen_descriptors) == 30 and subset.feature_mean is context.feature_mean
    fitted = SynthesizedCalibration().fit(context)
    assert fitted.diagnostics["simulated_classes"] == 30 and fitted.diagnostics["held_out_classes"] == 6
    assert len(fitted.biases) == len(context.new_rows), "the real new rows still get their biases"
    monkeypatch.setattr(simulation, "MAX_SIMULATED_CLASSES", 60)
    assert simulation.simulated_head(dataclasses.replace(context)).seen_rows is context.seen_rows


def test_reliability_table_rates_true_rows_above_rows_blended_from_their_neighbours():
    from classifier_injection.calibration import synthesize_features
    from classifier_injection.calibration.reliability import BINS, assess, reliability_table, synthetic_wins

    context = _context_with_statistics(num=60)
    rows, mean = context.seen_rows, context.feature_mean
    features, labels = synthesize_features(rows, mean, 3.8 * context.feature_std, confidence=0.3, samples=4)
    held = torch.arange(0, 60, 3)

    def table(predicted):
        wins = synthetic_wins(rows, held, predicted, features, mean, factor=1.0, offset=0.0)
        return reliability_table(wins, labels, rows, held, predicted)

    true = table(rows[held])
    assert true["statistic"] == "nearest_cosine" and true["rows"] == 20 and len(true["edges"]) == BINS - 1
    assert len(true["recall"]) == len(true["precision"]) == BINS
    # A row blended from a held-out class and its nearest kept class scores that neighbour's features too.
    kept = torch.tensor([i for i in range(60) if i % 3])
    neighbour = kept[(F.normalize(rows[held, :-1], dim=1) @ F.normalize(rows[kept, :-1], dim=1).T).argmax(1)]
    blended = (rows[held] + rows[neighbour]) / 2
    blurred = table(blended)

    def pooled(table):
        return sum(p for p in table["precision"] if p is not None) / len(table["precision"])

    assert pooled(blurred) < pooled(true)
    # assess: the nearest old classes by row cosine, and the rates of the bin a row falls in.
    names = [f"c{i}" for i in range(60)]
    [entry] = assess(rows[:1] * 3.0, rows, names, true)
    assert entry["nearest"][0] == ["c0", 1.0] and len(entry["nearest"]) == 3
    assert entry["expected_precision"] == true["precision"][-1] and entry["expected_recall"] == true["recall"][-1]
    assert "expected_precision" not in assess(rows[:1], rows, names, None)[0]


def test_a_fitted_injector_that_leaves_rows_out_replaces_the_refit(monkeypatch):
    """With ``fitted_injector`` the simulation predicts the held-out classes with it, their rows left out of the
    blends, and fits nothing; on a large head's subset the held-out classes are named by their rows in the head."""
    from classifier_injection.calibration import simulation

    calls: list[tuple[torch.Tensor, torch.Tensor]] = []

    class Fitted:
        def predict_left_out(self, descriptors: torch.Tensor, left_out: torch.Tensor) -> torch.Tensor:
            calls.append((descriptors, left_out))
            return context.seen_rows[left_out] + 0.1

    def no_refit():
        raise AssertionError("the simulation refitted")

    context = dataclasses.replace(_context_with_statistics(num=60), injector_factory=no_refit, fitted_injector=Fitted)
    fitted = SynthesizedCalibration().fit(context)
    ((descriptors, left_out),) = calls
    assert fitted.diagnostics["simulation"] == "left-out" and len(left_out) == 12
    assert torch.equal(descriptors, context.seen_descriptors[left_out])

    monkeypatch.setattr(simulation, "MAX_SIMULATED_CLASSES", 30)
    calls.clear()
    subset = simulation.simulated_head(dataclasses.replace(context))
    (held, predicted), *_ = simulation.simulate_injections(subset, 0.2, 1)
    ((_, left_out),) = calls
    assert torch.equal(left_out, subset.seen_index[held]), "positions in the head the injector was fitted on"
    torch.testing.assert_close(predicted, subset.seen_rows[held] + 0.1)


def test_a_simulation_with_the_injections_own_fit_is_corrected_to_choose_as_a_refit_would():
    class Fitted:  # rows blended from the kept ones: a stand-in for the injection's own fit
        def predict_left_out(self, descriptors: torch.Tensor, left_out: torch.Tensor) -> torch.Tensor:
            kept = torch.ones(len(context.seen_rows), dtype=torch.bool)
            kept[left_out] = False
            return torch.softmax(descriptors @ context.seen_descriptors[kept].T, 1) @ context.seen_rows[kept]

    context = dataclasses.replace(_context_with_statistics(num=80), fitted_injector=Fitted)
    corrected = SynthesizedCalibration(max_seen_drop=3.0, left_out_correction=1.0, floor_tolerance=None).fit(context)
    plain = SynthesizedCalibration(max_seen_drop=2.0, left_out_correction=0.0, floor_tolerance=None)
    assert corrected.diagnostics["seen_drop_budget"] == 2.0
    assert corrected.factor == plain.fit(dataclasses.replace(context)).factor
    refit = dataclasses.replace(context, fitted_injector=None)
    assert (
        SynthesizedCalibration(max_seen_drop=3.0, left_out_correction=1.0).fit(refit).diagnostics["seen_drop_budget"]
        == 3.0
    ), "a refitted simulation keeps max_seen_drop"
    rule = SimulatedCalibration(tolerance=0.1, left_out_correction=0.04)
    assert rule.tolerance_for(context) == pytest.approx(0.06) and rule.tolerance_for(refit) == 0.1
    assert SimulatedCalibration(tolerance=0.02).tolerance_for(context) == 0.0, "never below 0"
    curve = rule.simulated_curve(context)
    assert rule.fit(dataclasses.replace(context)).factor == rule.factors[rule.choose(curve, 0.06)]
    for bad in (-0.1, math.inf):
        with pytest.raises(ValueError, match="left_out_correction"):
            SimulatedCalibration(left_out_correction=bad)


def test_features_climbed_with_a_neighbour_share_are_confused_with_their_neighbours():
    from classifier_injection.calibration import synthesize_features
    from classifier_injection.calibration.simulation import _nearest_rows

    context = _context_with_statistics()
    rows, mean, spread = context.seen_rows, context.feature_mean, 3.8 * context.feature_std
    nearest = _nearest_rows(rows[:, :-1], 5)

    def neighbour_probability(share):
        features, labels = synthesize_features(rows, mean, spread, 0.3, samples=3, neighbour_share=share)
        probs = torch.softmax(features @ rows[:, :-1].T + rows[:, -1], dim=1)
        assert (probs[torch.arange(len(labels)), labels] > 0.29).all()  # every feature reaches its class (float32)
        return float(probs.gather(1, nearest[labels]).sum(1).mean())

    assert neighbour_probability(0.7) > 1.5 * neighbour_probability(0.0)
    with pytest.raises(ValueError, match="neighbour_share"):
        synthesize_features(rows, mean, spread, 0.3, neighbour_share=1.0)


def test_expected_rates_simulate_a_user_adding_k_classes():
    from classifier_injection.calibration import synthesize_features
    from classifier_injection.calibration.reliability import expected_at, expected_rates

    context = _context_with_statistics(num=60)
    rows, mean = context.seen_rows, context.feature_mean
    features, labels = synthesize_features(rows, mean, 3.8 * context.feature_std, 0.3, samples=4, neighbour_share=0.5)
    held = torch.arange(0, 60, 3)
    scales = (0.5, 1.0, 1.5, 2.0)

    def rates(predicted):
        return expected_rates(rows, held, predicted, features, labels, mean, 1.0, 0.0, (1, 5, 100), scales)

    true = rates(rows[held])
    assert true["new_classes"] == [1, 5, 20] and true["scales"] == list(scales)  # 100 capped at the 20 held out
    for recall, stolen in zip(true["recall"], true["stolen_per_class"], strict=True):
        assert recall == sorted(recall) and stolen == sorted(stolen)  # larger scales win more of everything
        assert all(0 <= r <= 100 for r in recall)
    # Rows blended from the held-out class and its nearest kept class take that neighbour's features.
    kept = torch.tensor([i for i in range(60) if i % 3])
    neighbour = kept[(F.normalize(rows[held, :-1], dim=1) @ F.normalize(rows[kept, :-1], dim=1).T).argmax(1)]
    blended = rates((rows[held] + rows[neighbour]) / 2)
    assert sum(blended["stolen_per_class"][1]) > sum(true["stolen_per_class"][1])
    # expected_at: the nearest simulated count, interpolated between scales, nothing outside them.
    at = expected_at(true, 4, 0.75)
    assert at["simulated_new_classes"] == 5 and at["new_classes"] == 4 and at["new_class_scale"] == 0.75
    assert at["recall"] == pytest.approx((true["recall"][1][0] + true["recall"][1][1]) / 2, abs=0.01)
    assert expected_at(true, 1, 1.0)["recall"] == true["recall"][0][1]
    outside = expected_at(true, 10, 3.0)  # no rates outside the simulated scales, but the curve to choose one
    assert outside["recall"] is None and outside["curve"]["precision"] == true["precision"][1]
    assert expected_at(None, 10, 1.0) is None


def test_the_win_share_discounts_recall_and_photos_taken_not_precision():
    from classifier_injection.calibration import synthesize_features
    from classifier_injection.calibration.reliability import expected_rates, reliability_table, synthetic_wins

    context = _context_with_statistics(num=60)
    rows, mean = context.seen_rows, context.feature_mean
    features, labels = synthesize_features(rows, mean, 3.8 * context.feature_std, 0.3, samples=4, neighbour_share=0.5)
    held = torch.arange(0, 60, 3)
    kept = torch.tensor([i for i in range(60) if i % 3])
    neighbour = kept[(F.normalize(rows[held, :-1], dim=1) @ F.normalize(rows[kept, :-1], dim=1).T).argmax(1)]
    predicted = (rows[held] + rows[neighbour]) / 2  # rows that win some features and take some
    args = (rows, held, predicted, features, labels, mean, 1.0, 0.0, (1, 5), (0.8, 1.0, 1.5), 0)
    full, half = expected_rates(*args), expected_rates(*args, win_share=0.5)
    assert half["precision"] == full["precision"]
    assert max(max(r) for r in full["recall"]) > 0 and max(max(s) for s in full["stolen_per_class"]) > 0
    for key, digits in (("recall", 1), ("stolen_per_class", 2)):
        for ours, theirs in zip(half[key], full[key], strict=True):
            assert ours == pytest.approx([t / 2 for t in theirs], abs=10**-digits)
    wins = synthetic_wins(rows, held, predicted, features, mean, 1.0, 0.0)
    table, discounted = (reliability_table(wins, labels, rows, held, predicted, s) for s in (1.0, 0.5))
    assert discounted["precision"] == table["precision"] and discounted["edges"] == table["edges"]
    for ours, theirs in zip(discounted["recall"], table["recall"], strict=True):
        assert ours == pytest.approx(theirs / 2, abs=0.1)
    with pytest.raises(ValueError, match="win_share"):
        SynthesizedCalibration(win_share=0.0)


def test_the_expected_rates_read_features_climbed_in_coarser_steps_than_the_factors():
    from classifier_injection.calibration import synthesize_features
    from classifier_injection.calibration.rules import EXPECTED_STEP

    context = _context_with_statistics()
    rule = SynthesizedCalibration()
    features, labels = rule.expected_features(context)
    spread = rule.spread * context.feature_std
    reference = synthesize_features(
        context.seen_rows,
        context.feature_mean,
        spread,
        rule.confidence,
        rule.expected_samples,
        context.seed,
        neighbour_share=rule.neighbour_share,
        step_size=EXPECTED_STEP,
    )
    assert inspect.signature(synthesize_features).parameters["step_size"].default < EXPECTED_STEP
    torch.testing.assert_close(features, reference[0], rtol=0, atol=0)
    assert torch.equal(labels, reference[1])
