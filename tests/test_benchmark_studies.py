"""The benchmark studies: their layout (no import circles, studies import only the harness), their commands, the
results records, and the calibration checks that need the benchmark harness or its research rules.

The real-head check skips when ../shared/data or the benchmark caches are absent.
"""

from __future__ import annotations

import ast
import importlib
import json
import math
from pathlib import Path

import pytest
import torch

from benchmarks.harness.research_rules import BudgetCalibration, noisy_prototype_gzsl_curve, proxy_noise
from benchmarks.run import STUDIES
from classifier_injection.calibration import (
    CalibrationContext,
    LogitMatchCalibration,
    NormCalibration,
    SimulatedCalibration,
    SynthesizedCalibration,
    get_calibration,
)
from classifier_injection.calibration.simulation import prototype_gzsl_curve
from tests.conftest import LeastSquares, synthetic_head

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


def benchmark_imports() -> dict[str, set[str]]:
    """``{module: benchmarks modules it imports}`` for every module of ``benchmarks/``, from the AST."""
    modules = {
        ".".join(path.relative_to(BENCHMARKS.parent).with_suffix("").parts).removesuffix(".__init__"): path
        for path in BENCHMARKS.rglob("*.py")
    }
    graph = {}
    for name, path in modules.items():
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            targets = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                targets = [f"{node.module}.{alias.name}" for alias in node.names] + [node.module]
            found |= {t for t in targets if t in modules and t != name}
        graph[name] = found
    return graph


def test_benchmarks_have_no_import_circles():
    graph = benchmark_imports()
    state: dict[str, int] = {}

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1
        for target in graph[module]:
            if state.get(target) == 1:
                pytest.fail("import circle: " + " -> ".join([*path[path.index(target) :], target]))
            if target not in state:
                visit(target, [*path, target])
        state[module] = 2

    for module in graph:
        if module not in state:
            visit(module, [module])


def test_studies_import_only_the_harness_and_the_library():
    for module, targets in benchmark_imports().items():
        if module.startswith("benchmarks.studies."):
            assert all(t.startswith("benchmarks.harness") for t in targets), (module, targets)
        if module.startswith("benchmarks.harness"):
            assert not any(t.startswith("benchmarks.studies") for t in targets), (module, targets)


def test_every_study_has_a_command(capsys):
    found = {p.stem for p in (BENCHMARKS / "studies").glob("*.py") if p.stem != "__init__"}
    assert found == set(STUDIES)
    for study in STUDIES:
        module = importlib.import_module(f"benchmarks.studies.{study}")
        with pytest.raises(SystemExit) as exit_:
            module.main(["--help"])
        assert exit_.value.code == 0
        assert f"benchmarks.studies.{study}" in capsys.readouterr().out


def test_run_dispatches_to_a_study(capsys):
    from benchmarks.run import main

    with pytest.raises(SystemExit):
        main(["icis_defaults", "--help"])
    assert "benchmarks.run icis_defaults" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    assert "--quick" in out and "--stages" in out and "calibration_shift" in out


def test_results_keep_one_json_per_study_and_a_readme_built_from_it(tmp_path):
    from benchmarks.harness.results import load_study, record

    record("demo", "first", {"h": 1.0}, "# Table\n\n| a |\n|---|\n| 1 |", "cmd one", title="Demo", root=tmp_path)
    record("demo", "second", [1, 2], "| b |", "cmd two", date="2026-01-01T00:00:00+00:00", root=tmp_path)
    record("demo", "first", {"h": 2.0}, "| a |", "cmd three", root=tmp_path)  # replaces its run
    doc = load_study("demo", tmp_path)
    assert list(doc["runs"]) == ["first", "second"] and doc["title"] == "Demo"
    assert doc["runs"]["first"]["results"] == {"h": 2.0} and doc["runs"]["second"]["date"].startswith("2026-01-01")
    assert json.loads((tmp_path / "demo" / "results.json").read_text()) == doc
    readme = (tmp_path / "demo" / "README.md").read_text()
    assert readme.startswith("# Demo") and "Command: `cmd three`" in readme and "cmd one" not in readme
    assert "CPUs" in readme


def test_committed_results_are_one_json_and_a_readme_per_study():
    results = BENCHMARKS / "results"
    assert not list(results.glob("*.json")) and not list(results.glob("*.log")), "flat result files are gone"
    for folder in (p for p in results.iterdir() if p.is_dir()):
        assert sorted(p.name for p in folder.iterdir() if p.suffix != ".png") == ["README.md", "results.json"]
        doc = json.loads((folder / "results.json").read_text())
        assert doc["runs"] and all({"command", "date", "table", "results"} <= set(r) for r in doc["runs"].values())


