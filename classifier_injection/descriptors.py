"""Class descriptors: the texts that describe each class, and their embedding.

A class is described by its name and, when known, a description (a definition). A
:class:`DescriptorConfig` turns them into one or more texts with templates; the class vector is the mean of
the L2-normalised embeddings of its texts (a template ensemble when there are several).

Descriptions come from, in order of preference: the user (``descriptions={"capybara": "..."}``), the
WordNet definition of a known synset (the seen classes of ImageNet-family heads, by WordNet id), or a
look-up of the class name among the lemmas of the 21,844 WordNet synsets that timm ships
(``timm/data/_info``). A name with several synsets is ambiguous and is resolved by an explicit policy
(:attr:`DescriptorConfig.ambiguous`); the default describes it by all of its senses (a
:data:`Description` may be a tuple of texts, whose embeddings are averaged). Every decision is returned as
provenance by :func:`describe_classes`.
"""

from __future__ import annotations

import csv
import functools
import logging
import math
import pkgutil
import re
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from .embedders import NAMES_ONLY_SENTENCE_MODEL, Embedder

__all__ = [
    "DEFAULT_TEMPLATES",
    "CombinedEmbedder",
    "Description",
    "DescriptorConfig",
    "InjectionDescriptions",
    "WordNetMatch",
    "default_config_for",
    "describe_classes",
    "describe_injection",
    "embed_classes",
    "lookup_wordnet",
    "openai_templates",
    "seen_class_names",
    "seen_class_wnids",
    "uses_descriptions",
    "wordnet_definition",
]

logger = logging.getLogger(__name__)

_WNID = re.compile(r"^n\d{8}$")

#: The library's default texts per class.
DEFAULT_TEMPLATES: tuple[str, ...] = ("{name}: {description}",)
#: Texts of a class without a description when a template needs one.
DEFAULT_FALLBACK = "{name}"

AmbiguityPolicy = Literal["average", "skip", "headword", "first", "error"]
_POLICIES = ("average", "skip", "headword", "first", "error")

#: A class description: one text, or several alternatives (the senses of an ambiguous name) whose embeddings
#: are averaged.
Description = str | tuple[str, ...]


@functools.cache
def openai_templates() -> tuple[str, ...]:
    """The 80 prompt templates of OpenAI's CLIP ImageNet evaluation (shipped by open_clip), as ``{name}`` strings."""
    from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES

    return tuple(t("{name}") for t in OPENAI_IMAGENET_TEMPLATES)


_PRESETS: dict[str, dict] = {
    "name": {"templates": ("{name}",), "use_definitions": False},
    "photo": {"templates": ("a photo of a {name}.",), "use_definitions": False},
    "ensemble": {"templates": "openai", "use_definitions": False},
    "definition": {"templates": ("{description}",)},
    "name+definition": {"templates": ("{name}: {description}",)},
    "photo+definition": {"templates": ("a photo of a {name}, {description}.",)},
    "name&definition": {"templates": ("{name}", "{description}")},
}


