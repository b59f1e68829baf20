"""benchmarks/gpu_code_report.py: its PTX and ptxas-log readers, gates and byte/FLOP model, and one real
offline compile of a kernel for sm_90 (twice: the second run comes from the cache)."""

from __future__ import annotations

import csv
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))
import _machine_code as mc  # noqa: E402
import gpu_code_report as report  # noqa: E402
import gpu_model  # noqa: E402

PTX = r"""
.version 8.4
.target sm_90a
.address_size 64

.extern .func __assertfail
(
	.param .b64 __assertfail_param_0
)
;
.func  (.param .b32 func_retval0) add_one(
	.param .b64 add_one_param_0
)
{
	.reg .f32 	%f<3>;
	red.relaxed.gpu.global.add.f32 	[%rd1], %f1;
	ret;
}
.visible .entry relaxed_kernel(
	.param .u64 relaxed_kernel_param_0
)
.reqntid 128, 1, 1
{
	.reg .b32 	%r<9>;
	.loc	1 10 5
	ld.global.v4.b32 	{%r1, %r2, %r3, %r4}, [%rd1];
	// begin inline asm
	@%p1 atom.global.add.f32 %f2, [%rd2], %f3;
	// end inline asm
	wgmma.fence.sync.aligned;
	wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 {%f4, %f5}, %rd3, %rd4, p, 1, 1, 0, 1;
	{ // callseq 0, 0
	call.uni (retval0),
	add_one,
	(
	param0
	);
	} // callseq 0
$L__BB0_2:
	ret;
}
.visible .entry fenced_kernel(
	.param .u64 fenced_kernel_param_0
)
{
	ld.global.v2.b32 	{%r1, %r2}, [%rd1];
	cp.async.cg.shared.global [ %r5 + 0 ], [ %rd6 + 0 ], 0x10, %r7;
	mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 {%f1, %f2, %f3, %f4}, {%r1, %r2}, {%r5}, {%f5, %f6};
	@%p11 atom.global.gpu.acq_rel.add.v4.f32 { %r65, %r66, %r67, %r68 }, [ %rd41 + 0 ], { %r69, %r70, %r71, %r72 };
	fence.proxy.async.shared::cta;
	ret;
}
.entry membar_kernel(
	.param .u64 membar_kernel_param_0
)
{
	ld.global.nc.v2.f64 	{%fd1, %fd2}, [%rd1];
	red.global.add.f32 	[%rd2], %f1;
	membar.gl;
	ret;
}
"""

LOG = """ptxas info    : 0 bytes gmem
ptxas info    : Compiling entry function '_Z6kernelIfLi4EEvPT_' for 'sm_80'
ptxas info    : Function properties for _Z6kernelIfLi4EEvPT_
    8 bytes stack frame, 12 bytes spill stores, 16 bytes spill loads
ptxas info    : Used 255 registers, used 1 barriers, 4096 bytes smem, 380 bytes cmem[0]
ptxas info    : Function properties for helper
    24 bytes stack frame, 4 bytes spill stores, 4 bytes spill loads
ptxas info    : Compiling entry function 'plain' for 'sm_80'
ptxas info    : Function properties for plain
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 40 registers, used 0 barriers, 380 bytes cmem[0]
"""


def test_ptx_features_read_each_entry_and_its_callees():
    found = mc.ptx_features(PTX)
    assert set(found) == {"relaxed_kernel", "fenced_kernel", "membar_kernel"}
    relaxed, fenced, membar = found["relaxed_kernel"], found["fenced_kernel"], found["membar_kernel"]
    # wgmma.fence is not a memory fence; the callee's relaxed red counts with the kernel's own atom.
    assert relaxed == mc.Features(mma=["wgmma.bf16"], load16=["ld"], atomics=2, atomic_sems=["relaxed"], fences=0)
    assert not relaxed.fenced_atomics
    # 8-byte vector loads are not 16-byte ones; fence.proxy does not order memory for atomics.
    assert fenced == mc.Features(mma=["mma.tf32"], load16=["cp.async"], atomics=1, atomic_sems=["acq_rel"], fences=0)
    assert fenced.fenced_atomics
    assert membar == mc.Features(mma=[], load16=["ld"], atomics=1, atomic_sems=["relaxed"], fences=1)
    assert membar.fenced_atomics
    assert mc.callees(PTX, "relaxed_kernel") == {"add_one"}


