"""Whole-model integrations: timm (:mod:`.timm`) and Hugging Face transformers (:mod:`.transformers`).

Neither imports its library at import time except :mod:`.transformers`, which registers ``"rollingq"`` with
``transformers.AttentionInterface`` when imported. :func:`rollingq_kernels.apply_rollingq` picks the right one.
"""
