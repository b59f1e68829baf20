"""grasp.ops.topk_neighbor_mean on every backend that runs here, against float64 brute force."""

from __future__ import annotations

import importlib
import json
import os
import socket
import subprocess
import sys
import textwrap

import pytest
import torch
from _kernel_launches import CurrentDevice, record_launches
from conftest import DEVICES

import grasp

#: The dispatch module (the package attribute of the same name is the public function).
op_module = importlib.import_module("grasp.ops.topk_neighbor_mean")

TOL = 1e-5  # float32 dot products of unit rows


def runnable(device: str) -> list[str]:
    return [b for b in ("reference", "cpu", "cuda", "triton", "faiss") if not op_module.backend_reason(b, device)]


BACKEND_CASES = [(dev, b) for dev in DEVICES for b in runnable(dev)]
INTERPRETED = {("cpu", "triton")}  # the Triton interpreter is slow: smaller data


def brute_force(x: torch.Tensor, k: int, metric: str = "cosine", exclude_self: bool = True):
    """float64 similarities, stable descending sort (ties -> smaller index)."""
    x64 = x.double().cpu()
    if metric == "cosine":
        x64 = x64 / x64.norm(dim=1, keepdim=True)
    sims = x64 @ x64.T
    if exclude_self:
        sims.fill_diagonal_(float("-inf"))
    vals, idx = sims.sort(dim=1, descending=True, stable=True)
    return vals, idx, sims


def check_against_brute_force(x, k, mean, idx, scores, metric="cosine", exclude_self=True, exact_ties=True):
    vals, truth_idx, sims = brute_force(x, k, metric, exclude_self)
    n = x.shape[0]
    idx, scores = idx.cpu(), scores.cpu()
    assert idx.dtype == torch.int64 and scores.dtype == torch.float32
    assert idx.shape == scores.shape == (n, k)
    assert ((idx >= 0) & (idx < n)).all()
    if exclude_self:
        assert not (idx == torch.arange(n).unsqueeze(1)).any(), "a row selected itself"
    # The selected similarity values are the true top-k values, in order.
    torch.testing.assert_close(scores.double(), vals[:, :k], atol=TOL, rtol=0)
    # The reported scores are the similarities of the reported indices.
    torch.testing.assert_close(sims.gather(1, idx), scores.double(), atol=TOL, rtol=0)
    # Indices equal where the value is separated from its neighbours (no near tie).
    padded = torch.cat([vals[:, :1] + 1, vals[:, : k + 1] if k < vals.shape[1] else torch.cat(
        [vals, vals.new_full((n, 1), float("-inf"))], 1)], dim=1)
    separated = ((padded[:, :-2] - padded[:, 1:-1]) > 10 * TOL) & ((padded[:, 1:-1] - padded[:, 2:]) > 10 * TOL)
    assert (idx[separated] == truth_idx[:, :k][separated]).all(), "indices differ where there is no tie"
    if exact_ties:
        # Among exactly equal similarities the smaller index comes first.
        same = scores[:, 1:] == scores[:, :-1]
        assert (idx[:, 1:][same] > idx[:, :-1][same]).all(), "equal scores not ordered by index"
    # The mean is over the selected original rows.
    expected = x.double().cpu()[idx].mean(dim=1)
    tol = {torch.float16: 2e-3, torch.bfloat16: 1e-2}.get(x.dtype, 1e-5)
    torch.testing.assert_close(mean.double().cpu(), expected, atol=tol, rtol=tol)
    assert mean.dtype == x.dtype and mean.device == x.device


def sizes_for(device, backend):
    if (device, backend) in INTERPRETED:
        return [(2, 3), (33, 17), (130, 17)]
    return [(2, 3), (33, 17), (1000, 3), (1000, 17), (1000, 384)]


@pytest.mark.parametrize("device,backend", BACKEND_CASES)
def test_random_data_every_k(device, backend):
    for n, D in sizes_for(device, backend):
        x = torch.randn(n, D, device=device)
        for k in sorted({1, min(10, n - 1), n - 1}):
            mean, idx, scores = grasp.ops.topk_neighbor_mean(x, k, return_indices=True, backend=backend)
            check_against_brute_force(x, k, mean, idx, scores, exact_ties=backend != "faiss")