def test_budget_rule_keeps_the_largest_factor_within_its_old_class_budget():
    descriptors, rows = synthetic_head(num=60)
    context = CalibrationContext(
        seen_rows=rows, new_rows=rows[:2], seen_descriptors=descriptors, injector_factory=LeastSquares, seed=3
    )
    # Without noise it is the clean prototype curve; with it, the head is imperfect on its own prototypes and
    # old-class accuracy falls as the new rows grow.
    held, factors = torch.arange(5), [0.01, 1.0, 100.0]
    clean = noisy_prototype_gzsl_curve(rows, held, rows[:5], factors, noise=0.0, samples=1)
    torch.testing.assert_close(clean, prototype_gzsl_curve(rows, held, rows[:5], factors))
    noise = proxy_noise(rows, 0.5)
    noisy = noisy_prototype_gzsl_curve(rows, held, rows[:5], factors, noise=noise)
    assert noise > 0 and noisy[0, 0] < clean[0, 0] and noisy[2, 0] < noisy[0, 0]
    tight, loose = BudgetCalibration(max_seen_drop=1.0), BudgetCalibration(max_seen_drop=30.0)
    fitted_tight, fitted_loose = tight.fit(context), loose.fit(context)
    assert fitted_tight.name == "budget" and fitted_tight.factor in tight.factors
    assert fitted_tight.factor < fitted_loose.factor, "a larger budget allows a larger scale"
    assert fitted_tight == tight.fit(context), "deterministic given the context's seed"
    assert {"proxy_noise", "simulated_S", "bias_rule"} <= set(fitted_tight.diagnostics)
    assert get_calibration("budget") == BudgetCalibration()
    with pytest.raises(RuntimeError, match="fitted first"):
        tight(rows[:1], rows)
    for bad in (dict(proxy_accuracy=1.0), dict(max_seen_drop=-1.0), dict(samples=0), dict(factors=())):
        with pytest.raises(ValueError):
            BudgetCalibration(**bad)


def test_budget_rule_shares_the_simulated_injection_of_its_context():
    descriptors, rows = synthetic_head(num=60)
    context = CalibrationContext(rows, rows[:2], descriptors, injector_factory=LeastSquares, seed=3)
    SimulatedCalibration().fit(context)
    alone = CalibrationContext(rows, rows[:2], descriptors, injector_factory=LeastSquares, seed=3)
    assert BudgetCalibration().fit(context) == BudgetCalibration().fit(alone)
    assert len([k for k in context.memo if k[0] == "injections"]) == 1


def test_operating_point_scores_the_simulation_with_every_other_true_row_competing():
    from benchmarks.studies.operating_point import f_half, precision_first, simulated_rates
    from classifier_injection.calibration.reliability import synthetic_wins
    from classifier_injection.calibration.simulation import simulate_injections

    descriptors, rows = synthetic_head(num=60)
    dim = rows.shape[1] - 1
    context = CalibrationContext(
        rows,
        rows[:2],
        descriptors,
        injector_factory=LeastSquares,
        seed=3,
        feature_mean=torch.zeros(dim),
        feature_std=torch.ones(dim),
    )
    rule = SynthesizedCalibration()
    rates = simulated_rates(rule, context, 1.5, 1, [1.0])[0]
    assert 0 < rates["recall"] <= 100 and rates["stolen_per_class"] >= 0
    # Alone against the kept rows only (the reliability record's scoring), a held-out row wins at least as often
    # on its own class's features as when the other held-out classes' true rows compete too.
    features, labels = rule.expected_features(context)
    held, predicted = simulate_injections(context, rule.holdout_fraction, rule.repeats, rule.name)[0]
    wins = synthetic_wins(rows, held, predicted, features, context.feature_mean, 1.5, rule.offset)
    own = labels[:, None] == held[None, :]
    assert rates["recall"] <= 100 * float((wins & own).sum()) / float(own.sum())
    assert f_half(50.0, 50.0) == pytest.approx(50.0) and f_half(float("nan"), 0.0) == 0.0
    table = [{"scale": 0.8, "recall": 10.0, "precision": 90.0}, {"scale": 1.0, "recall": 40.0, "precision": 40.0}]
    assert precision_first(table) == 1.0  # F0.5 34.6 against 40.0


def test_photo_wins_pools_the_rates_of_several_hold_outs():
    from benchmarks.studies.photo_wins import _pooled
    from classifier_injection.calibration.reliability import expected_rates

    _, rows = synthetic_head(num=60)
    dim = rows.shape[1] - 1
    features = rows[:, :-1].repeat(2, 1) + 0.3 * torch.randn(120, dim, generator=torch.Generator().manual_seed(0))
    labels = torch.arange(60).repeat(2)
    tables = [
        expected_rates(
            rows,
            held,
            (rows[held] + rows[held.roll(1)]) / 2,
            features,
            labels,
            torch.zeros(dim),
            1.0,
            0.0,
            (5,),
            (1.0,),
        )
        for held in (torch.arange(0, 60, 3), torch.arange(1, 60, 3))
    ]
    pooled = _pooled(tables)
    assert pooled["recall"] == pytest.approx((tables[0]["recall"][0][0] + tables[1]["recall"][0][0]) / 2)
    alone = _pooled(tables[:1])
    assert alone["precision"] == pytest.approx(tables[0]["precision"][0][0], abs=0.5)  # to the table's rounding
    assert 0 <= pooled["precision"] <= 100 and pooled["stolen_per_class"] >= 0