@dataclass(frozen=True)
class DescriptorConfig:
    """How a class (name, optional description) becomes texts.

    Attributes:
        templates: format strings with ``{name}`` and/or ``{description}``; a class gets one text per template
            and its vector is the mean of their normalised embeddings (a template ensemble).
        fallback_template: replaces a template that needs ``{description}`` for a class without one, so that
            every class still gets a text (classes described differently are less comparable: prefer giving
            descriptions to all new classes when the seen classes have them).
        use_definitions: look up WordNet definitions (seen ImageNet classes by WordNet id, other names by
            lemma). ``False``: only user-given descriptions are used.
        ambiguous: what to do with a name that is a lemma of several synsets: ``"average"`` (the one synset
            whose first lemma is the name, else all of them: the class vector is the mean over its senses),
            ``"headword"`` (the one headword synset, else no definition), ``"skip"`` (no definition),
            ``"first"`` (headword matches first, then WordNet order), ``"error"`` (raise, listing the
            candidates). ``"average"`` is the default: it needs no choice of sense.
        preset: the preset name this config was built from, if any (recorded in provenance).
    """

    templates: tuple[str, ...] = DEFAULT_TEMPLATES
    fallback_template: str = DEFAULT_FALLBACK
    use_definitions: bool = True
    ambiguous: AmbiguityPolicy = "average"
    preset: str | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        if isinstance(self.templates, str) or not self.templates:
            raise ValueError("templates must be a non-empty tuple of strings like ('a photo of a {name}.',)")
        object.__setattr__(self, "templates", tuple(self.templates))
        for template in (*self.templates, self.fallback_template):
            try:
                template.format(name="x", description="y")
            except (KeyError, IndexError, ValueError) as err:
                raise ValueError(
                    f"template {template!r} is not a valid format string with only {{name}} and {{description}}"
                ) from err
        if "{description}" in self.fallback_template:
            raise ValueError(f"fallback_template {self.fallback_template!r} must not need a description")
        if self.ambiguous not in _POLICIES:
            raise ValueError(f"ambiguous must be one of {_POLICIES}, got {self.ambiguous!r}")

    @classmethod
    def from_preset(cls, name: str, **overrides) -> DescriptorConfig:
        """A named config: ``"name"``, ``"photo"`` (``"a photo of a {name}."``), ``"ensemble"`` (80 CLIP
        templates), ``"definition"``, ``"name+definition"`` (the default), ``"photo+definition"``,
        ``"name&definition"`` (ensemble of the name and the definition)."""
        if name not in _PRESETS:
            raise ValueError(f"unknown descriptor preset {name!r}; choose one of {sorted(_PRESETS)}")
        kwargs = dict(_PRESETS[name])
        if kwargs["templates"] == "openai":
            kwargs["templates"] = openai_templates()
        return cls(**{**kwargs, "preset": name, **overrides})

    @property
    def needs_descriptions(self) -> bool:
        return any("{description}" in t for t in self.templates)

    def texts(self, name: str, description: Description | None = None) -> list[str]:
        """The texts of one class: one per template and alternative description (``description`` may be a tuple).

        A template without ``{description}`` gives the same text for every alternative, so that each template
        weighs the same in the class vector (the mean of the texts' embeddings).
        """
        alternatives = (description,) if description is None or isinstance(description, str) else description
        texts = []
        for template in self.templates:
            for text in alternatives:
                chosen = self.fallback_template if "{description}" in template and not text else template
                texts.append(chosen.format(name=name, description=(text or "").strip().rstrip(".")))
        return texts

    def to_dict(self) -> dict:
        data = asdict(self)
        data["templates"] = list(self.templates)
        if self.preset == "ensemble":  # 80 strings add nothing a reader can't get from the preset name
            data["templates"] = f"{len(self.templates)} OpenAI CLIP templates"
        return data

    @classmethod
    def from_dict(cls, data: dict) -> DescriptorConfig:
        """Inverse of :meth:`to_dict` (a preset's templates are rebuilt from its name)."""
        data = dict(data)
        if data.get("preset") == "ensemble":
            data["templates"] = openai_templates()
        return cls(**data)


def default_config_for(embedder: Embedder) -> DescriptorConfig:
    """The config used when none is given: the embedder's ``default_template`` if it has one, else the default."""
    template = getattr(embedder, "default_template", None)
    if template:
        return DescriptorConfig(templates=(template,), use_definitions="{description}" in template)
    return DescriptorConfig()