@pytest.mark.parametrize("device,backend", BACKEND_CASES)
def test_exact_and_cosine_ties(device, backend):
    n, D = (60, 17) if (device, backend) in INTERPRETED else (400, 17)
    x = torch.randn(n, D, device=device)
    x[10] = x[3]  # duplicates: exact ties
    x[20] = x[3]
    x[30] = 2.0 * x[5]  # scalar multiples: equal cosine
    x[40] = 0.5 * x[5]
    for k in (1, 3, 7):
        mean, idx, scores = grasp.ops.topk_neighbor_mean(x, k, return_indices=True, backend=backend)
        check_against_brute_force(x, k, mean, idx, scores, exact_ties=backend != "faiss")
        if backend != "faiss":
            top = min(k, 2)
            assert idx[3, :top].tolist() == [10, 20][:top] and idx[10, :top].tolist() == [3, 20][:top]
            assert idx[5, :top].tolist() == [30, 40][:top]


@pytest.mark.parametrize("device,backend", BACKEND_CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64], ids=str)
def test_dtypes_and_inner_product(device, backend, dtype):
    n = 60 if (device, backend) in INTERPRETED else 300
    x = torch.randn(n, 24, device=device).to(dtype)
    for metric in ("cosine", "ip"):
        mean, idx, scores = grasp.ops.topk_neighbor_mean(x, 5, metric=metric, return_indices=True, backend=backend)
        check_against_brute_force(x, 5, mean, idx, scores, metric=metric, exact_ties=False)
        assert mean.dtype == dtype


@pytest.mark.parametrize("device,backend", BACKEND_CASES)
def test_single_row_without_self_exclusion(device, backend):
    x = torch.randn(1, 5, device=device)
    mean, idx, _ = grasp.ops.topk_neighbor_mean(x, 1, exclude_self=False, return_indices=True, backend=backend)
    assert idx.tolist() == [[0]]
    torch.testing.assert_close(mean, x)


