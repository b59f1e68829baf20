"""Benchmark of grasp.ops.score_topk: every user's top-k items of a catalogue, fused vs score-then-topk.

B user states, M items, widths d = c = e, k items per user, for the plain score <query, table> and the gated
one (the GRASP enhancer folded, docs/design.md section 11). The inputs are drawn as the enhancer's layers:
an item table, adapted user and item vectors, the first layer Linear(4c, e) and the last Linear(e, d), and
the folded inputs (projected values, out_query = W2^T state) are made from them, so every implementation
ranks the same scores. Side by side in one process, on the same inputs:

- ``score+topk``: the scores of a chunk of items with PyTorch ops (the reference's ``block_scores``), torch.topk
  per chunk, merged: what one writes without the op; the baseline of the ratios;
- ``score_all+topk`` (gated only): what the GRASP model's ``GraspEncoder.score_all`` computes, the enhancer's
  layers unfolded: holistic_attention_projected on every (user, item) pair of a chunk, GELU, the last linear
  layer and a batched dot with the state, into the whole [B, M] score matrix, then torch.topk. On the
  2-core CPU it takes about 1.2 s per 1,000 items at B = 256, so it runs up to ``--unfolded-max-m`` items
  (default 100,000);
- ``reference``: the op's reference backend (chunked, exact ties);
- ``cpu`` / ``cuda`` / ``triton``: the op (Triton only on a GPU: the interpreter is not a timing target).

A call takes seconds, so each is timed on its own (at least ``--reps``, default 3, after a warm-up on 2048
items). Besides the median time the table shows the peak memory above the inputs during the first timed
call (CPU: the process's peak resident set, reset through /proc/self/clear_refs after glibc's malloc_trim
has returned free heap memory; GPU: torch's peak allocation) and the rows whose top-k set differs from the
first fused backend's. The options and the run are those of every op benchmark (benchmarks/_harness.py).

    python benchmarks/benchmark_score_topk.py                          # B = 256, M = 100k and 1M, d = 64, k = 10
    python benchmarks/benchmark_score_topk.py --shape 256,100000 --form gated --impl cpu --impl score+topk
    python benchmarks/benchmark_score_topk.py --sizes gpu --dtype bfloat16
"""

from __future__ import annotations

import ctypes
import math
import re
import sys
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _harness import DTYPES, Benchmark, Case, choose, dtypes, parser, pick_device, shapes, timed_backends  # noqa: E402

import grasp  # noqa: E402
from grasp.ops._score_topk_reference import Gated, block_scores  # noqa: E402
from grasp.ops.holistic_attention_projected import projected_values  # noqa: E402
from grasp.ops.score_topk import backend_reason  # noqa: E402

#: (B users, M items[, d = c = e]).
SIZES = {"default": [(256, 100_000, 64), (256, 1_000_000, 64)], "gpu": [(256, 1_000_000, 64), (4096, 1_000_000, 64)]}
FORMS = ("plain", "gated")
IMPLS = ("score+topk", "score_all+topk", "reference", "cpu", "cuda", "triton")
#: Elements of one chunk's temporaries in the unfused implementations ([B, chunk] scores, [B, chunk, e] GELU
#: inputs): the model's score_all chunk (grasp.models.item_encoders._CHUNK_ELEMENTS).
CHUNK_ELEMENTS = 1 << 22


