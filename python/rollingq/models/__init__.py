"""Models: per-modality encoders, fusion heads and detached linear probes, all with explicit arguments.

:class:`MultimodalModel` ``(modalities) -> ModelOutput``; :func:`rollingq.build.build_model` builds one
from a config.
"""

from .fusion import ATTENTION_FUSIONS, FUSIONS, STATIC_FUSIONS
from .multimodal import ModelOutput, MultimodalModel

__all__ = ["ATTENTION_FUSIONS", "FUSIONS", "STATIC_FUSIONS", "ModelOutput", "MultimodalModel"]
