"""Global properties of a model computed from its samples (higher is better), registered by name.

Built in: ``quality`` and ``diversity`` (our small digit CNN: minus a Fréchet distance, class entropy),
``fid`` and ``inception-score`` (Inception-v3 weights via torchmetrics), ``cluster-entropy`` and
``classifier-entropy`` (occupancy of reference clusters in an embedding model's space; an attribute
classifier's predictions), ``aesthetic`` (a linear head on CLIP image embeddings, at a quantile). A manifest can
also name a user's ``module:function`` (see :mod:`.custom`). Add more with :func:`register_property`.
"""

from .aesthetic import AestheticScore
from .digits import ClassEntropy, FrechetQuality
from .diversity import ClassifierEntropy, ClusterEntropy
from .inception import FrechetInceptionDistance, InceptionScore
from .registry import Property, available_properties, check_property, get_property, register_property

register_property("quality", FrechetQuality)
register_property("diversity", ClassEntropy)
register_property("cluster-entropy", ClusterEntropy)
register_property("classifier-entropy", ClassifierEntropy)
register_property("aesthetic", AestheticScore)
register_property("fid", FrechetInceptionDistance)
register_property("inception-score", InceptionScore)

__all__ = [
    "ClassEntropy",
    "FrechetQuality",
    "Property",
    "available_properties",
    "check_property",
    "get_property",
    "register_property",
]
