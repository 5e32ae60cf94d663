from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from classifier_injection import ICISConfig, ICISInjector
from classifier_injection.icis import _slope_says_stop


def _synthetic(num_seen: int = 64, num_new: int = 8, d: int = 12, row_dim: int = 17, seed: int = 0):
    """Rows that are a fixed linear map of descriptors: ICIS should recover the map's direction."""
    g = torch.Generator().manual_seed(seed)
    descriptors = torch.randn(num_seen + num_new, d, generator=g)
    mapping = torch.randn(d, row_dim, generator=g)
    rows = descriptors @ mapping
    return descriptors[:num_seen], rows[:num_seen], descriptors[num_seen:], rows[num_seen:]


def test_paper_config_matches_official_code():
    cfg = ICISConfig.paper()
    assert (cfg.lr, cfg.batch_size, cfg.latent_dim, cfg.max_epochs) == (1e-5, 16, 2048, 1000)
    assert (cfg.row_decoder, cfg.dropout, cfg.center) == ("linear", 0.0, False)
    assert (cfg.early_stop_slope, cfg.early_stop_patience, cfg.min_epochs, cfg.loss) == (0.002, 5, 20, "cosine")
    assert cfg.cross_reconstruction and cfg.include_new_descriptors and cfg.row_encoder


def test_slope_is_the_papers_formula():
    history = [float(i) for i in range(20, 0, -1)]  # loss falls by 1 per epoch
    assert _slope_says_stop(history[:19]) is None
    assert _slope_says_stop(history) == pytest.approx(1.0)  # -(mean(last10) - mean(prev10)) / 10 = 10/10


def test_icis_learns_a_linear_map_on_unseen_classes():
    a_seen, r_seen, a_new, r_new = _synthetic()
    cfg = ICISConfig(latent_dim=64, lr=1e-2, batch_size=32, max_epochs=100, early_stop_slope=0, row_decoder="linear")
    injector = ICISInjector(cfg)
    pred = injector.fit(a_seen, r_seen, a_new).predict(a_new)
    cosine = torch.nn.functional.cosine_similarity(pred, r_new).mean()
    assert pred.shape == r_new.shape
    assert cosine > 0.8, f"mean cosine to the true unseen rows {cosine:.3f}"
    assert injector.history[-1] < injector.history[0]


def test_mixture_decoder_blends_the_rows_of_similar_seen_classes():
    # Seen classes come in 8 groups with one row per group (plus noise); a new class described like group g
    # must get a row close to group g's row, which a convex combination of seen rows can represent exactly.
    g = torch.Generator().manual_seed(0)
    centres_a, centres_r = torch.randn(8, 12, generator=g), torch.randn(8, 17, generator=g)
    group = torch.arange(64) % 8
    a_seen = centres_a[group] + 0.1 * torch.randn(64, 12, generator=g)
    r_seen = centres_r[group] + 0.1 * torch.randn(64, 17, generator=g)
    a_new = centres_a + 0.1 * torch.randn(8, 12, generator=g)
    injector = ICISInjector(ICISConfig(latent_dim=32, lr=1e-2, batch_size=32, max_epochs=150, early_stop_slope=0))
    pred = injector.fit(a_seen, r_seen, a_new).predict(a_new)
    similarity = torch.nn.functional.normalize(pred, dim=1) @ torch.nn.functional.normalize(centres_r, dim=1).T
    assert torch.equal(similarity.argmax(1), torch.arange(8)), similarity
    # Every prediction is a convex combination of the seen rows: inside their bounding box.
    assert (pred >= r_seen.min(0).values - 1e-5).all() and (pred <= r_seen.max(0).values + 1e-5).all()


def test_fit_is_deterministic_given_seed_and_leaves_global_rng_alone():
    a_seen, r_seen, a_new, _ = _synthetic()
    cfg = ICISConfig(latent_dim=32, max_epochs=5)
    torch.manual_seed(123)
    state = torch.get_rng_state()
    p1 = ICISInjector(cfg, seed=7).fit(a_seen, r_seen, a_new).predict(a_new)
    assert torch.equal(torch.get_rng_state(), state)
    p2 = ICISInjector(cfg, seed=7).fit(a_seen, r_seen, a_new).predict(a_new)
    p3 = ICISInjector(cfg, seed=8).fit(a_seen, r_seen, a_new).predict(a_new)
    assert torch.equal(p1, p2)
    assert not torch.equal(p1, p3)


