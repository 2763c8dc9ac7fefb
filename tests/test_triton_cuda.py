"""The Triton kernels on a CUDA GPU at realistic sizes (skipped without CUDA).

Every comparison is against the float64 eager reference computed from the same (already
rounded) inputs, with the error measured as ``‖x − ref‖₂ / ‖ref‖₂`` (relative RMS: robust
to the single worst rounding event that dominates a max-abs metric).
"""

from __future__ import annotations

import os

import pytest
import torch

_COLLECT_ONLY = os.environ.get("ROLLINGQ_COLLECT_ONLY") == "1"  # benchmarks/run_gpu.sh --dry-run lists the cases
if not (torch.cuda.is_available() or _COLLECT_ONLY) or os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
    pytest.skip("needs a CUDA GPU (and TRITON_INTERPRET unset)", allow_module_level=True)

import rollingq_kernels  # noqa: E402
from rollingq_kernels import rollingq_attention  # noqa: E402
from rollingq_kernels.class_query import rotate_class_query  # noqa: E402
from rollingq_kernels.stats import STATISTICS  # noqa: E402
from rollingq_kernels.triton import launch as ta  # noqa: E402

pytestmark = pytest.mark.cuda
CUDA = torch.device("cuda")

# Relative RMS error allowed against the float64 reference. float32 runs its tile matmuls with
# 3xTF32 (fp32-accurate); float16/bfloat16 round P and dS to the input dtype before the tile
# matmuls, as flash attention does, and must stay within 2x of PyTorch's eager error (below).
TOL = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
STATS_ATOL = 1e-4  # float32 statistics, sums over up to ~1000 keys

ALL_QUERY = dict(B=4, H=12, Dh=64, class_only=False)
CLASS_ONLY = dict(B=64, H=1, Dh=768, class_only=True)
SEGMENTS = {  # (two modalities, three modalities); N = 1 + sum
    False: ([300, 800], [100, 500, 500]),
    True: ([124, 248], [100, 124, 148]),
}


def _rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    ref = ref.double()
    return float((x.double() - ref).norm() / ref.norm().clamp_min(1e-300))


def _lengths(B: int, segments: list[int], seed: int, empty: bool) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    cols = [torch.randint(1, s + 1, (B,), generator=g) for s in segments]
    lengths = torch.stack(cols, dim=1)
    lengths[0] = torch.tensor(segments)  # one full sample
    if empty:
        lengths[1, 1] = 0  # an empty modality
    return lengths.to(CUDA)


def _problem(B, H, Dh, class_only, segments, dtype, seed):
    g = torch.Generator(device=CUDA).manual_seed(seed)
    N = 1 + sum(segments)
    nq = 1 if class_only else N
    q = torch.randn(B, H, nq, Dh, generator=g, device=CUDA).to(dtype)
    k = torch.randn(B, H, N, Dh, generator=g, device=CUDA).to(dtype)
    v = torch.randn(B, H, N, Dh, generator=g, device=CUDA).to(dtype)
    grad = torch.randn(B, H, nq, Dh, generator=g, device=CUDA).to(dtype)
    return q, k, v, grad


def _run(backend, q, k, v, grad, segments, dtype=None, **kw):
    dtype = dtype or q.dtype
    leaves = [t.to(dtype).detach().requires_grad_() for t in (q, k, v)]
    out, stats = rollingq_attention(*leaves, segments, backend=backend, **kw)
    grads = torch.autograd.grad(out, leaves, grad.to(dtype))
    return out.detach(), stats, grads


def _reference(q, k, v, grad, segments, **kw):
    """The float64 oracle of the contract for inputs of ``q.dtype``.

    The contract rounds the rotated class query to the input dtype; running the float64 reference on
    ``q`` with row 0 already rotated and rounded (and no rotation) reproduces that exactly. The gradient
    of that row is then mapped back through the rotation: ``dq0 = dq0_rot @ R``.
    """
    rot = kw.pop("rotation", None)
    if rot is not None:
        q = q.clone()
        q[:, :, 0] = rotate_class_query(q[:, :, 0], rot)
    out, stats, grads = _run("reference", q, k, v, grad, segments, dtype=torch.float64, **kw)
    if rot is not None:
        dq = grads[0].clone()
        B, H, _, Dh = dq.shape
        r = rot.double()
        if r.dim() == 2:
            dq[:, :, 0] = (dq[:, :, 0].reshape(B, H * Dh) @ r).reshape(B, H, Dh)
        else:
            dq[:, :, 0] = torch.einsum("bhe,hed->bhd", dq[:, :, 0], r)
        grads = (dq, *grads[1:])
    return out, stats, grads


