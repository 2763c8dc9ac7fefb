"""Input normalisation (rollingq_kernels.layout): one canonical layout per call, other forms converted at the edge
(issue 24 item 4, issue 26 item 1: key-only masks of any shape timm passes, segments that follow the input,
several prefix tokens)."""

from __future__ import annotations

import pytest
import torch

from rollingq_kernels.layout import (
    CallLayout,
    EvenSplit,
    canonical_lengths,
    fold_prefix_segment,
    mask_lengths,
    resolve_call,
)
from rollingq_kernels.stats import STATISTICS, AttentionStats

SEGS = (5, 4)
PREFIX = 2
N = PREFIX + sum(SEGS)
LENGTHS = [[5, 4], [2, 0], [0, 3]]


def _keep(lengths=LENGTHS, prefix=PREFIX, segs=SEGS) -> torch.Tensor:
    """``(B, N)`` bool: the prefix tokens and the first ``lengths[b, m]`` tokens of each segment take part."""
    keep = torch.zeros(len(lengths), prefix + sum(segs), dtype=torch.bool)
    keep[:, :prefix] = True
    for b, row in enumerate(lengths):
        start = prefix
        for length, size in zip(row, segs):
            keep[b, start : start + length] = True
            start += size
    return keep


def test_even_split_follows_the_token_count():
    assert EvenSplit(2)(196) == (98, 98) and EvenSplit(2)(7) == (4, 3) and EvenSplit(3)(8) == (3, 3, 2)
    with pytest.raises(ValueError, match=r"EvenSplit\(3\) needs at least 3"):
        EvenSplit(3)(2)
    with pytest.raises(ValueError, match="parts"):
        EvenSplit(1)


@pytest.mark.parametrize("form", ["bool_2d", "bool_key_only", "float_key_only_inf", "float_symmetric_finfo",
                                  "float_symmetric_1e4", "bool_symmetric", "batch_of_one"])
def test_every_key_only_mask_timm_passes_gives_the_same_lengths(form):
    keep = _keep()
    pair = keep[:, :, None] & keep[:, None, :]  # (B, N, N) symmetric: a padded token's row masks everything
    masks = {
        "bool_2d": keep,
        "bool_key_only": keep[:, None, None, :],
        "float_key_only_inf": torch.zeros(3, 1, 1, N).masked_fill(~keep[:, None, None, :], float("-inf")),
        "float_symmetric_finfo": torch.zeros(3, 1, N, N).masked_fill(~pair[:, None], torch.finfo(torch.float32).min),
        "float_symmetric_1e4": torch.zeros(3, 1, N, N, dtype=torch.float64).masked_fill(~pair[:, None], -1e4),
        "bool_symmetric": pair[:, None],
        "batch_of_one": keep[:1, None, None, :].expand(1, 1, 1, N),
    }
    lengths = mask_lengths(masks[form], SEGS, PREFIX, batch=3)
    want = torch.tensor(LENGTHS) if form != "batch_of_one" else torch.tensor([LENGTHS[0]] * 3)
    assert lengths.dtype == torch.int64 and torch.equal(lengths, want)


def test_query_dependent_and_biased_masks_raise():
    keep = _keep()
    causal = torch.ones(N, N, dtype=torch.bool).tril().expand(3, 1, N, N)
    with pytest.raises(ValueError, match="depends on the query"):
        mask_lengths(causal, SEGS, PREFIX, batch=3)
    one_row_differs = (keep[:, :, None] & keep[:, None, :])[:, None].clone()
    one_row_differs[0, 0, 3, 4] = False  # a valid token's row masks a key the others keep
    with pytest.raises(ValueError, match="depends on the query"):
        mask_lengths(one_row_differs, SEGS, PREFIX, batch=3)
    bias = torch.zeros(3, 1, 1, N)
    bias[..., 3] = -5.0  # an additive bias, not a mask
    with pytest.raises(ValueError, match="large negative value"):
        mask_lengths(bias, SEGS, PREFIX, batch=3)
    with pytest.raises(ValueError, match="large negative value"):
        mask_lengths(torch.full((3, 1, 1, N), float("nan")), SEGS, PREFIX, batch=3)
    prefix_masked = keep.clone()
    prefix_masked[1, 1] = False
    with pytest.raises(ValueError, match="prefix token"):
        mask_lengths(prefix_masked, SEGS, PREFIX, batch=3)
    hole = keep.clone()
    hole[0, PREFIX] = False
    with pytest.raises(ValueError, match="modality 0 are not the end"):
        mask_lengths(hole, SEGS, PREFIX, batch=3)
    with pytest.raises(ValueError, match=r"expected a key-padding mask of shape"):
        mask_lengths(keep[:, None, :], SEGS, PREFIX, batch=3)
    with pytest.raises(TypeError, match="bool or float"):
        mask_lengths(keep.long(), SEGS, PREFIX, batch=3)


