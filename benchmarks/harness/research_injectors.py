"""Research injectors: ways to make ICIS rows discriminate against their neighbours, measured and not adopted.

Each is an :class:`~classifier_injection.injector.Injector`, so it runs through ``inject()`` and its calibration
like any other (the user regime's ``--user-methods``). What they gave: ``docs/decisions.md``.

* :class:`TemperedICIS`: the mixture decoder's weights sharpened (``temperature < 1``) or flattened (``> 1``) at
  prediction, so a new row leans more, or less, on its nearest old rows.
* :class:`DirectionEnsemble`: the mean of several injectors' unit row directions.
* :class:`NeighbourContrast`: descriptors minus a share of the mean descriptor of their nearest seen classes, so
  the injector sees what sets a class apart from its neighbours (seen classes leave themselves out).
* :class:`SeparatedICIS`: ICIS trained with a separation term: each seen class's row predicted from its descriptor
  must be nearer (by cosine) to its own true row than to any other seen row, the seen rows standing in for the
  features of their classes (the counterfactual extension of ICIS pushes rows of different classes apart).
* :class:`FeatureSeparatedICIS`: ICIS trained so that each seen class's row, predicted from its descriptor without
  its own row, wins the features synthesised for its class and loses those of its nearest classes, scored in the
  head with its own row replaced, as the calibration will place it (the separation term with the calibration's
  synthesised features standing in for photos, instead of the seen rows).
* :class:`RefitSimulationICIS`: ICIS whose calibration simulation refits a fresh injector on the kept classes (a
  second fit), as every simulation did before it reused the injection's fit with the held-out rows left out.
* :class:`ResidualICIS`: ICIS's blend plus a ridge map from what a class's descriptor says beyond the blend of its
  neighbours' descriptors to what its row holds beyond the blend of their rows (fitted on the seen classes, each
  blended without its own row), so the text can add what sets a class apart from the rows it mixes.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

from classifier_injection.calibration import SynthesizedCalibration
from classifier_injection.calibration.rules import EXPECTED_STEP
from classifier_injection.calibration.simulation import _nearest_rows, synthesize_features
from classifier_injection.icis import ICISConfig, ICISInjector, ICISModel, _MixtureDecoder
from classifier_injection.injector import Injector

__all__ = [
    "DirectionEnsemble",
    "FeatureSeparatedICIS",
    "NeighbourContrast",
    "RefitSimulationICIS",
    "ResidualICIS",
    "SeparatedICIS",
    "TemperedICIS",
]


class TemperedICIS(ICISInjector):
    """ICIS whose fitted mixture logits are divided by ``temperature`` before it predicts."""

    name = "icis-tempered"

    def __init__(self, temperature: float, config: ICISConfig | None = None, *, seed: int = 0) -> None:
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        super().__init__(config, seed=seed)
        self.temperature = temperature

    def hparams(self) -> dict:
        return {**super().hparams(), "temperature": self.temperature}

    def fit(self, seen_descriptors, seen_rows, new_descriptors=None) -> TemperedICIS:
        super().fit(seen_descriptors, seen_rows, new_descriptors)
        logits = self.model.weight_ae.decoder.logits  # logits(z) / t == (W / t) z + b / t
        with torch.no_grad():
            logits.weight.div_(self.temperature)
            logits.bias.div_(self.temperature)
        return self


class RefitSimulationICIS(ICISInjector):
    """ICIS that the calibration's simulation refits on the kept classes instead of leaving their rows out."""

    can_leave_out = False


class DirectionEnsemble:
    """Rows whose weights are the ``weights``-mean of the members' unit directions, biases the mean bias."""

    name = "direction-ensemble"
    cacheable = True

    def __init__(self, members: Sequence[Injector], weights: Sequence[float] | None = None) -> None:
        if not members:
            raise ValueError("members must name at least one injector")
        self.members = list(members)
        self.weights = list(weights) if weights is not None else [1 / len(members)] * len(members)
        if len(self.weights) != len(self.members):
            raise ValueError(f"got {len(self.weights)} weights for {len(self.members)} members")

    def hparams(self) -> dict:
        return {"members": [[m.name, m.hparams()] for m in self.members], "weights": self.weights}

    def fit(self, seen_descriptors, seen_rows, new_descriptors=None) -> DirectionEnsemble:
        for member in self.members:
            member.fit(seen_descriptors, seen_rows, new_descriptors)
        return self

    def predict(self, descriptors: torch.Tensor) -> torch.Tensor:
        rows = [member.predict(descriptors) for member in self.members]
        directions = sum(w * F.normalize(r[:, :-1], dim=1) for w, r in zip(self.weights, rows, strict=True))
        biases = sum(w * r[:, -1:] for w, r in zip(self.weights, rows, strict=True))
        return torch.cat([directions, biases], dim=1)