def _rotation(kind, H, Dh, seed):
    if kind is None:
        return None
    g = torch.Generator(device=CUDA).manual_seed(seed)
    shape = (H * Dh, H * Dh) if kind == "global" else (H, Dh, Dh)
    return torch.linalg.qr(torch.randn(*shape, generator=g, device=CUDA, dtype=torch.float64))[0].float()


VARIANTS = {
    "plain": dict(three=False, lengths=False, empty=False, rotation=None, dropout_p=0.0),
    "lengths_global_rotation_dropout": dict(three=False, lengths=True, empty=False, rotation="global", dropout_p=0.2),
    "three_modalities_empty_per_head": dict(three=True, lengths=True, empty=True, rotation="per_head", dropout_p=0.1),
}


def _variant_kwargs(case, variant, seed):
    spec = VARIANTS[variant]
    segments = SEGMENTS[case["class_only"]][1 if spec["three"] else 0]
    kw = dict(
        lengths=_lengths(case["B"], segments, seed, spec["empty"]) if spec["lengths"] else None,
        rotation=_rotation(spec["rotation"], case["H"], case["Dh"], seed),
        dropout_p=spec["dropout_p"], seed=4321 + seed,
    )
    return segments, kw


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("case", [ALL_QUERY, CLASS_ONLY], ids=["all_query", "class_only"])
def test_matches_float64_reference(case, dtype, variant):
    segments, kw = _variant_kwargs(case, variant, seed=11)
    q, k, v, grad = _problem(case["B"], case["H"], case["Dh"], case["class_only"], segments, dtype, seed=12)
    out, stats, grads = _run("triton", q, k, v, grad, segments, **kw)
    r_out, r_stats, r_grads = _reference(q, k, v, grad, segments, **kw)
    assert out.dtype == dtype
    for name, a, r in zip(("out", "dq", "dk", "dv"), (out, *grads), (r_out, *r_grads)):
        assert _rel_err(a, r) <= TOL[dtype], (name, _rel_err(a, r))
    for field in (s.name for s in STATISTICS if s.dtype.is_floating_point):
        a, r = getattr(stats, field), getattr(r_stats, field)
        torch.testing.assert_close(a.double(), r.double(), atol=STATS_ATOL, rtol=STATS_ATOL, msg=field)
    assert torch.equal(stats.valid, r_stats.valid)
    if kw["lengths"] is not None and not case["class_only"]:
        lengths = kw["lengths"].cpu()
        b = 1
        pad_start = 1 + segments[0] + int(lengths[b, 1])
        pad_end = 1 + segments[0] + segments[1]
        if pad_end > pad_start:  # padded query rows: exactly zero output and gradient
            assert torch.count_nonzero(out[b, :, pad_start:pad_end]) == 0
            assert torch.count_nonzero(grads[0][b, :, pad_start:pad_end]) == 0


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("case", [ALL_QUERY, CLASS_ONLY], ids=["all_query", "class_only"])
def test_half_precision_within_twice_eager_error(case, dtype):
    """Triton in bf16/fp16 vs PyTorch's eager reference run in the same dtype, both against float64."""
    segments, kw = _variant_kwargs(case, "lengths_global_rotation_dropout", seed=21)
    q, k, v, grad = _problem(case["B"], case["H"], case["Dh"], case["class_only"], segments, dtype, seed=22)
    tri = _run("triton", q, k, v, grad, segments, **kw)
    eager = _run("reference", q, k, v, grad, segments, **kw)
    ref = _reference(q, k, v, grad, segments, **kw)
    for i, name in enumerate(("out", "dq", "dk", "dv")):
        pick = (lambda r, i=i: r[0]) if i == 0 else (lambda r, i=i: r[2][i - 1])
        e_tri, e_eager = _rel_err(pick(tri), pick(ref)), _rel_err(pick(eager), pick(ref))
        assert e_tri <= 2.0 * e_eager + 1e-6, (name, e_tri, e_eager)


@pytest.mark.parametrize("case", [ALL_QUERY, CLASS_ONLY], ids=["all_query", "class_only"])
def test_deterministic(case):
    segments, kw = _variant_kwargs(case, "three_modalities_empty_per_head", seed=31)
    q, k, v, grad = _problem(case["B"], case["H"], case["Dh"], case["class_only"], segments, torch.bfloat16, seed=32)
    first = _run("triton", q, k, v, grad, segments, **kw)
    second = _run("triton", q, k, v, grad, segments, **kw)
    assert torch.equal(first[0], second[0])
    assert all(torch.equal(a, b) for a, b in zip(first[2], second[2]))
    assert torch.equal(first[1].key_mean, second[1].key_mean) and torch.equal(first[1].mass, second[1].mass)


