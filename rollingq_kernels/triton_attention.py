"""Compatibility name: the Triton kernels live in :mod:`rollingq_kernels.triton`."""

from .triton import attention_bwd, attention_fwd

__all__ = ["attention_bwd", "attention_fwd"]