def test_prototype_rates_score_true_rows_as_perfect_and_pool_classes_into_thirds():
    from benchmarks.harness.calibration import prototype_wins
    from benchmarks.studies.prototype_rates import summary

    rows = torch.cat([2 * torch.eye(30), torch.zeros(30, 1)], dim=1)  # orthogonal rows of one norm, no bias
    held = torch.arange(0, 30, 3)
    wins = prototype_wins(rows, held, rows[held], 1.0)
    # A true row wins its own class's prototype and no other: the simulation sees a perfect row.
    assert torch.equal(wins, torch.arange(30)[:, None] == held[None, :])
    classes = [
        {"expected_precision": float(p), "expected_recall": 50.0, "hit": hit, "wins": wins_, "factor": 1.0}
        for p, hit, wins_ in [(10, 1, 4), (20, 0, 2), (30, 1, 1), (40, 1, 2), (50, 0, 0), (60, 1, 1)]
    ]
    out = summary(classes)
    assert out["all"]["classes"] == 6 and out["all"]["measured_precision"] == pytest.approx(100 * 4 / 10)
    assert [t["classes"] for t in out["thirds"]] == [2, 2, 2]
    assert out["thirds"][0]["expected_precision"] == 15.0
    assert out["thirds"][0]["measured_precision"] == pytest.approx(100 / 6)
    assert out["thirds"][2]["measured_recall"] == 50.0 and out["factors"] == [1.0]


def test_confusions_pool_counts_over_draws_into_shares_and_chance():
    from benchmarks.studies.confusions import rates, table

    counts = [
        {"taken": 4, "taken_nearest": 2, "taken_first": 1, "lost": 2, "lost_nearest": 1},
        {"taken": 6, "taken_nearest": 3, "taken_first": 3, "lost": 0, "lost_nearest": 0},
    ]
    out = rates(counts, 10)
    assert out["taken"] == 10 and out["taken_nearest_pct"] == 50.0 and out["taken_first_pct"] == 40.0
    assert out["lost_nearest_pct"] == 50.0 and out["chance_pct"] == pytest.approx(100 * 3 / 990)
    none_lost = rates(counts[1:], 10)
    assert math.isnan(none_lost["lost_nearest_pct"])
    assert "| lite0, K = 10 | wordnet | 10 | 50.0 % | 40.0 % | 2 | 50.0 % | 0.30 % |" in table(
        {"lite0, K = 10": {"wordnet": out}}
    )


@pytest.mark.usefixtures("all_threads")
def test_real_head_one_fold_image_free_rules_against_the_test_picked_scale():
    """lite0, fold 0, ridge rows (weak: photo-prompt names): ``logit-match`` reaches >= 80 % of the H of the best
    test-picked factor; ``simulate`` keeps the old classes within 15 points of the model and still lets the new
    classes win (it gives up H for that: >= 60 % of the bound here); ``synthesize`` (the default) reaches 75 % of
    the bound (measured 79 %) within the same 15 points (measured 13.6), and its no-offset variant 80 %."""
    from benchmarks.harness.calibration import fold_inputs, injection_context
    from benchmarks.harness.data import CACHE, head_data, shared_data_available
    from benchmarks.harness.metrics import evaluate_rows, oracle
    from classifier_injection.baselines import RidgeInjector

    features = CACHE / "tf_efficientnet_lite0.safetensors"
    descriptors_file = CACHE / "descriptors" / "minilm-name.safetensors"
    if not (shared_data_available() and features.is_file() and descriptors_file.is_file()):
        pytest.skip(
            "needs ../shared/data and the benchmark caches (python -m benchmarks.harness.data; a benchmark run)"
        )
    from safetensors.torch import load_file

    data = head_data("tf_efficientnet_lite0")
    descriptors = load_file(str(descriptors_file))["descriptors"]
    held, _, seen_a, new_a, seen_rows = fold_inputs(data, descriptors, 0)
    predicted, context = injection_context(RidgeInjector(), seen_a, seen_rows, new_a)
    fitted = SimulatedCalibration().fit(context)
    chosen = evaluate_rows(data, held, fitted(predicted, seen_rows))
    plain = evaluate_rows(data, held, NormCalibration()(predicted, seen_rows))
    bound = max(
        evaluate_rows(data, held, NormCalibration(factor=f)(predicted, seen_rows))["h"]
        for f in (1.5, 1.75, 2.0, 2.25, 2.5, 2.75, 3.0, 3.5)
    )
    assert plain["h"] < 5 < chosen["unseen"]
    assert chosen["seen"] >= oracle(data, held)["seen"] - 15, (fitted, chosen)
    assert chosen["h"] >= 0.6 * bound, (fitted, chosen, bound)
    matched = LogitMatchCalibration().fit(context)
    favoured = evaluate_rows(data, held, matched(predicted, seen_rows))
    assert favoured["h"] >= 0.8 * bound, (matched, favoured, bound)
    # The default rule, with the model's feature statistics (measured: H 15.3 of 19.3, S drop 13.6).
    _, with_stats = injection_context(RidgeInjector(), seen_a, seen_rows, new_a, data.statistics())
    synthesized = SynthesizedCalibration().fit(with_stats)
    default = evaluate_rows(data, held, synthesized(predicted, seen_rows))
    assert default["unseen"] > 5 and default["h"] >= 0.75 * bound, (synthesized, default, bound)
    assert default["seen"] >= oracle(data, held)["seen"] - 15, (synthesized, default)
    # Without an offset: >= 80 % of the bound; the synthetic budget alone keeps the old classes within 16 points
    # (measured 14.9), and the floor never scales below `simulate`.
    no_offset = SynthesizedCalibration(max_seen_drop=2.5, floor_tolerance=0.1, offset=0.0).fit(with_stats)
    assert evaluate_rows(data, held, no_offset(predicted, seen_rows))["h"] >= 0.8 * bound
    assert no_offset.factor >= SimulatedCalibration().fit(with_stats).factor
    budget_only = SynthesizedCalibration(max_seen_drop=2.5, offset=0.0, floor_tolerance=None).fit(with_stats)
    assert evaluate_rows(data, held, budget_only(predicted, seen_rows))["seen"] >= oracle(data, held)["seen"] - 16