def test_torch_compile_fullgraph_forward_backward():
    segments = [300, 800]
    q, k, v, grad = _problem(2, 4, 64, False, segments, torch.float16, seed=41)

    def step(q, k, v):
        out, stats = rollingq_attention(q, k, v, segments, dropout_p=0.1, seed=7, backend="triton")
        return out, stats.mass, stats.cos

    compiled = torch.compile(step, fullgraph=True)
    results = []
    for fn in (step, compiled):
        leaves = [t.detach().requires_grad_() for t in (q, k, v)]
        out, mass, cos = fn(*leaves)
        out.backward(grad)
        results.append((out.detach(), mass, cos, [t.grad for t in leaves]))
    (o1, m1, c1, g1), (o2, m2, c2, g2) = results
    torch.testing.assert_close(o2, o1, atol=0, rtol=0)
    torch.testing.assert_close(m2, m1, atol=0, rtol=0)
    torch.testing.assert_close(c2, c1, atol=1e-6, rtol=1e-6)
    for a, b in zip(g2, g1):
        torch.testing.assert_close(a, b, atol=0, rtol=0)


@pytest.mark.skipif(not rollingq_kernels.HAS_CPP, reason="the C++ CPU kernels are not built")
@pytest.mark.parametrize("class_only", [False, True], ids=["all_query", "class_only"])
def test_agrees_with_cpp_cpu_kernels(class_only):
    segments = [124, 248]
    q, k, v, grad = _problem(2, 4, 64, class_only, segments, torch.float32, seed=51)
    lengths = _lengths(2, segments, seed=52, empty=True)
    rot = _rotation("per_head", 4, 64, seed=53)
    kw = dict(lengths=lengths, rotation=rot, dropout_p=0.15, seed=99)
    out, stats, grads = _run("triton", q, k, v, grad, segments, **kw)
    cpu_kw = dict(kw, lengths=lengths.cpu(), rotation=rot.cpu())
    c_out, c_stats, c_grads = _run("cpp", q.cpu(), k.cpu(), v.cpu(), grad.cpu(), segments, **cpu_kw)
    for name, a, c in zip(("out", "dq", "dk", "dv"), (out, *grads), (c_out, *c_grads)):
        assert _rel_err(a.cpu(), c) <= 5e-5, name
    for field in ("key_mean", "mass", "cos", "query"):
        torch.testing.assert_close(getattr(stats, field).cpu(), getattr(c_stats, field), atol=1e-5, rtol=1e-5)


def test_class_only_head_dim_1024_and_the_2048_error():
    segments = [60, 67]
    q, k, v, grad = _problem(8, 2, 1024, True, segments, torch.bfloat16, seed=61)
    lengths = _lengths(8, segments, seed=62, empty=True)
    out, stats, grads = _run("triton", q, k, v, grad, segments, lengths=lengths)
    r_out, r_stats, r_grads = _run("reference", q, k, v, grad, segments, dtype=torch.float64, lengths=lengths)
    for a, r in zip((out, *grads), (r_out, *r_grads)):
        assert _rel_err(a, r) <= TOL[torch.bfloat16]
    torch.testing.assert_close(stats.mass.double(), r_stats.mass.double(), atol=STATS_ATOL, rtol=STATS_ATOL)
    big = torch.randn(1, 1, 1, 2048, device=CUDA, dtype=torch.float16)
    kbig = torch.randn(1, 1, 1 + sum(segments), 2048, device=CUDA, dtype=torch.float16)
    with pytest.raises(ValueError, match="Dh <= 1024.*backend='cpp' or backend='reference'"):
        rollingq_attention(big, kbig, kbig, segments, backend="triton")


def _free_bytes() -> int:
    free, _ = torch.cuda.mem_get_info()
    return free


@pytest.mark.parametrize(
    ("B", "H", "segments", "Dh", "class_only"),
    [(2048, 16, [512, 512], 64, False), (8, 8, [16384, 16384], 1024, True)],
    ids=["all_query", "class_only"],
)
def test_int64_offsets(B, H, segments, Dh, class_only):
    """B·H·N·Dh > 2**31 elements: the last sample's data lies beyond int32 offsets."""
    N = 1 + sum(segments)
    assert B * H * N * Dh > 2**31
    nq = 1 if class_only else N
    elems = 2 * (2 * B * H * N * Dh + 2 * B * H * nq * Dh)  # inputs, outputs and their grads (fp16)
    if _free_bytes() < 2 * elems * 2:
        pytest.skip(f"needs about {4 * elems / 2**30:.0f} GiB of free GPU memory")
    g = torch.Generator(device=CUDA).manual_seed(71)
    q = torch.randn(B, H, nq, Dh, generator=g, device=CUDA, dtype=torch.float16)
    k = torch.randn(B, H, N, Dh, generator=g, device=CUDA, dtype=torch.float16)
    v = torch.randn(B, H, N, Dh, generator=g, device=CUDA, dtype=torch.float16)
    grad = torch.randn(B, H, nq, Dh, generator=g, device=CUDA, dtype=torch.float16)
    out, stats, grads = _run("triton", q, k, v, grad, segments, compute_stats=True)
    last = slice(B - 1, B)  # the sample whose offsets exceed 2**31
    r_out, r_stats, r_grads = _run("reference", q[last], k[last], v[last], grad[last], segments, dtype=torch.float64)
    assert _rel_err(out[last], r_out) <= TOL[torch.float16]
    for a, r in zip(grads, r_grads):
        assert _rel_err(a[last], r) <= TOL[torch.float16]
    torch.testing.assert_close(stats.key_mean[last].double(), r_stats.key_mean.double(), atol=STATS_ATOL, rtol=0)