def test_lengths_have_one_canonical_form():
    from_list = canonical_lengths(LENGTHS, 3, 2, torch.device("cpu"))
    from_int32 = canonical_lengths(torch.tensor(LENGTHS, dtype=torch.int32), 3, 2, torch.device("cpu"))
    assert from_list.dtype == from_int32.dtype == torch.int64 and torch.equal(from_list, from_int32)
    with pytest.raises(TypeError, match="lengths: expected an integer tensor"):
        canonical_lengths(torch.tensor(LENGTHS, dtype=torch.float32), 3, 2, torch.device("cpu"))
    with pytest.raises(ValueError, match=r"lengths: expected shape \(3, 2\)"):
        canonical_lengths(torch.tensor(LENGTHS)[:2], 3, 2, torch.device("cpu"))
    with pytest.raises(TypeError, match="lengths: expected a"):
        canonical_lengths("abc", 3, 2, torch.device("cpu"))


def test_resolve_call_takes_each_form_to_the_same_layout():
    shape, cpu = (3, N, 8), torch.device("cpu")
    common = dict(stored=EvenSplit(2), num_modalities=2, prefix=PREFIX)
    by_lengths = resolve_call(shape, cpu, lengths=torch.tensor(LENGTHS, dtype=torch.int16), **common)
    by_mask = resolve_call(shape, cpu, attn_mask=_keep()[:, None, None, :], **common)
    by_context = resolve_call(shape, cpu, context_lengths=LENGTHS, **common)
    positional = resolve_call(shape, cpu, attn_mask=list(SEGS), is_causal=torch.tensor(LENGTHS), **common)
    for layout in (by_lengths, by_mask, by_context, positional):
        assert layout.segments == SEGS and layout.prefix == PREFIX
        assert layout.lengths.dtype == torch.int64 and torch.equal(layout.lengths, torch.tensor(LENGTHS))
    assert by_lengths.op_segments() == [PREFIX - 1, *SEGS]
    assert torch.equal(by_lengths.op_lengths(), torch.tensor([[1, 5, 4], [1, 2, 0], [1, 0, 3]]))
    assert CallLayout(SEGS, None, 1).op_segments() == list(SEGS)
    with pytest.raises(ValueError, match="give the padding once"):
        resolve_call(shape, cpu, attn_mask=_keep(), lengths=LENGTHS, **common)
    with pytest.raises(ValueError, match=r"add up to the 9 tokens after the prefix"):
        resolve_call(shape, cpu, segments=(5, 5), **common)
    with pytest.raises(ValueError, match="is_causal"):
        resolve_call(shape, cpu, is_causal=True, **common)
    with pytest.raises(ValueError, match="segments: not set"):
        resolve_call(shape, cpu, stored=None, num_modalities=2, prefix=1)


def _random_stats(B: int, H: int, M: int, Dh: int, g: torch.Generator) -> AttentionStats:
    """Random statistics of every field of the table, for ``M`` op segments (shapes from the shape rules)."""
    sizes = {"B": B, "H": H, "M": M, "M+1": M + 1, "Dh": Dh}
    fields = {}
    for stat in STATISTICS:
        shape = tuple(sizes[d] for d in stat.shape)
        value = torch.rand(shape, generator=g)
        if stat.dtype == torch.bool:
            value = value > 0.3
        elif stat.name == "mass":
            value = value / value.sum(-1, keepdim=True)
        fields[stat.name] = value.to(stat.dtype)
    return AttentionStats(**fields)


def test_fold_prefix_segment_drops_the_prefix_segment_and_keeps_the_mass():
    """Every statistic of the table is folded by its shape rule: the ``M`` axis loses the prefix segment, the
    ``M+1`` mass adds it to the class token's, the others are unchanged (a new statistic needs no edit here)."""
    g = torch.Generator().manual_seed(0)
    B, H, M, Dh = 3, 2, 2, 5
    stats = _random_stats(B, H, M + 1, Dh, g)
    folded = fold_prefix_segment(stats)
    for stat in STATISTICS:
        before, after = getattr(stats, stat.name), getattr(folded, stat.name)
        if "M+1" in stat.shape:
            axis = stat.shape.index("M+1")
            assert after.shape[axis] == M + 1
            torch.testing.assert_close(after.narrow(axis, 0, 1).squeeze(axis),
                                       before.narrow(axis, 0, 2).sum(axis), rtol=0, atol=0)
            assert torch.equal(after.narrow(axis, 1, M), before.narrow(axis, 2, M))
        elif "M" in stat.shape:
            axis = stat.shape.index("M")
            assert torch.equal(after, before.narrow(axis, 1, M)), stat.name
        else:
            assert torch.equal(after, before), stat.name
    torch.testing.assert_close(folded.mass.sum(-1), torch.ones(B, H), rtol=0, atol=1e-6)
