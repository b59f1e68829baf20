"""Training configuration: the :class:`TrainConfig` dataclass and its command-line flags.

:func:`add_train_arguments` adds every flag to an :mod:`argparse` parser, :meth:`TrainConfig.from_args`
reads them back, :meth:`TrainConfig.validate` rejects incompatible settings with a message naming the
flag, and :meth:`TrainConfig.to_dict` / :meth:`TrainConfig.from_dict` round-trip through JSON.
"""

from __future__ import annotations

import argparse
from dataclasses import asdict, dataclass, fields
from typing import Any

from grasp.models.build import ACTIVATIONS, BACKBONES, DEFAULT_BRANCHES, DEFAULT_ID_INIT, ID_INITS, MODELS

__all__ = [
    "TrainConfig",
    "add_train_arguments",
    "parse_bert_negatives",
    "parse_eval_negatives",
    "RUN_DEFINING_EXCLUDED",
]

DEVICES = ("auto", "cpu", "cuda")

#: Fields that do not change what a run computes (how long, where, how it is logged). A run directory
#: may be resumed with different values of these; any other difference needs ``force``.
RUN_DEFINING_EXCLUDED = frozenset({"epochs", "device", "tensorboard", "eval_batch_size", "compile"})


@dataclass
class TrainConfig:
    """Everything that defines a training run (DESIGN.md section 5 defaults).

    Attributes:
        backbone, model: which :func:`grasp.models.build_model` to train.
        d, max_len, dropout, num_blocks, num_heads: backbone size.
        hae_branches, activation, attention, hae_backend, id_init: GRASP options (``model="grasp"`` only;
            ``id_init`` None becomes :data:`grasp.models.build.DEFAULT_ID_INIT` for GRASP).
        llmesr_alpha: LLM-ESR self-distillation weight (``model="llmesr"`` only).
        bert_negatives: BERT4Rec's loss (``backbone="bert4rec"`` only): ``"auto"`` (a 256-item sampled
            softmax for every model, so all models share one loss), ``"full"`` (cross-entropy over the
            catalogue; slow for ``model="grasp"``) or a sample size; see :func:`grasp.models.build_model`.
        mask_prob: BERT4Rec's masking probability (``backbone="bert4rec"`` only).
        epochs: the most epochs to train; patience: stop after this many epochs without a validation
            NDCG@10 gain.
        batch_size: users per optimisation step (the global batch: under DDP each rank gets an equal share).
        lr, weight_decay: Adam settings.
        seed: seeds model initialisation, the training negatives and dropout.
        eval_negatives: sampled negatives per user for evaluation, or ``"all"`` for full ranking.
        eval_seed: seed of the evaluation negatives (fixed, the same for every model and training seed).
        eval_batch_size: users per evaluation batch.
        device: ``"auto"`` (CUDA when available), ``"cpu"`` or ``"cuda"``.
        amp: bfloat16 (or float16 where bfloat16 is unsupported) autocast of training steps on CUDA;
            evaluation always runs in float32.
        compile: ``torch.compile`` the training step.
        tensorboard: log loss and validation metrics to ``run_dir/tensorboard``.
    """

    backbone: str = "sasrec"
    model: str = "id"
    d: int = 64
    max_len: int = 100
    dropout: float = 0.2
    num_blocks: int = 2
    num_heads: int = 1
    hae_branches: tuple[str, ...] = DEFAULT_BRANCHES
    activation: str = "sigmoid"
    attention: bool = True
    hae_backend: str | None = None
    id_init: str | None = None
    llmesr_alpha: float = 0.1
    bert_negatives: int | str = "auto"
    mask_prob: float = 0.2
    epochs: int = 200
    batch_size: int = 128
    lr: float = 1e-3
    weight_decay: float = 0.0
    patience: int = 20
    seed: int = 42
    eval_negatives: int | str = 100
    eval_seed: int = 2025
    eval_batch_size: int = 256
    device: str = "auto"
    amp: bool = False
    compile: bool = False
    tensorboard: bool = False

    def __post_init__(self) -> None:
        self.hae_branches = tuple(self.hae_branches)
        if self.model == "grasp" and self.id_init is None:
            self.id_init = DEFAULT_ID_INIT
        if isinstance(self.eval_negatives, str) and self.eval_negatives != "all":
            self.eval_negatives = parse_eval_negatives(self.eval_negatives)
        if isinstance(self.bert_negatives, str) and self.bert_negatives not in ("auto", "full"):
            self.bert_negatives = parse_bert_negatives(self.bert_negatives)

    def validate(self) -> TrainConfig:
        """Raise ``ValueError`` naming the flag for any bad or incompatible setting; return self."""
        if self.backbone not in BACKBONES:
            raise ValueError(f"--backbone must be one of {', '.join(BACKBONES)}, got {self.backbone!r}")
        if self.model not in MODELS:
            raise ValueError(f"--model must be one of {', '.join(MODELS)}, got {self.model!r}")
        for name in ("d", "max_len", "num_blocks", "num_heads", "epochs", "batch_size", "eval_batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.backbone != "gru4rec" and self.d % self.num_heads:
            raise ValueError(f"--hidden-size ({self.d}) must be divisible by --num-heads ({self.num_heads})")
        if self.patience < 1:
            raise ValueError(f"--patience must be >= 1, got {self.patience}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"--dropout must be in [0, 1), got {self.dropout}")
        if self.lr <= 0:
            raise ValueError(f"--lr must be > 0, got {self.lr}")
        if self.weight_decay < 0:
            raise ValueError(f"--weight-decay must be >= 0, got {self.weight_decay}")
        if self.eval_negatives != "all" and (
            not isinstance(self.eval_negatives, int) or isinstance(self.eval_negatives, bool) or self.eval_negatives < 1
        ):
            raise ValueError(f"--eval-negatives must be an integer >= 1 or 'all', got {self.eval_negatives!r}")
        if not self.hae_branches or any(b not in DEFAULT_BRANCHES for b in self.hae_branches):
            raise ValueError(f"--hae-branches must be a non-empty subset of {', '.join(DEFAULT_BRANCHES)}, "
                             f"got {' '.join(self.hae_branches) or '(none)'}")  # fmt: skip
        if len(set(self.hae_branches)) != len(self.hae_branches):
            raise ValueError(f"--hae-branches lists a branch twice: {' '.join(self.hae_branches)}")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"--activation must be one of {', '.join(ACTIVATIONS)}, got {self.activation!r}")
        if self.model != "grasp":
            defaults = TrainConfig()
            changed = [
                flag
                for flag, name in (("--hae-branches", "hae_branches"), ("--activation", "activation"),
                                   ("--no-attention", "attention"), ("--hae-backend", "hae_backend"),
                                   ("--id-init", "id_init"))
                if getattr(self, name) != getattr(defaults, name)
            ]  # fmt: skip
            if changed:
                raise ValueError(f"{', '.join(changed)} only apply to --model grasp, not --model {self.model}")
        if self.id_init is not None and self.id_init not in ID_INITS:
            raise ValueError(f"--id-init must be one of {', '.join(ID_INITS)}, got {self.id_init!r}")
        if self.model != "llmesr" and self.llmesr_alpha != TrainConfig.llmesr_alpha:
            raise ValueError(f"--llmesr-alpha only applies to --model llmesr, not --model {self.model}")
        if self.llmesr_alpha < 0:
            raise ValueError(f"--llmesr-alpha must be >= 0, got {self.llmesr_alpha}")
        if self.bert_negatives not in ("auto", "full") and (
            not isinstance(self.bert_negatives, int) or isinstance(self.bert_negatives, bool) or self.bert_negatives < 1
        ):
            raise ValueError(f"--bert-negatives must be 'auto', 'full' or an integer >= 1, got {self.bert_negatives!r}")
        if not 0.0 < self.mask_prob <= 1.0:
            raise ValueError(f"--mask-prob must be in (0, 1], got {self.mask_prob}")
        if self.backbone != "bert4rec":
            changed = [flag for flag, name in (("--bert-negatives", "bert_negatives"), ("--mask-prob", "mask_prob"))
                       if getattr(self, name) != getattr(TrainConfig, name)]  # fmt: skip
            if changed:
                raise ValueError(
                    f"{', '.join(changed)} only apply to --backbone bert4rec, not --backbone {self.backbone}"
                )
        if self.device not in DEVICES:
            raise ValueError(f"--device must be one of {', '.join(DEVICES)}, got {self.device!r}")
        if self.amp and self.device == "cpu":
            raise ValueError("--amp autocasts on CUDA only; drop --amp or use --device cuda/auto")
        return self

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict (tuples become lists)."""
        out = asdict(self)
        out["hae_branches"] = list(self.hae_branches)
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        """The inverse of :meth:`to_dict`; unknown keys raise ``ValueError`` naming them.

        A GRASP config written before ``id_init`` existed reads as ``"random"``, the only init then.
        """
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown training config keys: {', '.join(unknown)}")
        if data.get("model") == "grasp" and "id_init" not in data:
            data = {**data, "id_init": "random"}
        return cls(**data)

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> TrainConfig:
        """The config from flags added by :func:`add_train_arguments`, validated."""
        values = {f.name: getattr(args, f.name) for f in fields(cls) if hasattr(args, f.name)}
        return cls(**values).validate()

    def run_defining(self) -> dict[str, Any]:
        """:meth:`to_dict` without the fields in :data:`RUN_DEFINING_EXCLUDED` (used to check a resumed run)."""
        return {k: v for k, v in self.to_dict().items() if k not in RUN_DEFINING_EXCLUDED}


def parse_eval_negatives(text: str | int) -> int | str:
    """``"all"`` or a positive integer; anything else raises ``ValueError`` naming ``--eval-negatives``."""
    if isinstance(text, int) or text == "all":
        return text
    try:
        value = int(text)
    except ValueError:
        raise ValueError(f"--eval-negatives must be an integer >= 1 or 'all', got {text!r}") from None
    if value < 1:
        raise ValueError(f"--eval-negatives must be an integer >= 1 or 'all', got {text!r}")
    return value


def parse_bert_negatives(text: str | int) -> int | str:
    """``"auto"``, ``"full"`` or a positive integer; anything else raises ``ValueError`` naming ``--bert-negatives``."""
    if isinstance(text, int) or text in ("auto", "full"):
        return text
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise ValueError(f"--bert-negatives must be 'auto', 'full' or an integer >= 1, got {text!r}")
    return value


def _argument_type(parse):
    def convert(text: str) -> int | str:
        try:
            return parse(text)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None

    return convert


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    """Add every training flag (with help text and the :class:`TrainConfig` defaults) to ``parser``."""
    c = TrainConfig()
    g = parser.add_argument_group("model")
    g.add_argument(
        "--backbone", choices=BACKBONES, default=c.backbone, help="sequential backbone (default: %(default)s)"
    )
    g.add_argument(
        "--model",
        choices=MODELS,
        default=c.model,
        help="id: plain backbone; grasp: LLM tables + holistic attention; llminit: ID embeddings "
        "initialised from the LLM item embeddings; llmesr: LLM-ESR (default: %(default)s)",
    )
    g.add_argument("--hidden-size", "--d", dest="d", type=int, default=c.d,
                   help="model width d (default: %(default)s; under torchrun spell it --hidden-size, since torchrun "
                   "reads --d as an abbreviation of its own options)")  # fmt: skip
    g.add_argument(
        "--max-len", type=int, default=c.max_len, help="history length fed to the model (default: %(default)s)"
    )
    g.add_argument("--dropout", type=float, default=c.dropout, help="dropout rate (default: %(default)s)")
    g.add_argument(
        "--num-blocks", type=int, default=c.num_blocks, help="transformer / GRU layers (default: %(default)s)"
    )
    g.add_argument("--num-heads", type=int, default=c.num_heads, help="attention heads (default: %(default)s)")
    g.add_argument(
        "--hae-branches",
        nargs="+",
        choices=DEFAULT_BRANCHES,
        default=list(c.hae_branches),
        help="holistic attention branches to keep, for ablations (grasp only; default: all three)",
    )
    g.add_argument(
        "--activation",
        choices=ACTIVATIONS,
        default=c.activation,
        help="holistic attention weights: sigmoid (paper) or softmax (ablation; grasp only)",
    )
    g.add_argument(
        "--no-attention",
        dest="attention",
        action="store_false",
        help="ablation: fuse the LLM vectors without the holistic attention weights (grasp only)",
    )
    g.add_argument(
        "--hae-backend",
        default=c.hae_backend,
        help="force a holistic_attention backend (reference, cpu, cuda, triton; grasp only)",
    )
    g.add_argument(
        "--id-init",
        choices=ID_INITS,
        default=c.id_init,
        help=f"GRASP's ID embeddings: pca (the PCA of the LLM item embeddings, like llminit) or random (N(0, 1/d), "
        f"like the plain backbone) (grasp only; default: {DEFAULT_ID_INIT})",
    )
    g.add_argument(
        "--llmesr-alpha",
        type=float,
        default=c.llmesr_alpha,
        help="LLM-ESR self-distillation weight (llmesr only; default: %(default)s)",
    )
    g.add_argument(
        "--bert-negatives",
        type=_argument_type(parse_bert_negatives),
        default=c.bert_negatives,
        help="BERT4Rec loss: auto (256-item sampled softmax for every model, one loss for all), full "
        "(cross-entropy over the catalogue; slow for grasp) or a sample size (bert4rec only; default: %(default)s)",
    )
    g.add_argument(
        "--mask-prob",
        type=float,
        default=c.mask_prob,
        help="BERT4Rec masking probability (bert4rec only; default: %(default)s)",
    )
    t = parser.add_argument_group("training")
    t.add_argument("--epochs", type=int, default=c.epochs, help="most epochs to train (default: %(default)s)")
    t.add_argument(
        "--batch-size",
        type=int,
        default=c.batch_size,
        help="users per step, global across DDP ranks (default: %(default)s)",
    )
    t.add_argument("--lr", type=float, default=c.lr, help="Adam learning rate (default: %(default)s)")
    t.add_argument(
        "--weight-decay", type=float, default=c.weight_decay, help="Adam weight decay (default: %(default)s)"
    )
    t.add_argument(
        "--patience",
        type=int,
        default=c.patience,
        help="stop after this many epochs without a validation NDCG@10 gain (default: %(default)s)",
    )
    t.add_argument(
        "--seed", type=int, default=c.seed, help="seed of initialisation, negatives, dropout (default: %(default)s)"
    )
    t.add_argument("--device", choices=DEVICES, default=c.device, help="where to train (default: %(default)s)")
    t.add_argument(
        "--amp",
        action=argparse.BooleanOptionalAction,
        default=c.amp,
        help="bfloat16/float16 autocast of training steps, CUDA only; evaluation stays float32 (default: off)",
    )
    t.add_argument("--compile", action="store_true", help="torch.compile the training step")
    t.add_argument("--tensorboard", action="store_true", help="log to RUN_DIR/tensorboard (needs tensorboard)")
    e = parser.add_argument_group("evaluation")
    e.add_argument(
        "--eval-negatives",
        type=_argument_type(parse_eval_negatives),
        default=c.eval_negatives,
        help="sampled negatives per user, or 'all' for full ranking (default: %(default)s)",
    )
    e.add_argument(
        "--eval-seed",
        type=int,
        default=c.eval_seed,
        help="seed of the evaluation negatives, shared by all models (default: %(default)s)",
    )
    e.add_argument(
        "--eval-batch-size",
        type=int,
        default=c.eval_batch_size,
        help="users per evaluation batch (default: %(default)s)",
    )
