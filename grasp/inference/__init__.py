"""Inference: top-k recommendations from a trained run (:class:`TrainedRecommender`, ``grasp recommend``)."""

from grasp import _lazy

#: Imported on first use: the recommender imports torch, the options of ``grasp recommend`` do not.
_EXPORTS = {"grasp.inference.recommender": ("Recommendations", "TrainedRecommender")}
__all__ = [name for names in _EXPORTS.values() for name in names]
__getattr__, __dir__ = _lazy.lazy_exports(__name__, _EXPORTS)
