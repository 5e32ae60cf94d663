"""classifier_injection: give pretrained timm classifiers new classes from text alone.

    >>> from classifier_injection import inject
    >>> model = inject(model, ["capybara", "red panda"])

The extended model keeps every old logit bit-identical and predicts the new rows with ICIS
(Christensen et al., "Image-free Classifier Injection with Semantics", ICCV 2023).
"""

from ._version import __version__
from .api import inject
from .calibration import get_calibration
from .config import InjectionConfig
from .descriptors import DescriptorConfig
from .embedders import Embedder, SentenceTransformerEmbedder, default_embedder
from .heads import UnsupportedHeadError, find_head
from .icis import ICISConfig, ICISInjector
from .injector import Injector
from .io import load_injected, save_injected

__all__ = [
    "DescriptorConfig",
    "Embedder",
    "ICISConfig",
    "ICISInjector",
    "InjectionConfig",
    "Injector",
    "SentenceTransformerEmbedder",
    "UnsupportedHeadError",
    "__version__",
    "default_embedder",
    "find_head",
    "get_calibration",
    "inject",
    "load_injected",
    "save_injected",
]
