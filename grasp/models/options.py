"""The choices and defaults of :func:`grasp.models.build_model`'s options, in a module that imports nothing.

The command line offers them (the flags of :class:`grasp.training.TrainConfig`) before any model exists, so
``grasp train --help`` does not import torch; :mod:`grasp.models.build` checks its arguments against them.
"""

__all__ = [
    "BACKBONES",
    "MODELS",
    "DEFAULT_BRANCHES",
    "ACTIVATIONS",
    "ID_INITS",
    "DEFAULT_ID_INIT",
    "ADAPTER_INITS",
    "DEFAULT_ADAPTER_INIT",
    "AUTO_BERT_NEGATIVES",
]

BACKBONES = ("sasrec", "bert4rec", "gru4rec")
MODELS = ("id", "grasp", "llminit", "llmesr")
#: The branches of :class:`grasp.nn.HolisticAttention`, in the order of its output's columns.
DEFAULT_BRANCHES = ("self", "similar", "global")
#: The gates of :func:`grasp.ops.holistic_attention`.
ACTIVATIONS = ("sigmoid", "softmax")
#: How GRASP initialises its ID embeddings: ``N(0, 1/d)`` or the PCA of the LLM item embeddings (LLMInit's).
ID_INITS = ("random", "pca")
#: GRASP's default ID initialisation (it beats ``"random"`` on ml-100k and amazon-office; README).
DEFAULT_ID_INIT = "pca"
#: How GRASP initialises its user and item adapters: PyTorch's default, or as one linear map, the PCA of the LLM
#: user and item embeddings, so the gates start from the LLM similarity of user and item (README).
ADAPTER_INITS = ("random", "pca")
#: GRASP's default adapter initialisation.
DEFAULT_ADAPTER_INIT = "random"
#: Sampled-softmax size of BERT4Rec under ``bert_negatives="auto"`` (every model: the same loss for all).
AUTO_BERT_NEGATIVES = 256
