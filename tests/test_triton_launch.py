"""The Triton launchers, tables and registration (launch.py, tables.py, register.py), interpreter or GPU.

Splits of the class-only path, the head-dimension limit, empty batches, errors naming the argument,
no aliasing, the cached segment table, the debug value checks and the registered ops' schemas.
``TRITON_INTERPRET=1`` as for ``test_triton_kernels.py``.
"""

from __future__ import annotations

import pytest
import torch
from triton_cases import skip_without_triton

skip_without_triton()

from triton_cases import (  # noqa: E402
    DEVICE,
)

from rollingq_kernels.stats import KERNEL_STATISTICS, KernelOutputs  # noqa: E402
from rollingq_kernels.triton import launch as ta  # noqa: E402
from rollingq_kernels.triton.launch import SPLITS_ENV  # noqa: E402

pytestmark = pytest.mark.triton_interpret


def test_split_heuristic_fills_the_gpu(monkeypatch):
    monkeypatch.delenv(SPLITS_ENV, raising=False)
    from rollingq_kernels.triton.launch import class_only_splits

    cpu = torch.device("cpu")  # nominal 132 SMs off CUDA
    assert class_only_splits(64, 373, cpu) == 6  # 373 keys allow at most ceil(373 / 64) splits
    assert class_only_splits(64, 4097, cpu) == 9  # ceil(4 * 132 / 64): about four programs per SM
    assert class_only_splits(1024, 4097, cpu) == 1  # B*H alone fills the GPU
    monkeypatch.setenv(SPLITS_ENV, "0")
    with pytest.raises(ValueError, match=SPLITS_ENV):
        class_only_splits(64, 373, cpu)

@pytest.mark.parametrize(("nq", "head_dim", "mode"), [(1, 1032, "class-only"), (19, 264, "all-query")])
def test_head_dim_limit_error(nq, head_dim, mode):
    segments = [9, 9]
    q = torch.randn(1, 1, nq, head_dim)
    k = torch.randn(1, 1, 19, head_dim)
    with pytest.raises(ValueError, match=f"{mode}.*backend='cpp' or backend='reference'"):
        ta.attention_fwd(q, k, k, segments, None, None, 0.1, 0.0, 0, True)

