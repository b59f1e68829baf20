"""Inference: top-k recommendations from a trained run (:class:`TrainedRecommender`, ``grasp recommend``)."""

from grasp.inference.recommender import Recommendations, TrainedRecommender

__all__ = ["Recommendations", "TrainedRecommender"]