def test_early_stopping_stops_before_max_epochs():
    a_seen, r_seen, a_new, _ = _synthetic()
    injector = ICISInjector(ICISConfig(latent_dim=32, lr=1e-2, max_epochs=1000, early_stop_slope=0.002))
    injector.fit(a_seen, r_seen, a_new)
    assert 20 <= len(injector.history) < 1000


@pytest.mark.parametrize(
    "variant",
    [
        dict(loss="mse"),
        dict(cross_reconstruction=False),
        dict(row_encoder=False),
        dict(include_new_descriptors=False),
        dict(exclude_own_row=True),
    ],
)
def test_ablations_train(variant):
    a_seen, r_seen, a_new, _ = _synthetic()
    pred = ICISInjector(ICISConfig(latent_dim=32, max_epochs=3, **variant)).fit(a_seen, r_seen, a_new).predict(a_new)
    assert pred.shape == (8, 17) and torch.isfinite(pred).all()


@pytest.mark.parametrize("row_decoder", ["mixture", "linear"])
def test_save_load_round_trip(tmp_path, row_decoder):
    a_seen, r_seen, a_new, _ = _synthetic()
    cfg = ICISConfig(latent_dim=32, max_epochs=3, row_decoder=row_decoder)
    injector = ICISInjector(cfg, seed=3).fit(a_seen, r_seen, a_new)
    injector.fingerprint = "abc123"
    path = tmp_path / "icis.safetensors"
    injector.save(str(path))
    loaded = ICISInjector.load(str(path))
    assert torch.equal(loaded.predict(a_new), injector.predict(a_new))
    assert loaded.config == injector.config and loaded.fingerprint == "abc123" and loaded.seed == 3


@pytest.mark.parametrize("extra", [{}, {"mixture_top_k": 8, "mixture_dense_up_to": 16}, {"center": True}])
def test_a_state_without_its_basis_takes_it_from_the_fit_inputs(extra):
    a_seen, r_seen, a_new, _ = _synthetic()
    cfg = ICISConfig(latent_dim=16, max_epochs=3, **extra)
    injector = ICISInjector(cfg, seed=2).fit(a_seen, r_seen, a_new)
    tensors, metadata = injector.fit_state(with_basis=False)
    assert not {"weight_ae.decoder.basis", "basis_keys"} & set(tensors), "the head is not stored again"
    restored = ICISInjector(cfg, seed=2).load_fit_state(tensors, metadata, "state", a_seen, r_seen)
    assert torch.equal(restored.predict(a_new), injector.predict(a_new))
    left_out = torch.tensor([0, 5])
    assert torch.equal(restored.predict_left_out(a_new, left_out), injector.predict_left_out(a_new, left_out))
    assert restored.hparams() == injector.hparams()


def test_a_state_is_loaded_only_into_its_own_config_and_seed_with_its_inputs():
    a_seen, r_seen, a_new, _ = _synthetic()
    cfg = ICISConfig(latent_dim=16, max_epochs=3)
    tensors, metadata = ICISInjector(cfg, seed=2).fit(a_seen, r_seen, a_new).fit_state(with_basis=False)
    others = [
        ICISInjector(cfg, seed=3),
        ICISInjector(ICISConfig(latent_dim=16, max_epochs=4), seed=2),
    ]
    for other in others:
        with pytest.raises(ValueError, match="another config or seed"):
            other.load_fit_state(tensors, metadata, "state", a_seen, r_seen)
        assert not other.is_fitted, "left untouched"
    with pytest.raises(ValueError, match="basis was left out"):
        ICISInjector(cfg, seed=2).load_fit_state(tensors, metadata, "state")
    with pytest.raises(ValueError, match="basis was left out"):
        ICISInjector(cfg, seed=2).load_fit_state(tensors, metadata, "state", a_seen[:-1], r_seen[:-1])