def test_user_regime_draws_distinct_names_and_pools_counts_over_draws():
    from benchmarks.harness.descriptors import imagenet_classes
    from benchmarks.harness.user_regime import draw_classes, summarize
    from benchmarks.studies.benchmark import reliability_groups

    names, _ = imagenet_classes()
    draw = draw_classes(50, 0)
    assert list(draw) == sorted(draw) and len(set(draw)) == 50 and list(draw_classes(50, 0)) == list(draw)
    assert len({names[c].casefold() for c in draw}) == 50 and list(draw_classes(50, 1)) != list(draw)
    one = {"new_photos": 10, "hits": 4, "top5_hits": 7, "new_wins": 8, "right_wins": 4, "stolen": 4}
    two = {"new_photos": 10, "hits": 2, "top5_hits": 5, "new_wins": 2, "right_wins": 2, "stolen": 0}
    old = {"old_photos": 990, "old_before": 700, "old_after": 690}
    s = summarize([{**one, **old}, {**two, **old}])
    assert s["recall"] == 30 and s["precision"] == 60 and s["top5_recall"] == 60 and s["draws"] == 2
    assert s["stolen_per_class"] == 0.2 and s["old_change"] == pytest.approx(-100 * 20 / 1980)
    classes = [
        {"expected_precision": p, "expected_recall": 50.0, "hit": h, "wins": w}
        for p, h, w in [(10, 0, 3), (20, 1, 4), (80, 1, 1), (90, 1, 1), (50, 0, 0), (60, 1, 2)]
    ]
    low, mid, high = reliability_groups(classes)
    assert (low["measured_precision"], high["measured_precision"]) == (100 / 7, 100.0) and mid["classes"] == 2


def test_user_regime_one_draw_through_inject_on_a_real_head():
    """lite0 without 2 classes, injected back by name (ridge: fast): old rows kept, the true rows as the ceiling."""
    from benchmarks.harness.data import CACHE, head_data, shared_data_available
    from benchmarks.harness.user_regime import inject_draw, make_draw, reduced_model, score_rows
    from classifier_injection.baselines import RidgeInjector
    from classifier_injection.descriptors import seen_class_names, seen_class_wnids

    if not (shared_data_available() and (CACHE / "tf_efficientnet_lite0.safetensors").is_file()):
        pytest.skip("needs ../shared/data and the lite0 feature cache (python -m benchmarks.harness.data)")
    draw = make_draw("tf_efficientnet_lite0", 2, 0)
    model = reduced_model(draw)
    assert model.num_classes == 998 and seen_class_wnids(model, 998)[0] == "n01440764"
    assert seen_class_names(model, 998)[0] == "tench" and not set(draw.names) & set(seen_class_names(model, 998))
    rows, record = inject_draw(draw, "name-only", injector=RidgeInjector())
    assert rows.shape == (2, 1281) and record["names"] == draw.names and set(record["reliability"]) == set(draw.names)
    data = head_data("tf_efficientnet_lite0")
    ceiling = score_rows(draw, data.rows[torch.as_tensor(draw.removed)])
    assert len(ceiling["per_class"]) == 2 and ceiling["1.0"]["new_photos"] == 2 and ceiling["1.0"]["old_photos"] == 998
    counts = score_rows(draw, rows)
    assert counts["2.0"]["new_wins"] >= counts["0.5"]["new_wins"]  # a larger scale lets new rows win more


def test_research_injectors_predict_one_row_per_descriptor_and_temper_the_mixture():
    from benchmarks.harness.research_injectors import DirectionEnsemble, NeighbourContrast, TemperedICIS
    from classifier_injection import ICISConfig, ICISInjector

    g = torch.Generator().manual_seed(0)
    seen_a, new_a = torch.randn(40, 6, generator=g), torch.randn(5, 6, generator=g)
    seen_rows = torch.randn(40, 9, generator=g)
    config = ICISConfig(latent_dim=8, max_epochs=3)
    plain = ICISInjector(config, seed=0).fit(seen_a, seen_rows, new_a)
    tempered = TemperedICIS(0.5, config, seed=0).fit(seen_a, seen_rows, new_a)
    torch.testing.assert_close(
        tempered.model.weight_ae.decoder.logits.weight, plain.model.weight_ae.decoder.logits.weight / 0.5
    )
    assert tempered.hparams()["temperature"] == 0.5
    with pytest.raises(ValueError, match="temperature"):
        TemperedICIS(0.0)
    ensemble = DirectionEnsemble([LeastSquares(), LeastSquares()]).fit(seen_a, seen_rows, new_a)
    single = LeastSquares().fit(seen_a, seen_rows, new_a).predict(new_a)
    rows = ensemble.predict(new_a)
    torch.testing.assert_close(rows[:, :-1], torch.nn.functional.normalize(single[:, :-1], dim=1))
    contrast = NeighbourContrast(LeastSquares(), share=0.5, neighbours=3).fit(seen_a, seen_rows, new_a)
    assert contrast.predict(new_a).shape == (5, 9)
    assert not torch.allclose(contrast.predict(new_a), single)