def test_ptxas_log_gives_registers_spills_and_shared_memory():
    entries, frames = mc.parse_ptxas_log(LOG)
    assert entries == {
        "_Z6kernelIfLi4EEvPT_": mc.Resources(registers=255, stack=8, spill_stores=12, spill_loads=16, shared=4096),
        "plain": mc.Resources(registers=40),
    }
    assert frames["helper"] == mc.Resources(stack=24, spill_stores=4, spill_loads=4)


def test_kernel_names_are_demangled_and_shortened():
    name = "void grasp::(anonymous namespace)::gather_mean_kernel<c10::BFloat16, float, 8>(c10::BFloat16 const*, long)"
    assert mc.short_kernel_name(name) == ("gather_mean_kernel", "BFloat16, float, 8")
    assert mc.short_kernel_name("_hae_fwd_kernel") == ("_hae_fwd_kernel", "")
    if shutil.which("c++filt"):
        assert mc.demangle(["_Z6kernelIfLi4EEvPT_"]) == {"_Z6kernelIfLi4EEvPT_": "void kernel<float, 4>(float*)"}


def _row(kernel="knn.knn_search", arch=90, dtype="bf16", backward=False, spills=(0, 0), mma=("mma.bf16",),
         atomics=0, sems=(), fences=0, error=""):
    resources = dict(registers=64, stack=0, spill_stores=spills[0], spill_loads=spills[1], shared=0)
    features = dict(mma=list(mma), load16=[], atomics=atomics, atomic_sems=list(sems), fences=fences)
    return report.Row(kernel, arch, "n=1M", dtype, "Q=64 w4 s2", backward, resources, features, error)


DEFAULT = dict(kernel="knn.knn_search", dtype="bf16", precision="fast")


def test_gates_pass_clean_rows_and_name_each_failure():
    clean = [_row(arch=80), _row(arch=90), _row(kernel="projected.bwd", backward=True, atomics=3, sems=["relaxed"]),
             _row(kernel="projected.fwd", atomics=2, sems=["acq_rel"])]  # a fenced atomic outside a backward
    assert report.gates(clean, DEFAULT, "fast", [80, 90]) == []

    bad = [_row(kernel="hae.hae_bwd", backward=True, spills=(8, 4)),
           _row(kernel="projected.bwd", backward=True, atomics=28, sems=["acq_rel"]),
           _row(kernel="cuda.knn_select", atomics=49, sems=["relaxed"], fences=2),
           _row(arch=80, mma=()),
           _row(kernel="knn.gather_mean", error="RuntimeError: boom")]
    failures = report.gates(bad, DEFAULT, "fast", [80, 90])
    expected = ["spill: hae.hae_bwd sm_90", "fenced atomic in a backward kernel: projected.bwd sm_90",
                "fenced atomic in a CUDA C++ kernel: cuda.knn_select", "compile error: knn.gather_mean",
                "no mma/wgmma in the default kNN search: knn.knn_search sm_80"]
    assert len(failures) == len(expected), failures
    for start, line in zip(expected, failures, strict=True):
        assert line.startswith(start) and "\n" not in line, (start, line)
    assert "8 B stored, 4 B loaded" in failures[0] and "boom" in failures[3]

    # Another default precision than the case tables assume; a search dtype that is not the default.
    assert report.gates([_row(dtype="fp32", mma=())], DEFAULT, "highest", [90]) == [
        "default kNN search: grasp.ops.topk_neighbor_mean's default precision is 'highest', but DEFAULT_KNN_SEARCH in "
        "benchmarks/_gpu_cases.py assumes 'fast'"]


