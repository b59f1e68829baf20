"""The training loop: :func:`train` one model in one run directory, :func:`evaluate_run` a finished one.

Layout of a run directory (``train`` writes directly into the directory it is given; the CLI gives each
seed its own, e.g. ``runs/ml-1m/sasrec-grasp/seed42``)::

    config.json            the TrainConfig and the dataset fingerprint (checked on resume)
    eval_negatives.npz     the fixed evaluation negatives (sampled evaluation only)
    epochs.csv             epoch, loss, valid NDCG@10 / HR@10, seconds, samples/s
    metrics.json           final metrics (see train), written at the end
    report.md              the test metrics as markdown tables
    checkpoints/           last.safetensors + last.pt (every epoch), best.safetensors
    tensorboard/           with --tensorboard

Under ``torchrun`` (``WORLD_SIZE`` > 1) the same :func:`train` runs data-parallel: it initialises the
process group (gloo on CPU, NCCL on CUDA) unless one exists, wraps the loss in
``DistributedDataParallel``, gives each rank ``batch_size / world_size`` users of every global batch,
evaluates on rank 0 and writes files on rank 0 only.
"""

from __future__ import annotations

import csv
import io
import os
import pickle
import random
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from grasp._console import progress, say
from grasp._io import write_json, write_text
from grasp.data import Dataset
from grasp.training.batches import TrainBatches
from grasp.training.checkpoint import (
    load_training_state,
    load_weights,
    save_training_state,
    save_weights,
)
from grasp.training.config import TrainConfig
from grasp.training.evaluate import dataset_fingerprint, evaluate_split, load_or_create_eval_negatives
from grasp.training.metrics import GROUPS
from grasp.training.rundir import check_same_setup, clear_training_outputs, read_record, refuse_overwrite

__all__ = ["train", "evaluate_run", "evaluation_name", "build_recommender", "check_device", "ModelFactory"]

#: Builds the model of a run: ``(config, dataset, tables) -> Recommender``.
ModelFactory = Callable[[TrainConfig, Dataset, Any], nn.Module]

EPOCH_COLUMNS = ("epoch", "loss", "valid_NDCG@10", "valid_HR@10", "seconds", "samples_per_s")


def build_recommender(config: TrainConfig, dataset: Dataset, tables: Any) -> nn.Module:
    """The :func:`grasp.models.build_model` model that ``config`` describes."""
    from grasp.models import build_model

    return build_model(
        num_users=dataset.num_users, num_items=dataset.num_items, tables=tables, **config.model_options()
    )


# ------------------------------------------------------------------------------------------ environment


@dataclass
class _Env:
    rank: int
    world_size: int
    device: torch.device
    autocast_dtype: torch.dtype | None
    owns_group: bool

    @property
    def main(self) -> bool:
        return self.rank == 0


def _uses_cuda(device: str) -> bool:
    return device == "cuda" or (device == "auto" and torch.cuda.is_available())


def join_process_group(device: str) -> bool:
    """Under torchrun (``WORLD_SIZE`` > 1), create the process group unless one exists.

    NCCL when training on CUDA (this process first takes its ``LOCAL_RANK`` GPU), gloo on the CPU. Returns
    True when this call created the group, so the caller destroys it when done.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        return False
    use_cuda = _uses_cuda(device)
    if use_cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    return True


def check_device(device: str) -> None:
    """Raise ``ValueError`` when ``device`` (``--device``) names a device this machine lacks."""
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: CUDA is not available here (use --device cpu or auto)")


def _setup(config: TrainConfig) -> _Env:
    """Resolve the device, join / create the process group under torchrun, pick the autocast dtype."""
    check_device(config.device)
    use_cuda = _uses_cuda(config.device)
    owns_group = join_process_group(config.device)
    rank = dist.get_rank() if dist.is_initialized() else 0
    world_size = dist.get_world_size() if dist.is_initialized() else 1
    if use_cuda:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")) if world_size > 1 else 0)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    dtype = None
    if config.amp:
        if use_cuda:
            dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        elif rank == 0:
            say("note: --amp ignored: there is no CUDA device, training in float32 on the CPU")
    return _Env(rank, world_size, device, dtype, owns_group)


def _broadcast(env: _Env, obj: Any) -> Any:
    """Rank 0's ``obj`` (picklable) on every rank."""
    if env.world_size == 1:
        return obj
    payload = pickle.dumps(obj) if env.main else b""
    size = torch.tensor([len(payload)], dtype=torch.int64, device=env.device)
    _broadcast_tensor(size)
    if env.main:
        data = torch.frombuffer(bytearray(payload), dtype=torch.uint8).to(env.device, copy=True)
    else:
        data = torch.empty(int(size.item()), dtype=torch.uint8, device=env.device)
    _broadcast_tensor(data)
    return obj if env.main else pickle.loads(data.cpu().numpy().tobytes())