def test_separation_term_changes_the_fit_and_weight_zero_is_plain_icis():
    from benchmarks.harness.research_injectors import SeparatedICIS
    from classifier_injection import ICISConfig, ICISInjector

    g = torch.Generator().manual_seed(0)
    seen_a, new_a = torch.randn(40, 6, generator=g), torch.randn(5, 6, generator=g)
    seen_rows = torch.randn(40, 9, generator=g)
    config = ICISConfig(latent_dim=8, max_epochs=3, early_stop_slope=0.0)
    plain = ICISInjector(config, seed=0).fit(seen_a, seen_rows, new_a)
    zero = SeparatedICIS(0.0, config=config, seed=0).fit(seen_a, seen_rows, new_a)
    separated = SeparatedICIS(1.0, config=config, seed=0).fit(seen_a, seen_rows, new_a)
    torch.testing.assert_close(zero.predict(new_a), plain.predict(new_a))
    assert not torch.allclose(separated.predict(new_a), plain.predict(new_a))
    assert "losses" not in vars(separated.model)  # the wrapped loss does not outlive the fit
    with pytest.raises(ValueError, match="dense mixture"):
        SeparatedICIS(1.0, config=ICISConfig(latent_dim=8, max_epochs=1, row_decoder="linear")).fit(
            seen_a, seen_rows, new_a
        )


def test_feature_separation_changes_the_fit_and_weight_zero_is_plain_icis():
    from benchmarks.harness.research_injectors import FeatureSeparatedICIS
    from classifier_injection import ICISConfig, ICISInjector

    g = torch.Generator().manual_seed(0)
    seen_a, new_a = torch.randn(40, 6, generator=g), torch.randn(5, 6, generator=g)
    seen_rows = torch.randn(40, 9, generator=g)
    mean, std = torch.rand(8, generator=g), torch.rand(8, generator=g)
    config = ICISConfig(latent_dim=8, max_epochs=3, early_stop_slope=0.0)
    plain = ICISInjector(config, seed=0).fit(seen_a, seen_rows, new_a)
    zero = FeatureSeparatedICIS(mean, std, 0.0, config=config, seed=0).fit(seen_a, seen_rows, new_a)
    separated = FeatureSeparatedICIS(mean, std, 1.0, neighbours=3, config=config, seed=0).fit(seen_a, seen_rows, new_a)
    torch.testing.assert_close(zero.predict(new_a), plain.predict(new_a))
    assert not torch.allclose(separated.predict(new_a), plain.predict(new_a))
    assert "losses" not in vars(separated.model)  # the wrapped loss does not outlive the fit
    assert separated.hparams()["feature_separation"][:2] == [1.0, 3]
    with pytest.raises(ValueError, match="neighbours"):
        FeatureSeparatedICIS(mean, std, 1.0, neighbours=0)
    with pytest.raises(ValueError, match="dense mixture"):
        linear = ICISConfig(latent_dim=8, max_epochs=1, row_decoder="linear")
        FeatureSeparatedICIS(mean, std, 1.0, config=linear).fit(seen_a, seen_rows, new_a)


def test_residual_map_adds_to_plain_icis_and_vanishes_under_a_large_penalty():
    from benchmarks.harness.research_injectors import ResidualICIS
    from classifier_injection import ICISConfig, ICISInjector

    g = torch.Generator().manual_seed(0)
    seen_a, new_a = torch.randn(40, 6, generator=g), torch.randn(5, 6, generator=g)
    seen_rows = torch.randn(40, 9, generator=g)
    config = ICISConfig(latent_dim=8, max_epochs=3, early_stop_slope=0.0)
    plain = ICISInjector(config, seed=0).fit(seen_a, seen_rows, new_a).predict(new_a)
    residual = ResidualICIS(1.0, config, seed=0).fit(seen_a, seen_rows, new_a)
    assert residual.residual_map.shape == (6, 9) and residual.hparams()["residual_alpha"] == 1.0
    assert not torch.allclose(residual.predict(new_a), plain)
    damped = ResidualICIS(1e12, config, seed=0).fit(seen_a, seen_rows, new_a)
    torch.testing.assert_close(damped.predict(new_a), plain)
    with pytest.raises(ValueError, match="alpha"):
        ResidualICIS(0.0)
    with pytest.raises(ValueError, match="dense mixture"):
        ResidualICIS(1.0, ICISConfig(latent_dim=8, max_epochs=1, row_decoder="linear")).fit(seen_a, seen_rows, new_a)


