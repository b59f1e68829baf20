"""``build_model``: one entry point for every backbone x model combination, with argument checks."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np

from grasp.models.backbones import GRU4Rec, bert4rec, sasrec
from grasp.models.item_encoders import (
    DualViewEncoder,
    GraspEncoder,
    IdEncoder,
    embedding_std,
    pca_adapters,
    pca_embedding,
)
from grasp.models.options import (
    ACTIVATIONS,
    ADAPTER_INITS,
    AUTO_BERT_NEGATIVES,
    BACKBONES,
    DEFAULT_ADAPTER_INIT,
    DEFAULT_BRANCHES,
    DEFAULT_ID_INIT,
    ID_INITS,
    MODELS,
)
from grasp.models.recommender import NeighborDistillation, Recommender
from grasp.nn.holistic_attention import HolisticAttention, check_combination, check_options

if TYPE_CHECKING:
    from grasp.pipeline.tables import Tables

__all__ = [
    "build_model",
    "check_model_options",
    "BACKBONES",
    "MODELS",
    "DEFAULT_BRANCHES",
    "ACTIVATIONS",
    "ID_INITS",
    "DEFAULT_ID_INIT",
    "AUTO_BERT_NEGATIVES",
]

#: build_model's names of HolisticAttention's arguments.
_NN_ARGUMENTS = {"branches": "hae_branches"}

#: Tables each model reads.
_NEEDS = {
    "id": (),
    "grasp": ("user", "user_sim", "item", "item_sim"),
    "llminit": ("item",),
    "llmesr": ("item", "user_neighbors"),
}


def build_model(
    backbone: str,
    model: str,
    *,
    num_users: int,
    num_items: int,
    tables: Tables | None,
    d: int = 64,
    max_len: int = 100,
    dropout: float = 0.2,
    num_blocks: int = 2,
    num_heads: int = 1,
    hae_branches: tuple[str, ...] = DEFAULT_BRANCHES,
    activation: str = "sigmoid",
    attention: bool = True,
    hae_backend: str | None = None,
    id_init: str | None = None,
    adapter_init: str | None = None,
    llmesr_alpha: float = 0.1,
    mask_prob: float = 0.2,
    bert_negatives: int | str = "auto",
) -> Recommender:
    """Build a :class:`~grasp.models.recommender.Recommender`.

    Args:
        backbone: ``"sasrec"``, ``"bert4rec"`` or ``"gru4rec"`` (``num_blocks`` = GRU layers; ``num_heads``
            unused).
        model: ``"id"`` (ID embeddings), ``"grasp"`` (ID + holistic attention enhancement), ``"llminit"`` (ID
            embeddings initialised from the PCA of the LLM item embeddings) or ``"llmesr"`` (LLM-ESR: dual
            view + retrieval-based self-distillation); see :mod:`grasp.models.item_encoders`.
        num_users, num_items: ids are 1..n, 0 is padding.
        tables: the frozen LLM tables (:class:`grasp.pipeline.tables.Tables`); required by every model but
            ``"id"`` (ignored there).
        d, max_len, dropout, num_blocks, num_heads: backbone sizes (``d`` divisible by ``num_heads``).
        hae_branches, activation, attention, hae_backend: the GRASP enhancer and its ablations (model
            ``"grasp"`` only; see :class:`grasp.nn.HolisticAttention`).
        id_init: the GRASP model's ID embeddings start from ``"pca"`` of the LLM item embeddings, as LLMInit's
            do (None: the default, :data:`DEFAULT_ID_INIT`), or ``"random"`` (``N(0, 1/d)``, the plain
            backbone's). Model ``"grasp"`` only.
        adapter_init: the GRASP model's user and item adapters start as PyTorch initialises them (``"random"``,
            None: the default, :data:`DEFAULT_ADAPTER_INIT`) or as one linear map, the PCA of the LLM user and
            item embeddings (``"pca"``, :func:`grasp.models.item_encoders.pca_adapters`: the gates start from
            the LLM similarity of user and item). Model ``"grasp"`` only.
        llmesr_alpha: weight of LLM-ESR's self-distillation term (model ``"llmesr"`` only).
        mask_prob: BERT4Rec's masking probability.
        bert_negatives: BERT4Rec's loss: ``"full"`` (cross-entropy over the whole catalogue), a positive
            int K (sampled softmax over the target and K uniform items), or ``"auto"``: K = 256
            (:data:`AUTO_BERT_NEGATIVES`) for every model, so all models on a dataset train with the same
            loss. ``"full"`` for ``"grasp"`` runs the enhancer on ``B x num_items`` (user, item) pairs per
            step (its item vectors are user-conditioned): tens of times slower than a training step
            otherwise and memory-hungry, hence not the default.

    Raises:
        ValueError: naming the argument: unknown backbone / model / branch / activation, out-of-range sizes,
            missing tables or a table whose shape does not match ``num_users`` / ``num_items``, flags that do
            not apply to the model or do not go together.
    """
    for name, value in (("num_users", num_users), ("num_items", num_items)):
        _check_positive_int(name, value)
    check_model_options(
        backbone, model, d=d, max_len=max_len, dropout=dropout, num_blocks=num_blocks, num_heads=num_heads,
        hae_branches=hae_branches, activation=activation, attention=attention, hae_backend=hae_backend,
        id_init=id_init, adapter_init=adapter_init, llmesr_alpha=llmesr_alpha, mask_prob=mask_prob,
        bert_negatives=bert_negatives,
    )  # fmt: skip
    _check_combinations(model, tuple(hae_branches), activation, attention, id_init, adapter_init, llmesr_alpha)
    if model != "id":
        _check_tables(tables, _NEEDS[model], num_users, num_items)

    if model == "id":
        encoder = IdEncoder(num_items, d)
    elif model == "llminit":
        encoder = IdEncoder(num_items, d, init=pca_embedding(tables.item, d, embedding_std(d)))
    elif model == "grasp":
        enhancer = HolisticAttention(
            tables.user.shape[1],
            tables.item.shape[1],
            d,
            dropout=dropout,
            branches=tuple(hae_branches),
            activation=activation,
            attention=attention,
            backend=hae_backend,
        )
        if (adapter_init or DEFAULT_ADAPTER_INIT) == "pca":
            pca_adapters(enhancer, tables.user, tables.item)
        init = pca_embedding(tables.item, d, embedding_std(d)) if (id_init or DEFAULT_ID_INIT) == "pca" else None
        encoder = GraspEncoder(
            num_items, d, enhancer, (tables.user, tables.user_sim, tables.item, tables.item_sim), init=init
        )
    else:
        encoder = DualViewEncoder(num_items, d, tables.item, init=pca_embedding(tables.item, d, embedding_std(d)))

    if backbone == "gru4rec":
        net = GRU4Rec(d, num_layers=num_blocks, dropout=dropout)
    else:
        factory = sasrec if backbone == "sasrec" else bert4rec
        net = factory(d, max_len, num_blocks=num_blocks, num_heads=num_heads, dropout=dropout)
    distillation = None
    if model == "llmesr":
        distillation = NeighborDistillation(tables.user_neighbors, encoder.width, llmesr_alpha)
    return Recommender(
        encoder,
        net,
        objective="masked" if backbone == "bert4rec" else "next",
        num_items=num_items,
        max_len=max_len,
        mask_prob=mask_prob,
        bert_negatives=_bert_negatives(bert_negatives),
        distillation=distillation,
    )


def check_model_options(
    backbone: str,
    model: str,
    *,
    d: int,
    max_len: int,
    dropout: float,
    num_blocks: int,
    num_heads: int,
    hae_branches: tuple[str, ...],
    activation: str,
    attention: bool,
    hae_backend: str | None,
    id_init: str | None,
    adapter_init: str | None,
    llmesr_alpha: float,
    mask_prob: float,
    bert_negatives: int | str,
    name: Callable[[str], str] = str,
) -> None:
    """Check each option of :func:`build_model` on its own (not the data sizes and tables, nor which options
    apply to which model and go together: :func:`build_model` checks those).

    Args:
        backbone, model, d, ..., bert_negatives: as for :func:`build_model`, all given.
        name: how a message names an argument (``str``: its Python name; the training config passes its
            command-line flag).

    Raises:
        ValueError: the first bad option, named with ``name``.
    """
    if backbone not in BACKBONES:
        raise ValueError(f"{name('backbone')}: unknown {backbone!r}; valid: {', '.join(BACKBONES)}")
    if model not in MODELS:
        raise ValueError(f"{name('model')}: unknown {model!r}; valid: {', '.join(MODELS)}")
    for argument, value in (("d", d), ("max_len", max_len), ("num_blocks", num_blocks), ("num_heads", num_heads)):
        _check_positive_int(name(argument), value)
    if backbone != "gru4rec" and d % num_heads:
        raise ValueError(f"{name('d')} ({d}) must be divisible by {name('num_heads')} ({num_heads})")
    if not 0 <= dropout < 1:
        raise ValueError(f"{name('dropout')} must be in [0, 1), got {dropout!r}")
    if not 0 < mask_prob <= 1:
        raise ValueError(f"{name('mask_prob')} must be in (0, 1], got {mask_prob!r}")
    if not (math.isfinite(llmesr_alpha) and llmesr_alpha >= 0):
        raise ValueError(f"{name('llmesr_alpha')} must be a finite number >= 0, got {llmesr_alpha!r}")
    if bert_negatives not in ("auto", "full") and (
        isinstance(bert_negatives, bool) or not isinstance(bert_negatives, int) or bert_negatives < 1
    ):
        raise ValueError(f"{name('bert_negatives')} must be 'auto', 'full' or a positive int, got {bert_negatives!r}")
    check_options(hae_branches, activation, attention, name=lambda arg: name(_NN_ARGUMENTS.get(arg, arg)))
    if hae_backend is not None and not isinstance(hae_backend, str):
        raise ValueError(f"{name('hae_backend')} must be a backend name or None, got {hae_backend!r}")
    if id_init is not None and id_init not in ID_INITS:
        raise ValueError(f"{name('id_init')}: unknown {id_init!r}; valid: {', '.join(ID_INITS)}")
    if adapter_init is not None and adapter_init not in ADAPTER_INITS:
        raise ValueError(f"{name('adapter_init')}: unknown {adapter_init!r}; valid: {', '.join(ADAPTER_INITS)}")


def _check_combinations(
    model: str, hae_branches: tuple[str, ...], activation: str, attention: bool, id_init: str | None,
    adapter_init: str | None, llmesr_alpha: float,
) -> None:
    """Refuse options that do not apply to ``model`` or do not go together (the options are valid alone)."""
    all_branches = set(hae_branches) == set(DEFAULT_BRANCHES)
    if model != "grasp" and not (all_branches and activation == "sigmoid" and attention):
        raise ValueError(
            f"hae_branches / activation / attention are GRASP enhancer ablations; model {model!r} has no enhancer"
        )
    check_combination(hae_branches, activation, attention, name=lambda arg: _NN_ARGUMENTS.get(arg, arg))
    if model != "grasp" and id_init is not None:
        raise ValueError(
            f"id_init applies to model 'grasp' only, not {model!r} (id is random, llminit and llmesr use pca)"
        )
    if model != "grasp" and adapter_init is not None:
        raise ValueError(f"adapter_init applies to model 'grasp' only, not {model!r} (it has no GRASP adapters)")
    if model != "llmesr" and llmesr_alpha != 0.1:
        raise ValueError(f"llmesr_alpha applies to model 'llmesr' only, not {model!r}")


def _check_positive_int(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")


def _bert_negatives(value: int | str) -> int | None:
    """The sample size of BERT4Rec's sampled softmax (None: the full softmax) for a checked ``bert_negatives``."""
    if value == "auto":
        return AUTO_BERT_NEGATIVES
    return None if value == "full" else int(value)


