"""The op's Triton kernels (``docs/op.md``): CUDA, or CPU under ``TRITON_INTERPRET=1``.

Modules, one job each:

* :mod:`.common` — device helpers every kernel shares (program prologue, token layout, dropout hash);
* :mod:`.forward` — the all-query forward kernel;
* :mod:`.class_only` — the class-only kernels (forward, combine, backward), also the statistics pass;
* :mod:`.backward` — the all-query backward kernels;
* :mod:`.configs` — block sizes, autotune candidates and pruning;
* :mod:`.tables` — the segment table, built without host synchronisation in steady state;
* :mod:`.launch` — the host launchers :func:`attention_fwd` / :func:`attention_bwd`;
* :mod:`.register` — the ``triton_op`` registration (imported here).
"""

from . import register  # noqa: F401  (registers the CUDA implementation of the ops)
from .launch import attention_bwd, attention_fwd

__all__ = ["attention_bwd", "attention_fwd"]