def test_byte_and_flop_model():
    fwd = gpu_model.holistic_attention_forward(2, 3, 4, "fp32")
    # user, user_sim [2, 4]; item, item_sim [2, 3, 4]; out [2, 3, 16]; 8 FLOPs per position and column.
    assert (fwd.bytes, fwd.flops) == ((2 * 2 * 4 + 2 * 2 * 3 * 4 + 2 * 3 * 16) * 4, 8 * 2 * 3 * 4)
    per_position = gpu_model.holistic_attention_forward(2, 3, 4, "bf16", per_position=True)
    assert per_position.bytes == (2 * 2 * 3 * 4 * 2 + 2 * 3 * 16) * 2
    search = gpu_model.topk_neighbor_mean_search(q=3, n=10, D=4, k=2, dtype="bf16")
    assert (search.bytes, search.flops) == ((3 + 10) * 4 * 2 + 3 * 2 * 12, 2 * 3 * 10 * 4)
    both = gpu_model.holistic_attention_forward(2, 3, 4, "fp32") + gpu_model.holistic_attention_backward(
        2, 3, 4, "fp32"
    )
    assert both.flops == fwd.flops + gpu_model.holistic_attention_backward(2, 3, 4, "fp32").flops

    got = gpu_model.fractions(gpu_model.Work("k", "", bytes=2_000, flops=8_000), 1e-6, 4e9, 1e10)
    assert got["bytes_per_s"] == pytest.approx(2e9) and got["of_copy"] == pytest.approx(0.5)
    assert got["flops_per_s"] == pytest.approx(8e9) and got["of_matmul"] == pytest.approx(0.8)
    assert got["bound"] == pytest.approx(0.8)
    with pytest.raises(ValueError, match="seconds"):
        gpu_model.fractions(fwd, 0.0, 1.0, 1.0)
    assert len(list(gpu_model.target_work())) > 0


def _run_report(args: list[str], cache: Path) -> subprocess.CompletedProcess:
    # TRITON_INTERPRET stays set (tests/conftest.py sets it): the script must run itself again without it.
    command = [sys.executable, str(BENCHMARKS / "gpu_code_report.py"), *args, "--cache-dir", str(cache)]
    return subprocess.run(command, capture_output=True, text=True, timeout=900, env=dict(os.environ))


def test_report_compiles_offline_then_reads_its_cache(tmp_path):
    pytest.importorskip("triton")
    args = ["--only", "knn.gather_mean", "--arch", "90", "--no-cuda", "--jobs", "2"]
    first = _run_report([*args, "--csv", str(tmp_path / "first.csv")], tmp_path / "cache")
    assert first.returncode == 0, first.stdout[-2000:] + first.stderr[-3000:]
    summary = first.stdout.strip().splitlines()[-1]
    rows = list(csv.DictReader((tmp_path / "first.csv").open()))
    assert rows and f"{len(rows)} rows" in summary and " 0 cached" in summary, summary
    assert {r["kernel"] for r in rows} == {"knn.gather_mean"} and {r["arch"] for r in rows} == {"sm_90"}
    assert all(int(r["regs"]) > 0 and r["error"] == "" for r in rows)
    assert {r["dtype"] for r in rows} == {"fp32", "bf16"}

    second = _run_report([*args, "--csv", str(tmp_path / "second.csv")], tmp_path / "cache")
    assert second.returncode == 0, second.stderr[-3000:]
    assert " 0 compiled" in second.stdout and f"{len(rows)} cached" in second.stdout
    assert list(csv.DictReader((tmp_path / "second.csv").open())) == rows


def test_every_triton_kernel_has_a_case_table_that_fits_it(tmp_path):
    pytest.importorskip("triton")
    listed = _run_report(["--list", "--check", "--arch", "90"], tmp_path)
    assert listed.returncode == 0, listed.stdout[-3000:] + listed.stderr[-3000:]
    assert "FAIL" not in listed.stdout and "Triton compile jobs" in listed.stdout
