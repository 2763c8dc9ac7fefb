"""What one modality's input tensor looks like: datasets state it, encoders are built for it."""

from __future__ import annotations

from dataclasses import dataclass

KINDS = ("features", "spectrogram", "frames")


@dataclass(frozen=True)
class InputSpec:
    """One sample's tensor of a modality, without the batch dimension.

    Attributes:
        kind: ``"features"`` ``(L, F)`` token features, ``"spectrogram"`` ``(F, T)``
            a 1-channel spectrogram, or ``"frames"`` ``(T, 3, S, S)`` video frames.
        shape: the tensor's shape.
    """

    kind: str
    shape: tuple[int, ...]

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"kind: expected one of {KINDS}, got {self.kind!r}")
        object.__setattr__(self, "shape", tuple(int(s) for s in self.shape))
