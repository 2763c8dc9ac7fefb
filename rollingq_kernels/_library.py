"""The op library: the ``rollingq`` op schemas, the compiled extension and the fake kernels.

This is the bottom layer of the kernel package and imports nothing of it. It

* holds the two schemas (:data:`FWD_SCHEMA`, :data:`BWD_SCHEMA`): the one
  definition the C++ registration (``csrc/ops.cpp``) is checked against
  (``tests/test_cpp_kernels.py``) and the one the fallback below defines;
* loads ``rollingq_kernels._C`` (the C++ CPU kernels, which register the ops
  with ``TORCH_LIBRARY``) or, when it is missing, defines the schemas itself so
  the Triton path and ``torch.compile`` still work (:data:`HAS_CPP` says which);
* registers the fake (meta) implementations ``torch.compile`` and ``opcheck``
  use;
* answers whether Triton runs in its CPU interpreter (:func:`triton_interpret`).
"""

from __future__ import annotations

import importlib.util
import os

import torch

#: ``rollingq::attention_fwd`` (without the namespace).
FWD_SCHEMA = (
    "attention_fwd(Tensor q, Tensor k, Tensor v, int[] segments, Tensor? lengths, "
    "Tensor? rotation, float scale, float dropout_p, int seed, bool compute_stats) "
    "-> (Tensor out, Tensor lse, Tensor key_mean, Tensor mass, Tensor query)"
)
#: ``rollingq::attention_bwd`` (without the namespace).
BWD_SCHEMA = (
    "attention_bwd(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, "
    "int[] segments, Tensor? lengths, Tensor? rotation, float scale, float dropout_p, int seed) "
    "-> (Tensor dq, Tensor dk, Tensor dv)"
)

#: How to get the compiled kernels (used in messages).
BUILD_HINT = (
    "build them with `pip install --no-build-isolation -e .` "
    "(unset ROLLINGQ_SKIP_EXTENSION; needs a C++ compiler)"
)

try:  # the compiled CPU kernels; importing registers the ops with the dispatcher
    from . import _C  # type: ignore[attr-defined]  # noqa: F401

    HAS_CPP = True
    CPP_IMPORT_ERROR: str | None = None
except ImportError as exc:  # pragma: no cover - exercised in the skip-extension install
    HAS_CPP = False
    if importlib.util.find_spec("rollingq_kernels._C") is None:
        CPP_IMPORT_ERROR = "rollingq_kernels._C is not built"
    else:  # built but not loadable, e.g. compiled against another torch
        CPP_IMPORT_ERROR = f"rollingq_kernels._C failed to load: {exc}"
    _fallback_lib = torch.library.Library("rollingq", "DEF")  # noqa: TOR901
    _fallback_lib.define(FWD_SCHEMA)
    _fallback_lib.define(BWD_SCHEMA)


def triton_interpret() -> bool:
    """True when Triton runs in its CPU interpreter (``TRITON_INTERPRET=1`` set before Triton is imported)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@torch.library.register_fake("rollingq::attention_fwd")
def _attention_fwd_fake(q, k, v, segments, lengths, rotation, scale, dropout_p, seed, compute_stats):
    B, H, nq, Dh = q.shape
    M = len(segments)
    out = torch.empty_like(q)
    lse = q.new_empty((B, H, nq), dtype=torch.float32)
    if compute_stats:
        key_mean = q.new_empty((B, H, M, Dh), dtype=torch.float32)
        mass = q.new_empty((B, H, M + 1), dtype=torch.float32)
        query = q.new_empty((B, H, Dh), dtype=torch.float32)
    else:
        key_mean, mass, query = (q.new_empty((0,), dtype=torch.float32) for _ in range(3))
    return out, lse, key_mean, mass, query


@torch.library.register_fake("rollingq::attention_bwd")
def _attention_bwd_fake(grad_out, q, k, v, out, lse, segments, lengths, rotation, scale, dropout_p, seed):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