def test_only_a_fit_that_reads_the_new_descriptors_depends_on_them():
    a_seen, r_seen, a_new, _ = _synthetic()
    for reads in (True, False):
        cfg = ICISConfig(latent_dim=16, max_epochs=3, include_new_descriptors=reads)
        assert ICISInjector(cfg).reads_new_descriptors is reads
        with_new = ICISInjector(cfg, seed=1).fit(a_seen, r_seen, a_new).predict(a_new)
        without = ICISInjector(cfg, seed=1).fit(a_seen, r_seen, a_new[:2]).predict(a_new)
        assert torch.equal(with_new, without) is not reads


def test_load_rejects_basis_that_does_not_match_the_decoder(tmp_path):
    from classifier_injection.serialization import atomic_save_safetensors, read_safetensors

    a_seen, r_seen, a_new, _ = _synthetic()
    path = tmp_path / "icis.safetensors"
    ICISInjector(ICISConfig(latent_dim=8, max_epochs=2)).fit(a_seen, r_seen, a_new).save(str(path))
    tensors, metadata = read_safetensors(str(path))
    for basis_rows in ("0", "-3", "10000000000000"):
        bad = tmp_path / f"bad{basis_rows}.safetensors"
        atomic_save_safetensors(tensors, str(bad), {**metadata, "basis_rows": basis_rows})
        with pytest.raises(ValueError, match=r"basis_rows|does not match|shape"):
            ICISInjector.load(str(bad))


def test_files_from_before_the_row_decoder_option_load_as_linear(tmp_path):
    import json

    from classifier_injection.serialization import atomic_save_safetensors, read_safetensors

    a_seen, r_seen, a_new, _ = _synthetic()
    path = tmp_path / "icis.safetensors"
    injector = ICISInjector(ICISConfig(latent_dim=8, max_epochs=2, row_decoder="linear", dropout=0.0))
    injector.fit(a_seen, r_seen, a_new).save(str(path))
    tensors, metadata = read_safetensors(str(path))
    config = {k: v for k, v in json.loads(metadata["config"]).items() if k not in ("row_decoder", "dropout")}
    old = {k: v for k, v in metadata.items() if k != "basis_rows"} | {"config": json.dumps(config)}
    atomic_save_safetensors(tensors, str(tmp_path / "old.safetensors"), old)
    loaded = ICISInjector.load(str(tmp_path / "old.safetensors"))
    assert loaded.config.row_decoder == "linear" and loaded.config.dropout == 0.0
    assert torch.equal(loaded.predict(a_new), injector.predict(a_new))


def test_files_from_before_the_row_encoder_option_load_with_it(tmp_path):
    import json

    from classifier_injection.serialization import atomic_save_safetensors, read_safetensors

    a_seen, r_seen, a_new, _ = _synthetic()
    path = tmp_path / "icis.safetensors"
    ICISInjector(ICISConfig(latent_dim=8, max_epochs=2)).fit(a_seen, r_seen, a_new).save(str(path))
    tensors, metadata = read_safetensors(str(path))
    config = {k: v for k, v in json.loads(metadata["config"]).items() if k != "row_encoder"}
    atomic_save_safetensors(tensors, str(tmp_path / "old.safetensors"), metadata | {"config": json.dumps(config)})
    assert ICISInjector.load(str(tmp_path / "old.safetensors")).config.row_encoder


@pytest.mark.parametrize("top_k", [None, 16])
def test_without_the_row_encoder_only_the_descriptor_path_trains(top_k):
    a_seen, r_seen, a_new, _ = _synthetic()
    extra = {} if top_k is None else {"mixture_top_k": top_k, "mixture_dense_up_to": 8}
    config = ICISConfig(latent_dim=16, max_epochs=3, row_encoder=False, **extra)
    injector = ICISInjector(config).fit(a_seen, r_seen, a_new)
    assert all(p.grad is None for p in injector.model.weight_ae.encoder.parameters()), "no term reaches it"
    assert all(p.grad is not None for p in injector.model.descriptor_ae.parameters())
    both = ICISInjector(ICISConfig(latent_dim=16, max_epochs=3, **extra)).fit(a_seen, r_seen, a_new)
    assert all(p.grad is not None for p in both.model.weight_ae.encoder.parameters())
    assert not torch.equal(both.predict(a_new), injector.predict(a_new))