def test_registered_ops_dispatch_to_triton_on_cuda():
    segments = [10, 13]
    q, k, v, _ = _problem(2, 3, 32, False, segments, torch.float16, seed=81)
    direct = ta.attention_fwd(q, k, v, segments, None, None, 0.2, 0.0, 0, True)
    for op in (torch.ops.rollingq.attention_fwd, torch.ops.rollingq.triton_attention_fwd):
        via_op = op(q, k, v, segments, None, None, 0.2, 0.0, 0, True)
        for a, b in zip(direct, via_op):
            assert torch.equal(a, b)


def _training_step(case, variant="three_modalities_empty_per_head", dtype=torch.bfloat16, seed=91):
    """``(step, leaves, grad)``: one forward + backward of the op on fixed inputs of ``variant``."""
    segments, kw = _variant_kwargs(case, variant, seed=seed)
    q, k, v, grad = _problem(case["B"], case["H"], case["Dh"], case["class_only"], segments, dtype, seed=seed + 1)
    leaves = [t.detach().requires_grad_() for t in (q, k, v)]

    def step():
        out, stats = rollingq_attention(*leaves, segments, backend="triton", **kw)
        dq, dk, dv = torch.autograd.grad(out, leaves, grad)
        return out, stats.mass, stats.key_mean, stats.cos, dq, dk, dv

    return step, leaves, grad


@pytest.mark.parametrize("variant", ["three_modalities_empty_per_head", "plain"])  # lengths / None
@pytest.mark.parametrize("case", [ALL_QUERY, CLASS_ONLY], ids=["all_query", "class_only"])
def test_no_host_synchronisation_per_call(case, variant):
    """After the first calls (autotuning, the segment table), a forward + backward never waits for the GPU."""
    step, _, _ = _training_step(case, variant)
    for _ in range(2):
        step()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()


@pytest.mark.parametrize("variant", ["three_modalities_empty_per_head", "plain"])  # lengths / None
@pytest.mark.parametrize("case", [ALL_QUERY, CLASS_ONLY], ids=["all_query", "class_only"])
def test_cuda_graph_capture_of_forward_and_backward(case, variant):
    """fwd + bwd captured in one CUDA graph; replays on new inputs equal eager calls bitwise."""
    step, leaves, _ = _training_step(case, variant)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up: autotuning and the segment table happen here, not in the capture
        for _ in range(2):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = step()
    for seed in (5, 6):
        g = torch.Generator(device=CUDA).manual_seed(seed)
        with torch.no_grad():
            for t in leaves:
                t.copy_(torch.randn(t.shape, generator=g, device=CUDA).to(t.dtype))
        graph.replay()
        expected = step()
        torch.cuda.synchronize()
        for name, a, b in zip(("out", "mass", "key_mean", "cos", "dq", "dk", "dv"), captured, expected):
            assert torch.equal(a, b), name


def test_torch_compile_traces_into_the_triton_kernels():
    """Under torch.compile the CUDA path is a triton_op: the graphs hold the kernels, not an opaque op."""
    from torch._dynamo.backends.common import aot_autograd

    graphs = []

    def keep(gm, example_inputs):
        graphs.append(gm)
        return gm

    segments = [300, 800]
    q, k, v, grad = _problem(2, 4, 64, False, segments, torch.bfloat16, seed=95)
    leaves = [t.detach().requires_grad_() for t in (q, k, v)]

    def f(q, k, v):
        out, stats = rollingq_attention(q, k, v, segments, backend="triton", dropout_p=0.1, seed=3)
        return out, stats.mass

    compiled = torch.compile(f, backend=aot_autograd(fw_compiler=keep, bw_compiler=keep), fullgraph=True)
    out, _ = compiled(*leaves)
    out.backward(grad)
    code = "\n".join(gm.code for gm in graphs)
    assert "triton_kernel_wrapper" in code
    assert "triton_attention_fwd" not in code and "triton_attention_bwd" not in code