def _check_tables(tables: Tables | None, needed: tuple[str, ...], num_users: int, num_items: int) -> None:
    if tables is None:
        raise ValueError(f"tables: required by this model (it reads {', '.join(needed)}), got None")
    rows = {"user": num_users + 1, "user_sim": num_users + 1, "item": num_items + 1, "item_sim": num_items + 1}
    rows["user_neighbors"] = num_users + 1
    for name in needed:
        array = getattr(tables, name, None)
        if not isinstance(array, np.ndarray):
            raise ValueError(f"tables.{name}: expected a numpy array, got {type(array).__name__}")
        side = "num_users" if name.startswith("user") else "num_items"
        if array.ndim != 2 or len(array) != rows[name] or array.shape[1] < 1:
            raise ValueError(
                f"tables.{name} has shape {array.shape}, expected ({rows[name]}, k) = ({side} + 1, k) for "
                f"{side}={rows[name] - 1}"
            )
        if name == "user_neighbors":
            if array[1:].min(initial=1) < 1 or array.max(initial=0) > num_users:
                raise ValueError(f"tables.user_neighbors: ids must lie in 1..{num_users} (num_users)")
            continue
        if not np.issubdtype(array.dtype, np.floating) or not np.isfinite(array).all():
            raise ValueError(f"tables.{name}: must be a finite float array (dtype {array.dtype})")
    for name in ("user_sim", "item_sim"):
        base = name.removesuffix("_sim")
        if name in needed and getattr(tables, name).shape != getattr(tables, base).shape:
            raise ValueError(
                f"tables.{name} has shape {getattr(tables, name).shape}, expected tables.{base}'s shape "
                f"{getattr(tables, base).shape}"
            )
