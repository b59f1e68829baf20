"""``TrainedRecommender``: top-k recommendations from a trained run, in the dataset's original ids.

A run directory written by ``grasp train`` holds ``train.json`` (the config, the pipeline directory with the
dataset and the LLM tables, the seeds) and one ``seed<S>/`` directory per seed with its checkpoints.
:meth:`TrainedRecommender.load` rebuilds the model of one seed, refuses files that do not belong together, and
:meth:`TrainedRecommender.recommend` ranks the whole catalogue for a batch of users through the model's
fused scoring (:func:`grasp.ops.score_topk`): no ``[users x items]`` score matrix is formed.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from grasp.data.preprocess import Dataset
from grasp.data.store import load_dataset
from grasp.pipeline.tables import Tables
from grasp.training.batches import pad_left
from grasp.training.checkpoint import load_weights
from grasp.training.config import TrainConfig
from grasp.training.evaluate import dataset_fingerprint
from grasp.training.rundir import read_record, table_hashes
from grasp.training.trainer import build_recommender

__all__ = ["Recommendations", "TrainedRecommender"]

_RUN_FILE = "train.json"
_SEED_FILE = "config.json"
#: Item attributes that name an item, in order of preference.
_TITLE_KEYS = ("title", "name", "text")


@dataclass
class Recommendations:
    """Top-k items per user, in original ids.

    Attributes:
        users: the users' original ids, one per row.
        items: ``[rows][<= k]`` original item ids, best first (a row is shorter when fewer items remain).
        scores: ``[rows][<= k]`` the model's scores of those items.
        titles: ``[rows][<= k]`` the items' titles (the ``title`` attribute, else ``name``, else a RecBole
            ``text`` column), or None when the dataset has none.
    """

    users: list[str]
    items: list[list[str]]
    scores: list[list[float]]
    titles: list[list[str]] | None

    def rows(self) -> Iterator[dict[str, Any]]:
        """One dict per (user, rank): ``user_id, rank`` (1-based), ``item_id, score[, title]``."""
        for n, user in enumerate(self.users):
            for rank, (item, score) in enumerate(zip(self.items[n], self.scores[n], strict=True), 1):
                row = {"user_id": user, "rank": rank, "item_id": item, "score": score}
                if self.titles is not None:
                    row["title"] = self.titles[n][rank - 1]
                yield row


class TrainedRecommender:
    """A trained model of one seed, with its dataset's id maps and titles. Build it with :meth:`load`.

    Example:
        >>> rec = TrainedRecommender.load("runs/quick")                      # doctest: +SKIP
        >>> rec.recommend(["17", "42"], k=10).rows()                          # doctest: +SKIP
    """

    def __init__(self, model: torch.nn.Module, dataset: Dataset, config: TrainConfig, seed_dir: Path) -> None:
        self.model = model.eval()
        self.dataset = dataset
        self.config = config
        self.seed_dir = seed_dir
        self.device = next(model.parameters()).device
        titles = [_title(dataset.item_attributes.get(i, {})) for i in range(1, dataset.num_items + 1)]
        self._titles = None if all(t is None for t in titles) else ["", *(t or "" for t in titles)]

    @classmethod
    def load(
        cls,
        run_dir: str | Path,
        checkpoint: str = "best",
        device: str | torch.device | None = None,
        *,
        seed: int | None = None,
    ) -> TrainedRecommender:
        """Load a trained run.

        Args:
            run_dir: a directory written by ``grasp train`` (``train.json``), or one of its ``seed<S>`` directories.
            checkpoint: ``"best"`` (the early-stopping choice) or ``"last"``.
            device: where the model runs (default: CUDA when available, else the CPU).
            seed: which seed of a multi-seed run (required when it has several; a seed directory implies it).

        Raises:
            FileNotFoundError: a file of the run is missing. ValueError: the run's files do not belong together
            (another dataset, changed LLM tables, an unknown seed or checkpoint), one line naming the file.
        """
        if checkpoint not in ("best", "last"):
            raise ValueError(f"checkpoint must be 'best' or 'last', got {checkpoint!r}")
        run_dir, seed_dir = _seed_dir(Path(run_dir), seed)
        record = read_record(run_dir / _RUN_FILE, ("config", "pipeline_dir", "seeds"))
        saved = read_record(seed_dir / _SEED_FILE, ("config",))
        if saved is None:
            raise FileNotFoundError(f"{seed_dir / _SEED_FILE}: missing; is {seed_dir} a trained seed of {run_dir}?")
        config = TrainConfig.from_dict(saved["config"])
        pipeline_dir = Path(record["pipeline_dir"])
        dataset = load_dataset(pipeline_dir / "data")
        fingerprint = saved.get("dataset", {}).get("fingerprint")
        if fingerprint != dataset_fingerprint(dataset):
            raise ValueError(f"{seed_dir / _SEED_FILE}: trained on other data than {pipeline_dir / 'data'} holds now")
        tables = None
        if config.model != "id":
            if record.get("tables") != table_hashes(pipeline_dir):
                raise ValueError(f"{pipeline_dir / 'embeddings'}: the LLM tables changed since {run_dir} was trained")
            tables = Tables.load(pipeline_dir / "embeddings", num_users=dataset.num_users, num_items=dataset.num_items)
        device = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
        model = build_recommender(config, dataset, tables).to(device)
        load_weights(seed_dir / "checkpoints" / f"{checkpoint}.safetensors", model)
        return cls(model, dataset, config, seed_dir)

    @property
    def has_titles(self) -> bool:
        """Whether the dataset has item titles (then :class:`Recommendations` carries them)."""
        return self._titles is not None

    def user_index(self, user: object) -> int:
        """The internal id of an original user id (0 for a user the training data does not have)."""
        return self.dataset.user_ids.get(str(user), 0)

    def item_index(self, item: object, where: str) -> int:
        """The internal id of an original item id; an unknown one is an error naming it and ``where``."""
        index = self.dataset.item_ids.get(str(item))
        if index is None:
            raise ValueError(f"{where}: unknown item id {item!r} (not in the dataset the model was trained on)")
        return index

    @torch.no_grad()
    def recommend(
        self,
        users: Sequence[object],
        k: int = 10,
        *,
        exclude_seen: bool = True,
        histories: Sequence[Sequence[object] | None] | None = None,
        candidates: Sequence[object] | None = None,
    ) -> Recommendations:
        """The top ``k`` items for each user, as the next item after the user's history.

        Args:
            users: original user ids. Each must be a user of the training data unless ``histories`` gives
                its history. A user the training data does not have gets the model's padding user: zero LLM
                user vectors (``U = Ū = 0``) where the model reads them (``grasp``), so its items are scored
                from its history alone.
            k: items per user (at most the catalogue, or ``len(candidates)``).
            exclude_seen: leave out the items of the history.
            histories: per user, a history of original item ids (oldest first) that replaces the dataset's, or
                None to keep it. Unknown item ids are an error naming the id.
            candidates: original item ids to rank among (default: the whole catalogue).

        Returns:
            :class:`Recommendations` in original ids (and titles where the dataset has them).
        """
        users = [str(u) for u in users]
        if histories is not None and len(histories) != len(users):
            raise ValueError(f"histories: one per user expected ({len(users)}), got {len(histories)}")
        limit = len(candidates) if candidates is not None else self.dataset.num_items
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= limit:
            raise ValueError(f"k must be an int in 1..{limit}, got {k!r}")
        ids, seqs = [], []
        for n, user in enumerate(users):
            given = None if histories is None else histories[n]
            index = self.user_index(user)
            if given is None:
                if index == 0:
                    raise ValueError(f"users: unknown user id {user!r}; pass its history in histories to score it")
                seqs.append(self.dataset.sequences[index])
            else:
                seqs.append(np.array([self.item_index(i, f"histories[{n}]") for i in given], dtype=np.int64))
            ids.append(index)
        cand = None
        if candidates is not None:
            cand = torch.tensor([self.item_index(i, "candidates") for i in candidates], device=self.device)
        scores, items = self._rank(torch.tensor(ids, device=self.device), seqs, k, exclude_seen, cand)
        tokens = self.dataset.item_tokens
        out_items = [[tokens[i] for i in row if i > 0] for row in items.tolist()]
        out_scores = [[s for s, i in zip(srow, irow, strict=True) if i > 0] for srow, irow in
                      zip(scores.tolist(), items.tolist(), strict=True)]  # fmt: skip
        titles = None
        if self._titles is not None:
            titles = [[self._titles[i] for i in row if i > 0] for row in items.tolist()]
        return Recommendations(users, out_items, out_scores, titles)

    def _rank(
        self, users: torch.Tensor, seqs: list[np.ndarray], k: int, exclude_seen: bool, candidates: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(scores float32 [B, k], item ids [B, k]; 0 where fewer than k items remain)."""
        model = self.model
        window = torch.from_numpy(pad_left(seqs, self.config.max_len)).to(self.device)
        state = model.user_state(users, window)
        exclude = None
        if exclude_seen:
            width = max(1, max(len(s) for s in seqs))
            exclude = torch.from_numpy(_pad_right(seqs, width)).to(self.device)
        if candidates is None:
            return model.encoder.topk(users, state, k, exclude)
        cand = candidates.unsqueeze(0).expand(len(users), -1)
        scores = torch.bmm(model.encoder(users, cand), state.unsqueeze(-1)).squeeze(-1).float()
        if exclude is not None:
            scores = scores.masked_fill((cand.unsqueeze(2) == exclude.unsqueeze(1)).any(2), float("-inf"))
        order = torch.sort(scores, dim=1, descending=True, stable=True)
        top = order.values[:, :k]
        items = torch.where(torch.isneginf(top), 0, cand.gather(1, order.indices[:, :k]))
        return top, items