@pytest.mark.parametrize("device,backend", BACKEND_CASES)
def test_query_slices_and_blocks_match_the_whole(device, backend):
    n = 90 if (device, backend) in INTERPRETED else 500
    x = torch.randn(n, 16, device=device)
    whole_mean, whole_idx, _ = grasp.ops.topk_neighbor_mean(x, 4, return_indices=True, backend=backend)
    part_mean, part_idx, _ = grasp.ops.topk_neighbor_mean(
        x, 4, queries=x[37:71], query_start=37, exclude_self=True, return_indices=True, backend=backend
    )
    assert torch.equal(part_idx, whole_idx[37:71])
    torch.testing.assert_close(part_mean, whole_mean[37:71])
    seen = []
    blocked = grasp.ops.topk_neighbor_mean(x, 4, backend=backend, block_size=7,
                                           progress=lambda done, total: seen.append((done, total)))
    torch.testing.assert_close(blocked, whole_mean)
    assert seen[-1] == (n, n) and len(seen) == -(-n // 7)


@pytest.mark.parametrize("device,backend", BACKEND_CASES)
def test_non_contiguous_database(device, backend):
    x = torch.randn(24, 70, device=device).t()  # [70, 24] view with strides (1, 70)
    assert not x.is_contiguous()
    for metric in ("cosine", "ip"):
        mean, idx, scores = grasp.ops.topk_neighbor_mean(x, 4, metric=metric, return_indices=True, backend=backend)
        check_against_brute_force(x, 4, mean, idx, scores, metric=metric, exact_ties=False)


def test_rows_of_extreme_magnitude_under_cosine():
    x = torch.randn(50, 8)
    x[3] *= 1e20  # its float32 squared norm would overflow
    x[4] *= 1e-25  # and this one would underflow to a false "zero norm"
    mean, idx, scores = grasp.ops.topk_neighbor_mean(x, 3, return_indices=True, backend="reference")
    check_against_brute_force(x, 3, mean, idx, scores, exact_ties=False)


def test_external_queries_default_to_no_self_exclusion():
    x, queries = torch.randn(200, 8), torch.randn(13, 8)
    mean, idx, scores = grasp.ops.topk_neighbor_mean(x, 6, queries=queries, return_indices=True)
    qn, xn = queries / queries.norm(dim=1, keepdim=True), x / x.norm(dim=1, keepdim=True)
    truth, truth_idx = (qn.double() @ xn.double().T).sort(dim=1, descending=True, stable=True)
    torch.testing.assert_close(scores.double(), truth[:, :6], atol=TOL, rtol=0)
    torch.testing.assert_close(mean, x[idx].mean(1))


def test_fast_search_proof_and_redo_on_cpu():
    """The fast path's candidate pass, rescoring, proof and float32 re-search, driven on CPU with the
    reference search over bfloat16 copies (what a GPU backend does with its bf16 kernel)."""
    torch.manual_seed(3)
    centers = torch.randn(10, 48)
    # Tight clusters larger than the candidate list: scores within bfloat16 error, so proofs fail.
    x = centers.repeat_interleave(150, 0) + 1e-3 * torch.randn(1500, 48)
    x[7] = x[11]  # and an exact tie
    db32 = x / x.norm(dim=1, keepdim=True)
    norms = torch.linalg.vector_norm(db32, dim=1, dtype=torch.float64)
    search = op_module._search_fn("reference")
    for k in (1, 10):
        want_s, want_i = search(db32, db32, k, 0, True)
        s, i, redone = op_module._fast_search(search, db32, db32, db32.bfloat16(), k, 0, True, norms, norms.max())
        assert redone > 0, "near-tie data must make some proofs fail"
        torch.testing.assert_close(s, want_s, atol=TOL, rtol=0)
        agree = (i.unsqueeze(2) == want_i.unsqueeze(1)).any(2).float().mean().item()
        assert agree > 0.999, f"fast/highest neighbour agreement {agree}"
        # query_start: a slice of the rows searched on its own excludes the right self rows
        s2, i2, _ = op_module._fast_search(search, db32[300:420], db32, db32.bfloat16(), k, 300, True, norms[300:420],
                                     norms.max())
        assert not (i2 == torch.arange(300, 420).unsqueeze(1)).any()
        torch.testing.assert_close(s2, want_s[300:420], atol=TOL, rtol=0)


def test_fast_precision_equals_highest():
    device = "cuda" if torch.cuda.is_available() else "cpu"
    x = torch.randn(3000, 64, device=device)
    for backend in runnable(device):
        if (device, backend) in INTERPRETED:
            continue
        hi = grasp.ops.topk_neighbor_mean(x, 10, return_indices=True, backend=backend)
        fast = grasp.ops.topk_neighbor_mean(x, 10, return_indices=True, backend=backend, precision="fast")
        recall = (fast[1].unsqueeze(2) == hi[1].unsqueeze(1)).any(2).float().mean().item()
        assert recall == 1.0, f"{backend}: fast recall@10 {recall}"
        torch.testing.assert_close(fast[2], hi[2], atol=TOL, rtol=0)


# ---- errors, not garbage ----

@pytest.mark.parametrize(
    "call,exc,pattern",
    [
        (lambda x: grasp.ops.topk_neighbor_mean(x, 0), ValueError, r"k must be >= 1, got 0"),
        (lambda x: grasp.ops.topk_neighbor_mean(x, 10), ValueError, r"k=10 > n - 1 = 9"),
        (lambda x: grasp.ops.topk_neighbor_mean(x, 11, exclude_self=False), ValueError, r"k=11 > n = 10"),
        (lambda x: grasp.ops.topk_neighbor_mean(x, 2.0), TypeError, r"k must be an int"),
        (lambda x: grasp.ops.topk_neighbor_mean(x, 2, queries=torch.randn(3, 5)), ValueError, r"D mismatch"),
        (lambda x: grasp.ops.topk_neighbor_mean(x.long(), 2), TypeError, r"floating-point tensor, got torch.int64"),
        (lambda x: grasp.ops.topk_neighbor_mean(x[:0], 1), ValueError, r"x is empty"),
        (lambda x: grasp.ops.topk_neighbor_mean(x[:, :0], 1), ValueError, r"x is empty"),
        (lambda x: grasp.ops.topk_neighbor_mean(x[0], 1), ValueError, r"x must be \[n, D\]"),
        (lambda x: grasp.ops.topk_neighbor_mean(x, 2, metric="l2"), ValueError, r"metric must be"),
        (lambda x: grasp.ops.topk_neighbor_mean(x, 2, precision="low"), ValueError, r"precision must be"),
        (lambda x: grasp.ops.topk_neighbor_mean(x, 2, queries=x[:8], query_start=5, exclude_self=True), ValueError,
         r"query_start \+ q = 13 > n = 10"),
        (lambda x: grasp.ops.topk_neighbor_mean(x, 2, backend="tpu"), ValueError, r"unknown backend 'tpu'"),
        (lambda x: grasp.ops.topk_neighbor_mean(x, 2, query_start=5), ValueError, r"query_start \+ q = 15 > n = 10"),
        (lambda x: grasp.ops.topk_neighbor_mean(x, 2, block_size=-4), ValueError, r"block_size must be an int >= 1"),
    ],
    ids=["k0", "k_gt_n-1", "k_gt_n", "k_float", "D_mismatch", "int", "empty_n", "empty_D", "rank", "metric",
         "precision", "query_range", "backend", "query_start_self", "block_size"],
)
def test_bad_arguments(call, exc, pattern):
    with pytest.raises(exc, match=pattern):
        call(torch.randn(10, 4))


def test_zero_norm_rows_under_cosine():
    x = torch.randn(10, 4)
    x[6] = 0
    with pytest.raises(ValueError, match=r"x row 6 has zero norm"):
        grasp.ops.topk_neighbor_mean(x, 2)
    grasp.ops.topk_neighbor_mean(x, 2, metric="ip")  # inner product is defined there


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_values(bad):
    x = torch.randn(10, 4)
    x[7, 2] = bad
    with pytest.raises(ValueError, match=r"x has NaN or Inf values \(first in row 7"):
        grasp.ops.topk_neighbor_mean(x, 2)
    with pytest.raises(ValueError, match=r"queries has NaN or Inf"):
        grasp.ops.topk_neighbor_mean(torch.randn(10, 4), 2, queries=x, exclude_self=False)


# ---- memory: the q x n similarity matrix never exists ----

MEMORY_SCRIPT = textwrap.dedent("""
    import json, resource, sys, torch, grasp
    n, q, backend = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
    torch.manual_seed(0)
    x = torch.randn(n, 64)
    queries = x[:q]
    grasp.ops.topk_neighbor_mean(x[:1000], 10, backend=backend)  # warm up allocators and kernels
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    grasp.ops.topk_neighbor_mean(x, 10, queries=queries, exclude_self=True, backend=backend)
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"growth_kib": after - before}))
""")


@pytest.mark.slow
@pytest.mark.parametrize("backend", [b for b in ("cpu", "reference") if not op_module.backend_reason(b, "cpu")])
def test_peak_memory_far_below_n_squared(backend, tmp_path):
    n = 200_000
    full = os.environ.get("GRASP_SLOW_TESTS") == "full"
    q = n if full else 10_000  # bounded form: 10k queries x 200k rows would still be 8 GB as one matrix
    script = tmp_path / "mem.py"
    script.write_text(MEMORY_SCRIPT)
    done = subprocess.run([sys.executable, str(script), str(n), str(q), backend], capture_output=True, text=True,
                          check=True, timeout=1800)
    growth_bytes = json.loads(done.stdout.strip().splitlines()[-1])["growth_kib"] * 1024
    q_times_n = 4 * q * n
    assert growth_bytes < 1.5 * 2**30, f"peak RSS grew by {growth_bytes / 2**30:.2f} GiB"
    assert growth_bytes < q_times_n / 10, "memory grows like the q x n similarity matrix"


# ---- sharding over torch.distributed ranks (gloo, 2 processes) ----

DIST_SCRIPT = textwrap.dedent("""
    import json, os, sys, torch, torch.distributed as dist, grasp
    dist.init_process_group("gloo", rank=int(sys.argv[1]), world_size=2)
    torch.manual_seed(0)
    x = torch.randn(301, 12)
    mean, idx, scores = grasp.ops.topk_neighbor_mean_distributed(x, 5, return_indices=True, backend=sys.argv[2])
    single = grasp.ops.topk_neighbor_mean(x, 5, return_indices=True, backend=sys.argv[2])
    ok = torch.equal(idx, single[1]) and torch.equal(scores, single[2]) and torch.allclose(mean, single[0])
    print(json.dumps({"rank": dist.get_rank(), "ok": ok, "rows": mean.shape[0]}))
    dist.destroy_process_group()
""")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("backend", [b for b in ("cpu", "reference") if not op_module.backend_reason(b, "cpu")])
def test_two_process_gloo_matches_single_process(backend, tmp_path):
    script = tmp_path / "dist.py"
    script.write_text(DIST_SCRIPT)
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port())}
    procs = [subprocess.Popen([sys.executable, str(script), str(rank), backend], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for rank in range(2)]
    results = []
    for p in procs:
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0, err
        results.append(json.loads(out.strip().splitlines()[-1]))
    assert sorted(r["rank"] for r in results) == [0, 1]
    assert all(r["ok"] and r["rows"] == 301 for r in results)


# ---- the Triton search split over database slices ----

TRITON_CPU = not op_module.backend_reason("triton", "cpu")
needs_triton = pytest.mark.skipif(not TRITON_CPU, reason=op_module.backend_reason("triton", "cpu") or "")

# (q, n, D, k, exclude_self, slices): odd slice lengths, k larger than a slice's rows, k near n, one
# row per slice, several query tiles, and one slice (no merge).
SLICE_CASES = [
    (1, 1, 1, 1, False, 1),
    (5, 40, 17, 3, False, 7),
    (20, 50, 8, 20, True, 9),
    (7, 7, 3, 6, True, 4),
    (9, 9, 5, 9, False, 9),
    (33, 130, 24, 17, True, 3),
    (40, 200, 33, 1, True, 1),
]


def assert_search_matches_float64(scores, idx, queries, db, k, start, exclude_self):
    """The raw search contract against float64 products: top values, their indices, ties, no self."""
    q, n = queries.shape[0], db.shape[0]
    sims = queries.double() @ db.double().T
    rows = torch.arange(q)
    if exclude_self:
        sims[rows, rows + start] = float("-inf")
    vals, truth = sims.sort(dim=1, descending=True, stable=True)
    assert idx.shape == scores.shape == (q, k) and idx.dtype == torch.int64 and scores.dtype == torch.float32
    assert ((idx >= 0) & (idx < n)).all()
    assert (idx.sort(dim=1).values.diff(dim=1) > 0).all(), "a neighbour listed twice"
    if exclude_self:
        assert not (idx == (rows + start).unsqueeze(1)).any(), "a row selected itself"
    torch.testing.assert_close(scores.double(), vals[:, :k], atol=TOL, rtol=0)
    torch.testing.assert_close(sims.gather(1, idx), scores.double(), atol=TOL, rtol=0)
    ext = torch.cat([vals[:, :1] + 1, vals, vals.new_full((q, 1), float("-inf"))], dim=1)[:, : k + 2]
    separated = ((ext[:, :-2] - ext[:, 1:-1]) > 10 * TOL) & ((ext[:, 1:-1] - ext[:, 2:]) > 10 * TOL)
    assert (idx[separated] == truth[:, :k][separated]).all(), "indices differ where there is no tie"
    same = scores[:, 1:] == scores[:, :-1]
    assert (idx[:, 1:][same] > idx[:, :-1][same]).all(), "equal scores not ordered by index"


@needs_triton
@pytest.mark.parametrize("q,n,D,k,exclude_self,slices", SLICE_CASES)
def test_triton_sliced_search_random_data(q, n, D, k, exclude_self, slices):
    from grasp_kernels import topk_neighbor_mean as kernels

    db = torch.randn(n, D)
    start = (n - q) // 2 if exclude_self else 0
    queries = db[start : start + q].contiguous() if exclude_self else torch.randn(q, D)
    scores, idx = kernels.topk_neighbor_mean_search(queries, db, k, start, exclude_self, slices)
    assert_search_matches_float64(scores, idx, queries, db, k, start, exclude_self)


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("q,n,D,k,exclude_self,slices", SLICE_CASES)
def test_triton_sliced_search_exact_ties(q, n, D, k, exclude_self, slices, dtype):
    """Small integers: every product and sum is exact in float32 in any order, ties abound and span
    slices, so the merged result must equal the reference's (score desc, index asc) bit for bit."""
    from grasp_kernels import topk_neighbor_mean as kernels

    db = torch.randint(-2, 3, (n, D)).to(dtype)
    start = (n - q) // 2 if exclude_self else 0
    queries = db[start : start + q].contiguous() if exclude_self else torch.randint(-2, 3, (q, D)).to(dtype)
    scores, idx = kernels.topk_neighbor_mean_search(queries, db, k, start, exclude_self, slices)
    want_s, want_i = op_module.topk_neighbor_mean_search_reference(queries.float(), db.float(), k, query_start=start,
                                              exclude_self=exclude_self)
    assert torch.equal(idx, want_i)
    assert torch.equal(scores, want_s)


def test_slice_count_fills_the_gpu():
    pytest.importorskip("triton")
    if not TRITON_CPU:
        pytest.skip("grasp_kernels.topk_neighbor_mean needs the Triton interpreter here")
    from grasp_kernels import topk_neighbor_mean as kernels

    sms, k = 132, 10
    for q in (1, 5, 64, 1000, 100_000, 1_000_000):
        for n in (1000, 1_000_000):
            s = kernels.slice_count(q, n, k, sms)
            room = min(-(-n // kernels._MIN_SLICE_ROWS), kernels._MAX_PARTIAL_BYTES // (8 * q * k))
            assert 1 <= s <= max(1, room)
            programs = -(-q // kernels._NOMINAL_BLOCK_Q) * s
            assert programs >= kernels._PROGRAMS_PER_SM * sms or s == max(1, room), (q, n, s)
            # No more slices than needed: one fewer would not reach the target.
            assert s == 1 or -(-q // kernels._NOMINAL_BLOCK_Q) * (s - 1) < kernels._PROGRAMS_PER_SM * sms
    assert kernels.slice_count(1_000_000, 1_000_000, k, sms) == 1
    assert kernels.slice_count(4, 1_000_000, k, sms) > 100
    assert kernels.slice_count(4, 100, k, None) == kernels._INTERPRET_SLICES


@needs_triton
def test_triton_search_rejects_bad_arguments():
    from grasp_kernels import topk_neighbor_mean as kernels

    x = torch.randn(10, 4)
    for slices in (-1, 65536):
        with pytest.raises(ValueError, match=r"slices must be in \[0, 65535\]"):
            kernels.topk_neighbor_mean_search(x, x, 2, 0, False, slices)
    with pytest.raises(ValueError, match=r"k = 11 must be in \[1, n = 10\]"):
        kernels.topk_neighbor_mean_search(x, x, 11, 0, False)
    with pytest.raises(TypeError, match=r"db has dtype torch.float16"):
        kernels.topk_neighbor_mean_search(x, x.half(), 2, 0, False)


# ---- autotuning keys on buckets, not on exact sizes ----

@needs_triton
def test_autotuning_benchmarks_once_per_bucket(monkeypatch):
    """Each kernel behind an autotuner of two configs with the module's key and pruner; a sweep of
    query counts and database sizes benchmarks once per power-of-two bucket, not once per size."""
    import triton

    from grasp_kernels import topk_neighbor_mean as kernels

    benchmarks = {"search": 0, "merge": 0, "gather": 0}

    def tuner(name, kernel, configs, key, prune):
        def bench(kernel_call, quantiles):
            benchmarks[name] += 1
            kernel_call()
            return [1.0, 1.0, 1.0]

        return triton.autotune(configs=configs, key=key, prune_configs_by={"early_config_prune": prune},
                               do_bench=bench)(kernel.fn)

    config = triton.Config
    monkeypatch.setattr(kernels, "_knn_search_kernel", tuner(
        "search", kernels._knn_search_kernel,
        [config({"BLOCK_Q": 16, "BLOCK_N": 32, "BLOCK_D": 16}), config({"BLOCK_Q": 16, "BLOCK_N": 16, "BLOCK_D": 16})],
        kernels._SEARCH_KEY, kernels._prune_search_configs))
    monkeypatch.setattr(kernels, "_knn_merge_kernel", tuner(
        "merge", kernels._knn_merge_kernel,
        [config({"BLOCK_Q": 16, "BLOCK_M": 16}), config({"BLOCK_Q": 16, "BLOCK_M": 32})],
        kernels._MERGE_KEY, kernels._prune_merge_configs))
    monkeypatch.setattr(kernels, "_gather_mean_kernel", tuner(
        "gather", kernels._gather_mean_kernel,
        [config({"BLOCK_R": 16, "BLOCK_D": 32}), config({"BLOCK_R": 16, "BLOCK_D": 16})],
        kernels._GATHER_KEY, kernels._prune_gather_configs))

    db = torch.randn(70, 8)
    sizes = [(q, n) for q in (17, 19, 23, 29, 31) for n in (49, 53, 59, 61, 67)]
    for q, n in sizes:
        queries = torch.randn(q, 8)
        _, idx = kernels.topk_neighbor_mean_search(queries, db[:n], 3, 0, False)
        kernels.topk_neighbor_mean_gather(db[:n], idx)
    # Buckets: queries 32; rows per slice (3 slices of 17..23 rows) 32; one dtype and flags.
    assert benchmarks == {"search": 2, "merge": 2, "gather": 2}, benchmarks
    # A new bucket benchmarks once more; a new size within it does not.
    kernels.topk_neighbor_mean_search(torch.randn(5, 8), db, 3, 0, False)
    kernels.topk_neighbor_mean_search(torch.randn(6, 8), db, 3, 0, False)
    assert benchmarks["search"] == 4 and benchmarks["merge"] == 4, benchmarks


# ---- launches run on the tensors' device ----

@needs_triton
def test_triton_launches_on_the_tensors_device(monkeypatch):
    from torch._subclasses.fake_tensor import FakeTensorMode

    from grasp_kernels import topk_neighbor_mean as kernels

    launches = record_launches(monkeypatch, kernels, ["_knn_search_kernel", "_knn_merge_kernel", "_gather_mean_kernel"])
    with FakeTensorMode():
        x = torch.empty(100, 16, device="cuda:1")
        _, idx = kernels.topk_neighbor_mean_search(x, x, 5, 0, True, 2)
        kernels.topk_neighbor_mean_gather(x, idx)
    assert [(launch.name, launch.current) for launch in launches] == [
        ("_knn_search_kernel", "cuda:1"), ("_knn_merge_kernel", "cuda:1"), ("_gather_mean_kernel", "cuda:1")
    ]
    assert CurrentDevice.current == "cuda:0"


def test_faiss_gpu_search_runs_on_the_tensors_device(monkeypatch):
    faiss = pytest.importorskip("faiss")
    import types

    from torch._subclasses.fake_tensor import FakeTensorMode

    from grasp.ops import _topk_neighbor_mean_faiss

    calls = []

    def knn_gpu(res, xq, xb, k, metric=None, device=-1):
        calls.append((res, device, CurrentDevice.current))
        return xq.new_zeros((xq.shape[0], k)), xq.new_zeros((xq.shape[0], k), dtype=torch.int64)

    # faiss.contrib.torch_utils would patch faiss for torch tensors: an empty stand-in is "imported".
    monkeypatch.setitem(sys.modules, "faiss.contrib.torch_utils", types.ModuleType("faiss.contrib.torch_utils"))
    monkeypatch.setattr(faiss, "knn_gpu", knn_gpu, raising=False)
    monkeypatch.setattr(_topk_neighbor_mean_faiss, "has_gpu", lambda: True)
    monkeypatch.setattr(_topk_neighbor_mean_faiss, "_gpu_resources", lambda index: f"resources of GPU {index}")
    monkeypatch.setattr(torch.cuda, "device", CurrentDevice)
    with FakeTensorMode():
        x = torch.empty(50, 8, device="cuda:1")
        scores, idx = _topk_neighbor_mean_faiss._raw_search(x, x, 4)
    assert calls == [("resources of GPU 1", 1, "cuda:1")]
    assert idx.shape == (50, 4) and idx.device == torch.device("cuda:1")


# ---- autocast ----

AUTOCAST_DTYPE = {"cpu": torch.bfloat16, "cuda": torch.float16}


@pytest.mark.parametrize("device,backend", BACKEND_CASES)
def test_autocast_is_ignored(device, backend):
    n = 60 if (device, backend) in INTERPRETED else 400
    x = torch.randn(n, 24, device=device)
    for metric in ("cosine", "ip"):
        want = grasp.ops.topk_neighbor_mean(x, 5, metric=metric, return_indices=True, backend=backend)
        with torch.autocast(device, dtype=AUTOCAST_DTYPE[device]):
            got = grasp.ops.topk_neighbor_mean(x, 5, metric=metric, return_indices=True, backend=backend)
        assert got[0].dtype == x.dtype and got[2].dtype == torch.float32
        assert torch.equal(got[1], want[1])
        assert torch.equal(got[2], want[2])
        assert torch.equal(got[0], want[0])


@pytest.mark.parametrize("device", [d for d in DEVICES if not op_module.backend_reason(d, d)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_cpp_knn_search_ignores_autocast(device, dtype):
    queries = torch.randn(50, 64, dtype=dtype, device=device)
    db = torch.randn(3000, 64, dtype=dtype, device=device)
    want = torch.ops.grasp.topk_neighbor_mean_search(queries, db, 5, 0, False)
    with torch.autocast(device, dtype=AUTOCAST_DTYPE[device]):
        got = torch.ops.grasp.topk_neighbor_mean_search(queries, db, 5, 0, False)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


@pytest.mark.parametrize("device,backend", [(dev, b) for dev, b in BACKEND_CASES if b in ("cpu", "cuda", "triton")])
def test_kernel_ops_pass_opcheck(device, backend):
    """The search and gather kernel ops (C++ and Triton) have schemas and fake kernels that agree with them."""
    suffix = "_triton" if backend == "triton" else ""
    search = getattr(torch.ops.grasp, "topk_neighbor_mean_search" + suffix)
    gather = getattr(torch.ops.grasp, "topk_neighbor_mean_gather" + suffix)
    x = torch.randn(37, 24, device=device)
    torch.library.opcheck(search, (x[:11], x, 4, 3, True))
    _, indices = search(x[:11], x, 4, 3, True)
    torch.library.opcheck(gather, (x, indices))


# ---- the fast path: proof bound, rescoring chunks, re-search route ----

@pytest.mark.parametrize("D", [3, 48, 384, 1536])
def test_proof_bound_covers_both_roundings(D):
    """|approximate - exact| + |rescored - exact| <= _proof_bound for every candidate, on rows of mixed
    magnitudes (the approximate scores here come from float32 matmuls of bfloat16 copies, as on CPU)."""
    q = torch.randn(40, D) * torch.logspace(-3, 3, 40).unsqueeze(1)
    db = torch.randn(500, D) * torch.logspace(-2, 2, 500)[torch.randperm(500)].unsqueeze(1)
    db[7] = db[3]
    approx, cand = op_module.topk_neighbor_mean_search_reference(q.bfloat16(), db.bfloat16(), 50, exclude_self=False)
    rescored = op_module._rescore(q, db, cand)
    exact = (q.double().unsqueeze(1) * db.double()[cand]).sum(-1)
    q_norms = torch.linalg.vector_norm(q, dim=1, dtype=torch.float64)
    db_norm = torch.linalg.vector_norm(db, dim=1, dtype=torch.float64).max()
    bound = op_module._proof_bound(torch.bfloat16, D, q_norms, db_norm)
    error = (approx.double() - exact).abs() + (rescored.double() - exact).abs()
    assert (error <= bound.unsqueeze(1)).all()
    # and a usable one: for unit rows within 1.5 times the bfloat16 rounding term 2u = 2^-7
    unit = torch.ones(1, dtype=torch.float64)
    assert op_module._proof_bound(torch.bfloat16, D, unit, unit[0]).item() < 1.5 * 2.0**-7


def test_rescoring_in_chunks(monkeypatch):
    q, db = torch.randn(37, 24), torch.randn(300, 24)
    cand = torch.randint(0, 300, (37, 70))
    whole = (q.unsqueeze(1) * db[cand]).sum(-1)
    monkeypatch.setattr(op_module, "RESCORE_BYTES", 3 * 8 * 70 * 24)  # three rows per chunk
    torch.testing.assert_close(op_module._rescore(q, db, cand), whole, atol=1e-6, rtol=0)


def test_research_route(monkeypatch):
    """Triton on a GPU re-searches with a float32 matmul (the reference search) from D = 128 on, while
    TF32 cannot reach it; otherwise with the backend's own float32 search."""
    calls = []

    def search(queries, db, k, start, excl):
        calls.append((k, start, excl))
        return op_module.topk_neighbor_mean_search_reference(queries, db, k, query_start=start, exclude_self=excl)

    queries, db = torch.randn(6, 160), torch.randn(90, 160)
    want = op_module.topk_neighbor_mean_search_reference(queries, db, 4, exclude_self=False)
    for ieee in (True, False):
        monkeypatch.setattr(op_module, "_fp32_matmul_is_ieee", lambda ieee=ieee: ieee)
        for backend, device, D, matmul in (("triton", "cuda", 160, ieee), ("triton", "cuda", 64, False),
                                           ("cuda", "cuda", 160, False), ("triton", "cpu", 160, False)):
            calls.clear()
            s, i = op_module._research_fn(backend, device, search, D)(queries, db, 4)
            assert calls == ([] if matmul else [(4, 0, False)])
            assert torch.equal(i, want[1])


def test_fp32_matmul_setting_is_read():
    before = torch.backends.cuda.matmul.fp32_precision
    try:
        torch.backends.cuda.matmul.fp32_precision = "tf32"
        assert not op_module._fp32_matmul_is_ieee()
        torch.backends.cuda.matmul.fp32_precision = "ieee"
        assert op_module._fp32_matmul_is_ieee()
    finally:
        torch.backends.cuda.matmul.fp32_precision = before


@needs_triton
def test_fast_search_through_the_sliced_triton_kernel(monkeypatch):
    """The fast path with the Triton kernel's bfloat16 candidates over 4 slices, self excluded for a
    slice of the rows, the unproven rows re-searched by the matmul route: equal to the float32 search."""
    from grasp_kernels import topk_neighbor_mean as kernels

    monkeypatch.setattr(kernels, "_INTERPRET_SLICES", 4)
    centers = torch.randn(2, 24)  # clusters larger than the candidate list: proofs fail
    x = centers.repeat_interleave(100, 0) + 1e-3 * torch.randn(200, 24)
    x[101] = x[130]  # an exact tie (row 101 is a query)
    db32 = x / x.norm(dim=1, keepdim=True)
    norms = torch.linalg.vector_norm(db32, dim=1, dtype=torch.float64)
    search = op_module._search_fn("triton")
    monkeypatch.setattr(op_module, "_fp32_matmul_is_ieee", lambda: True)
    research = op_module._research_fn("triton", "cuda", search, 128)
    queries = db32[90:122].contiguous()
    for k in (1, 5):
        want_s, want_i = op_module.topk_neighbor_mean_search_reference(
            queries, db32, k, query_start=90, exclude_self=True
        )
        s, i, redone = op_module._fast_search(search, queries, db32, db32.bfloat16(), k, 90, True, norms[90:122],
                                        norms.max(), research)
        assert redone > 0, "near-tie data must make some proofs fail"
        assert not (i == torch.arange(90, 122).unsqueeze(1)).any()
        torch.testing.assert_close(s, want_s, atol=TOL, rtol=0)
        agree = (i.unsqueeze(2) == want_i.unsqueeze(1)).any(2).float().mean().item()
        assert agree > 0.99, f"fast/highest neighbour agreement {agree}"