class NeighbourContrast:
    """``inner`` fitted on ``a - share * mean(a of the nearest seen classes)`` (seen classes leave themselves out)."""

    name = "neighbour-contrast"
    cacheable = True

    def __init__(self, inner: Injector, share: float = 0.5, neighbours: int = 10) -> None:
        self.inner, self.share, self.neighbours = inner, share, neighbours
        self.seen: torch.Tensor | None = None

    def hparams(self) -> dict:
        return {"inner": [self.inner.name, self.inner.hparams()], "share": self.share, "neighbours": self.neighbours}

    def _contrast(self, descriptors: torch.Tensor, seen: bool) -> torch.Tensor:
        similarity = F.normalize(descriptors.float(), dim=1) @ F.normalize(self.seen, dim=1).T
        skip = int(seen)  # a seen class is its own nearest
        index = similarity.topk(self.neighbours + skip, dim=1).indices[:, skip:]
        return descriptors.float() - self.share * self.seen[index].mean(1)

    def fit(self, seen_descriptors, seen_rows, new_descriptors=None) -> NeighbourContrast:
        self.seen = seen_descriptors.detach().float()
        new = None if new_descriptors is None else self._contrast(new_descriptors, seen=False)
        self.inner.fit(self._contrast(seen_descriptors, seen=True), seen_rows, new)
        return self

    def predict(self, descriptors: torch.Tensor) -> torch.Tensor:
        if self.seen is None:
            raise RuntimeError("NeighbourContrast.predict() called before fit()")
        return self.inner.predict(self._contrast(descriptors, seen=False))


class _SeparatedFit(ICISInjector):
    """ICIS whose fit adds ``weight`` x an extra term (:meth:`_term`) to every batch's losses; dense mixture only."""

    weight: float

    def _term(self, model: ICISModel, rows: torch.Tensor) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
        """The extra loss of a batch from its ``descriptors`` and ``own``, the batch's indices among the seen rows."""
        raise NotImplementedError

    def _train(self, model, a, r, a_new, candidates) -> list[float]:
        if candidates is not None or not isinstance(model.weight_ae.decoder, _MixtureDecoder):
            raise ValueError(f"{type(self).__name__} needs the dense mixture decoder (heads of up to 2048 rows)")
        if self.weight == 0:
            return super()._train(model, a, r, a_new, candidates)
        term = self._term(model, r)
        prototypes = F.normalize(r[:, :-1], dim=1)
        original = model.losses

        def losses(descriptors, rows, *args):
            own = (F.normalize(rows[:, :-1], dim=1) @ prototypes.T).argmax(1)  # each batch row is a seen row
            return original(descriptors, rows, *args) + self.weight * term(descriptors, own)

        model.losses = losses
        try:
            return super()._train(model, a, r, a_new, candidates)
        finally:
            del model.losses


class SeparatedICIS(_SeparatedFit):
    """ICIS plus ``weight`` x a softmax cross-entropy over ``scale`` x the cosines of each batch class's A->W row to
    every seen row, its own row the target; with ``leave_out``, the blend that is scored may not use its own row
    (as a new class's cannot)."""

    name = "icis-separated"

    def __init__(
        self,
        weight: float = 1.0,
        scale: float = 10.0,
        leave_out: bool = True,
        config: ICISConfig | None = None,
        *,
        seed: int = 0,
    ) -> None:
        if not weight >= 0 or not scale > 0:
            raise ValueError(f"weight must be >= 0 and scale > 0, got {weight}, {scale}")
        super().__init__(config, seed=seed)
        self.weight, self.scale, self.leave_out = weight, scale, leave_out

    def hparams(self) -> dict:
        return {**super().hparams(), "separation": [self.weight, self.scale, self.leave_out]}

    def _term(self, model: ICISModel, rows: torch.Tensor) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
        prototypes = F.normalize(rows[:, :-1], dim=1)

        def term(descriptors: torch.Tensor, own: torch.Tensor) -> torch.Tensor:
            decoder = model.weight_ae.decoder
            blend = decoder(model.descriptor_ae.encoder(descriptors), exclude=own if self.leave_out else None)
            logits = self.scale * F.normalize(blend[:, :-1], dim=1) @ prototypes.T
            return F.cross_entropy(logits, own)

        return term


