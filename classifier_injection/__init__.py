"""classifier_injection: give pretrained timm classifiers new classes from text alone.

    >>> from classifier_injection import inject
    >>> model = inject(model, ["capybara", "red panda"])

The extended model keeps every old logit bit-identical and predicts the new rows with ICIS
(Christensen et al., "Image-free Classifier Injection with Semantics", ICCV 2023).
"""

__version__ = "0.1.0"

from .api import head_fingerprint, inject
from .baselines import (
    ConSE,
    COSTAInjector,
    MLPInjector,
    RidgeInjector,
    SubRegInjector,
    VGSESMOInjector,
    VGSEWAvgInjector,
)
from .calibration import (
    BudgetCalibration,
    Calibration,
    CalibrationContext,
    FactorChoice,
    LogitMatchCalibration,
    NoCalibration,
    NormCalibration,
    SimulatedCalibration,
    SynthesizedCalibration,
    get_calibration,
)
from .calibration_cache import CalibrationCache
from .descriptors import DescriptorConfig, embed_classes, seen_class_names
from .embedders import (
    DEFAULT_SENTENCE_MODEL,
    CombinedEmbedder,
    Embedder,
    OpenCLIPEmbedder,
    PrecomputedEmbedder,
    SentenceTransformerEmbedder,
    WordVectorEmbedder,
    default_embedder,
)
from .features import FeatureStatistics, feature_statistics
from .heads import ClassifierHead, UnsupportedHeadError, find_head
from .icis import ICISConfig, ICISInjector, ICISModel
from .injector import Injector
from .io import load_injected, save_injected

__all__ = [
    "DEFAULT_SENTENCE_MODEL",
    "BudgetCalibration",
    "COSTAInjector",
    "Calibration",
    "CalibrationCache",
    "CalibrationContext",
    "ClassifierHead",
    "CombinedEmbedder",
    "ConSE",
    "DescriptorConfig",
    "Embedder",
    "FactorChoice",
    "FeatureStatistics",
    "ICISConfig",
    "ICISInjector",
    "ICISModel",
    "Injector",
    "LogitMatchCalibration",
    "MLPInjector",
    "NoCalibration",
    "NormCalibration",
    "OpenCLIPEmbedder",
    "PrecomputedEmbedder",
    "RidgeInjector",
    "SentenceTransformerEmbedder",
    "SimulatedCalibration",
    "SubRegInjector",
    "SynthesizedCalibration",
    "UnsupportedHeadError",
    "VGSESMOInjector",
    "VGSEWAvgInjector",
    "WordVectorEmbedder",
    "__version__",
    "default_embedder",
    "embed_classes",
    "feature_statistics",
    "find_head",
    "get_calibration",
    "head_fingerprint",
    "inject",
    "load_injected",
    "save_injected",
    "seen_class_names",
]
