"""What a trained SASRec/GRU4Rec/BERT4Rec + GRASP model does with its LLM context.

For one or more trained ``--model grasp`` seed directories (``grasp train`` output) it prints:

* the test NDCG@10 / HR@10 of the model as trained, and with the enhancer switched off at evaluation (the
  ID embeddings alone): a model that ignores its LLM context loses nothing;
* how large the enhancer's contribution is next to the ID embedding, over the items of the test
  histories (median norm ratio ``|enhancer(u, i)| / |id(i)|``);
* the gate values of the three branches (self, similar, global) over the same positions: saturated at 0
  means a branch is shut, at 1 that it passes everything ungated;
* the training loss and the validation NDCG@10 at the best epoch, next to a plain ``id`` run when one is
  given (``--baseline``): a lower training loss with no validation gain points at over-fitting;
* on texts with controlled hallucination (``grasp generate --hallucination-rate p``), the mean gate of each
  branch at positions whose item and user descriptions are both right, whose item's is wrong, and whose
  user's is wrong: gates that tell wrong context apart are lower where it is wrong; and how well each gate
  ranks right context above wrong (the AUC: the chance that a position with both descriptions right has the
  higher gate than one with either wrong; 0.5 is blind), next to the same AUC of the cosine of the frozen
  LLM user and item vectors (what the descriptions alone tell apart, before any training).

    python benchmarks/diagnose_grasp.py runs/ml-100k/sasrec-grasp/seed42 --baseline runs/ml-100k/sasrec-id/seed42
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _timing import markdown_table  # noqa: E402

from grasp.data.store import load_dataset  # noqa: E402
from grasp.ops._holistic_attention_reference import gate_logits  # noqa: E402
from grasp.pipeline import Tables  # noqa: E402
from grasp.training.batches import history_matrix  # noqa: E402
from grasp.training.checkpoint import load_weights  # noqa: E402
from grasp.training.config import TrainConfig  # noqa: E402
from grasp.training.evaluate import evaluate_split  # noqa: E402
from grasp.training.trainer import build_recommender  # noqa: E402


def best_epoch_row(seed_dir: Path) -> dict[str, str]:
    """The epochs.csv row of the best validation epoch."""
    with open(seed_dir / "epochs.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    return max(rows, key=lambda r: float(r["valid_NDCG@10"]))


def diagnose(seed_dir: Path, pipeline_dir: Path) -> dict[str, float]:
    config = TrainConfig.from_dict(json.loads((seed_dir / "config.json").read_text())["config"])
    dataset = load_dataset(pipeline_dir / "data")
    tables = Tables.load(pipeline_dir / "embeddings", num_users=dataset.num_users, num_items=dataset.num_items)
    model = build_recommender(config, dataset, tables)
    load_weights(seed_dir / "checkpoints" / "best.safetensors", model)
    model.eval()
    with np.load(seed_dir / "eval_negatives.npz") as f:
        negatives = f["negatives"]
    kwargs = {"max_len": config.max_len, "negatives": negatives, "batch_size": 256}
    with_llm, _ = evaluate_split(model, dataset, "test", **kwargs)

    encoder, d = model.encoder, model.encoder.enhancer.d
    histories = torch.from_numpy(history_matrix(dataset, "test", config.max_len))[1:]
    users = torch.arange(1, dataset.num_users + 1)
    with torch.no_grad():
        real = histories > 0
        enhancement = encoder.enhance(users, histories)[real]
        identity = model.encoder.embedding(histories)[real]
        ratio = (enhancement.norm(dim=-1) / identity.norm(dim=-1).clamp(min=1e-12)).median().item()
        u, u_sim = encoder.adapt_users(users)
        i, i_sim = encoder.adapt_items(histories)
        s1 = (i * u.unsqueeze(1)).sum(-1)[real]
        s2 = (i_sim * u_sim.unsqueeze(1)).sum(-1)[real]
        gates = torch.sigmoid(gate_logits(s1, s2, d)).T
        llm_cosine = torch.cosine_similarity(encoder.user[users].unsqueeze(1), encoder.item[histories], dim=-1)[real]
    item_wrong = torch.from_numpy(np.isin(histories.numpy(), swapped(pipeline_dir, "items")))[real]
    user_wrong = torch.from_numpy(np.isin(users.numpy(), swapped(pipeline_dir, "users")))
    user_wrong = user_wrong.unsqueeze(1).expand_as(histories)[real]

    encoder.enhance = lambda users, items: torch.zeros(*items.shape, d)  # the ID embeddings alone
    try:
        without, _ = evaluate_split(model, dataset, "test", **kwargs)
    finally:
        del encoder.enhance
    best = best_epoch_row(seed_dir)
    result = {
        "NDCG@10": with_llm["overall"]["NDCG@10"],
        "NDCG@10 without enhancer": without["overall"]["NDCG@10"],
        "tail-item NDCG@10": with_llm["tail_item"]["NDCG@10"],
        "tail-item NDCG@10 without": without["tail_item"]["NDCG@10"],
        "median ‖enh‖ / ‖id‖": ratio,
        "best epoch": float(best["epoch"]),
        "train loss at best": float(best["loss"]),
        "valid NDCG@10 at best": float(best["valid_NDCG@10"]),
    }
    for name, values in zip(("self", "similar", "global"), gates, strict=True):
        result[f"gate {name} mean"] = values.mean().item()
        result[f"gate {name} <0.1 / >0.9"] = (
            f"{(values < 0.1).float().mean().item():.0%} / {(values > 0.9).float().mean().item():.0%}"  # noqa: E501
        )
    right = ~item_wrong & ~user_wrong
    for name, values in zip(("self", "similar", "global"), gates, strict=True):
        means = [f"{values[m].mean().item():.3f}" if m.any() else "–" for m in (right, item_wrong, user_wrong)]
        result[f"gate {name}: right / item wrong / user wrong"] = " / ".join(means)
    wrong = item_wrong | user_wrong
    names = ("LLM cosine", "gate self", "gate similar", "gate global")
    for name, values in zip(names, (llm_cosine, *gates), strict=True):
        result[f"AUC right > wrong: {name}"] = auc(values[right], values[wrong]) if wrong.any() else "–"
    return result


def auc(higher: torch.Tensor, lower: torch.Tensor) -> float:
    """P(a > b) + P(a = b) / 2 for a drawn from ``higher`` and b from ``lower`` (Mann-Whitney), in O(n log n)."""
    lower = lower.double().sort().values
    higher = higher.double()
    below = torch.searchsorted(lower, higher, right=False)
    at_or_below = torch.searchsorted(lower, higher, right=True)
    return ((below + at_or_below).double() / 2).mean().item() / len(lower)


def swapped(pipeline_dir: Path, side: str) -> np.ndarray:
    """Ids of the items or users whose description ``--hallucination-rate`` swapped (empty without it)."""
    path = pipeline_dir / "texts" / f"{side}.json"
    hallucinated = json.loads(path.read_text()).get("hallucinated", {}) if path.exists() else {}
    return np.array(sorted(int(k) for k in hallucinated), dtype=np.int64)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("seed_dirs", nargs="+", type=Path, help="RUN_DIR/seed<S> of --model grasp runs")
    parser.add_argument("--pipeline-dir", type=Path, help="the stages' run directory (default: from train.json)")
    parser.add_argument("--baseline", nargs="*", type=Path, default=[], help="RUN_DIR/seed<S> of id runs")
    args = parser.parse_args()
    rows = []
    for seed_dir in args.seed_dirs:
        pipeline = args.pipeline_dir or Path(json.loads((seed_dir.parent / "train.json").read_text())["pipeline_dir"])
        result = diagnose(seed_dir, pipeline)
        rows.append([str(seed_dir)] + [f"{v:.3f}" if isinstance(v, float) else v for v in result.values()])
    print(markdown_table(["run"] + list(result), rows))
    if args.baseline:
        print()
        base = [[str(d)] + [best_epoch_row(d)[k] for k in ("epoch", "loss", "valid_NDCG@10")] for d in args.baseline]
        print(markdown_table(["baseline run", "best epoch", "train loss at best", "valid NDCG@10 at best"], base))


if __name__ == "__main__":
    main()