def test_scaling_exponent_and_table_report_what_was_measured():
    from benchmarks.studies.scaling import exponent, table

    assert exponent([1000, 2000, 4000], [1.0, 4.0, 16.0]) == pytest.approx(2.0)
    assert exponent([1000], [1.0]) != exponent([1000], [1.0])  # NaN: one size fits no slope
    row = {"num": 21843, "count": 1, "seconds": 30.0, "peak_mb": 900.0, "extra_peak_mb": 300.0, "head_mb": 100.0}
    results = {
        "device": "cuda",
        "forward_seconds": 0.01,
        "rows": [{**row, "epochs": 200, "gpu_peak_mb": 512.0, "seen_head": {"seconds": 0.5, "epochs": 200}}],
        "exponents": {"1": float("nan")},
        "cold_embedding_seconds": {"21843": 60.0},
        "ratios": {"11821_over_1000": float("nan")},
    }
    text = table(results)
    assert "Device: cuda" in text and "| 21843 | 1 | 30.0 | 3000.0 | 900 | 300 | 100 | 3.0 | 200 |" in text
    assert "- N = 21843, K = 1: 512" in text
    assert "- N = 21843, K = 1: 0.5 s (50.0 forward passes), 200 epochs" in text
    assert "nan" not in text  # one head size: no exponent, no ratio
    measured = table({**results, "exponents": {"1": 0.25}, "ratios": {"11821_over_1000": 2.4}})
    assert "- K = 1: 0.25" in measured and "time(11821) / time(1000), K = 1: 2.4" in measured
    assert "GFLOP/s" not in text and "ICIS fit" not in text  # runs from before these were measured
    phased = table(
        {
            **results,
            "matmul_gflops": 68.04,
            "rows": [{**row, "epochs": 200, "fit_seconds": 20.0, "calibration_seconds": 6.5}],
        }
    )
    assert "2048^3 matrix product there: 68.0 GFLOP/s" in phased
    assert "- N = 21843, K = 1: fit 20.0, calibration 6.5" in phased
    assert "inject() alone" not in phased  # runs from before it was measured
    cold = table({**results, "cold_inject_seconds": {"1000": 20.0}, "cold_inject_seconds_unshipped": {"1000": 32.5}})
    assert "inject() alone" in cold and "- N = 1000: 20.0 s (32.5 s)" in cold


def test_scaling_refuses_cuda_where_there_is_none(monkeypatch, capsys):
    from benchmarks.studies import scaling

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit):
        scaling.main(["--device", "cuda", "--sizes", "1000", "--counts", "1"])
    assert "no CUDA device is available here" in capsys.readouterr().err


def test_scaling_icis_settings_are_json_values_checked_against_the_config():
    from benchmarks.studies.scaling import icis_settings

    assert icis_settings(["row_encoder=false", "mixture_top_k=32"]) == {"row_encoder": False, "mixture_top_k": 32}
    assert icis_settings([]) == {}
    for bad, match in (("row_encoder", "KEY=VALUE"), ("lr=fast", "must be JSON"), ("no_such=1", "no_such")):
        with pytest.raises(ValueError, match=match):
            icis_settings([bad])
    with pytest.raises(ValueError, match="lr"):
        icis_settings(["lr=0"])  # the config's own check


def test_seeds_table_gives_mean_deviation_and_paired_differences():
    from benchmarks.studies.seeds import seeded, table

    runs = {
        "icis": {"0": {"zsl": 36.0, "h": 35.0}, "1": {"zsl": 38.0, "h": 37.0}},
        "other": {"0": {"zsl": 37.0, "h": 34.0}, "1": {"zsl": 38.0, "h": 38.0}},
    }
    text = table({"m": runs}, [0, 1])
    assert "| m | icis | 36.0 / 35.0 | 38.0 / 37.0 | 37.00 / 36.00 | 1.41 / 1.41 | - |" in text
    assert "| 37.50 / 36.00 | 0.71 / 2.83 | +0.50 / +0.00 (H higher on 1 of 2 seeds) |" in text
    assert seeded("icis", 3).seed == 3
    with pytest.raises(ValueError, match="no seed"):
        seeded("ridge", 3)


def test_left_out_table_compares_every_correction_with_the_refit():
    from benchmarks.studies.left_out import CORRECTIONS, table

    def head(synthesize: float, simulate: float) -> dict[str, float]:
        factors = {"synthesize refit": 1.0, "simulate refit": 1.0}
        factors |= {f"synthesize left-out {c:g}": synthesize - c / 2 for c in CORRECTIONS["synthesize"]}
        factors |= {f"simulate left-out {c:g}": simulate + c for c in CORRECTIONS["simulate"]}
        return factors

    text = table({"a": head(1.25, 0.95), "b": head(1.25, 0.975)})
    assert "| synthesize | 0.5 | 2 of 2 | +0.0000 | 0.0000 |" in text
    assert "| synthesize | 0 | 0 of 2 | +0.2500 | 0.2500 |" in text
    assert "| simulate | 0.025 | 1 of 2 | -0.0125 | 0.0125 |" in text