def merge_topk(best: tuple[torch.Tensor, torch.Tensor] | None, scores: torch.Tensor, start: int,
               k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The running top-k merged with a chunk's scores (columns from item ``start``), by torch.topk."""
    values, index = scores.topk(min(k, scores.shape[1]), dim=1)
    index += start
    if best is not None:
        values, pos = torch.cat([best[0], values], 1).topk(k, dim=1)
        index = torch.cat([best[1], index], 1).gather(1, pos)
    return values, index


def score_then_topk(inputs: dict, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Chunks of scores from the reference's ``block_scores`` (PyTorch ops), torch.topk per chunk, merged."""
    query, table, gated = inputs["query"], inputs["table"], inputs["gated"]
    B, M = query.shape[0], table.shape[0]
    chunk = max(k, CHUNK_ELEMENTS // (B * (1 if gated is None else gated.values.shape[2])))
    best = None
    for lo in range(0, M, chunk):
        best = merge_topk(best, block_scores(query, table, gated, slice(None), slice(lo, lo + chunk)), lo, k)
    return best


def score_all_then_topk(inputs: dict, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """GraspEncoder.score_all's fused path on these inputs, then torch.topk: [B, M] scores, the enhancer's
    first layer by holistic_attention_projected on every (user, item) pair of a chunk, GELU, the last layer,
    a batched dot with the state."""
    state, table, (u, u_sim, item, item_sim), (w1, b1, w2, b2) = (inputs[key] for key in ("query", "table", "adapted",
                                                                                         "layers"))
    B, M, d = state.shape[0], table.shape[0], state.shape[1]
    scores = state @ table.T
    chunk = max(1, CHUNK_ELEMENTS // (B * d))
    for lo in range(0, M, chunk):
        i, i_sim = item[lo : lo + chunk], item_sim[lo : lo + chunk]
        width = len(i)
        rows = torch.arange(B, device=state.device).repeat_interleave(width)
        cols = torch.arange(width, device=state.device).repeat(B)
        hidden = grasp.ops.holistic_attention_projected(u, u_sim, i, i_sim, w1, b1, user_index=rows, item_index=cols)
        rep = F.linear(F.gelu(hidden), w2, b2).view(B, width, d)
        scores[:, lo : lo + width] += torch.bmm(rep, state.unsqueeze(-1)).squeeze(-1)
    return scores.topk(k, dim=1)


def fused(inputs: dict, k: int, *, backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    return grasp.ops.score_topk(inputs["query"], inputs["table"], k, gated=inputs["gated"], backend=backend)


def implementations(device: str) -> dict[str, Callable]:
    """Name -> fn(inputs, k) returning (scores, indices) [B, k]."""
    impls: dict[str, Callable] = {
        "score+topk": score_then_topk,
        "score_all+topk": score_all_then_topk,
        "reference": partial(fused, backend="reference"),
    }
    impls.update({backend: partial(fused, backend=backend) for backend in timed_backends(device, backend_reason)})
    return impls


def make_inputs(B: int, M: int, width: int, form: str, dtype: torch.dtype, device: str) -> dict:
    """The enhancer's tensors (item table, adapted vectors, the two layers) and the op's folded inputs."""
    gen = torch.Generator(device=device).manual_seed(0)

    def draw(*shape, scale=1.0):
        return (torch.randn(shape, device=device, generator=gen) * scale).to(dtype)

    d = c = e = width
    state, table = draw(B, d), draw(M, d, scale=d**-0.5)
    inputs = {"query": state, "table": table, "gated": None}
    if form == "gated":
        adapted = (draw(B, c), draw(B, c), draw(M, c), draw(M, c))
        layers = (draw(e, 4 * c, scale=(4 * c) ** -0.5), draw(e, scale=0.1), draw(d, e, scale=e**-0.5),
                  draw(d, scale=0.1))
        values = projected_values(adapted[2], adapted[3], layers[0])
        inputs.update(adapted=adapted, layers=layers,
                      gated=Gated(*adapted, values, layers[1], state @ layers[2]))  # out_query = W2^T state
    return inputs


def _status_kib(field: str) -> int:
    return int(re.search(rf"^{field}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.M).group(1))


def peak_memory_mib(fn: Callable[[], object], device: str) -> float:
    """Peak memory above the start during one call of ``fn`` in MiB (NaN where it cannot be measured)."""
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        start = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - start) / 2**20
    try:
        # Free heap memory goes back to the OS first (glibc keeps freed blocks mapped, and a call reusing them
        # would not raise the resident set); then the peak resident set (VmHWM) is reset to the current one.
        ctypes.CDLL(None).malloc_trim(0)
        Path("/proc/self/clear_refs").write_text("5")
        start = _status_kib("VmRSS")
    except (OSError, AttributeError):
        return math.nan
    fn()
    return max(0, _status_kib("VmHWM") - start) / 1024


class ScoreTopk(Benchmark):
    name = title = "score_topk"
    ratio_column = "speedup_vs_score_topk"

    def __init__(self, device: str, impls: dict[str, Callable], k: int, reps: int, unfolded_max_m: int) -> None:
        self.k, self.unfolded_max_m = k, unfolded_max_m
        self.timing = dict(min_reps=reps, warmup=0, wall_clock=True)
        fused_names = [n for n in impls if n in ("cpu", "cuda", "triton")]
        self.truth = fused_names[0] if fused_names else "reference"
        super().__init__(device, impls, baseline="score+topk",
                         note=f"k={k}; top-k sets compared with {self.truth}; peak memory above the inputs")

    def setup(self, case: Case):
        B, M, width = case.shape
        return {"inputs": make_inputs(B, M, width, case.columns["form"], case.dtype, self.device), "results": {},
                "peak": {}}

    def passes(self, state, name, fn):
        inputs, k = state["inputs"], self.k
        M = inputs["table"].shape[0]
        if name == "score_all+topk" and (inputs["gated"] is None or M > self.unfolded_max_m):
            return {}  # the model's path is the gated form's; past --unfolded-max-m it takes too long
        warm = {key: value for key, value in inputs.items()}
        few = min(M, 2048)
        warm["table"] = inputs["table"][:few]
        if inputs["gated"] is not None:
            g = inputs["gated"]
            warm["gated"] = g._replace(item=g.item[:few], item_sim=g.item_sim[:few], values=g.values[:few])
            warm["adapted"] = (*inputs["adapted"][:2], *(t[:few] for t in inputs["adapted"][2:]))
        fn(warm, min(k, few))  # warm-up: threads, allocator, kernels

        def call():
            state["results"][name] = fn(inputs, k)

        def first_call_measured():  # the first timed call also measures the peak memory (no extra call)
            if name in state["peak"]:
                return call()
            state["peak"][name] = peak_memory_mib(call, self.device)

        return {"": first_call_measured}

    def columns(self, case, state, rows):
        truth = state["results"].get(self.truth)
        for r in rows:
            idx = state["results"][r.impl][1]
            differing = "-" if truth is None else str(
                int((idx.cpu().sort(1).values != truth[1].cpu().sort(1).values).any(1).sum()))
            peak = state["peak"][r.impl]
            r.cells = {"peak MiB": "-" if math.isnan(peak) else f"{peak:.0f}", "rows with another set": differing}
            r.fields = {"peak_mib": f"{peak:.1f}", "rows_differing": differing, "truth": self.truth}


def main(argv: list[str] | None = None) -> int:
    p = parser(__doc__, impls=IMPLS, shape="B,M[,d]", sizes=SIZES)
    p.add_argument("--form", action="append", choices=FORMS, help="repeatable (default: both)")
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--reps", type=int, default=3, help="timed calls per measurement, at least (default 3)")
    p.add_argument("--unfolded-max-m", type=int, default=100_000,
                   help="run score_all+topk only up to this many items (default 100,000)")
    args = p.parse_args(argv)
    device = pick_device(args)
    impls = choose(implementations(device), args.impl, device, p)
    cases = []
    for dtype in dtypes(args, device):
        for B, M, *width in shapes(args, SIZES, device, p):
            width = width[0] if width else 64
            for form in args.form or FORMS:
                cases.append(Case((B, M, width), DTYPES[dtype],
                                  dict(form=form, dtype=dtype, B=B, M=M, d=width, k=args.k),
                                  title=f"{form} B={B} M={M} d=c=e={width} k={args.k} {dtype}"))
    return ScoreTopk(device, impls, args.k, args.reps, args.unfolded_max_m).run(cases, args)


if __name__ == "__main__":
    sys.exit(main())
