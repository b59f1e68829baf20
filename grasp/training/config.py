"""Training configuration: :class:`TrainConfig`, the one home of every training option.

Each field carries its command-line form in its metadata: help text, group, flags, choices, how to parse
it, its range, and the model or backbone it applies to. From that metadata :func:`add_train_arguments`
generates the flags and :meth:`TrainConfig.validate` checks a config: each value (the model's options with
:func:`grasp.models.build.check_model_options`, naming the flags) and where an option applies.
:meth:`TrainConfig.model_options` hands the model's options to :func:`grasp.models.build_model` by name,
which also refuses ablations that do not go together. :meth:`TrainConfig.to_dict` /
:meth:`TrainConfig.from_dict` round-trip through JSON.
"""

from __future__ import annotations

import argparse
import functools
import inspect
from collections.abc import Callable
from dataclasses import Field, asdict, dataclass, field, fields
from typing import Any, get_type_hints

from grasp.models.options import (
    ACTIVATIONS,
    ADAPTER_INITS,
    BACKBONES,
    DEFAULT_ADAPTER_INIT,
    DEFAULT_BRANCHES,
    DEFAULT_ID_INIT,
    ID_INITS,
    MODELS,
)

__all__ = [
    "TrainConfig",
    "add_train_arguments",
    "parse_bert_negatives",
    "parse_eval_negatives",
    "RUN_DEFINING_EXCLUDED",
    "with_later_fields",
]

DEVICES = ("auto", "cpu", "cuda")

#: Fields that do not change what a run computes (how long, where, how it is logged). A run directory
#: may be resumed with different values of these; any other difference needs ``force``.
RUN_DEFINING_EXCLUDED = frozenset({"epochs", "device", "tensorboard", "eval_batch_size", "compile"})


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


def _is_count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


#: ``check`` metadata: (the test a value must pass, the requirement named in the error).
_AT_LEAST_ONE = (_is_count, ">= 1")
_GRASP, _LLMESR, _BERT4REC = ("model", "grasp"), ("model", "llmesr"), ("backbone", "bert4rec")


def _option(
    default: Any,
    help: str,
    *,
    group: str,
    flags: tuple[str, ...] = (),
    choices: tuple[str, ...] | None = None,
    parse: Callable[[str], Any] | None = None,
    nargs: str | None = None,
    action: type[argparse.Action] | None = None,
    applies_to: tuple[str, str] | None = None,
    check: tuple[Callable[[Any], bool], str] | None = None,
) -> Any:
    """A :class:`TrainConfig` field with its command-line metadata.

    Args:
        default: the default value (also the flag's default).
        help: the flag's help text (``%(default)s`` shows the default).
        group: the help group of the flag.
        flags: the flag spellings, the first one named in errors (default ``--field-name``).
        choices: the allowed values (each value, for ``nargs``).
        parse: turns the flag's text into the value (default: the field's type, ``int`` or ``float``).
        nargs, action: as for :meth:`argparse.ArgumentParser.add_argument` (booleans default to a switch).
        applies_to: ``(field, value)``: the option only applies when that field has that value.
        check: a range check the value must pass, and its requirement for the error.
    """
    metadata = {"help": help, "group": group, "flags": flags, "choices": choices, "parse": parse, "nargs": nargs,
                "action": action, "applies_to": applies_to, "check": check}  # fmt: skip
    return field(default=default, metadata=metadata)


