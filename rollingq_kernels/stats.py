"""The op's statistics, declared once, and the cheap epilogue shared by all backends.

:data:`STATISTICS` is the one table of the statistics: for each its name, shape rule, dtype,
where it comes from (a kernel output of ``rollingq::attention_fwd``, or derived by the epilogue
from those) and how it enters the window sums of :mod:`rollingq_kernels.accumulator`. Everything
else is built from it: :class:`AttentionStats`, :class:`KernelOutputs` (the op's named results),
the op's output schema (:func:`forward_outputs_schema`), the fake kernels, the window sums and the
statistics table of ``docs/op.md`` (:func:`markdown_table`; a test checks the two agree).

Kernels produce the ``kernel`` statistics while they read K; :func:`finish_stats` derives the
others without touching K again (``O(B·H·M·Dh)`` work).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch

#: Where a statistic comes from.
KERNEL, EPILOGUE = "kernel", "epilogue"
#: How a statistic enters the window sums (float64, summed over the samples of every batch):
#: ``sum`` over samples; ``sum_present`` over samples where the modality is present (the ``M`` axis
#: masked by ``valid``); ``cosines`` the sums of :func:`~rollingq_kernels.accumulator.cosine_sums`
#: (AIR and the mean cosines); ``present`` the count of samples where each modality is present;
#: ``none``: not summed.
SUM, SUM_PRESENT, COSINES, PRESENT, NONE = "sum", "sum_present", "cosines", "present", "none"
#: The dimension names of a shape rule: batch, heads, modalities (``M+1`` with the class token), head size.
DIMS = ("B", "H", "M", "M+1", "Dh")


@dataclass(frozen=True)
class Statistic:
    """One statistic of the class-token query row.

    Attributes:
        name: the field of :class:`AttentionStats` (and of :class:`KernelOutputs` for a kernel statistic).
        shape: the shape rule, names of :data:`DIMS`, e.g. ``("B", "H", "M", "Dh")``.
        dtype: the returned dtype.
        source: :data:`KERNEL` (an output of ``rollingq::attention_fwd``) or :data:`EPILOGUE`.
        reduce: how it enters the window sums (:data:`SUM`, :data:`SUM_PRESENT`, :data:`COSINES`,
            :data:`PRESENT` or :data:`NONE`).
        definition: what it is (the definition column of ``docs/op.md``).
        sum_name: its window sum (``sum`` / ``sum_present``), shape :attr:`shape` without ``B``.
        mean_name: the :class:`~rollingq_kernels.accumulator.WindowStatistics` field of its window mean.
        absent_mean: ``sum_present``: the window mean where the modality never was present.
    """

    name: str
    shape: tuple[str, ...]
    dtype: torch.dtype
    source: str
    reduce: str
    definition: str
    sum_name: str | None = None
    mean_name: str | None = None
    absent_mean: float = 0.0

    def __post_init__(self) -> None:
        if any(d not in DIMS for d in self.shape) or self.shape[:1] != ("B",):
            raise ValueError(f"{self.name}: shape rule {self.shape} must start with 'B' and use {DIMS}")
        if self.source not in (KERNEL, EPILOGUE):
            raise ValueError(f"{self.name}: source must be {KERNEL!r} or {EPILOGUE!r}, got {self.source!r}")
        if self.reduce not in (SUM, SUM_PRESENT, COSINES, PRESENT, NONE):
            raise ValueError(f"{self.name}: unknown reduction {self.reduce!r}")
        summed = self.reduce in (SUM, SUM_PRESENT)
        if summed != (self.sum_name is not None) or summed != (self.mean_name is not None):
            raise ValueError(f"{self.name}: sum_name and mean_name go with the reductions 'sum' and 'sum_present'")
        if self.reduce == SUM_PRESENT and "M" not in self.shape:
            raise ValueError(f"{self.name}: 'sum_present' needs an 'M' axis, shape {self.shape}")

    def shape_of(self, B: int, H: int, M: int, Dh: int) -> tuple[int, ...]:
        """The shape for sizes ``B, H, M, Dh``."""
        size = {"B": B, "H": H, "M": M, "M+1": M + 1, "Dh": Dh}
        return tuple(size[d] for d in self.shape)

    def sum_shape(self, H: int, M: int, Dh: int) -> tuple[int, ...]:
        """The shape of its window sum: :meth:`shape_of` without the batch dimension."""
        return self.shape_of(0, H, M, Dh)[1:]


_F32 = torch.float32

#: The statistics of the class-token query row (row 0), before dropout, without gradient.
STATISTICS: tuple[Statistic, ...] = (
    Statistic("key_mean", ("B", "H", "M", "Dh"), _F32, KERNEL, SUM_PRESENT,
              "mean of the valid keys of modality `m`; `0` where the modality is empty", "key_sum", "key_mean"),
    Statistic("mass", ("B", "H", "M+1"), _F32, KERNEL, SUM,
              "`P[b, h, 0, :]` summed over [class token, modality 1, …, modality M]; sums to 1",
              "mass_sum", "mass_mean"),
    Statistic("cos", ("B", "M"), _F32, EPILOGUE, COSINES,
              "cosine between the rotated class query and modality `m`'s mean key, heads concatenated "
              "(`H·Dh` vectors); `0` for an empty modality"),
    Statistic("cos_per_head", ("B", "H", "M"), _F32, EPILOGUE, SUM_PRESENT,
              "the same cosine per head; `0` for an empty modality", "cos_head_sum", "cos_head_mean",
              absent_mean=math.nan),
    Statistic("query", ("B", "H", "Dh"), _F32, KERNEL, SUM,
              "the rotated class query `q0_rot` (after rounding to the input dtype)", "query_sum", "query_mean"),
    Statistic("valid", ("B", "M"), torch.bool, EPILOGUE, PRESENT, "`lengths[b, m] > 0`"),
    Statistic("tokens", ("B", "M"), _F32, EPILOGUE, SUM,
              "valid tokens of modality `m`: `lengths[b, m]`, or `L_m` without `lengths` (the `L^m` of the "
              "paper's Eq. 3; the controller's assumption check and `indicator=\"score\"` read it)",
              "tokens_sum", "tokens_mean"),
    Statistic("score_max", ("B", "H"), _F32, KERNEL, NONE,
              "the class row's largest scaled score `max_j S[b, h, 0, j]` over the valid keys (the online "
              "softmax's final running max)"),
    Statistic("max_prob", ("B", "H"), _F32, EPILOGUE, SUM,
              "`exp(score_max − lse[b, h, 0])` = `max_j P[b, h, 0, j]`, the largest single attention "
              "probability of the class row: 1 / (valid keys, the class key included) for uniform attention, "
              "→ 1 when the softmax saturates", "max_prob_sum", "max_prob_mean"),
)

#: The statistics the kernels produce (in the order of the op's outputs after ``out`` and ``lse``).
KERNEL_STATISTICS: tuple[Statistic, ...] = tuple(s for s in STATISTICS if s.source == KERNEL)
#: Every statistic that enters the window sums as a plain or presence-masked sum.
SUMMED_STATISTICS: tuple[Statistic, ...] = tuple(s for s in STATISTICS if s.reduce in (SUM, SUM_PRESENT))
#: The names of the op's forward outputs: ``out``, ``lse``, then the kernel statistics.
KERNEL_OUTPUT_NAMES: tuple[str, ...] = ("out", "lse") + tuple(s.name for s in KERNEL_STATISTICS)


def statistic(name: str) -> Statistic:
    """The table's entry ``name``."""
    for s in STATISTICS:
        if s.name == name:
            return s
    raise KeyError(f"name: no statistic {name!r}; the table has {[s.name for s in STATISTICS]}")