def test_the_user_stage_averages_what_inject_expected_over_draws():
    from benchmarks.studies.benchmark import _expected_line, mean_expected

    records = [
        {"simulated_new_classes": 10, "recall": 60.0, "precision": 20.0, "stolen_per_class": 2.0},
        None,
        {"simulated_new_classes": 10, "recall": 40.0, "precision": None, "stolen_per_class": 3.0},
    ]
    mean = mean_expected(records)
    assert mean == {"draws": 2, "simulated_new_classes": 10, "recall": 50.0, "precision": 20.0, "stolen_per_class": 2.5}
    assert mean_expected([None]) is None
    line = "| wordnet | icis, expected by `inject()` | 50.0 | 20.0 | - | 2.50 | - | |"
    assert _expected_line("wordnet", mean) == line


def test_target_entries_pool_each_targets_draws():
    from benchmarks.harness.user_regime import COUNTS
    from benchmarks.studies.benchmark import draw_targets, target_entries

    def counts(hits: int, wins: int) -> dict:
        return {**dict.fromkeys(COUNTS, 0), "new_photos": 10, "hits": hits, "new_wins": wins, "right_wins": hits}

    per_draw = [
        {"0.3": {"scale": 0.9, "counts": counts(3, 6)}, "0.4": {"scale": 0.8, "counts": counts(1, 2)}},
        {},  # a draw without an expected curve
        {"0.3": {"scale": 0.85, "counts": counts(1, 4)}},
    ]
    entries = target_entries(per_draw)
    assert list(entries) == ["0.3", "0.4"] and entries["0.3"]["scales"] == [0.9, 0.85]
    assert entries["0.3"]["summary"]["recall"] == 20.0 and entries["0.3"]["summary"]["precision"] == 40.0
    assert entries["0.4"]["summary"]["draws"] == 1
    assert draw_targets(None, {"expected": None, "rows": None}) == {}


def test_row_bound_oracles_recover_rows_they_can_reach_and_rows_are_calibrated_alike():
    from benchmarks.harness.user_regime import CURVE_SCALES as SCALES
    from benchmarks.harness.user_regime import RULE_OFFSET, calibrated, curve_summary
    from benchmarks.studies.row_bound import best_blend, best_linear
    from classifier_injection.calibration.base import feature_mean_biases

    generator = torch.Generator().manual_seed(0)
    kept = torch.randn(12, 6, generator=generator)
    weights = torch.softmax(torch.randn(2, 12, generator=generator), 1)
    blend, found = best_blend(kept, weights @ kept)
    assert torch.nn.functional.cosine_similarity(blend, weights @ kept).min() > 0.999
    assert torch.allclose(found.sum(1), torch.ones(2))
    among = torch.tensor([[0, 1], [2, 3]])
    _, only = best_blend(kept, weights @ kept, among, steps=50)
    assert only[0, 2:].sum() == 0 and only[1, :2].sum() == 0 and only[1, 4:].sum() == 0
    mixed = torch.randn(3, 12, generator=generator) @ kept
    torch.testing.assert_close(best_linear(kept, mixed), mixed, rtol=1e-4, atol=1e-4)

    old_rows = torch.randn(12, 7, generator=generator)
    mean = torch.randn(6, generator=generator)
    rows = calibrated(torch.randn(2, 6, generator=generator), old_rows, mean)
    torch.testing.assert_close(rows[:, :-1].norm(dim=1), old_rows[:, :-1].norm(dim=1).mean().expand(2))
    torch.testing.assert_close(rows[:, -1], feature_mean_biases(rows[:, :-1], old_rows, mean) + RULE_OFFSET)

    def counts(hits: int, wins: int, right: int) -> dict[str, int]:
        return {
            "new_photos": 10,
            "hits": hits,
            "top5_hits": 10,
            "new_wins": wins,
            "right_wins": right,
            "stolen": 0,
            "old_photos": 990,
            "old_before": 900,
            "old_after": 900,
        }

    # Precision 60 % at recall 30 %, 40 % at 50 %, nothing won below scale 1.
    draw = {str(s): counts(5, 10, 4) if s > 1 else counts(3, 5, 3) if s == 1 else counts(0, 0, 0) for s in SCALES}
    summary = curve_summary([draw, draw], [0.5, 0.7])
    assert summary["cosine"] == pytest.approx(0.6)
    assert summary["recall_at_precision_50"] == 30 and summary["recall_at_precision_35"] == 50
    assert summary["best_f1"] == pytest.approx(2 * 50 * 40 / 90) and summary["best_f1_scale"] == 1.05


