"""Turning controller records and tensors into JSON-ready values, and the metrics.jsonl file."""

from __future__ import annotations

import json
import math
from typing import Any

import torch

from .checkpoint import atomic_write_bytes


def jsonable(value: Any) -> Any:
    """Recursively convert tensors, tuples, dataclass-like records and NaN/inf floats into JSON values."""
    if hasattr(value, "to_dict") and callable(value.to_dict):
        return jsonable(value.to_dict())
    if isinstance(value, torch.Tensor):
        return jsonable(value.detach().cpu().tolist())
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, (int, str, bool)) or value is None:
        return value
    if hasattr(value, "_asdict"):
        return jsonable(value._asdict())
    if hasattr(value, "__dict__"):
        return jsonable(vars(value))
    return str(value)


def write_metrics(path: str, history: list[dict]) -> None:
    """Rewrite ``metrics.jsonl`` (one JSON object per epoch) atomically from ``history``."""
    text = "".join(json.dumps(jsonable(row)) + "\n" for row in history)
    atomic_write_bytes(text.encode("utf-8"), path)


def read_metrics(path: str) -> list[dict]:
    """The rows of a ``metrics.jsonl`` file (blank lines skipped); raises ``ValueError`` naming a bad line."""
    records = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}:{lineno}: not a JSON object ({exc})") from exc
    return records