def _title(attributes: dict[str, str]) -> str | None:
    """An item's title: its ``title`` attribute, else ``name``, else the raw ``text`` column (RecBole)."""
    return next((attributes[key] for key in _TITLE_KEYS if attributes.get(key)), None)


def _pad_right(sequences: Sequence[np.ndarray], width: int) -> np.ndarray:
    """``int64 [len(sequences), width]``: each sequence's items, right-padded with 0."""
    out = np.zeros((len(sequences), width), dtype=np.int64)
    for row, seq in enumerate(sequences):
        out[row, : len(seq)] = seq
    return out


def _seed_dir(path: Path, seed: int | None) -> tuple[Path, Path]:
    """``(run directory, seed directory)`` of ``path`` (either of the two) and ``seed``."""
    if (path / _SEED_FILE).is_file() and (path.parent / _RUN_FILE).is_file():
        if seed is not None and path.name != f"seed{seed}":
            raise ValueError(f"{path}: a seed directory, but seed={seed} asks for {path.parent / f'seed{seed}'}")
        return path.parent, path
    record = read_record(path / _RUN_FILE, ("config", "pipeline_dir", "seeds"))
    if record is None:
        raise FileNotFoundError(f"{path / _RUN_FILE}: missing; is {path} a directory written by `grasp train`?")
    seeds = [int(s) for s in record["seeds"]]
    if seed is None:
        if len(seeds) > 1:
            raise ValueError(f"{path}: a run of seeds {', '.join(map(str, seeds))}; choose one (seed= / --seed)")
        seed = seeds[0]
    if seed not in seeds:
        raise ValueError(f"{path}: no seed {seed}; the run has seeds {', '.join(map(str, seeds))}")
    return path, path / f"seed{seed}"