def test_row_signals_families_keep_the_default_calibration_and_change_only_what_they_name():
    from benchmarks.harness.data import HeadData
    from benchmarks.harness.user_regime import calibrated, grown_labels, score_head
    from benchmarks.studies.row_signals import families, logit_spread, neighbour_similarity

    generator = torch.Generator().manual_seed(0)
    old_rows = torch.randn(20, 9, generator=generator)
    mean, spread = torch.randn(8, generator=generator), torch.rand(8, generator=generator) + 0.5
    blend = torch.randn(4, 8, generator=generator) * torch.tensor([0.5, 1.0, 2.0, 4.0])[:, None]
    rows, signals = families(blend, old_rows, mean, spread)
    default = rows["ICIS, the default's calibration"]
    torch.testing.assert_close(default, calibrated(blend, old_rows, mean))
    torch.testing.assert_close(signals["blend norm"], blend.norm(dim=1))
    scaled = rows["blend norm, gamma 0.5"][:, :-1].norm(dim=1) / default[:, :-1].norm(dim=1)
    torch.testing.assert_close(scaled, (blend.norm(dim=1) / blend.norm(dim=1).mean()).sqrt())
    centred = rows["neighbour similarity about the injection's mean, lam 1"]
    torch.testing.assert_close(centred[:, :-1], default[:, :-1])
    torch.testing.assert_close(centred[:, -1].mean(), default[:, -1].mean())
    torch.testing.assert_close(
        default[:, -1] - centred[:, -1], signals["neighbour similarity"] - signals["neighbour similarity"].mean()
    )
    spread_rows = rows["logit spread"][:, :-1]
    torch.testing.assert_close(
        logit_spread(spread_rows, spread) * spread_rows.norm(dim=1),
        (logit_spread(old_rows[:, :-1], spread).mean() * default[:, :-1].norm(dim=1)),
    )
    # A copy of an old row is as near its neighbours as that row is: its z-score is that row's own.
    kept = old_rows[:, :-1]
    z = neighbour_similarity(kept[:1] * 3, kept)
    unit = torch.nn.functional.normalize(kept, dim=1)
    cosines = (unit @ unit.T).fill_diagonal_(-2)
    among = cosines.topk(5, dim=1).values.mean(1)
    near = torch.cat([torch.ones(1), cosines[0].topk(4).values]).mean()  # the copy's nearest: the row, its 4 nearest
    torch.testing.assert_close(z, ((near - among.mean()) / among.std()).reshape(1))

    # The grown head: the other classes in order, then the new ones in the order given.
    photos = HeadData("synthetic", old_rows, kept.clone(), torch.arange(20))
    target = grown_labels(20, torch.tensor([7, 2]))[photos.labels]
    assert target[7] == 18 and target[2] == 19 and target[0] == 0 and target[3] == 2 and target[19] == 17
    keep = torch.ones(20, dtype=torch.bool)
    keep[torch.tensor([7, 2])] = False
    counts, per_class = score_head(photos, old_rows[keep], old_rows[torch.tensor([7, 2])], target, (0.5, 1.0))
    assert counts["1.0"]["new_photos"] == 2 and counts["1.0"]["old_photos"] == 18
    assert len(per_class) == 2 and counts["1.0"]["hits"] == sum(c["hit"] for c in per_class)
    assert counts["1.0"]["new_wins"] == sum(c["wins"] for c in per_class)
    assert score_head(photos, old_rows[keep], old_rows[torch.tensor([7, 2])], target, (0.5,))[1] is None


def test_uncertainty_gate_lets_a_new_row_win_the_photos_the_old_head_is_unsure_of():
    import math

    from benchmarks.harness.data import HeadData
    from benchmarks.harness.user_regime import score_head
    from benchmarks.studies.uncertainty_gate import UNGATED, auroc, entropy, gate_curves

    assert entropy(torch.zeros(1, 3)).item() == pytest.approx(math.log(3))
    assert auroc(torch.tensor([3.0, 1.0, 2.0, 2.0]), torch.tensor([True, False, True, False])) == 0.875
    # Classes 0-4 stay; class 5 is new. Its photo looks a little like each old class, and its row is class 0's:
    # without a gate it wins its own photo exactly when it also takes class 0's.
    rows = torch.cat([torch.eye(6) * 5, torch.zeros(6, 1)], 1)
    features = torch.eye(6)
    features[5, :5] = 0.4
    photos = HeadData("toy", rows, features, torch.arange(6))
    injection = (rows[:5], torch.tensor([[5.0, 0, 0, 0, 0, 0, 0]]), torch.tensor([5]))
    result = gate_curves(photos, [injection], lambdas=(1.0,))
    assert result["entropy auroc"] == 1.0
    ungated, gated = result["families"][UNGATED], result["families"]["entropy gate, lam 1"]
    assert ungated["best_f1"] <= 200 / 3 + 1e-9 and gated["best_f1"] == 100.0
    # The gate adds a logit to the new classes only: the old ones, and no offset at all, score as before.
    target = torch.arange(6)
    plain, _ = score_head(photos, rows[:5], injection[1], target, (1.0,))
    zero, _ = score_head(photos, rows[:5], injection[1], target, (1.0,), torch.zeros(6))
    assert plain == zero and plain["1.0"]["old_before"] == 5
    # In the protocol's head, no gate at scale 1 is the protocol's own S / U / H; the gate takes no seen photo here.
    from benchmarks.harness.metrics import evaluate_rows
    from benchmarks.studies.uncertainty_gate import gated_gzsl

    held = torch.tensor([5])
    protocol = evaluate_rows(photos, held.numpy(), injection[1])
    rates = gated_gzsl(photos, held, injection[1], (0.0, 1.0), (1.0, 0.6))
    assert rates[0.0][1.0] == {k: protocol[k] for k in ("seen", "unseen", "h")}
    assert rates[1.0][0.6] == {"seen": 100.0, "unseen": 100.0, "h": 100.0}
