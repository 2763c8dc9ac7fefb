"""TorchScript support of :class:`~rollingq_kernels.module.FusedRollingQAttention`: its body runs in Python.

The layer's ``forward`` has a TorchScript signature and hands the call to a ``torch.jit.ignore``'d method, so a
model holding the layer scripts (``torch.jit.script(model)``, as timm's tests do). The op, the layouts and the
statistics stay Python: a scripted model runs in Python (it cannot be saved with ``torch.jit.save``).
TorchScript calls an ignored method with the *scripted* module, which keeps only TorchScript attributes; so
``__prepare_scriptable__`` (called by ``torch.jit.script`` before it scripts the layer) registers the layer
under a fresh key, which the scripted module keeps as an int attribute (:func:`owner` looks the layer up; the
Python object TorchScript passes is a fresh wrapper at each call, so the registry keeps the layer for the rest of
the process). Parameters and buffers are the same tensors in both.
"""

from __future__ import annotations

import itertools
from typing import Any

_LAYERS: dict[int, Any] = {}
_KEYS = itertools.count(1)


def register(layer: Any) -> int:
    """A fresh key for ``layer``, about to be scripted."""
    key = next(_KEYS)
    _LAYERS[key] = layer
    return key


def owner(module: Any, layer_type: type) -> Any:
    """The layer behind ``module``: ``module`` itself, or the layer a scripted ``module`` was made from."""
    if isinstance(module, layer_type):
        return module
    key = int(getattr(module, "_script_key", 0))
    layer = _LAYERS.get(key)
    if layer is None:
        raise RuntimeError(f"a scripted {layer_type.__name__} (key {key}) has no layer behind it; "
                           "script the model with torch.jit.script in this process")
    return layer