class CombinedEmbedder:
    """Concatenation of several embedders' L2-normalised vectors (optionally weighted).

    Each part may describe a class with its own texts: pass ``(embedder, DescriptorConfig)`` pairs, e.g. a
    sentence model over ``"{name}: {description}"`` plus word vectors of ``"{name}"``.
    :func:`~classifier_injection.descriptors.embed_classes` builds each part's class vectors with its own
    config and concatenates them; :meth:`encode` embeds the same texts with every part.

    Args:
        parts: embedders, or ``(embedder, config)`` pairs (``config=None``: the config passed to
            ``embed_classes``, or the embedder's ``default_template``).
        weights: per-part scale applied after normalisation (default 1 each; the concatenation then has
            norm ``sqrt(len(parts))``).
    """

    def __init__(
        self,
        parts: Sequence[Embedder | tuple[Embedder, DescriptorConfig | None]],
        weights: Sequence[float] | None = None,
    ) -> None:
        if isinstance(parts, (str, bytes)) or not parts:
            raise ValueError("parts must be a non-empty list of embedders or (embedder, DescriptorConfig) pairs")
        self.embedders: list[Embedder] = []
        self.configs: list[DescriptorConfig | None] = []
        for i, part in enumerate(parts):
            embedder, config = part if isinstance(part, tuple) else (part, None)
            if not isinstance(embedder, Embedder):
                raise TypeError(f"parts[{i}] must be an Embedder (id, dim, encode), got {type(embedder).__name__}")
            self.embedders.append(embedder)
            self.configs.append(config)
        weights = [1.0] * len(self.embedders) if weights is None else [float(w) for w in weights]
        if len(weights) != len(self.embedders) or any(w < 0 or not math.isfinite(w) for w in weights):
            raise ValueError(f"weights must be {len(self.embedders)} finite non-negative numbers, got {weights}")
        self.weights = weights

    @property
    def id(self) -> str:
        def describe(i: int) -> str:
            config = self.configs[i]
            templates = "" if config is None else "|" + "+".join(config.templates)
            weight = "" if self.weights[i] == 1.0 else f"*{self.weights[i]:g}"
            return f"{self.embedders[i].id}{templates}{weight}"

        return "combined(" + ", ".join(describe(i) for i in range(len(self.embedders))) + ")"

    @property
    def dim(self) -> int:
        return sum(e.dim for e in self.embedders)

    @property
    def cacheable(self) -> bool:
        return False  # the parts are cached one by one

    def combine(self, vectors: Sequence[torch.Tensor]) -> torch.Tensor:
        """Normalise, weight and concatenate per-part vectors ``[n, d_i]``."""
        return torch.cat([F.normalize(v.float(), dim=1) * w for v, w in zip(vectors, self.weights, strict=True)], 1)

    def encode(self, texts: Sequence[str]) -> torch.Tensor:
        return self.combine([e.encode(texts) for e in self.embedders])

    def __repr__(self) -> str:
        return f"CombinedEmbedder({self.embedders!r}, weights={self.weights})"


# ---------------------------------------------------------------------------------------------------------------
# WordNet lemmas and definitions shipped by timm


@dataclass(frozen=True)
class _WordNetTables:
    lemmas: dict[str, list[str]]  # wnid -> lemmas, headword first
    definitions: dict[str, str]  # wnid -> gloss
    by_lemma: dict[str, list[str]]  # normalised lemma -> wnids, in file order


def _normalise(name: str) -> str:
    return " ".join(name.replace("_", " ").lower().split())


@functools.cache
def _wordnet() -> _WordNetTables:
    def read(file: str) -> dict[str, str]:
        data = pkgutil.get_data("timm.data", f"_info/{file}")
        if data is None:
            raise FileNotFoundError(f"timm does not ship {file}: upgrade timm (>= 0.9)")
        return dict(csv.reader(data.decode("utf-8").splitlines(), delimiter="\t"))

    lemmas = {
        wnid: [lemma.strip() for lemma in text.split(",")]
        for wnid, text in read("imagenet_synset_to_lemma.txt").items()
    }
    by_lemma: dict[str, list[str]] = {}
    for wnid, names in lemmas.items():
        for lemma in dict.fromkeys(_normalise(n) for n in names):
            by_lemma.setdefault(lemma, []).append(wnid)
    return _WordNetTables(lemmas, read("imagenet_synset_to_definition.txt"), by_lemma)


def wordnet_definition(wnid: str) -> str | None:
    """WordNet definition (gloss) of a synset id such as ``"n02084071"``, if timm knows it."""
    return _wordnet().definitions.get(wnid)


@dataclass(frozen=True)
class WordNetMatch:
    """Result of looking a class name up among WordNet lemmas.

    Attributes:
        name: the name looked up.
        status: ``"found"`` (one synset chosen), ``"ambiguous"`` (several, none chosen), ``"not_found"``.
        wnid: the chosen synset, if any.
        definition: its definition.
        candidates: every synset with this lemma, ``(wnid, lemmas, definition)``, in WordNet order.
    """

    name: str
    status: Literal["found", "ambiguous", "not_found"]
    wnid: str | None = None
    definition: str | None = None
    candidates: tuple[tuple[str, str, str], ...] = ()