def test_predict_rejects_wrong_descriptor_width():
    a_seen, r_seen, _, _ = _synthetic()
    injector = ICISInjector(ICISConfig(latent_dim=16, max_epochs=2)).fit(a_seen, r_seen)
    with pytest.raises(ValueError, match="width this injector was trained on"):
        injector.predict(torch.randn(2, 5))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(loss="l1"), "loss"),
        (dict(batch_size=0), "batch_size"),
        (dict(lr=0), "lr"),
        (dict(row_decoder="mlp"), "row_decoder"),
        (dict(dropout=1.0), "dropout"),
        (dict(cross_reconstruction=False, row_encoder=False), "nothing would train the row decoder"),
    ],
)
def test_config_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ICISConfig(**kwargs)


def test_fit_validates_shapes():
    with pytest.raises(ValueError, match="one descriptor per row"):
        ICISInjector().fit(torch.randn(5, 4), torch.randn(6, 3))


def test_top_cosines_equal_the_cosines_of_normalised_rows_in_any_chunking():
    from classifier_injection.injector import top_cosines

    generator = torch.Generator().manual_seed(3)
    keys, queries = torch.randn(50, 7, generator=generator) * 4, torch.randn(23, 7, generator=generator)
    expected = (F.normalize(queries, dim=1) @ F.normalize(keys, dim=1).T).topk(5, dim=1)
    for chunk in (1, 4, 256):
        values, indices = top_cosines(keys, queries, 5, chunk=chunk)
        torch.testing.assert_close(values, expected.values)
        assert torch.equal(indices, expected.indices)
    assert top_cosines(keys[:3], queries, 5)[0].shape == (23, 3), "k is capped at the number of keys"


def test_top_cosines_never_return_excluded_keys():
    from classifier_injection.injector import top_cosines

    generator = torch.Generator().manual_seed(4)
    keys, queries = torch.randn(30, 6, generator=generator), torch.randn(9, 6, generator=generator)
    exclude = torch.zeros(30, dtype=torch.bool)
    exclude[::3] = True
    values, indices = top_cosines(keys, queries, 5, chunk=4, exclude=exclude)
    kept = (~exclude).nonzero().squeeze(1)
    expected = (F.normalize(queries, dim=1) @ F.normalize(keys[kept], dim=1).T).topk(5, dim=1)
    torch.testing.assert_close(values, expected.values)
    assert torch.equal(indices, kept[expected.indices])
    assert top_cosines(keys, queries, 25, exclude=exclude)[1].shape == (9, 20), "k is capped at the kept keys"


