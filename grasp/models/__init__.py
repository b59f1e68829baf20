"""Sequential recommenders: backbones x item representations (docs/design.md section 6).

``build_model(backbone, model, num_users=, num_items=, tables=, ...)`` builds a :class:`Recommender` from
one of :data:`BACKBONES` (SASRec, BERT4Rec, GRU4Rec) and one of :data:`MODELS` (``id``, ``grasp``,
``llminit``, ``llmesr``). A recommender exposes ``loss(users, seqs, negatives)``, ``score(users, seqs,
candidates)`` and ``score_all(users, seqs)``; sequences are left-padded with 0.

Example:
    >>> import torch
    >>> from grasp.models import build_model
    >>> model = build_model("sasrec", "id", num_users=10, num_items=50, tables=None, d=16, max_len=8)
    >>> seqs = torch.randint(1, 51, (4, 9))
    >>> model.loss(torch.arange(1, 5), seqs, torch.randint(1, 51, (4, 9))).shape
    torch.Size([])
    >>> model.score_all(torch.arange(1, 5), seqs[:, 1:]).shape
    torch.Size([4, 51])
"""

from grasp import _lazy

#: Imported on first use: the models import torch, their options (grasp.models.options) do not.
_EXPORTS = {
    "grasp.models.build": ("build_model",),
    "grasp.models.options": ("BACKBONES", "MODELS"),
    "grasp.models.recommender": ("Recommender", "NeighborDistillation"),
}
__all__ = [name for names in _EXPORTS.values() for name in names]
__getattr__, __dir__ = _lazy.lazy_exports(__name__, _EXPORTS)
