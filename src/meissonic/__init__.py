"""meissonic: Meissonic masked generative transformers for text-to-image (arXiv 2410.08261)."""

from .version import __version__
from .quantize import quiet_torchao  # noqa: E402

with quiet_torchao():  # diffusers imports torchao (when installed) with its ModelMixin, which prints build notes
    from .pipeline import MeissonicPipeline, MeissonicScheduler  # noqa: E402
    from .sampler import decode  # noqa: E402
    from .transformer import MeissonicTransformer  # noqa: E402

__all__ = ["MeissonicPipeline", "MeissonicScheduler", "MeissonicTransformer", "decode", "__version__"]