def _broadcast_tensor(tensor: torch.Tensor) -> None:
    """``dist.broadcast`` from rank 0, returning only once no gloo worker thread holds ``tensor``.

    A gloo worker releases a finished collective's tensors after waking the caller, and that release takes
    the GIL. If it comes after the interpreter has begun to shut down (the last collective of a script),
    the worker thread is killed inside a destructor and the process aborts ("terminate called without an
    active exception"). The process group lives on until exit (DDP keeps it referenced), so its threads
    cannot be joined earlier; instead this waits until the tensor's C++ use count and Python reference
    count are back to what they were before the collective.
    """
    refs = sys.getrefcount(tensor)
    dist.broadcast(tensor, src=0)
    if tensor.device.type != "cpu":
        return
    deadline = time.monotonic() + 10.0
    while (tensor._use_count() > 1 or sys.getrefcount(tensor) > refs) and time.monotonic() < deadline:
        time.sleep(0.0005)


def _rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# ------------------------------------------------------------------------------------------ run directory


def _dataset_info(dataset: Dataset) -> dict[str, Any]:
    return {
        "name": dataset.name,
        "fingerprint": dataset_fingerprint(dataset),
        "num_users": dataset.num_users,
        "num_items": dataset.num_items,
        "head_user_threshold": dataset.head_user_threshold,
        "head_item_threshold": dataset.head_item_threshold,
    }


def _check_run_dir(run_dir: Path, config: TrainConfig, data_info: dict[str, Any], force: bool) -> None:
    """Refuse a run directory made with another config or dataset unless ``force``."""
    path = run_dir / "config.json"
    saved = None if force else read_record(path, ("config",))
    if saved is None:
        return
    try:
        old = TrainConfig.from_dict(saved["config"]).run_defining()
    except (ValueError, TypeError) as e:
        raise ValueError(f"{path}: unreadable run config ({e}); use another run directory or force") from None
    old_data = saved.get("dataset", {})
    check_same_setup(
        run_dir,
        {**old, "dataset": old_data.get("fingerprint")},
        {**config.run_defining(), "dataset": data_info["fingerprint"]},
        kind="setup",
        force=force,
        notes={"dataset": f"dataset: {old_data.get('name')!r} -> {data_info['name']!r} (different data)"},
    )


def _write_epochs_csv(path: Path, history: list[dict[str, float]]) -> None:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=EPOCH_COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(history)
    write_text(path, buffer.getvalue())


# ------------------------------------------------------------------------------------------ training


