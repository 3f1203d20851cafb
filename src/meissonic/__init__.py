"""meissonic: Meissonic masked generative transformers for text-to-image (arXiv 2410.08261)."""

__version__ = "0.1.0"

from .pipeline import MeissonicPipeline, MeissonicScheduler  # noqa: E402
from .sampler import decode  # noqa: E402
from .transformer import MeissonicTransformer  # noqa: E402

__all__ = ["MeissonicPipeline", "MeissonicScheduler", "MeissonicTransformer", "decode", "__version__"]
