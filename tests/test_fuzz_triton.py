"""Fuzz: the Triton kernels against the float64 reference (see ``fuzz_op.py``), smaller than the C++ fuzz.

Runs in Triton's interpreter on CPU (the CI step ``TRITON_INTERPRET=1 pytest tests/test_triton_kernels.py
... tests/test_fuzz_triton.py``, see ``.ci/run``; the variable must be set before Triton is imported) or on a CUDA GPU.
"""

from __future__ import annotations

import os

import pytest
import torch

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
if not _INTERPRET and not torch.cuda.is_available():
    pytest.skip("needs TRITON_INTERPRET=1 (Triton's CPU interpreter) or a CUDA GPU", allow_module_level=True)

from fuzz_op import cases, compare, examples, make_inputs, poison  # noqa: E402
from hypothesis import given, settings  # noqa: E402

pytestmark = pytest.mark.triton_interpret
DEVICE = "cpu" if _INTERPRET else "cuda"
# float64 gradients are limited by the float32 log-sum-exp the forward saves (the contract's lse dtype)
TRITON_TOL = {torch.float64: (1e-10, 2e-6), torch.float32: (2e-5, 2e-4)}
SMALL = dict(max_batch=2, max_heads=2, head_dims=(1, 3, 8, 16), max_segment=12)


@settings(max_examples=examples(12))
@given(case=cases(**SMALL))
def test_triton_matches_the_float64_reference(case):
    compare("triton", case, make_inputs(case), device=DEVICE, tol=TRITON_TOL)


@settings(max_examples=examples(6))
@given(case=cases(need_padding=True, **SMALL))
def test_triton_with_nan_in_padding_matches_the_clean_reference(case):
    clean = make_inputs(case)
    compare("triton", case, poison(clean), reference_inputs=clean, device=DEVICE, tol=TRITON_TOL)


@settings(max_examples=examples(4))
@given(case=cases(**{**SMALL, "min_batch": 0, "max_batch": 0}) | cases(**{**SMALL, "min_heads": 0, "max_heads": 0}))
def test_triton_empty_batch_or_heads(case):
    compare("triton", case, make_inputs(case), device=DEVICE, tol=TRITON_TOL)