def lookup_wordnet(name: str, ambiguous: AmbiguityPolicy = "headword") -> WordNetMatch:
    """Find the WordNet synset of a class name (case and ``_`` insensitive), see :attr:`DescriptorConfig.ambiguous`."""
    if ambiguous not in _POLICIES:
        raise ValueError(f"ambiguous must be one of {_POLICIES}, got {ambiguous!r}")
    tables = _wordnet()
    key = _normalise(name)
    wnids = tables.by_lemma.get(key, [])
    candidates = tuple((w, ", ".join(tables.lemmas[w]), tables.definitions.get(w, "")) for w in wnids)
    if not wnids:
        return WordNetMatch(name, "not_found")
    chosen: str | None = wnids[0] if len(wnids) == 1 else None
    if chosen is None and ambiguous != "skip":
        headword = [w for w in wnids if _normalise(tables.lemmas[w][0]) == key]
        if ambiguous == "error":
            listing = "; ".join(f"{w} ({lemmas}: {gloss})" for w, lemmas, gloss in candidates)
            raise ValueError(
                f"class name {name!r} names {len(wnids)} WordNet synsets: {listing}. Pass "
                f"descriptions={{{name!r}: '...'}} to say which one, or choose another ambiguity policy"
            )
        if len(headword) == 1:
            chosen = headword[0]
        elif ambiguous == "first":
            chosen = (headword or wnids)[0]
    if chosen is None:
        return WordNetMatch(name, "ambiguous", candidates=candidates)
    return WordNetMatch(name, "found", chosen, tables.definitions.get(chosen), candidates)


def describe_classes(
    names: Sequence[str],
    descriptions: Mapping[str, str] | None = None,
    config: DescriptorConfig | None = None,
    *,
    wnids: Sequence[str | None] | None = None,
) -> tuple[list[Description | None], list[dict]]:
    """The description of each class, and where it came from.

    Order of preference per class: ``descriptions[name]`` (the user's); the definition of ``wnids[i]`` (a
    known synset, e.g. a seen class of an ImageNet head); a WordNet look-up of the name
    (:func:`lookup_wordnet`). The last two only when ``config.use_definitions``.

    Returns:
        ``(texts, provenance)``: one description (or ``None``) per name, and one JSON-able record per name
        with ``source`` in ``{"user", "wordnet-id", "wordnet-lemma", "wordnet-senses", "none"}`` plus the
        synset and, for ambiguous names, the candidates. ``"wordnet-senses"`` (policy ``"average"``): the
        description is the tuple of the definitions of all candidates, averaged when embedded.
    """
    config = config or DescriptorConfig()
    descriptions = dict(descriptions or {})
    if wnids is not None and len(wnids) != len(names):
        raise ValueError(f"wnids must have one entry per name: got {len(wnids)} for {len(names)} names")
    texts: list[Description | None] = []
    records: list[dict] = []
    for i, name in enumerate(names):
        text, record = None, {"source": "none"}
        wnid = wnids[i] if wnids is not None else None
        if descriptions.get(name):
            text, record = descriptions[name], {"source": "user"}
        elif config.use_definitions and wnid and wordnet_definition(wnid):
            text, record = wordnet_definition(wnid), {"source": "wordnet-id", "wnid": wnid}
        elif config.use_definitions:
            match = lookup_wordnet(name, config.ambiguous)
            if match.status == "found":
                text, record = match.definition, {"source": "wordnet-lemma", "wnid": match.wnid}
                if len(match.candidates) > 1:
                    record["ambiguous"] = [c[0] for c in match.candidates]
            elif match.status == "ambiguous" and config.ambiguous == "average":
                text = tuple(gloss for _, _, gloss in match.candidates)
                record = {"source": "wordnet-senses", "ambiguous": [c[0] for c in match.candidates]}
            elif match.status == "ambiguous":
                record = {"source": "none", "ambiguous": [c[0] for c in match.candidates]}
        texts.append(text or None)
        records.append(record)
    return texts, records


# ---------------------------------------------------------------------------------------------------------------
# Embedding