def _named_tuple(name: str, fields: Sequence[str], doc: str) -> Any:
    cls = NamedTuple(name, [(f, torch.Tensor) for f in fields])  # type: ignore[misc]
    cls.__doc__ = doc
    cls.__module__ = __name__
    return cls


def _field_doc(s: Statistic) -> str:
    shape = "(" + ", ".join(s.shape) + ")"
    return f"    {s.name}: ``{shape}`` {str(s.dtype).removeprefix('torch.')}, {s.definition.replace('`', '``')}."


#: Statistics of the class-token query row (float32 unless noted, no grad); one field per :data:`STATISTICS` entry.
AttentionStats = _named_tuple(
    "AttentionStats", [s.name for s in STATISTICS],
    "Statistics of the class-token query row (no gradient); fields from :data:`STATISTICS`.\n\n"
    "Attributes:\n" + "\n".join(_field_doc(s) for s in STATISTICS),
)

#: The results of ``rollingq::attention_fwd`` by name: ``out`` (like ``q``), ``lse`` ``(B, H, Nq)`` float32,
#: then the kernel statistics (empty ``(0,)`` float32 tensors with ``compute_stats=False``).
KernelOutputs = _named_tuple(
    "KernelOutputs", KERNEL_OUTPUT_NAMES,
    "The named results of ``rollingq::attention_fwd`` (build one with ``KernelOutputs(*op_result)``).\n\n"
    "Attributes:\n    out: like ``q``, the attention output.\n"
    "    lse: ``(B, H, Nq)`` float32, natural log-sum-exp of each query row's scaled, masked scores.\n"
    + "\n".join(_field_doc(s) for s in KERNEL_STATISTICS),
)