@dataclass
class TrainConfig:
    """Everything that defines a training run (docs/design.md section 6 gives the defaults).

    Each field's meaning is its help text (``grasp train --help``). ``id_init`` and ``adapter_init`` None
    become :data:`grasp.models.options.DEFAULT_ID_INIT` and ``DEFAULT_ADAPTER_INIT`` for GRASP;
    ``eval_negatives`` and ``bert_negatives`` also take their command-line text (``"all"``, ``"auto"``,
    ``"full"`` or a number).
    """

    backbone: str = _option("sasrec", "sequential backbone (default: %(default)s)", group="model",
                            choices=BACKBONES)  # fmt: skip
    model: str = _option(
        "grasp",
        "grasp: LLM tables + holistic attention; id: the plain backbone; llminit: ID embeddings initialised from "
        "the LLM item embeddings; llmesr: LLM-ESR (default: %(default)s)",
        group="model",
        choices=MODELS,
    )
    d: int = _option(
        64,
        "model width d (default: %(default)s; under torchrun spell it --hidden-size, since torchrun reads --d as "
        "an abbreviation of its own options)",
        group="model",
        flags=("--hidden-size", "--d"),
    )
    max_len: int = _option(100, "history length fed to the model (default: %(default)s)", group="model")
    dropout: float = _option(0.2, "dropout rate (default: %(default)s)", group="model")
    num_blocks: int = _option(2, "transformer / GRU layers (default: %(default)s)", group="model")
    num_heads: int = _option(1, "attention heads (default: %(default)s)", group="model")
    hae_branches: tuple[str, ...] = _option(
        DEFAULT_BRANCHES,
        "holistic attention branches to keep, for ablations (grasp only; default: all three)",
        group="model",
        choices=DEFAULT_BRANCHES,
        nargs="+",
        applies_to=_GRASP,
    )
    activation: str = _option(
        "sigmoid",
        "holistic attention weights: sigmoid (paper) or softmax (ablation; grasp only)",
        group="model",
        choices=ACTIVATIONS,
        applies_to=_GRASP,
    )
    attention: bool = _option(
        True,
        "ablation: fuse the LLM vectors without the holistic attention weights (grasp only)",
        group="model",
        flags=("--no-attention",),
        applies_to=_GRASP,
    )
    hae_backend: str | None = _option(
        None,
        "force a holistic_attention backend (reference, cpu, cuda, triton; grasp only)",
        group="model",
        applies_to=_GRASP,
    )
    id_init: str | None = _option(
        None,
        "GRASP's ID embeddings: pca (the PCA of the LLM item embeddings, like llminit) or random (N(0, 1/d), like "
        f"the plain backbone) (grasp only; default: {DEFAULT_ID_INIT})",
        group="model",
        choices=ID_INITS,
        applies_to=_GRASP,
    )
    adapter_init: str | None = _option(
        None,
        "GRASP's user and item adapters: random (PyTorch's init) or pca (one linear map, the PCA of the LLM user and "
        "item embeddings: the gates start from their LLM similarity) "
        f"(grasp only; default: {DEFAULT_ADAPTER_INIT})",
        group="model",
        choices=ADAPTER_INITS,
        applies_to=_GRASP,
    )
    llmesr_alpha: float = _option(0.1, "LLM-ESR self-distillation weight (llmesr only; default: %(default)s)",
                                  group="model", applies_to=_LLMESR)  # fmt: skip
    bert_negatives: int | str = _option(
        "auto",
        "BERT4Rec loss: auto (256-item sampled softmax for every model, one loss for all), full (cross-entropy over "
        "the catalogue; slow for grasp) or a sample size (bert4rec only; default: %(default)s)",
        group="model",
        parse=parse_bert_negatives,
        applies_to=_BERT4REC,
    )
    mask_prob: float = _option(0.2, "BERT4Rec masking probability (bert4rec only; default: %(default)s)",
                               group="model", applies_to=_BERT4REC)  # fmt: skip
    epochs: int = _option(200, "most epochs to train (default: %(default)s)", group="training", check=_AT_LEAST_ONE)
    batch_size: int = _option(128, "users per step, global across DDP ranks (default: %(default)s)",
                              group="training", check=_AT_LEAST_ONE)  # fmt: skip
    lr: float = _option(1e-3, "Adam learning rate (default: %(default)s)", group="training",
                        check=(lambda value: value > 0, "> 0"))  # fmt: skip
    weight_decay: float = _option(0.0, "Adam weight decay (default: %(default)s)", group="training",
                                  check=(lambda value: value >= 0, ">= 0"))  # fmt: skip
    patience: int = _option(20, "stop after this many epochs without a validation NDCG@10 gain (default: %(default)s)",
                            group="training", check=_AT_LEAST_ONE)  # fmt: skip
    seed: int = _option(42, "seed of initialisation, negatives, dropout (default: %(default)s)", group="training")
    eval_negatives: int | str = _option(
        100,
        "sampled negatives per user, or 'all' for full ranking (default: %(default)s)",
        group="evaluation",
        parse=parse_eval_negatives,
        check=(lambda value: value == "all" or _is_count(value), "an integer >= 1 or 'all'"),
    )
    eval_seed: int = _option(2025, "seed of the evaluation negatives, shared by all models (default: %(default)s)",
                             group="evaluation")  # fmt: skip
    eval_batch_size: int = _option(256, "users per evaluation batch (default: %(default)s)", group="evaluation",
                                   check=_AT_LEAST_ONE)  # fmt: skip
    device: str = _option("auto", "where to train (default: %(default)s)", group="training", choices=DEVICES)
    amp: bool = _option(
        False,
        "bfloat16/float16 autocast of training steps, CUDA only; evaluation stays float32 (default: off)",
        group="training",
        action=argparse.BooleanOptionalAction,
    )
    compile: bool = _option(False, "torch.compile the training step", group="training")
    tensorboard: bool = _option(False, "log to RUN_DIR/tensorboard (needs tensorboard)", group="training")

    def __post_init__(self) -> None:
        self.hae_branches = tuple(self.hae_branches)
        if self.model == "grasp" and self.id_init is None:
            self.id_init = DEFAULT_ID_INIT
        if self.model == "grasp" and self.adapter_init is None:
            self.adapter_init = DEFAULT_ADAPTER_INIT
        if isinstance(self.eval_negatives, str) and self.eval_negatives != "all":
            self.eval_negatives = parse_eval_negatives(self.eval_negatives)
        if isinstance(self.bert_negatives, str) and self.bert_negatives not in ("auto", "full"):
            self.bert_negatives = parse_bert_negatives(self.bert_negatives)

    @staticmethod
    def flag(name: str) -> str:
        """The command-line flag of field ``name`` (``"d"`` -> ``"--hidden-size"``)."""
        return _flags(_FIELDS[name])[0]

    def validate(self) -> TrainConfig:
        """Raise ``ValueError`` naming the flag for any bad or incompatible setting; return self."""
        for spec in fields(self):
            value, choices, check = getattr(self, spec.name), spec.metadata["choices"], spec.metadata["check"]
            if choices and not spec.metadata["nargs"] and value not in (*choices, spec.default):
                raise ValueError(f"{self.flag(spec.name)} must be one of {', '.join(choices)}, got {value!r}")
            if check and not check[0](value):
                raise ValueError(f"{self.flag(spec.name)} must be {check[1]}, got {value!r}")
        self._check_applicable()
        from grasp.models.build import check_model_options  # imports torch: not needed to build the flags

        check_model_options(name=self.flag, **self.model_options())
        if self.amp and self.device == "cpu":
            raise ValueError("--amp autocasts on CUDA only; drop --amp or use --device cuda/auto")
        return self

    def _check_applicable(self) -> None:
        """Refuse options changed from their defaults where they do not apply (``applies_to`` metadata)."""
        rules: dict[tuple[str, str], list[Field]] = {}
        for spec in fields(self):
            if spec.metadata["applies_to"]:
                rules.setdefault(spec.metadata["applies_to"], []).append(spec)
        for (name, wanted), specs in rules.items():
            actual = getattr(self, name)
            changed = [self.flag(spec.name) for spec in specs if getattr(self, spec.name) != spec.default]
            if actual != wanted and changed:
                verb = "applies" if len(specs) == 1 else "apply"
                flag = self.flag(name)
                raise ValueError(f"{', '.join(changed)} only {verb} to {flag} {wanted}, not {flag} {actual}")

    def model_options(self) -> dict[str, Any]:
        """The fields that are :func:`grasp.models.build_model` arguments, by name (backbone and model included)."""
        return {name: getattr(self, name) for name in _model_options()}

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict (tuples become lists)."""
        out = asdict(self)
        out["hae_branches"] = list(self.hae_branches)
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        """The inverse of :meth:`to_dict`; unknown or missing keys raise ``ValueError`` naming them."""
        unknown = sorted(set(data) - set(_FIELDS))
        if unknown:
            raise ValueError(f"unknown training config keys: {', '.join(unknown)}")
        data = with_later_fields(data)
        missing = [name for name in _FIELDS if name not in data]
        if missing:
            raise ValueError(f"training config keys missing: {', '.join(missing)} (written by another grasp version?)")
        return cls(**data)

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> TrainConfig:
        """The config from flags added by :func:`add_train_arguments`, validated."""
        values = {name: getattr(args, name) for name in _FIELDS if hasattr(args, name)}
        return cls(**values).validate()

    def run_defining(self) -> dict[str, Any]:
        """:meth:`to_dict` without the fields in :data:`RUN_DEFINING_EXCLUDED` (used to check a resumed run)."""
        return {k: v for k, v in self.to_dict().items() if k not in RUN_DEFINING_EXCLUDED}


_FIELDS: dict[str, Field] = {spec.name: spec for spec in fields(TrainConfig)}
#: Fields that configs written before they existed lack, and the value that gives those runs' behaviour.
_ADDED_LATER: dict[str, Callable[[dict[str, Any]], Any]] = {
    "adapter_init": lambda data: DEFAULT_ADAPTER_INIT if data.get("model") == "grasp" else None,
}


def with_later_fields(data: dict[str, Any]) -> dict[str, Any]:
    """A saved config dict (``TrainConfig.to_dict`` of an older grasp) completed with the fields added since,
    set as the run behaved without them."""
    return {**{name: value(data) for name, value in _ADDED_LATER.items() if name not in data}, **data}


@functools.cache
def _model_options() -> tuple[str, ...]:
    """The fields that are :func:`grasp.models.build_model` arguments (read from its signature on first use:
    grasp.models.build imports torch)."""
    from grasp.models.build import build_model

    return tuple(name for name in inspect.signature(build_model).parameters if name in _FIELDS)


def _flags(spec: Field) -> tuple[str, ...]:
    return spec.metadata["flags"] or ("--" + spec.name.replace("_", "-"),)


def _argument_type(parse: Callable[[str], Any]) -> Callable[[str], Any]:
    """``parse`` with its ``ValueError`` turned into argparse's error (a usage message, exit status 2)."""

    def convert(text: str) -> Any:
        try:
            return parse(text)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None

    return convert


def _argument(spec: Field, kind: Any) -> dict[str, Any]:
    """The :meth:`~argparse.ArgumentParser.add_argument` keywords of one field."""
    meta = spec.metadata
    options: dict[str, Any] = {"dest": spec.name, "help": meta["help"]}
    if kind is bool:
        options["action"] = meta["action"] or ("store_false" if spec.default else "store_true")
        if meta["action"]:
            options["default"] = spec.default
        return options
    options["default"] = list(spec.default) if meta["nargs"] else spec.default
    parse = meta["parse"] or (kind if kind in (int, float) else None)
    if parse is not None:
        options["type"] = _argument_type(parse) if meta["parse"] else parse
    for key in ("choices", "nargs"):
        if meta[key]:
            options[key] = meta[key]
    return options


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    """Add every training flag, generated from the :class:`TrainConfig` fields, to ``parser``, group by group."""
    kinds = get_type_hints(TrainConfig)
    groups: dict[str, list[Field]] = {}
    for spec in fields(TrainConfig):
        groups.setdefault(spec.metadata["group"], []).append(spec)
    for name, specs in groups.items():
        group = parser.add_argument_group(name)
        for spec in specs:
            group.add_argument(*_flags(spec), **_argument(spec, kinds[spec.name]))
