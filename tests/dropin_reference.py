"""A float64 reference of the query token's statistics for a layout with ``P`` prefix tokens, straight from the
definitions of ``docs/op.md`` (the other prefix tokens join no modality; their mass counts with the query token's).
Shared by the drop-in tests; independent of the op, its reference and ``fold_prefix_segment``."""

from __future__ import annotations

import torch


def class_row_reference(q, k, segments, prefix=1, lengths=None, rotation=None, scale=None) -> dict:
    """``q``: ``(B, H, ·, Dh)`` (row 0 is the query token), ``k``: ``(B, H, N, Dh)``, ``N = P + sum(segments)``.

    Returns float64 ``mass`` ``(B, H, M+1)``, ``key_mean`` ``(B, H, M, Dh)``, ``cos`` ``(B, M)``,
    ``cos_per_head`` ``(B, H, M)``, ``query`` ``(B, H, Dh)``, ``valid`` and ``tokens`` ``(B, M)``.
    """
    q0, k = q[:, :, 0].double(), k.double()
    B, H, N, Dh = k.shape
    if rotation is not None and rotation.dim() == 2:
        q0 = (q0.reshape(B, H * Dh) @ rotation.double().T).reshape(B, H, Dh)
    elif rotation is not None:
        q0 = torch.einsum("bhd,hed->bhe", q0, rotation.double())
    lengths = torch.tensor([list(segments)] * B) if lengths is None else lengths.cpu()
    keep = torch.ones(B, N, dtype=torch.bool)
    start = prefix
    for m, size in enumerate(segments):
        keep[:, start : start + size] = torch.arange(size)[None] < lengths[:, m : m + 1]
        start += size
    scores = (scale if scale is not None else Dh**-0.5) * torch.einsum("bhd,bhnd->bhn", q0, k)
    p = scores.masked_fill(~keep[:, None], float("-inf")).softmax(-1)
    mass, means = [p[..., :prefix].sum(-1)], []
    start = prefix
    for size in segments:
        sel = keep[:, None, start : start + size, None].double()
        mass.append(p[..., start : start + size].sum(-1))
        means.append((k[:, :, start : start + size] * sel).sum(2) / sel.sum(2).clamp_min(1))
        start += size
    key_mean = torch.stack(means, 2)

    def cosine(a, b, dims):
        den = torch.linalg.vector_norm(a, dim=dims) * torch.linalg.vector_norm(b, dim=dims)
        return torch.where(den > 0, (a * b).sum(dims) / den.clamp_min(1e-300), torch.zeros_like(den))

    return {
        "mass": torch.stack(mass, -1), "key_mean": key_mean, "query": q0,
        "cos_per_head": cosine(q0[:, :, None], key_mean, -1),
        "cos": cosine(q0[:, :, None].expand_as(key_mean).transpose(1, 2).reshape(B, len(segments), -1),
                      key_mean.transpose(1, 2).reshape(B, len(segments), -1), -1),
        "valid": lengths > 0, "tokens": lengths.double(),
    }


def assert_stats_match(stats, reference: dict, atol: float = 1e-5) -> None:
    """The op's (float32) statistics equal the float64 reference."""
    for name, want in reference.items():
        got = getattr(stats, name)
        if name == "valid":
            assert torch.equal(got.cpu(), want), name
        else:
            torch.testing.assert_close(got.double().cpu(), want, rtol=1e-4, atol=atol, msg=name)