def forward_outputs_schema() -> str:
    """The output list of the forward op's schema, ``"(Tensor out, Tensor lse, Tensor key_mean, …)"``."""
    return "(" + ", ".join(f"Tensor {n}" for n in KERNEL_OUTPUT_NAMES) + ")"


def empty_kernel_stats(q: torch.Tensor, segments: Sequence[int], compute_stats: bool) -> dict[str, torch.Tensor]:
    """Uninitialised kernel statistics for the inputs of ``q`` ``(B, H, Nq, Dh)`` (``(0,)`` without stats).

    The shapes and dtypes the kernels write and the fake kernels promise.
    """
    B, H, _, Dh = q.shape
    M = len(segments)
    return {s.name: q.new_empty(s.shape_of(B, H, M, Dh) if compute_stats else (0,), dtype=s.dtype)
            for s in KERNEL_STATISTICS}


def markdown_table() -> str:
    """The statistics table of ``docs/op.md`` (field, shape, dtype, source, window sum, definition)."""
    def window(s: Statistic) -> str:
        if s.reduce == SUM:
            return f"Σ → `{s.sum_name}`"
        if s.reduce == SUM_PRESENT:
            return f"Σ where present → `{s.sum_name}`"
        return {COSINES: "cosine sums (AIR)", PRESENT: "→ `present`", NONE: "—"}[s.reduce]

    rows = ["| field | shape | dtype | from | window sum | definition |", "|---|---|---|---|---|---|"]
    for s in STATISTICS:
        shape = "(" + ", ".join(s.shape) + ")"
        dtype = str(s.dtype).removeprefix("torch.")
        rows.append(f"| `{s.name}` | `{shape}` | {dtype} | {s.source} | {window(s)} | {s.definition} |")
    return "\n".join(rows)


# ----------------------------------------------------------------------------- the epilogue


def safe_cosine(dot: torch.Tensor, norm_a: torch.Tensor, norm_b: torch.Tensor) -> torch.Tensor:
    """``dot / (|a||b|)``, defined as 0 where either norm is 0."""
    denom = norm_a * norm_b
    return (dot / denom.clamp_min(torch.finfo(dot.dtype).tiny)).masked_fill_(denom == 0, 0.0)


def valid_modalities(
    lengths: torch.Tensor | None, batch: int, segments: Sequence[int], device: torch.device
) -> torch.Tensor:
    """``(B, M)`` bool: modality ``m`` of sample ``b`` has at least one valid token."""
    if lengths is None:
        return torch.ones(batch, len(segments), dtype=torch.bool, device=device)
    return lengths > 0


def token_counts(
    lengths: torch.Tensor | None, batch: int, segments: Sequence[int], device: torch.device
) -> torch.Tensor:
    """``(B, M)`` float32 valid tokens per modality: ``lengths``, or ``segments`` for every sample.

    Without ``lengths`` the counts are filled on ``device`` (no host-to-device copy), so the call
    never waits for the GPU and can be captured in a CUDA graph (``docs/op.md``, no host syncs).
    """
    if lengths is None:
        columns = [torch.full((batch,), float(s), dtype=torch.float32, device=device) for s in segments]
        return torch.stack(columns, dim=1)
    return lengths.float()


class _Epilogue(NamedTuple):
    """What a derivation reads: the kernel statistics (float32) by name, ``lse`` and the layout."""

    kernel: dict[str, torch.Tensor]
    lse: torch.Tensor | None
    lengths: torch.Tensor | None
    segments: Sequence[int]