class FeatureSeparatedICIS(_SeparatedFit):
    """ICIS plus ``weight`` x a cross-entropy on synthesised features: each batch class's A->W blend (its own row
    left out) takes its row's place in the head, placed as ``rule`` (default: the default calibration) places a new
    row (the rows' mean norm, the feature-mean bias plus its ``offset``), and must win the features of its class and
    lose those of its ``neighbours`` nearest classes. The features are ``rule``'s expected ones, from the model's
    feature statistics ``feature_mean`` / ``feature_std``."""

    name = "icis-feature-separated"

    def __init__(
        self,
        feature_mean: torch.Tensor,
        feature_std: torch.Tensor,
        weight: float = 0.3,
        neighbours: int = 5,
        config: ICISConfig | None = None,
        *,
        seed: int = 0,
        rule: SynthesizedCalibration | None = None,
    ) -> None:
        if not weight >= 0 or neighbours < 1:
            raise ValueError(f"weight must be >= 0 and neighbours >= 1, got {weight}, {neighbours}")
        super().__init__(config, seed=seed)
        self.feature_mean, self.feature_std = feature_mean.float(), feature_std.float()
        self.weight, self.neighbours = weight, neighbours
        self.rule = rule or SynthesizedCalibration()

    def hparams(self) -> dict:
        rule = self.rule
        synthesis = {"spread": rule.spread, "confidence": rule.confidence, "neighbour_share": rule.neighbour_share}
        return {**super().hparams(), "feature_separation": [self.weight, self.neighbours, synthesis]}

    @torch.no_grad()
    def _term(self, model: ICISModel, rows: torch.Tensor) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
        rule, samples = self.rule, self.rule.expected_samples
        features, labels = synthesize_features(
            rows,
            self.feature_mean,
            rule.spread * self.feature_std,
            rule.confidence,
            samples,
            seed=self.seed,
            neighbour_share=rule.neighbour_share,
            step_size=EXPECTED_STEP,
        )
        weights, biases = rows[:, :-1], rows[:, -1]
        old_logits = features @ weights.T + biases  # [M, S]: fixed, the old rows do not train
        centred = features - self.feature_mean  # a new row's logit: m u . (f - mu) + mean old logit at mu + offset
        level = (weights @ self.feature_mean + biases).mean() + rule.offset
        norm = weights.norm(dim=1).mean()
        classes = torch.cat([torch.arange(len(rows))[:, None], _nearest_rows(weights, self.neighbours)], 1)
        by_class = torch.arange(len(features)).view(len(rows), samples)  # labels are repeat_interleave'd
        scored = by_class[classes].flatten(1)  # [S, (1 + neighbours) x samples]: each class's feature indices

        def term(descriptors: torch.Tensor, own: torch.Tensor) -> torch.Tensor:
            blend = model.weight_ae.decoder(model.descriptor_ae.encoder(descriptors), exclude=own)
            unit = F.normalize(blend[:, :-1], dim=1)
            idx = scored[own]  # [B, G]
            new = norm * torch.einsum("bd,bgd->bg", unit, centred[idx]) + level
            place = own[:, None, None].expand(-1, idx.shape[1], 1)
            logits = old_logits[idx].scatter(2, place, new[..., None])
            return F.cross_entropy(logits.flatten(0, 1), labels[idx].flatten())

        return term


class ResidualICIS(ICISInjector):
    """ICIS rows plus ``d M``: ``d`` a descriptor minus the mixture's blend of the seen descriptors, ``M`` the ridge
    map (penalty ``alpha``) from those descriptor residuals to the row residuals of the seen classes."""

    name = "icis-residual"
    can_leave_out = False  # its rows are more than a blend: the simulation refits it

    def __init__(self, alpha: float, config: ICISConfig | None = None, *, seed: int = 0) -> None:
        if not alpha > 0:
            raise ValueError(f"alpha must be > 0, got {alpha}")
        super().__init__(config, seed=seed)
        self.alpha = alpha
        self.keys: torch.Tensor | None = None
        self.residual_map: torch.Tensor | None = None

    def hparams(self) -> dict:
        return {**super().hparams(), "residual_alpha": self.alpha}

    def _mixture(self, descriptors: torch.Tensor, exclude: torch.Tensor | None = None) -> torch.Tensor:
        decoder = self.model.weight_ae.decoder
        if not isinstance(decoder, _MixtureDecoder) or self.model.top_k is not None:
            raise ValueError("ResidualICIS needs the dense mixture decoder (heads of up to mixture_dense_up_to rows)")
        return decoder.weights(self.model.descriptor_ae.encoder(descriptors), exclude=exclude)

    @torch.no_grad()
    def fit(self, seen_descriptors, seen_rows, new_descriptors=None) -> ResidualICIS:
        with torch.enable_grad():
            super().fit(seen_descriptors, seen_rows, new_descriptors)
        keys, rows = seen_descriptors.detach().float(), seen_rows.detach().float()
        weights = self._mixture(keys, exclude=torch.arange(len(keys)))
        d, e = keys - weights @ keys, rows - weights @ rows
        gram = d.T @ d + self.alpha * torch.eye(d.shape[1])
        self.keys, self.residual_map = keys, torch.linalg.solve(gram, d.T @ e)
        return self

    @torch.no_grad()
    def predict(self, descriptors: torch.Tensor) -> torch.Tensor:
        rows = super().predict(descriptors)
        if self.residual_map is None:
            raise RuntimeError("ResidualICIS.predict() called before fit()")
        a = descriptors.detach().float()
        return rows + (a - self._mixture(a) @ self.keys) @ self.residual_map