def test_cuda_kernels_are_registered():
    for op in ("rollingq::attention_fwd", "rollingq::attention_bwd"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(op, "CUDA"), op

@pytest.mark.parametrize(("B", "H"), [(0, 2), (2, 0)])
@pytest.mark.parametrize("class_only", [False, True], ids=["all_query", "class_only"])
def test_empty_batch_or_heads_give_empty_outputs(B, H, class_only):
    segments = [3, 4]
    N = 1 + sum(segments)
    q = torch.randn(B, H, 1 if class_only else N, 16, device=DEVICE)
    k, v = torch.randn(B, H, N, 16, device=DEVICE), torch.randn(B, H, N, 16, device=DEVICE)
    fwd = ta.attention_fwd(q, k, v, segments, None, None, 0.25, 0.0, 0, True)
    assert fwd.out.shape == q.shape and fwd.lse.shape == (B, H, q.shape[2])
    for s in KERNEL_STATISTICS:
        assert getattr(fwd, s.name).shape == s.shape_of(B, H, 2, 16), s.name
    dq, dk, dv = ta.attention_bwd(torch.randn_like(q), q, k, v, fwd.out, fwd.lse, segments, None, None, 0.25, 0.0, 0)
    assert dq.shape == q.shape and dk.shape == k.shape and dv.shape == v.shape

def test_launcher_errors_name_the_argument():
    segments = [3, 4]
    q, k = torch.randn(1, 2, 8, 16, device=DEVICE), torch.randn(1, 2, 8, 16, device=DEVICE)
    call = lambda **kw: ta.attention_fwd(**{**dict(q=q, k=k, v=k, segments=segments, lengths=None,  # noqa: E731
                                                   rotation=None, scale=0.25, dropout_p=0.0, seed=0,
                                                   compute_stats=True), **kw})
    with pytest.raises(TypeError, match="q, k, v: expected one dtype"):
        call(k=k.double())
    with pytest.raises(TypeError, match="lengths: expected int64"):
        call(lengths=torch.ones(1, 2, dtype=torch.int32, device=DEVICE))
    with pytest.raises(ValueError, match=r"lengths: expected shape \(1, 2\)"):
        call(lengths=torch.ones(2, 2, dtype=torch.int64, device=DEVICE))
    with pytest.raises(ValueError, match="segments: expected"):
        call(segments=[3, 5])
    with pytest.raises(TypeError, match="rotation: expected float32 or float64"):
        call(rotation=torch.eye(32, dtype=torch.float16, device=DEVICE))
    with pytest.raises(ValueError, match="rotation: expected shape"):
        call(rotation=torch.eye(16, device=DEVICE))
    with pytest.raises(ValueError, match="q: expected shape"):
        call(q=torch.randn(1, 2, 5, 16, device=DEVICE))

def test_outputs_never_alias_inputs_and_q_is_not_copied_for_the_rotation():
    segments = [3, 4]
    q = torch.randn(2, 2, 1, 16, device=DEVICE)
    k = torch.randn(2, 2, 8, 16, device=DEVICE)
    outs = ta.attention_fwd(q, k, k, segments, None, None, 0.25, 0.0, 0, True)  # fp32, class-only, no rotation
    storages = {t.untyped_storage().data_ptr() for t in (q, k)}
    assert all(t.untyped_storage().data_ptr() not in storages for t in outs)
    q_all = torch.randn(2, 2, 8, 16, device=DEVICE)
    before = q_all.clone()
    rot = torch.linalg.qr(torch.randn(2, 16, 16, dtype=torch.float64))[0].float().to(DEVICE)
    ta.attention_fwd(q_all, k, k, segments, None, rot, 0.25, 0.0, 0, True)
    assert torch.equal(q_all, before)

def test_segment_table_is_cached_per_layout_and_device():
    from rollingq_kernels.triton import tables

    a = tables.segment_table([5, 7, 4], torch.empty(1, device=DEVICE))
    b = tables.segment_table((5, 7, 4), torch.empty(3, device=DEVICE))
    assert a is b and a.tolist() == [0, 1, 6, 13, 17] and a.dtype == torch.int32
    assert tables.segment_table([5, 7], torch.empty(1, device=DEVICE)) is not a

def test_value_checks_on_cuda_only_under_the_debug_flag(monkeypatch):
    """Reading ``lengths``/``rotation`` back synchronises with the GPU: on CUDA only with ROLLINGQ_DEBUG_CHECKS=1."""
    from rollingq_kernels import checks

    monkeypatch.delenv(checks.DEBUG_CHECKS_ENV, raising=False)
    assert checks._reads_values(torch.device("cpu"))
    assert not checks._reads_values(torch.device("cuda", 0))
    monkeypatch.setenv(checks.DEBUG_CHECKS_ENV, "1")
    assert checks._reads_values(torch.device("cuda", 0))

@pytest.mark.parametrize("class_only", [False, True], ids=["all_query", "class_only"])
def test_triton_ops_schema_no_aliasing_no_mutation(class_only):
    """``torch.library.opcheck``'s schema test: outputs never alias inputs (float32 class-only ``query``
    included), inputs are not written."""
    from rollingq_kernels.triton import register

    segs = [3, 4]
    nq = 1 if class_only else 8
    q, k, v = (torch.randn(2, 2, n, 16, device=DEVICE) for n in (nq, 8, 8))
    lengths = torch.tensor([[2, 4], [3, 1]], device=DEVICE)
    fwd_args = (q, k, v, segs, lengths, None, 0.25, 0.1, 3, True)
    torch.library.opcheck(register.triton_attention_fwd, fwd_args, test_utils=("test_schema",))
    fwd = KernelOutputs(*register.triton_attention_fwd(*fwd_args))
    out, lse = fwd.out, fwd.lse
    bwd_args = (torch.randn_like(q), q, k, v, out, lse, segs, lengths, None, 0.25, 0.1, 3)
    torch.library.opcheck(register.triton_attention_bwd, bwd_args, test_utils=("test_schema",))
