"""Global properties of a model computed from its samples (higher is better), registered by name.

Built in: ``quality`` (minus a Fréchet distance in our digit classifier's feature space) and ``diversity``
(entropy in bits of the predicted classes). Add more with :func:`register_property`.
"""

from .digits import ClassEntropy, FrechetQuality
from .registry import Property, available_properties, get_property, register_property

register_property("quality", FrechetQuality)
register_property("diversity", ClassEntropy)

__all__ = [
    "ClassEntropy",
    "FrechetQuality",
    "Property",
    "available_properties",
    "get_property",
    "register_property",
]
