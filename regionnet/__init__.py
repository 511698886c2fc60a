"""regionnet: which anatomical region does a musculoskeletal radiograph show?

One shared timm backbone with a binary (one-vs-rest) head per region, trained with Lightning,
configured with Hydra, logged to Weights & Biases.
"""

from regionnet.regions import REGIONS

__all__ = ["REGIONS", "Prediction", "RegionPredictor", "load_model"]
__version__ = "0.1.0"

_LAZY = {"load_model", "RegionPredictor", "Prediction"}  # from regionnet.api (imports torch)


def __getattr__(name: str):
    if name in _LAZY:
        from regionnet import api

        return getattr(api, name)
    raise AttributeError(f"module 'regionnet' has no attribute {name!r}")
