"""The CUDA path under torch.compile's tracing, without a GPU.

On CUDA the op runs as the ``triton_op``s ``rollingq::triton_attention_fwd/bwd``. Here fake CUDA
tensors stand in for real ones and a stand-in Triton driver (``benchmarks/_cubin.py``) answers the
target queries of the tracer's mutation analysis, so AOTAutograd traces the whole forward and
backward exactly as ``torch.compile`` does on a GPU: the graphs must hold the Triton kernels
(``triton_kernel_wrapper_functional``), not an opaque call of the op, and nothing that would
synchronise with the host (a copy from the CPU, a read of a value).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
    pytest.skip("traces the compiled kernels: run without TRITON_INTERPRET", allow_module_level=True)
triton = pytest.importorskip("triton")

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root holds the `benchmarks` package

from benchmarks._cubin import StandInDriver  # noqa: E402
from rollingq_kernels import rollingq_attention  # noqa: E402

SYNCING = ("_local_scalar_dense", "aten.item", "aten.nonzero", "_assert_async", "_tensor_constant")


@pytest.fixture
def stand_in_driver():
    from triton.runtime.driver import driver

    previous = driver._active
    StandInDriver(90).install()
    yield
    driver._active = previous


def _graphs(fn, *inputs) -> list[str]:
    """The code of the graphs AOTAutograd traces for ``fn(*inputs)`` (fake CUDA tensors, no grad)."""
    from torch._functorch.aot_autograd import aot_function

    graphs = []

    def keep(gm, example_inputs):
        graphs.append(gm.code)
        return gm

    aot_function(fn, fw_compiler=keep)(*inputs)
    return graphs


def _check(graphs: list[str]) -> None:
    assert graphs, "nothing was traced"
    for code in graphs:
        assert "triton_kernel_wrapper" in code
        assert "rollingq.triton_attention" not in code and "rollingq.attention" not in code
        for op in SYNCING:
            assert op not in code, op
        copies = [line for line in code.splitlines() if "_to_copy" in line and "device =" in line]
        assert not copies, copies  # a copy from the host


@pytest.mark.parametrize("class_only", [False, True], ids=["all_query", "class_only"])
def test_traced_forward_and_backward_hold_the_triton_kernels_and_no_sync(stand_in_driver, class_only):
    """The op's forward (with statistics), and the backward op its autograd Function calls.

    (The autograd engine itself cannot run on fake CUDA tensors without a GPU, so the backward
    op is traced directly: it is what the compiled backward graph calls.)
    """
    from torch._subclasses.fake_tensor import FakeTensorMode

    segments = [5, 7, 4]
    B, H, N, Dh = 2, 3, 1 + sum(segments), 64
    nq = 1 if class_only else N

    def forward(q, k, v, lengths, rotation):
        out, stats = rollingq_attention(q, k, v, segments, lengths=lengths, rotation=rotation, dropout_p=0.1,
                                        seed=7, backend="triton")
        return out, stats.mass, stats.cos

    def backward(grad, q, k, v, out, lse, lengths, rotation):
        return torch.ops.rollingq.triton_attention_bwd(grad, q, k, v, out, lse, segments, lengths, rotation,
                                                       0.125, 0.1, 7)

    with FakeTensorMode(allow_non_fake_inputs=True):
        cuda = torch.device("cuda")
        q = torch.empty(B, H, nq, Dh, device=cuda, dtype=torch.bfloat16)
        k, v = (torch.empty(B, H, N, Dh, device=cuda, dtype=torch.bfloat16) for _ in range(2))
        lengths = torch.empty(B, 3, device=cuda, dtype=torch.int64)
        rotation = torch.empty(H * Dh, H * Dh, device=cuda)
        lse = torch.empty(B, H, nq, device=cuda)
        _check(_graphs(forward, q, k, v, lengths, rotation))
        _check(_graphs(backward, q, q, k, v, q, lse, lengths, rotation))