def _cosines(x: _Epilogue) -> tuple[torch.Tensor, torch.Tensor]:
    key_mean, query = x.kernel["key_mean"], x.kernel["query"]
    # Few, fused reductions: this epilogue runs on every call, next to a memory-bound kernel.
    dots = (key_mean * query.unsqueeze(2)).sum(-1)  # (B, H, M)
    cos_per_head = safe_cosine(
        dots, torch.linalg.vector_norm(query, dim=-1).unsqueeze(-1), torch.linalg.vector_norm(key_mean, dim=-1)
    )
    cos = safe_cosine(  # heads concatenated: sums over h of the dots and squared norms
        dots.sum(1), torch.linalg.vector_norm(query, dim=(1, 2)).unsqueeze(-1),
        torch.linalg.vector_norm(key_mean, dim=(1, 3)),
    )
    return cos, cos_per_head


def _layout(x: _Epilogue) -> tuple[torch.Tensor, torch.Tensor]:
    batch, device = x.kernel["key_mean"].shape[0], x.kernel["key_mean"].device
    return (valid_modalities(x.lengths, batch, x.segments, device),
            token_counts(x.lengths, batch, x.segments, device))


def _max_prob(x: _Epilogue) -> tuple[torch.Tensor]:
    """``exp(score_max − lse of the class row)`` in float64 (NaN when the caller gave no ``lse``)."""
    score_max = x.kernel["score_max"]
    if x.lse is None:
        return (torch.full_like(score_max, math.nan),)
    return (torch.exp(score_max.double() - x.lse[..., 0].double()),)


#: How the epilogue derives the :data:`EPILOGUE` statistics: names -> a function returning them in that
#: order (one function for statistics that share work). A test checks that they cover the table's.
DERIVATIONS: dict[tuple[str, ...], Callable[[_Epilogue], tuple[torch.Tensor, ...]]] = {
    ("cos", "cos_per_head"): _cosines,
    ("valid", "tokens"): _layout,
    ("max_prob",): _max_prob,
}


def stats_from_outputs(outputs: Any, lengths: torch.Tensor | None, segments: Sequence[int]) -> Any:
    """The :class:`AttentionStats` of the op's :class:`KernelOutputs` (computed with statistics)."""
    kernel = {s.name: getattr(outputs, s.name) for s in KERNEL_STATISTICS}
    return _finish(kernel, outputs.lse, lengths, segments)


def finish_stats(
    key_mean: torch.Tensor,
    mass: torch.Tensor,
    query: torch.Tensor,
    lengths: torch.Tensor | None,
    segments: Sequence[int],
    **kernel: torch.Tensor,
) -> Any:
    """Derive the epilogue statistics from the kernel statistics.

    Args:
        key_mean: ``(B, H, M, Dh)`` float32.
        mass: ``(B, H, M+1)`` float32.
        query: ``(B, H, Dh)`` float32, the rotated class query.
        lengths: ``(B, M)`` integer tensor or None.
        segments: the padded modality sizes.
        **kernel: the other kernel statistics by name and ``lse`` ``(B, H, Nq)``. A statistic that
            cannot be had without them is NaN when they are missing (a caller that computes only these
            three, e.g. a benchmark's separate pass).

    Returns:
        The :class:`AttentionStats`.
    """
    lse = kernel.pop("lse", None)
    return _finish(dict(kernel, key_mean=key_mean, mass=mass, query=query), lse, lengths, segments)


def _finish(kernel: dict[str, torch.Tensor], lse: torch.Tensor | None, lengths: torch.Tensor | None,
            segments: Sequence[int]) -> Any:
    unknown = sorted(set(kernel) - {s.name for s in KERNEL_STATISTICS})
    if unknown:
        raise TypeError(f"finish_stats: unknown kernel statistics {unknown}")
    B, H, M, Dh = kernel["key_mean"].shape
    for s in KERNEL_STATISTICS:
        kernel.setdefault(s.name, kernel["key_mean"].new_full(s.shape_of(B, H, M, Dh), math.nan, dtype=s.dtype))
    x = _Epilogue(kernel, lse, lengths, segments)  # derived from the values as given (float64 in the reference)
    values = dict(kernel)
    for names, derive in DERIVATIONS.items():
        values.update(zip(names, derive(x)))
    return AttentionStats(**{s.name: values[s.name].to(s.dtype) for s in STATISTICS})