@pytest.mark.parametrize("top_k", [None, 8])
def test_predict_left_out_blends_only_the_rows_kept(top_k):
    a_seen, r_seen, a_new, _ = _synthetic(num_seen=40)
    config = ICISConfig(latent_dim=16, max_epochs=3, mixture_top_k=top_k, mixture_dense_up_to=16)
    injector = ICISInjector(config, seed=1).fit(a_seen, r_seen, a_new)
    left_out = torch.tensor([0, 3, 5, 17, 39])
    rows = injector.predict_left_out(a_seen[left_out], left_out)
    assert torch.equal(injector.predict_left_out(a_new, torch.tensor([], dtype=torch.long)), injector.predict(a_new))
    model, kept = injector.model, torch.ones(40, dtype=torch.bool)
    kept[left_out] = False
    z = model.descriptor_ae.encoder(a_seen[left_out])
    logits = model.weight_ae.decoder.logits(z)
    if top_k is None:
        expected = torch.softmax(logits[:, kept], dim=1) @ r_seen[kept]
    else:
        # The top_k kept rows nearest by descriptor, as a fit that never saw the left-out rows would choose.
        near = kept.nonzero().squeeze(1)[
            (F.normalize(a_seen[left_out], dim=1) @ F.normalize(a_seen[kept], dim=1).T).topk(top_k, dim=1).indices
        ]
        weights = torch.softmax(logits.gather(1, near), dim=1)
        expected = torch.einsum("bk,bkd->bd", weights, r_seen[near])
    torch.testing.assert_close(rows, expected, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(rows, injector.predict(a_seen[left_out])), "the left-out rows were in the blends"
    with pytest.raises(ValueError, match="at least one seen row"):
        injector.predict_left_out(a_new, torch.arange(40))
    linear = ICISInjector(ICISConfig(latent_dim=16, max_epochs=2, row_decoder="linear"), seed=1).fit(a_seen, r_seen)
    assert not linear.can_leave_out and injector.can_leave_out
    with pytest.raises(ValueError, match="row_decoder='mixture'"):
        linear.predict_left_out(a_new, left_out)


def test_sparse_blends_and_their_gradient_equal_blends_of_the_gathered_rows():
    from classifier_injection.icis import _SparseBlend
    from classifier_injection.injector import top_cosines

    a_seen, r_seen, _, _ = _synthetic(num_seen=40)
    candidates = top_cosines(a_seen * 3, a_seen, 6)[1]  # keys of any norm: the nearest by cosine
    assert (candidates[:, 0] == torch.arange(40)).all(), "a class is its own nearest neighbour"
    logits = torch.randn(40, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    sparse, gathered = logits.clone().requires_grad_(), logits.clone().requires_grad_()
    basis = r_seen.double()
    got = _SparseBlend.apply(torch.softmax(sparse, 1), candidates, basis)
    expected = torch.einsum("bk,bkd->bd", torch.softmax(gathered, 1), basis[candidates])
    got.sin().sum().backward(), expected.sin().sum().backward()
    torch.testing.assert_close(got, expected)
    torch.testing.assert_close(sparse.grad, gathered.grad)


def test_sparse_linear_and_its_gradients_equal_the_linear_layer_on_the_gathered_rows():
    from classifier_injection.icis import _SparseLinear
    from classifier_injection.injector import top_cosines

    a_seen, _, _, _ = _synthetic(num_seen=40)
    candidates = top_cosines(a_seen, a_seen, 6)[1]
    generator = torch.Generator().manual_seed(2)
    x = torch.randn(40, 5, dtype=torch.float64, generator=generator)
    weight, bias = torch.randn(40, 5, dtype=torch.float64), torch.randn(40, dtype=torch.float64)
    sparse = [t.clone().requires_grad_() for t in (x, weight, bias)]
    gathered = [t.clone().requires_grad_() for t in (x, weight, bias)]
    got = _SparseLinear.apply(sparse[0], candidates, sparse[1], sparse[2])
    expected = torch.einsum("bke,be->bk", gathered[1][candidates], gathered[0]) + gathered[2][candidates]
    got.sin().sum().backward(), expected.sin().sum().backward()
    torch.testing.assert_close(got, expected)
    for mine, reference in zip(sparse, gathered, strict=True):
        assert mine.grad.layout == torch.strided, "dense gradients, as the optimiser keeps them"
        torch.testing.assert_close(mine.grad, reference.grad)


def test_transposed_pattern_is_the_pattern_transposed():
    from classifier_injection.icis import _pattern, _transposed_pattern

    candidates = torch.tensor([[3, 0, 5], [5, 3, 1], [0, 5, 2]])
    values = torch.arange(9, dtype=torch.float64).reshape(3, 3)
    torch.testing.assert_close(
        _transposed_pattern(values, candidates, 7).to_dense(), _pattern(values, candidates, 7).to_dense().T
    )


def test_dense_blend_targets_give_the_loss_and_gradient_of_blending_the_whole_basis():
    from classifier_injection.icis import _BlendTargets, _cosine_distance, _mse

    _, r_seen, _, _ = _synthetic(num_seen=12)
    idx = torch.tensor([3, 0, 7, 7, 11])
    targets = _BlendTargets.dense(r_seen.double()).select(idx)
    for loss, reference in (("cosine", _cosine_distance), ("mse", _mse)):
        logits = torch.randn(len(idx), 12, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
        explicit, gram = logits.clone().requires_grad_(), logits.clone().requires_grad_()
        expected = reference(torch.softmax(explicit, 1) @ r_seen.double(), r_seen[idx].double())
        got = targets.distance(torch.softmax(gram, 1), loss, r_seen.shape[1])
        expected.backward(), got.backward()
        torch.testing.assert_close(got, expected)
        torch.testing.assert_close(gram.grad, explicit.grad)


def test_dense_mixture_trains_on_the_gram_matrix_only_while_it_is_cheaper():
    from classifier_injection.icis import _blend_targets, _MixtureDecoder

    rows = torch.randn(30, 7)
    assert _blend_targets(_MixtureDecoder(4, rows[:13]), rows[:13]).gram.shape == (13, 13)
    assert _blend_targets(_MixtureDecoder(4, rows[:14]), rows[:14]) is None, "14 rows of width 7: blends are cheaper"
    assert _blend_targets(torch.nn.Linear(4, 7), rows) is None


@pytest.mark.parametrize("exclude_own_row", [False, True])
def test_training_through_the_gram_matrix_gives_the_rows_of_training_on_built_blends(monkeypatch, exclude_own_row):
    from classifier_injection import icis

    a_seen, r_seen, a_new, _ = _synthetic(num_seen=24, row_dim=40)  # 24 rows of width 40: the Gram form applies
    config = ICISConfig(latent_dim=16, max_epochs=4, batch_size=8, exclude_own_row=exclude_own_row)
    gram = ICISInjector(config, seed=3).fit(a_seen, r_seen, a_new)
    assert isinstance(icis._blend_targets(gram.model.weight_ae.decoder, r_seen), icis._BlendTargets)
    monkeypatch.setattr(icis, "_blend_targets", lambda decoder, rows: None)
    built = ICISInjector(config, seed=3).fit(a_seen, r_seen, a_new)
    assert len(gram.history) == len(built.history) == 4
    torch.testing.assert_close(gram.predict(a_new), built.predict(a_new), rtol=1e-4, atol=1e-4)


def test_large_heads_blend_their_nearest_rows_and_visit_a_bounded_share_per_epoch(tmp_path):
    a_seen, r_seen, a_new, _ = _synthetic(num_seen=96)
    config = ICISConfig(latent_dim=16, max_epochs=3, mixture_top_k=8, mixture_dense_up_to=32, classes_per_epoch=40)
    injector = ICISInjector(config, seed=1).fit(a_seen, r_seen, a_new)
    model = injector.model
    assert model.top_k == 8 and model.candidates(a_new).shape == (len(a_new), 8)
    predicted = injector.predict(a_new)
    # Each new row is a convex blend of its 8 nearest seen rows, so it lies in their bounding box.
    for row, chosen in zip(predicted, model.candidates(a_new), strict=True):
        near = r_seen[chosen]
        assert (row >= near.min(0).values - 1e-5).all() and (row <= near.max(0).values + 1e-5).all()
    path = tmp_path / "icis.safetensors"
    injector.save(str(path))
    assert torch.equal(ICISInjector.load(str(path)).predict(a_new), predicted)
    dense = ICISInjector(ICISConfig(latent_dim=16, max_epochs=3, mixture_dense_up_to=96), seed=1).fit(a_seen, r_seen)
    assert dense.model.top_k is None, "heads up to mixture_dense_up_to blend all their rows"


@pytest.mark.parametrize("top_k", [None, 6])
def test_exclude_own_row_puts_no_weight_on_the_excluded_basis_row(top_k):
    from classifier_injection.icis import _MixtureDecoder
    from classifier_injection.injector import top_cosines

    _, r_seen, _, _ = _synthetic(num_seen=20)
    decoder = _MixtureDecoder(8, r_seen)
    z, own = torch.randn(20, 8), torch.arange(20)
    keys = torch.nn.functional.normalize(r_seen, dim=1)
    candidates = None if top_k is None else top_cosines(keys, r_seen, top_k)[1]
    rows = decoder(z, candidates, exclude=own)
    logits = decoder.logits(z)
    if candidates is None:
        weights = torch.softmax(logits.scatter(1, own[:, None], float("-inf")), dim=1)
        expected = weights @ r_seen
        assert (weights[own, own] == 0).all()
    else:
        weights = decoder.weights(z, candidates, own)
        assert (weights[candidates == own[:, None]] == 0).all() and (candidates[:, 0] == own).all()
        expected = torch.einsum("bk,bkd->bd", weights, r_seen[candidates])
    torch.testing.assert_close(rows, expected)
    assert not torch.allclose(rows, decoder(z, candidates)), "without exclude a row may use its own basis row"


def test_exclude_own_row_changes_training_only_when_asked():
    a_seen, r_seen, a_new, _ = _synthetic()
    config = ICISConfig(latent_dim=16, max_epochs=3)
    plain = ICISInjector(config).fit(a_seen, r_seen, a_new).predict(a_new)
    again = ICISInjector(ICISConfig(latent_dim=16, max_epochs=3, exclude_own_row=False)).fit(a_seen, r_seen, a_new)
    assert torch.equal(again.predict(a_new), plain)
    loo = ICISInjector(ICISConfig(latent_dim=16, max_epochs=3, exclude_own_row=True)).fit(a_seen, r_seen, a_new)
    assert not torch.equal(loo.predict(a_new), plain)


def test_an_epoch_visits_at_most_classes_per_epoch(monkeypatch):
    a_seen, r_seen, a_new, _ = _synthetic(num_seen=96)
    steps = []
    original = torch.optim.Adam.step
    monkeypatch.setattr(torch.optim.Adam, "step", lambda self, *a, **k: steps.append(1) or original(self, *a, **k))
    config = ICISConfig(latent_dim=8, batch_size=16, max_epochs=2, early_stop_slope=0, classes_per_epoch=40)
    ICISInjector(config).fit(a_seen, r_seen, a_new)
    assert len(steps) == 2 * 3, "40 classes per epoch in batches of 16: 3 steps, not 6"


def test_fit_runs_on_the_requested_device_and_returns_cpu_rows():
    a_seen, r_seen, a_new, _ = _synthetic()
    config = ICISConfig(latent_dim=8, max_epochs=2)
    on_cpu = ICISInjector(config, seed=2, device="cpu").fit(a_seen, r_seen, a_new).predict(a_new)
    default = ICISInjector(config, seed=2).fit(a_seen, r_seen, a_new).predict(a_new)
    assert on_cpu.device.type == "cpu" and torch.equal(on_cpu, default)
    if torch.cuda.is_available():
        on_gpu = ICISInjector(config, seed=2, device="cuda").fit(a_seen.cuda(), r_seen.cuda(), a_new.cuda())
        assert on_gpu.predict(a_new).device.type == "cpu"


def test_predict_in_chunks_gives_the_rows_of_one_pass(monkeypatch):
    from classifier_injection import icis

    a_seen, r_seen, a_new, _ = _synthetic(num_seen=96)
    config = ICISConfig(latent_dim=16, max_epochs=2, mixture_top_k=8, mixture_dense_up_to=32)
    injector = ICISInjector(config, seed=1).fit(a_seen, r_seen, a_new)
    queries = torch.cat([a_new, a_seen[:7]])
    with torch.no_grad():
        whole = injector.model(queries)
    monkeypatch.setattr(icis, "_PREDICT_CHUNK", 3)
    torch.testing.assert_close(injector.predict(queries), whole)


def test_latent_dropout_zeroes_a_share_p_and_rescales_the_rest():
    from classifier_injection.icis import _Dropout

    x = torch.ones(200, 500)
    dropout = _Dropout(0.3)
    out = dropout(x)
    kept = out != 0
    assert abs(1 - kept.float().mean().item() - 0.3) < 0.01
    torch.testing.assert_close(out[kept], torch.full((int(kept.sum()),), 1 / 0.7))
    assert torch.equal(dropout.eval()(x), x)
    assert torch.equal(_Dropout(0.0).train()(x), x)