class _LossStep(nn.Module):
    """``forward`` = ``model.loss``, so DDP and torch.compile see the training computation as a forward pass."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, users: torch.Tensor, seqs: torch.Tensor, negatives: torch.Tensor) -> torch.Tensor:
        return self.model.loss(users, seqs, negatives)


def _eval_kwargs(config: TrainConfig, env: _Env, negatives: np.ndarray | None) -> dict[str, Any]:
    return {
        "max_len": config.max_len,
        "negatives": negatives,
        "batch_size": config.eval_batch_size,
        "device": env.device,
    }


def _eval_negatives(run_dir: Path, dataset: Dataset, config: TrainConfig) -> np.ndarray | None:
    if config.eval_negatives == "all":
        return None
    return load_or_create_eval_negatives(
        run_dir / "eval_negatives.npz", dataset, int(config.eval_negatives), config.eval_seed
    )


def train(
    run_dir: str | Path,
    dataset: Dataset,
    tables: Any,
    config: TrainConfig,
    *,
    resume: bool = False,
    progress: bool = True,
    force: bool = False,
    model_factory: ModelFactory | None = None,
) -> dict[str, Any]:
    """Train ``config``'s model on ``dataset`` in ``run_dir`` with early stopping; test the best checkpoint.

    Adam, the model's own loss, one pass over the (shuffled) users per epoch; validation NDCG@10 after
    every epoch; stop after ``config.patience`` epochs without a gain (or ``config.epochs``); the best
    epoch's weights are evaluated on test.

    Args:
        run_dir: the run directory (layout in the module docstring); created if missing.
        dataset: the preprocessed dataset. tables: its frozen LLM tables (``None`` for ``model="id"``).
        config: the run's settings (validated here).
        resume: continue from ``checkpoints/last.*`` when present (a fresh start otherwise); the result
            equals an uninterrupted run's. A finished run just re-evaluates. ``config.epochs`` may grow.
            Without ``resume`` or ``force``, a ``run_dir`` holding checkpoints is refused (``ValueError``).
        progress: show a progress bar per epoch (rank 0; plain lines when stderr is not a terminal). The
            line per epoch is printed either way (:func:`grasp._console.say`, also into open log files).
        force: use ``run_dir`` even if it was made with a different config or dataset, deleting the
            outputs of an earlier run there before starting over (unless ``resume``).
        model_factory: builds the model (default :func:`build_recommender`).

    Returns:
        The content of ``metrics.json``: ``{"config", "dataset", "test": {group: {"NDCG@k": %, "HR@k": %}
        or None if the group is empty}, "valid": {...}, "group_sizes": {"test": {...}, "valid": {...}},
        "thresholds": {"head_user", "head_item"}, "best_epoch", "epochs", "stopped_early",
        "train_seconds", "world_size"}`` with groups ``overall, tail_user, head_user, tail_item, head_item``.
    """
    config.validate()
    env = _setup(config)
    try:
        return _Trainer(Path(run_dir), dataset, tables, config, env, model_factory or build_recommender).run(
            resume=resume, progress=progress, force=force
        )
    finally:
        if env.owns_group:
            dist.destroy_process_group()


class _Trainer:
    def __init__(
        self, run_dir: Path, dataset: Dataset, tables: Any, config: TrainConfig, env: _Env, factory: ModelFactory
    ) -> None:
        self.run_dir, self.dataset, self.config, self.env = run_dir, dataset, config, env
        _seed_all(config.seed)
        self.model = factory(config, dataset, tables).to(env.device)
        # Dropout / masking randomness: its own stream per rank, independent of initialisation.
        torch.manual_seed(config.seed + 7919 * (env.rank + 1))
        self.batches = TrainBatches(dataset, config.max_len, config.batch_size, config.seed)
        self.optimizer = torch.optim.Adam(
            [p for p in self.model.parameters() if p.requires_grad], lr=config.lr, weight_decay=config.weight_decay
        )
        self.scaler = torch.amp.GradScaler(env.device.type, enabled=env.autocast_dtype == torch.float16)
        step: nn.Module = _LossStep(self.model)
        if env.world_size > 1:
            step = nn.parallel.DistributedDataParallel(
                step,
                device_ids=[env.device.index] if env.device.type == "cuda" else None,
                broadcast_buffers=False,  # frozen tables are identical everywhere; don't resend them
                find_unused_parameters=True,
            )
        self.step: Callable[..., torch.Tensor] = torch.compile(step) if config.compile else step
        self.ckpt = run_dir / "checkpoints"
        self.negatives: np.ndarray | None = None  # evaluation negatives (rank 0; None = full ranking)
        self.data_info = _dataset_info(dataset)
        self.state: dict[str, Any] = {
            "epoch": 0, "best": -1.0, "best_epoch": 0, "bad_epochs": 0, "stopped": False,
            "train_seconds": 0.0, "history": [],
        }  # fmt: skip

    # ---------------------------------------------------------------- setup / checkpoints

    def _prepare_dir(self, resume: bool, force: bool) -> None:
        _check_run_dir(self.run_dir, self.config, self.data_info, force)
        refuse_overwrite(self.run_dir, resume=resume, force=force)
        last = self.ckpt / "last.pt"
        if resume and last.is_file():
            self._load_last()
            if self.env.main:
                say(f"{self.run_dir}: resuming after epoch {self.state['epoch']}")
        else:
            if self.env.main:
                if resume:
                    say(f"note: {last} not found, starting {self.run_dir} from scratch")
                clear_training_outputs(self.run_dir)  # a fresh start keeps nothing of an earlier (forced) run
        if self.env.main:
            self.ckpt.mkdir(parents=True, exist_ok=True)
            write_json(self.run_dir / "config.json", {"config": self.config.to_dict(), "dataset": self.data_info})
            self.negatives = _eval_negatives(self.run_dir, self.dataset, self.config)
        if self.config.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as e:
                raise RuntimeError(f"--tensorboard needs the tensorboard package (pip install tensorboard): {e}") from e
            self.writer = SummaryWriter(str(self.run_dir / "tensorboard")) if self.env.main else None
        else:
            self.writer = None

    def _load_last(self) -> None:
        saved = load_training_state(self.ckpt / "last.pt", self.ckpt / "last.safetensors")
        load_weights(self.ckpt / "last.safetensors", self.model)
        self.optimizer.load_state_dict(saved["optimizer"])
        self.scaler.load_state_dict(saved["scaler"])
        self.batches.load_state_dict(saved["batches"])
        rngs = saved["rng"]
        if len(rngs) != self.env.world_size and self.env.main:
            say(f"note: checkpoint from {len(rngs)} process(es), resuming with {self.env.world_size}: "
                  "dropout randomness will differ from an uninterrupted run")  # fmt: skip
        _set_rng_state(rngs[self.env.rank % len(rngs)])
        self.state = saved["trainer"]

    def _save_last(self) -> None:
        rngs = [_rng_state()]
        if self.env.world_size > 1:
            gathered: list[Any] = [None] * self.env.world_size
            dist.all_gather_object(gathered, rngs[0])
            rngs = gathered
        if not self.env.main:
            return
        epoch = self.state["epoch"]
        save_weights(self.ckpt / "last.safetensors", self.model, {"epoch": epoch})
        save_training_state(self.ckpt / "last.pt", {
            "epoch": epoch, "optimizer": self.optimizer.state_dict(), "scaler": self.scaler.state_dict(),
            "batches": self.batches.state_dict(), "rng": rngs, "trainer": self.state,
        })  # fmt: skip

    # ---------------------------------------------------------------- loop

    def run(self, *, resume: bool, progress: bool, force: bool) -> dict[str, Any]:
        self._prepare_dir(resume, force)
        show = progress and self.env.main
        while not self.state["stopped"] and self.state["epoch"] < self.config.epochs:
            self._epoch(show)
        metrics = self._finish() if self.env.main else None
        if self.writer is not None:
            self.writer.close()
        return _broadcast(self.env, metrics)

    def _epoch(self, show: bool) -> None:
        env, config = self.env, self.config
        epoch = self.state["epoch"] + 1
        self.model.train()
        start = time.perf_counter()
        loss_sum = torch.zeros((), dtype=torch.float64, device=env.device)
        steps = samples = 0
        bar = progress(len(self.batches), f"epoch {epoch}", "batch", enabled=show, leave=False)
        for users, seqs, negatives in self.batches.epoch(env.rank, env.world_size):
            u, s, n = (torch.from_numpy(a).to(env.device, non_blocking=True) for a in (users, seqs, negatives))
            self.optimizer.zero_grad(set_to_none=True)
            if env.autocast_dtype is not None:
                with torch.autocast(device_type=env.device.type, dtype=env.autocast_dtype):
                    loss = self.step(u, s, n)
            else:
                loss = self.step(u, s, n)
            self.scaler.scale(loss).backward()
            self.scaler.step(self.optimizer)
            self.scaler.update()
            loss_sum += loss.detach().double()
            steps += 1
            samples += len(users) * env.world_size
            bar.update()
            if show and (steps % 10 == 0 or steps == len(self.batches)):
                elapsed = time.perf_counter() - start
                bar.set_postfix(loss=f"{loss_sum.item() / steps:.4f}", samples_s=f"{samples / elapsed:.0f}")
        bar.close()
        if env.world_size > 1:
            dist.all_reduce(loss_sum)
        mean_loss = loss_sum.item() / max(steps * env.world_size, 1)
        if not np.isfinite(mean_loss):
            raise FloatingPointError(f"training loss became {mean_loss} in epoch {epoch} (try a lower --lr)")
        train_time = time.perf_counter() - start

        valid = None
        if env.main:
            groups, _ = evaluate_split(self.model, self.dataset, "valid", **_eval_kwargs(config, env, self.negatives))
            valid = groups["overall"]
        valid = _broadcast(env, valid)
        seconds = time.perf_counter() - start
        st = self.state
        st["epoch"] = epoch
        st["train_seconds"] += seconds
        st["history"].append({
            "epoch": epoch, "loss": round(mean_loss, 6), "valid_NDCG@10": round(valid["NDCG@10"], 4),
            "valid_HR@10": round(valid["HR@10"], 4), "seconds": round(seconds, 3),
            "samples_per_s": round(samples / max(train_time, 1e-9), 1),
        })  # fmt: skip
        if valid["NDCG@10"] > st["best"]:
            st["best"], st["best_epoch"], st["bad_epochs"] = valid["NDCG@10"], epoch, 0
            if env.main:
                save_weights(self.ckpt / "best.safetensors", self.model, {"epoch": epoch, "valid_NDCG@10": st["best"]})
        else:
            st["bad_epochs"] += 1
        st["stopped"] = st["bad_epochs"] >= config.patience
        self._save_last()
        if env.main:
            _write_epochs_csv(self.run_dir / "epochs.csv", st["history"])
            if self.writer is not None:
                self.writer.add_scalar("train/loss", mean_loss, epoch)
                self.writer.add_scalar("train/samples_per_s", st["history"][-1]["samples_per_s"], epoch)
                for k in ("NDCG@10", "HR@10"):
                    self.writer.add_scalar(f"valid/{k}", valid[k], epoch)
        if env.main:
            say(
                f"epoch {epoch}: loss {mean_loss:.4f}  valid NDCG@10 {valid['NDCG@10']:.2f} HR@10 {valid['HR@10']:.2f}"
                f"  (best {st['best']:.2f} at epoch {st['best_epoch']})  {seconds:.1f}s"
            )
            if st["stopped"]:
                best = st["best_epoch"]
                say(f"early stop: no validation NDCG@10 gain for {config.patience} epochs; best epoch {best}")

    def _finish(self) -> dict[str, Any]:
        from grasp.training.report import write_report

        load_weights(self.ckpt / "best.safetensors", self.model)
        kwargs = _eval_kwargs(self.config, self.env, self.negatives)
        test, test_sizes = evaluate_split(self.model, self.dataset, "test", **kwargs)
        valid, valid_sizes = evaluate_split(self.model, self.dataset, "valid", **kwargs)
        st = self.state
        metrics = {
            "config": self.config.to_dict(),
            "dataset": self.data_info,
            "test": {g: test[g] for g in GROUPS},
            "valid": {g: valid[g] for g in GROUPS},
            "group_sizes": {"test": test_sizes, "valid": valid_sizes},
            "thresholds": {
                "head_user": self.dataset.head_user_threshold,
                "head_item": self.dataset.head_item_threshold,
            },
            "best_epoch": st["best_epoch"],
            "epochs": st["epoch"],
            "stopped_early": st["stopped"],
            "train_seconds": round(st["train_seconds"], 3),
            "world_size": self.env.world_size,
        }
        write_json(self.run_dir / "metrics.json", metrics)
        write_report(self.run_dir, metrics)
        return metrics


# ------------------------------------------------------------------------------------------ re-evaluation


def evaluate_run(
    run_dir: str | Path,
    dataset: Dataset,
    tables: Any,
    *,
    checkpoint: str = "best",
    device: str = "auto",
    eval_negatives: int | str | None = None,
    batch_size: int | None = None,
    model_factory: ModelFactory | None = None,
    print_table: bool = True,
    save: bool = True,
) -> dict[str, Any]:
    """Re-evaluate a run's ``checkpoints/{checkpoint}.safetensors`` on test (and validation); print the table.

    The result is also written to ``run_dir/evaluations/<checkpoint>-<protocol>.json`` and ``.md``, where
    the protocol is ``full`` (ranking every item) or ``sampled<N>-seed<S>`` (:func:`evaluation_name`).

    Args:
        run_dir: a directory written by :func:`train` (needs ``config.json`` and the checkpoint).
        dataset, tables: the same data the run was trained on (the fingerprint is checked).
        checkpoint: ``"best"`` or ``"last"``.
        device: ``"auto"``, ``"cpu"`` or ``"cuda"``.
        eval_negatives: override the run's setting (an int or ``"all"``); ``None`` keeps it. The run's
            ``eval_negatives.npz`` is reused when the count and seed match, otherwise negatives are drawn
            with the run's eval seed and not saved.
        batch_size: evaluation batch size (default: the run's).
        model_factory: builds the model (default :func:`build_recommender`).
        print_table: print the markdown report.
        save: write the result into ``run_dir/evaluations``.

    Returns:
        ``{"config", "dataset", "test", "valid", "group_sizes", "thresholds", "checkpoint", "epoch",
        "eval_negatives"}`` (the config's ``eval_negatives`` is the one evaluated with).
    """
    from grasp.training.evaluate import sample_eval_negatives
    from grasp.training.report import metrics_tables

    run_dir = Path(run_dir)
    path = run_dir / "config.json"
    saved = read_record(path, ("config",))
    if saved is None:
        raise FileNotFoundError(f"{path}: not found; is {run_dir} a training run directory?")
    if checkpoint not in ("best", "last"):
        raise ValueError(f"checkpoint must be 'best' or 'last', got {checkpoint!r}")
    config = TrainConfig.from_dict(saved["config"])
    config.device = device
    config.amp = config.amp and device != "cpu"
    if batch_size is not None:
        config.eval_batch_size = batch_size
    config.validate()
    info = _dataset_info(dataset)
    if saved.get("dataset", {}).get("fingerprint") != info["fingerprint"]:
        raise ValueError(f"{path}: the run was trained on different data than dataset {dataset.name!r}")
    count = config.eval_negatives if eval_negatives is None else eval_negatives
    env = _setup(config)
    _seed_all(config.seed)
    model = (model_factory or build_recommender)(config, dataset, tables).to(env.device)
    meta = load_weights(run_dir / "checkpoints" / f"{checkpoint}.safetensors", model)
    if count == "all":
        negatives = None
    elif count == config.eval_negatives:
        negatives = _eval_negatives(run_dir, dataset, config)
    else:
        negatives = sample_eval_negatives(dataset, int(count), config.eval_seed)
    kwargs = _eval_kwargs(config, env, negatives)
    test, test_sizes = evaluate_split(model, dataset, "test", **kwargs)
    valid, valid_sizes = evaluate_split(model, dataset, "valid", **kwargs)
    result = {
        "config": {**config.to_dict(), "eval_negatives": count},
        "dataset": info,
        "test": test,
        "valid": valid,
        "group_sizes": {"test": test_sizes, "valid": valid_sizes},
        "thresholds": {"head_user": dataset.head_user_threshold, "head_item": dataset.head_item_threshold},
        "checkpoint": checkpoint,
        "epoch": int(meta.get("epoch", 0)),
        "eval_negatives": count,
    }
    if save:
        name = evaluation_name(checkpoint, count, config.eval_seed)
        write_json(run_dir / "evaluations" / f"{name}.json", result)
        write_text(run_dir / "evaluations" / f"{name}.md", metrics_tables(result))
    if print_table:
        say(metrics_tables(result))
    return result


def evaluation_name(checkpoint: str, eval_negatives: int | str, eval_seed: int) -> str:
    """The file name (without suffix) of an evaluation: ``best-full`` or ``best-sampled100-seed2025``."""
    protocol = "full" if eval_negatives == "all" else f"sampled{eval_negatives}-seed{eval_seed}"
    return f"{checkpoint}-{protocol}"
