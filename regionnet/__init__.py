"""regionnet: which anatomical region does a musculoskeletal radiograph show?

One shared timm backbone with a binary (one-vs-rest) head per region, trained with Lightning,
configured with Hydra, logged to Weights & Biases.
"""

from regionnet.regions import REGIONS

__all__ = ["REGIONS"]
__version__ = "0.1.0"
