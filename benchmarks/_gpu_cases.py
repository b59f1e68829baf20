"""What ``benchmarks/gpu_code_report.py`` compiles: the case tables of grasp's Triton kernels.

A case table is one function per kernel (registered with :func:`cases_for`) that yields the launches of
that kernel at the target shapes of ``benchmarks/gpu_model.py``: every argument the launcher passes,
with tensors as ``meta`` tensors of the real shape and dtype. From a case, :func:`compile_jobs` derives
the rest from the kernel object itself, as the JIT and the autotuner would at launch:

- the configs: the autotuner's configs that its ``early_config_prune`` keeps for these arguments (each
  of them can be chosen, so each is compiled), or, for a kernel that its launcher configures itself,
  the configs and the choosing function the launcher uses (named in the case); ``triton.heuristics``
  values applied;
- the signature and alignment attributes: Triton's own specialisation of each argument value (an
  integer argument equal to 1 becomes a constant, tensors and integers divisible by 16 get the
  divisibility attribute), so the code is the code a launch would compile.

When a launcher changes its arguments, edit that kernel's case function; a kernel of the modules below
without a case table, or a case missing an argument of its kernel, is reported (and fails ``--check``).
Cases use the modules' own argument helpers (``_launch_args``) where they exist.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import inspect
import math
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from itertools import product
from pathlib import Path
from typing import Any

import gpu_model

__all__ = ["DEFAULT_KNN_SEARCH", "KERNEL_MODULES", "Case", "Job", "cases_for", "compile_jobs", "source_digest",
           "uncovered_kernels"]

#: Modules whose Triton kernels are all compiled.
KERNEL_MODULES = ("grasp_kernels.holistic_attention", "grasp_kernels.holistic_attention_projected",
                  "grasp_kernels.topk_neighbor_mean")

#: The search that ``topk_neighbor_mean`` runs on a GPU with its default arguments: the kernel and dtype,
#: and the default ``precision`` that choice assumes (the report checks it against grasp.ops.topk_neighbor_mean).
#: ``precision="fast"`` searches bfloat16 copies of the rows for candidates, then rescores them in float32.
DEFAULT_KNN_SEARCH = dict(
    module="grasp_kernels.topk_neighbor_mean", kernel="_knn_search_kernel", dtype="bf16", precision="fast"
)

_TORCH_DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16", "i64": "int64"}


@dataclass(frozen=True)
class Case:
    """One launch of a kernel: a label of the target shape, the data dtype and every argument by name.

    ``configs`` / ``pick``: for a kernel without an autotuner, the configs its launcher chooses from and the
    function ``(configs, named_args, **kwargs)`` it chooses with (None: the autotuner's configs and pruner).
    """

    shape: str
    dtype: str
    args: dict[str, Any]
    configs: list | None = None
    pick: Callable | None = None


@dataclass
class Job:
    """One compilation: a kernel at one case and config for one architecture."""

    kind: str  # "triton" or "cuda"
    kernel: str  # display name
    arch: int
    shape: str = ""
    dtype: str = ""
    config: str = ""
    backward: bool = False
    payload: dict = field(default_factory=dict)  # what the worker needs (picklable)
    key: dict = field(default_factory=dict)  # what the cached result depends on (JSON-serialisable)
    order: int = 0  # position in the report: case table order, then the pruner's config order


_REGISTRY: dict[tuple[str, str], tuple[Callable[[Any], Iterator[Case]], bool]] = {}


def cases_for(module: str, kernel: str, backward: bool = False):
    """Register the decorated function as the case table of ``module.kernel`` (called with the module)."""

    def register(fn: Callable[[Any], Iterator[Case]]) -> Callable[[Any], Iterator[Case]]:
        _REGISTRY[(module, kernel)] = (fn, backward)
        return fn

    return register


def _meta(dtype: str, *shape: int):
    import torch

    return torch.empty(shape, dtype=getattr(torch, _TORCH_DTYPES[dtype]), device="meta")


# --------------------------------------------------------------------------------------------- HAE

_HAE = "grasp_kernels.holistic_attention"


def _hae_cases(module) -> Iterator[tuple[str, str, Any, Any, dict]]:
    """(label, dtype, user, item, shape arguments) of every HAE target shape (no mask)."""
    B, L = gpu_model.HAE["B"], gpu_model.HAE["L"]
    for d, softmax, per_position, dtype in product(gpu_model.HAE["d"], (False, True), (False, True),
                                                   gpu_model.HAE["dtypes"]):
        user = _meta(dtype, B, L, d) if per_position else _meta(dtype, B, d)
        item = _meta(dtype, B, L, d)
        label = f"d={d} {'softmax' if softmax else 'sigmoid'} {'per-pos' if per_position else 'bcast'}"
        yield label, dtype, user, item, module._launch_args(user, item, None, softmax)


@cases_for(_HAE, "_hae_fwd_kernel")
def _hae_forward(module) -> Iterator[Case]:
    for label, dtype, user, item, shape in _hae_cases(module):
        B, L, d = item.shape
        args = dict(user_ptr=user, user_sim_ptr=user, item_ptr=item, item_sim_ptr=item, mask_ptr=item,
                    out_ptr=_meta(dtype, B, L, 4 * d), **shape)
        yield Case(label, dtype, args)


@cases_for(_HAE, "_hae_bwd_kernel", backward=True)
def _hae_backward(module) -> Iterator[Case]:
    for label, dtype, user, item, shape in _hae_cases(module):
        B, L, d = item.shape
        args = dict(grad_out_ptr=_meta(dtype, B, L, 4 * d), user_ptr=user, user_sim_ptr=user, item_ptr=item,
                    item_sim_ptr=item, mask_ptr=item, grad_user_ptr=user, grad_user_sim_ptr=user,
                    grad_item_ptr=item, grad_item_sim_ptr=item, **shape)
        yield Case(label, dtype, args)


# ----------------------------------------------------------------------------------- projected HAE

_PROJECTED = "grasp_kernels.holistic_attention_projected"


def _projected_cases(module) -> Iterator[tuple[str, str, dict, dict]]:
    """(label, dtype, tensors, shape arguments) of every projected-op target shape."""
    N, U, M = gpu_model.PROJECTED["N"], gpu_model.PROJECTED["U"], gpu_model.PROJECTED["M"]
    for (d, e), dtype in product(gpu_model.PROJECTED["de"], gpu_model.PROJECTED["dtypes"]):
        t = dict(user=_meta(dtype, U, d), item=_meta(dtype, M, d), values=_meta(dtype, M, 3, e),
                 user_index=_meta("i64", N), item_index=_meta("i64", N))
        yield f"N={N} d={d} e={e}", dtype, t, module._launch_args(t["item"], t["values"], t["user_index"])


@cases_for(_PROJECTED, "_fwd_kernel")
def _projected_forward(module) -> Iterator[Case]:
    for label, dtype, t, shape in _projected_cases(module):
        args = dict(user_ptr=t["user"], user_sim_ptr=t["user"], item_ptr=t["item"], item_sim_ptr=t["item"],
                    values_ptr=t["values"], user_index_ptr=t["user_index"], item_index_ptr=t["item_index"],
                    out_ptr=_meta(dtype, t["user_index"].shape[0], t["values"].shape[2]), **shape)
        yield Case(label, dtype, args)


def _projected_backward_cases(module) -> Iterator[tuple[str, str, dict, dict]]:
    """The projected-op cases with the backward's tensors added: grad_out, the float32 per-pair buffer,
    and the pairs grouped by item and by user (sorted int64 keys, order and segment offsets). Gradients
    are written in the inputs' dtype on a GPU."""
    for label, dtype, t, shape in _projected_cases(module):
        N, M, U = t["user_index"].shape[0], t["item"].shape[0], t["user"].shape[0]
        t = dict(t, grad_out=_meta(dtype, N, t["values"].shape[2]), pair=_meta("fp32", N, 5), keys=_meta("i64", N),
                 order=_meta("i64", N), item_starts=_meta("i64", M + 1), user_starts=_meta("i64", U + 1))
        yield label, dtype, t, shape


@cases_for(_PROJECTED, "_bwd_pairs_kernel", backward=True)
def _projected_backward_pairs(module) -> Iterator[Case]:
    for label, dtype, t, shape in _projected_backward_cases(module):
        args = dict(grad_out_ptr=t["grad_out"], user_ptr=t["user"], user_sim_ptr=t["user"], item_ptr=t["item"],
                    item_sim_ptr=t["item"], values_ptr=t["values"], user_index_ptr=t["user_index"],
                    item_index_ptr=t["item_index"], pair_ptr=t["pair"], **shape)
        yield Case(label, dtype, args, module._PAIRS_CONFIGS, module._pick_pairs_config)


@cases_for(_PROJECTED, "_bwd_rows_kernel", backward=True)
def _projected_backward_rows(module) -> Iterator[Case]:
    """Two launches per shape: the item side (rows of user, user_sim summed per item) and the user side."""
    for label, dtype, t, shape in _projected_backward_cases(module):
        N, D = shape["N"], shape["D"]
        sides = (("by item", t["item_starts"], t["user_index"], t["user"]),
                 ("by user", t["user_starts"], t["item_index"], t["item"]))
        for side, starts, gather_index, rows in sides:
            chunks = _cdiv(N, module._chunk_length(N))
            args = dict(key_ptr=t["keys"], order_ptr=t["order"], starts_ptr=starts, gather_index_ptr=gather_index,
                        pair_ptr=t["pair"], a_ptr=rows, b_ptr=rows, grad_a_ptr=_meta(dtype, starts.shape[0] - 1, D),
                        grad_b_ptr=_meta(dtype, starts.shape[0] - 1, D), partial_ptr=_meta("fp32", chunks, 2, 2, D),
                        N=N, W=D, chunk=module._chunk_length(N))
            yield Case(f"{label} {side}", dtype, args, module._REDUCE_CONFIGS, module._pick_by_width)


@cases_for(_PROJECTED, "_bwd_values_kernel", backward=True)
def _projected_backward_values(module) -> Iterator[Case]:
    for label, dtype, t, shape in _projected_backward_cases(module):
        N, E = shape["N"], shape["E"]
        chunks = _cdiv(N, module._chunk_length(N))
        args = dict(key_ptr=t["keys"], order_ptr=t["order"], starts_ptr=t["item_starts"], pair_ptr=t["pair"],
                    grad_out_ptr=t["grad_out"], grad_values_ptr=t["values"], partial_ptr=_meta("fp32", chunks, 2, 3, E),
                    N=N, W=E, chunk=module._chunk_length(N))
        yield Case(label, dtype, args, module._REDUCE_CONFIGS, module._pick_by_width)


@cases_for(_PROJECTED, "_bwd_combine_kernel", backward=True)
def _projected_backward_combine(module) -> Iterator[Case]:
    """After each reduction: K = 2 rows of width d (row grads), K = 3 of width e (value grads)."""
    for label, dtype, t, shape in _projected_backward_cases(module):
        N, D, E = shape["N"], shape["D"], shape["E"]
        chunks = _cdiv(N, module._chunk_length(N))
        grad_rows = _meta(dtype, t["item"].shape[0], D)
        for K, W, outs, row_stride, k_stride in ((2, D, (grad_rows,) * 3, D, 0), (3, E, (t["values"],) * 3, 3 * E, E)):
            args = dict(key_ptr=t["keys"], starts_ptr=t["item_starts"], partial_ptr=_meta("fp32", chunks, 2, K, W),
                        out0_ptr=outs[0], out1_ptr=outs[1], out2_ptr=outs[2], N=N, W=W,
                        chunk=module._chunk_length(N), out_row_stride=row_stride, out_k_stride=k_stride, K=K)
            yield Case(f"{label} K={K}", dtype, args, module._COMBINE_CONFIGS, module._pick_by_width)


# --------------------------------------------------------------------------------------------- kNN

_KNN = "grasp_kernels.topk_neighbor_mean"


#: SMs of the GPU the database slicing is sized for (H100 / H200 SXM; an A100 has 108).
SM_COUNT = 132


def _knn_shapes() -> Iterator[tuple[int, int, int, int, str]]:
    """(n, D, q, k, dtype) of every kNN search target shape: k neighbours in float32 and bfloat16, and the
    candidate width of the fast path's bfloat16 search (the default search on a GPU)."""
    from grasp.ops.topk_neighbor_mean import fast_margin

    n, k = gpu_model.KNN["n"], gpu_model.KNN["k"]
    for D, q in product(gpu_model.KNN["D"], gpu_model.KNN["q"]):
        for dtype in gpu_model.KNN["dtypes"]:
            yield n, D, q, k, dtype
        yield n, D, q, k + fast_margin(k), "bf16"


def _knn_slicing(module, q: int, n: int, k: int) -> tuple[int, int]:
    """(slices, rows per slice) that topk_neighbor_mean_search launches with on a GPU of SM_COUNT SMs."""
    slices = module.slice_count(q, n, k, SM_COUNT)
    slice_len = _cdiv(_cdiv(n, min(slices, n)), module._SLICE_ALIGN) * module._SLICE_ALIGN
    return _cdiv(n, slice_len), slice_len


@cases_for(_KNN, "_knn_search_kernel")
def _knn_search(module) -> Iterator[Case]:
    for (n, D, q, k, dtype), exclude_self in product(_knn_shapes(), (False, True)):
        slices, slice_len = _knn_slicing(module, q, n, k)
        scores, indices = _meta("fp32", q, k), _meta("i64", q, k)
        args = dict(q_ptr=_meta(dtype, q, D), db_ptr=_meta(dtype, n, D), scores_ptr=scores, indices_ptr=indices,
                    keys_ptr=_meta("i64", q, slices, k) if slices > 1 else indices, q=q, n=n, D=D, k=k,
                    query_start=0, slice_len=slice_len, Q_BUCKET=module._bucket(q, module._MAX_Q_BUCKET),
                    N_BUCKET=module._bucket(slice_len), EXCLUDE_SELF=exclude_self, SPLIT=slices > 1,
                    D_PAD=max(module._MIN_DOT, _next_power_of_2(D)), K_PAD=_next_power_of_2(k))
        label = f"n=1M D={D} q={q} k={k} slices={slices}{' excl' if exclude_self else ''}"
        yield Case(label, dtype, args)


@cases_for(_KNN, "_knn_merge_kernel")
def _knn_merge(module) -> Iterator[Case]:
    """One launch per (q, k) of the searches: the merge reads keys, whatever D and the dtype were."""
    for n, q, k in sorted({(n, q, k) for n, _, q, k, _ in _knn_shapes()}, key=lambda s: (-s[1], s[2])):
        slices, _ = _knn_slicing(module, q, n, k)
        if slices == 1:  # a single slice: the search writes the result itself
            continue
        args = dict(keys_ptr=_meta("i64", q, slices, k), scores_ptr=_meta("fp32", q, k),
                    indices_ptr=_meta("i64", q, k), q=q, m=slices * k, k=k,
                    Q_BUCKET=module._bucket(q, module._MAX_Q_BUCKET), K_PAD=_next_power_of_2(k))
        yield Case(f"n=1M q={q} k={k} slices={slices}", "i64", args)


@cases_for(_KNN, "_gather_mean_kernel")
def _gather_mean(module) -> Iterator[Case]:
    n, k = gpu_model.KNN["n"], gpu_model.KNN["k"]
    for D, q, dtype in product(gpu_model.KNN["D"], gpu_model.KNN["q"], gpu_model.KNN["dtypes"]):
        args = dict(x_ptr=_meta(dtype, n, D), indices_ptr=_meta("i64", q, k), out_ptr=_meta(dtype, q, D),
                    q=q, D=D, k=k, Q_BUCKET=module._bucket(q, 64), F64=False)
        yield Case(f"n=1M D={D} q={q} k={k}", dtype, args)


def _next_power_of_2(x: int) -> int:
    return 1 << max(0, math.ceil(math.log2(x)))


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


# --------------------------------------------------------------------------------------------- jobs


def _unwrap(kernel) -> tuple[Any, list[Any]]:
    """(the JITFunction, the autotuner / heuristics wrappers around it, outermost first)."""
    import triton

    wrappers = []
    while not isinstance(kernel, triton.runtime.JITFunction):
        wrappers.append(kernel)
        kernel = kernel.fn
    return kernel, wrappers


def _configs(wrappers: list[Any], case: Case) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """(constexpr values, compile options) of every config the kernel can run with for the case."""
    import triton

    args = case.args
    tuner = next((w for w in wrappers if isinstance(w, triton.runtime.Autotuner)), None)
    if case.configs is not None:
        configs, prune = list(case.configs), case.pick
    elif tuner is not None:
        configs, prune = list(tuner.configs), getattr(tuner, "early_config_prune", None)
    else:
        configs, prune = [triton.Config({}, num_warps=4, num_stages=3)], None
    if prune is not None:
        # The autotuner passes its positional arguments as named_args and the keyword ones as kwargs; a
        # pruner reads each argument from one of them, so both get all of them.
        configs = prune(configs, dict(args), **args)
    result = []
    for config in configs:
        values = {**args, **config.kwargs}
        for wrapper in wrappers:
            if isinstance(wrapper, triton.runtime.Heuristics):
                values.update({name: rule(values) for name, rule in wrapper.values.items()})
        options = {name: getattr(config, name) for name in ("num_warps", "num_stages", "num_ctas", "maxnreg")
                   if getattr(config, name, None) is not None}
        result.append(({k: v for k, v in values.items() if k not in args}, options))
    return result


def _specialise(fn, values: dict[str, Any], backend) -> tuple[dict, dict, list]:
    """(signature, constexprs, attrs) that the JIT would compile ``fn`` with for these argument values."""
    from triton._C.libtriton import native_specialize_impl

    signature, constexprs, attrs = {}, {}, []
    for index, param in enumerate(fn.params):
        value = values[param.name]
        if param.is_constexpr:
            signature[param.name], constexprs[param.name] = "constexpr", value
            continue
        specialize = not param.do_not_specialize
        annotation = param.annotation_type
        if isinstance(annotation, str) and (annotation == "u1" or annotation[:2] in ("fp", "bf")):
            specialize = False
        ty, key = native_specialize_impl(type(backend), value, param.is_const, specialize,
                                         not param.do_not_specialize_on_alignment)
        if annotation and ty != "constexpr":
            ty, key = annotation, (key if specialize else None)
        signature[param.name] = ty
        if ty == "constexpr":
            constexprs[param.name] = value
        elif isinstance(key, str):
            attrs.append(([index], backend.parse_attr(key)))
    return signature, constexprs, attrs


def _config_label(constexprs: dict[str, Any], options: dict[str, Any], tuned: list[str]) -> str:
    blocks = " ".join(f"{name.removeprefix('BLOCK_')}={constexprs[name]}" for name in tuned)
    return f"{blocks} w{options.get('num_warps', 4)} s{options.get('num_stages', 3)}".strip()


def _display_name(module: str, kernel: str) -> str:
    """``hae.hae_fwd``, ``projected.fwd``, ``knn.knn_search``: the module's short name and the kernel's."""
    short = {"holistic_attention": "hae", "holistic_attention_projected": "projected", "topk_neighbor_mean": "knn"}
    base = module.rpartition(".")[2]
    return f"{short.get(base, base)}.{kernel.strip('_').removesuffix('_kernel')}"


def compile_jobs(archs: list[int], only: str | None = None) -> tuple[list[Job], list[str]]:
    """Every Triton compile job for ``archs`` (kernels whose display name contains ``only``), and the
    problems found on the way (a case table that no longer fits its kernel), one line each."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend

    jobs, problems = [], []
    for (module_name, kernel_name), (table, backward) in _REGISTRY.items():
        name = _display_name(module_name, kernel_name)
        if only and only not in name:
            continue
        module = importlib.import_module(module_name)
        kernel = getattr(module, kernel_name, None)
        if kernel is None:
            problems.append(f"case table: {module_name}.{kernel_name} no longer exists; "
                            "update benchmarks/_gpu_cases.py")
            continue
        fn, wrappers = _unwrap(kernel)
        source = source_digest(module_name)
        backends = {arch: make_backend(GPUTarget("cuda", arch, 32)) for arch in archs}
        try:
            cases = list(table(module))
        except Exception as error:  # noqa: BLE001 - a stale case table is reported, the other kernels go on
            problems.append(f"case table of {name} failed ({type(error).__name__}: {error}); "
                            "update benchmarks/_gpu_cases.py")
            continue
        for case in cases:
            try:
                configs = _configs(wrappers, case)
            except Exception as error:  # noqa: BLE001 - as above: a pruner that wants other arguments
                problems.append(f"pruner of {name} failed on the case table's arguments ({type(error).__name__}: "
                                f"{error}); update benchmarks/_gpu_cases.py")
                break
            for constexprs, options in configs:
                values = {**case.args, **constexprs}
                for param in fn.params:
                    if param.name not in values and param.default is not inspect.Parameter.empty:
                        values[param.name] = param.default
                missing = [p.name for p in fn.params if p.name not in values]
                unknown = sorted(set(values) - {p.name for p in fn.params})
                if missing or unknown:
                    problems.append(f"case table of {name} ({case.shape}): missing {missing}, unknown {unknown}; "
                                    "update benchmarks/_gpu_cases.py")
                    break
                for arch in archs:
                    signature, consts, attrs = _specialise(fn, values, backends[arch])
                    payload = dict(module=module_name, kernel=kernel_name, signature=signature, constexprs=consts,
                                   attrs=attrs, options=options, arch=arch)
                    key = dict(payload, source=source, triton=triton.__version__)
                    jobs.append(Job("triton", name, arch, case.shape, case.dtype,
                                    _config_label(consts, options, list(constexprs)), backward, payload, key,
                                    order=len(jobs)))
    return jobs, problems


def source_digest(module_name: str) -> str:
    """sha256 of a kernel module's source file as it is on disk now."""
    spec = importlib.util.find_spec(module_name)
    return hashlib.sha256(Path(spec.origin).read_bytes()).hexdigest()


def uncovered_kernels() -> list[str]:
    """Triton kernels of KERNEL_MODULES that have no case table."""
    missing = []
    for module_name in KERNEL_MODULES:
        module = importlib.import_module(module_name)
        source = inspect.getsource(module)
        for attr, value in vars(module).items():
            if _is_kernel(attr, value, source) and (module_name, attr) not in _REGISTRY:
                missing.append(f"{module_name}.{attr}")
    return missing


def _is_kernel(attr: str, value: Any, source: str) -> bool:
    """An autotuned or heuristics-wrapped JIT function is a kernel; a bare one is when its name ends in
    ``_kernel`` or the module launches it (a helper called by kernels is neither)."""
    import triton

    if isinstance(value, (triton.runtime.Autotuner, triton.runtime.Heuristics)):
        return True
    if not isinstance(value, triton.runtime.JITFunction):
        return False
    launched = rf"(?<![\w.]){re.escape(attr)}\[|\b(?:launcher|wrap_triton)\(\s*{re.escape(attr)}\s*\)"
    return attr.endswith("_kernel") or re.search(launched, source) is not None
