"""grasp: LLM world knowledge for sequential recommenders, robust to LLM hallucination.

``grasp.ops`` holds the fused operators (holistic attention, top-k neighbour
averaging), ``grasp.nn`` the modules built on them. Both are imported on first
use, as is ``grasp.TrainedRecommender``, so ``import grasp`` (and every
``grasp`` command before it needs them) does not import torch. Importing
``grasp.ops`` loads the compiled extension ``grasp._C`` when it was built and
registers the ``torch.ops.grasp.*`` operators.
"""

from grasp import _lazy

__version__ = "0.1.0"

_EXPORTS = {"grasp.nn": ("nn",), "grasp.ops": ("ops",), "grasp.inference": ("TrainedRecommender",)}
__all__ = ["nn", "ops", "TrainedRecommender", "__version__"]
__getattr__, __dir__ = _lazy.lazy_exports(__name__, _EXPORTS)
