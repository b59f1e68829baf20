"""grasp: LLM world knowledge for sequential recommenders, robust to LLM hallucination.

``grasp.ops`` holds the fused operators (holistic attention, top-k neighbour
averaging), ``grasp.nn`` the modules built on them. Importing grasp loads the
compiled extension ``grasp._C`` when it was built.
"""

from grasp import (
    _extension,  # noqa: F401  (loads grasp._C first, so its ops exist for grasp.ops)
    nn,
    ops,
)

__version__ = "0.1.0"
__all__ = ["nn", "ops", "TrainedRecommender", "__version__"]


def __getattr__(name: str):
    # grasp.TrainedRecommender without importing the training stack on `import grasp`
    if name == "TrainedRecommender":
        from grasp.inference import TrainedRecommender

        return TrainedRecommender
    raise AttributeError(f"module 'grasp' has no attribute {name!r}")