def _description_list(
    names: Sequence[str], descriptions: Mapping[str, str] | Sequence[Description | None] | None
) -> list[Description | None]:
    if descriptions is None:
        return [None] * len(names)
    if isinstance(descriptions, Mapping):
        return [descriptions.get(n) for n in names]
    if isinstance(descriptions, str) or len(descriptions) != len(names):
        raise ValueError("descriptions must be a mapping name -> text or a list with one entry (or None) per name")
    return list(descriptions)


def embed_classes(
    embedder: Embedder,
    names: Sequence[str],
    config: DescriptorConfig | None = None,
    descriptions: Mapping[str, str] | Sequence[Description | None] | None = None,
    *,
    cache=None,
) -> torch.Tensor:
    """Class vectors ``[len(names), embedder.dim]``: mean of the normalised embeddings of each class's texts.

    Args:
        embedder: any :class:`~classifier_injection.embedders.Embedder`. The parts of a
            :class:`~classifier_injection.embedders.CombinedEmbedder` are embedded with their own configs
            (or ``config``), normalised and concatenated.
        names: class names.
        config: how a class becomes texts; default :func:`default_config_for` the embedder.
        descriptions: a mapping name -> description, or a list aligned with ``names`` (needed when names
            repeat, like the two "crane" classes of ImageNet; an entry may be a tuple of alternatives, averaged).
            Lists are used as given; see :func:`describe_classes` to fill them from WordNet.
        cache: an :class:`~classifier_injection.cache.EmbeddingCache` to read and extend, or ``None``.
    """
    described = _description_list(names, descriptions)
    if isinstance(embedder, CombinedEmbedder):
        parts = [
            embed_classes(part, names, part_config or config, described, cache=cache)
            for part, part_config in zip(embedder.embedders, embedder.configs, strict=True)
        ]
        return embedder.combine(parts)
    if config is None:
        config = default_config_for(embedder)
    if cache is not None:
        from .cache import CachedEmbedder

        embedder = CachedEmbedder(embedder, cache)
    per_class = [config.texts(name, text) for name, text in zip(names, described, strict=True)]
    # Each distinct text is encoded once (a template without {description} repeats for every sense).
    unique = list(dict.fromkeys(text for texts in per_class for text in texts))
    position = {text: i for i, text in enumerate(unique)}
    vectors = F.normalize(embedder.encode(unique).float(), dim=1)
    index = torch.tensor([position[text] for texts in per_class for text in texts])
    counts = torch.tensor([len(texts) for texts in per_class])
    owner = torch.repeat_interleave(torch.arange(len(names)), counts)
    summed = torch.zeros(len(names), vectors.shape[1]).index_add_(0, owner, vectors[index])
    return summed / counts[:, None]


# ---------------------------------------------------------------------------------------------------------------
# The classes a head already has


def _readable(names: Sequence[str]) -> bool:
    return all(isinstance(n, str) and n.strip() and not _WNID.match(n) for n in names)


def _imagenet_info(model: nn.Module, num_classes: int):
    from timm.data import ImageNetInfo, infer_imagenet_subset

    subset = infer_imagenet_subset(model)
    if subset is not None:
        info = ImageNetInfo(subset)
        if info.num_classes() == num_classes:
            return info
    return None


def seen_class_names(model: nn.Module, num_classes: int, class_names: Sequence[str] | None = None) -> list[str]:
    """Human-readable names of the classes a model's head already has.

    Order of preference: ``class_names`` if given; the model's ``pretrained_cfg["label_names"]`` when they
    are readable, or the first lemma of each when they are WordNet ids (a head on a subset of ImageNet);
    timm's ImageNet metadata (first WordNet lemma) for ImageNet-sized heads.
    """
    if class_names is not None:
        names = list(class_names)
        if len(names) != num_classes or not _readable(names):
            raise ValueError(
                f"class_names must be {num_classes} non-empty strings, one per existing class of the head; "
                f"got {len(names)}"
            )
        return names
    cfg = getattr(model, "pretrained_cfg", None) or {}
    label_names = cfg.get("label_names")
    if label_names and len(label_names) == num_classes:
        if _readable(label_names):
            return list(label_names)
        lemmas = _wordnet().lemmas
        if all(isinstance(n, str) and n in lemmas for n in label_names):
            return [lemmas[n][0] for n in label_names]
    info = _imagenet_info(model, num_classes)
    if info is not None:
        return [d.split(",")[0].strip() for d in info.label_descriptions()]
    raise ValueError(
        f"cannot tell the names of the {num_classes} classes this model already has: pass "
        "class_names=[...] (one string per existing class, in head order)"
    )


def seen_class_wnids(
    model: nn.Module, num_classes: int, class_names: Sequence[str] | None = None
) -> list[str | None] | None:
    """WordNet ids of the head's classes when known (ImageNet-family heads), else ``None``.

    Known when the model's ``label_names`` are WordNet ids, or when the head is ImageNet-sized and no
    other names were given (``class_names`` or readable ``label_names`` mean the classes may be others).
    """
    if class_names is not None:
        return None
    cfg = getattr(model, "pretrained_cfg", None) or {}
    label_names = cfg.get("label_names")
    if label_names and len(label_names) == num_classes:
        if all(isinstance(n, str) and _WNID.match(n) for n in label_names):
            return list(label_names)
        return None
    info = _imagenet_info(model, num_classes)
    return list(info.label_names()) if info is not None else None


def uses_descriptions(embedder: Embedder, config: DescriptorConfig) -> bool:
    """Whether embedding with ``embedder`` and ``config`` reads any description (a part's config counts)."""
    if isinstance(embedder, CombinedEmbedder):
        return any(
            uses_descriptions(part, part_config or config)
            for part, part_config in zip(embedder.embedders, embedder.configs, strict=True)
        )
    return config.needs_descriptions


@dataclass
class InjectionDescriptions:
    """Descriptions of a head's seen classes and of the classes being injected, described the same way.

    Attributes:
        seen: one description (or ``None``) per seen class, in head order.
        new: one description (or ``None``) per new class.
        provenance: per new class name, ``{"text": ..., "source": ..., ...}`` (see :func:`describe_classes`).
    """

    seen: list[Description | None]
    new: list[Description | None]
    provenance: dict[str, dict]


def describe_injection(
    model: nn.Module,
    seen_names: Sequence[str],
    new_names: Sequence[str],
    *,
    embedder: Embedder,
    config: DescriptorConfig,
    descriptions: Mapping[str, str] | None = None,
    class_names: Sequence[str] | None = None,
) -> InjectionDescriptions:
    """Describe the seen and the new classes of one injection by the same rules.

    Seen classes of ImageNet-family heads get the definition of their WordNet id; other seen classes and
    all new classes are looked up by name (unless the user described them). When no template reads a
    description, nothing is looked up. When *no* new class has a description, the seen classes are not
    described either: the injector then learns from names and predicts from names (definitions on one side
    only are worse than none).
    """
    if not uses_descriptions(embedder, config):
        return InjectionDescriptions([None] * len(seen_names), [None] * len(new_names), {})
    wnids = seen_class_wnids(model, len(seen_names), class_names)
    seen, _ = describe_classes(seen_names, descriptions, config, wnids=wnids)
    new, records = describe_classes(new_names, descriptions, config)
    provenance = {name: {"text": text, **record} for name, text, record in zip(new_names, new, records, strict=True)}
    missing = [name for name, text in zip(new_names, new, strict=True) if text is None]
    if len(missing) == len(new_names) and any(seen):
        logger.warning(
            "no description for any new class (not in WordNet, or ambiguous): all classes are described by "
            "their name alone; pass descriptions={name: '...'} to use definitions, or for names alone a larger "
            "text model, e.g. embedder=SentenceTransformerEmbedder('%s') (more precise rows in the benchmark)",
            NAMES_ONLY_SENTENCE_MODEL,
        )
        # User descriptions of seen classes are kept; definitions found by look-up are dropped.
        given = descriptions or {}
        seen = [given.get(name) or None for name in seen_names]
    elif missing and any(seen):
        # The seen classes are described with definitions and these new classes are not: their descriptors
        # are less comparable. Say so, and how to fix it.
        logger.warning(
            "no description for new classes %s (not in WordNet, or ambiguous): they are described by their name "
            "alone; pass descriptions={name: '...'} for better rows",
            missing[:10],
        )
    return InjectionDescriptions(seen, new, provenance)
