"""The eager reference against hand-computed cases and the contract's invariants."""

from __future__ import annotations

import math

import pytest
import torch

import rollingq_kernels
from rollingq_kernels import dropout_mask, rollingq_attention
from rollingq_kernels.reference import key_valid_mask, rollingq_attention_reference

F64 = torch.float64


def _rand(*shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=F64)


def _qkv(B, H, segs, Dh, class_query_only=False, seed=0):
    N = 1 + sum(segs)
    q = _rand(B, H, 1 if class_query_only else N, Dh, seed=seed)
    k = _rand(B, H, N, Dh, seed=seed + 1)
    v = _rand(B, H, N, Dh, seed=seed + 2)
    return q, k, v


def test_hand_computed_single_head():
    # B=H=1, Dh=2, segments (1, 2): tokens [cls, a, v1, v2]
    q = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [0.5, -1.0]], dtype=F64).view(1, 1, 4, 2)
    k = torch.tensor([[1.0, 2.0], [0.0, 1.0], [-1.0, 0.0], [2.0, 2.0]], dtype=F64).view(1, 1, 4, 2)
    v = torch.tensor([[1.0, 0.0], [0.0, 1.0], [2.0, 2.0], [-1.0, 3.0]], dtype=F64).view(1, 1, 4, 2)
    scale = 0.5
    out, st = rollingq_attention_reference(q, k, v, (1, 2), scale=scale)
    kk, vv = k[0, 0].tolist(), v[0, 0].tolist()
    for row in range(4):
        qi = q[0, 0, row].tolist()
        s = [scale * (qi[0] * kj[0] + qi[1] * kj[1]) for kj in kk]
        e = [math.exp(x - max(s)) for x in s]
        p = [x / sum(e) for x in e]
        expect = [sum(p[j] * vv[j][d] for j in range(4)) for d in range(2)]
        assert out[0, 0, row].tolist() == pytest.approx(expect, abs=1e-12)
        if row == 0:
            assert st.mass[0, 0].tolist() == pytest.approx([p[0], p[1], p[2] + p[3]], abs=1e-7)
    # mean keys: audio = k1, visual = (k2 + k3) / 2 = (0.5, 1.0)
    assert st.key_mean[0, 0].flatten().tolist() == pytest.approx([0.0, 1.0, 0.5, 1.0])
    # cos(q_cls=(1,0), (0,1)) = 0 ; cos((1,0), (0.5,1)) = 0.5/sqrt(1.25)
    assert st.cos[0].tolist() == pytest.approx([0.0, 0.5 / math.sqrt(1.25)], abs=1e-7)
    assert st.query[0, 0].tolist() == [1.0, 0.0]
    assert st.valid.tolist() == [[True, True]]


def test_mass_sums_to_one_and_stats_shapes():
    B, H, Dh, segs = 3, 2, 5, (4, 7, 3)
    q, k, v = _qkv(B, H, segs, Dh)
    out, st = rollingq_attention(q, k, v, segs, backend="reference")
    assert out.shape == q.shape and out.dtype == F64
    assert st.key_mean.shape == (B, H, 3, Dh) and st.key_mean.dtype == torch.float32
    assert st.mass.shape == (B, H, 4)
    assert st.cos.shape == (B, 3) and st.cos_per_head.shape == (B, H, 3)
    assert st.query.shape == (B, H, Dh) and st.valid.dtype == torch.bool
    torch.testing.assert_close(st.mass.sum(-1), torch.ones(B, H), atol=1e-6, rtol=0)


def test_lengths_equal_truncated_sequences():
    """Masking padded keys equals running on the sequence with the padding removed."""
    B, H, Dh, segs = 2, 3, 4, (5, 6)
    q, k, v = _qkv(B, H, segs, Dh, class_query_only=True)
    lengths = torch.tensor([[3, 6], [5, 2]])
    out, st = rollingq_attention_reference(q, k, v, segs, lengths=lengths)
    for b in range(B):
        la, lv = lengths[b].tolist()
        keep = [0] + list(range(1, 1 + la)) + list(range(6, 6 + lv))
        o_b, st_b = rollingq_attention_reference(q[b : b + 1], k[b : b + 1, :, keep], v[b : b + 1, :, keep], (la, lv))
        torch.testing.assert_close(out[b : b + 1], o_b)
        torch.testing.assert_close(st.mass[b : b + 1], st_b.mass)
        torch.testing.assert_close(st.key_mean[b : b + 1], st_b.key_mean)
        torch.testing.assert_close(st.cos[b : b + 1], st_b.cos)


def test_empty_modality_gives_zero_stats_and_no_nan():
    B, H, Dh, segs = 2, 2, 3, (4, 5)
    q, k, v = _qkv(B, H, segs, Dh)
    q.requires_grad_(True)
    k.requires_grad_(True)
    v.requires_grad_(True)
    lengths = torch.tensor([[0, 5], [4, 0]])
    out, st = rollingq_attention(q, k, v, segs, lengths=lengths, backend="reference")
    out.square().sum().backward()
    for t in (out, q.grad, k.grad, v.grad, st.key_mean, st.mass, st.cos, st.cos_per_head):
        assert torch.isfinite(t).all()
    assert st.valid.tolist() == [[False, True], [True, False]]
    assert st.cos[0, 0] == 0 and st.cos[1, 1] == 0
    assert (st.mass[0, :, 1] == 0).all() and (st.mass[1, :, 2] == 0).all()
    assert (st.key_mean[0, :, 0] == 0).all() and (st.key_mean[1, :, 1] == 0).all()
    assert (st.cos_per_head[0, :, 0] == 0).all()


def test_padded_query_rows_output_zero_and_pass_no_gradient():
    B, H, Dh, segs = 2, 2, 4, (3, 4)
    q, k, v = _qkv(B, H, segs, Dh)
    q.requires_grad_(True)
    lengths = torch.tensor([[1, 4], [3, 2]])
    out, _ = rollingq_attention(q, k, v, segs, lengths=lengths, backend="reference")
    valid = key_valid_mask(lengths, segs, B, q.device)  # (B, N)
    assert (out[~valid[:, None, :].expand(B, H, -1)] == 0).all()
    out.sum().backward()
    assert (q.grad.abs().sum(-1)[~valid[:, None, :].expand(B, H, -1)] == 0).all()
    assert (q.grad.abs().sum(-1)[valid[:, None, :].expand(B, H, -1)] > 0).all()


@pytest.mark.parametrize("rotation_kind", [None, "global", "per_head"])
@pytest.mark.parametrize("dropout_p", [0.0, 0.3])
def test_class_query_only_equals_class_row_of_all_query(rotation_kind, dropout_p):
    B, H, Dh, segs = 2, 3, 4, (3, 5)
    q, k, v = _qkv(B, H, segs, Dh)
    rot = None
    if rotation_kind == "global":
        rot = torch.linalg.qr(_rand(H * Dh, H * Dh, seed=7))[0]
    elif rotation_kind == "per_head":
        rot = torch.linalg.qr(_rand(H, Dh, Dh, seed=7))[0]
    lengths = torch.tensor([[2, 5], [3, 1]])
    kw = dict(lengths=lengths, rotation=rot, dropout_p=dropout_p, seed=11, backend="reference")
    out_all, st_all = rollingq_attention(q, k, v, segs, **kw)
    out_cls, st_cls = rollingq_attention(q[:, :, :1], k, v, segs, **kw)
    torch.testing.assert_close(out_cls, out_all[:, :, :1], rtol=0, atol=1e-14)
    for a, b in zip(st_all, st_cls):
        torch.testing.assert_close(a, b)


def test_rotation_applies_to_class_row_only_with_gradient_through_r():
    B, H, Dh, segs = 2, 2, 3, (2, 3)
    q, k, v = _qkv(B, H, segs, Dh)
    rot = torch.linalg.qr(_rand(H * Dh, H * Dh, seed=3))[0]
    q1 = q.clone().requires_grad_(True)
    out, st = rollingq_attention(q1, k, v, segs, rotation=rot, backend="reference")
    # explicit formula: rotate the class row, then plain attention
    q2 = q.clone().requires_grad_(True)
    q0 = (q2[:, :, 0].reshape(B, H * Dh) @ rot.T).reshape(B, H, Dh)
    q_rot = torch.cat([q0.unsqueeze(2), q2[:, :, 1:]], 2)
    expect = torch.softmax(q_rot @ k.transpose(-1, -2) * Dh**-0.5, -1) @ v
    torch.testing.assert_close(out, expect)
    torch.testing.assert_close(st.query, q0.detach().float())
    g = _rand(*out.shape, seed=9)
    out.backward(g)
    expect.backward(g)
    torch.testing.assert_close(q1.grad, q2.grad)
    # per-head rotation equals the block-diagonal global rotation
    per_head = torch.linalg.qr(_rand(H, Dh, Dh, seed=5))[0]
    block = torch.block_diag(*per_head)
    o_ph, s_ph = rollingq_attention(q, k, v, segs, rotation=per_head, backend="reference")
    o_bd, s_bd = rollingq_attention(q, k, v, segs, rotation=block, backend="reference")
    torch.testing.assert_close(o_ph, o_bd)
    torch.testing.assert_close(s_ph.cos, s_bd.cos)


def test_dropout_scales_kept_probabilities():
    B, H, Dh, segs = 2, 2, 4, (3, 4)
    q, k, v = _qkv(B, H, segs, Dh)
    p = 0.25
    out, st = rollingq_attention(q, k, v, segs, dropout_p=p, seed=123, backend="reference")
    probs = torch.softmax(q @ k.transpose(-1, -2) * Dh**-0.5, -1)
    keep = dropout_mask(123, B, H, q.shape[2], k.shape[2], p)
    torch.testing.assert_close(out, (probs * keep / (1 - p)) @ v)
    # statistics are taken before dropout
    torch.testing.assert_close(st.mass[..., 0], probs[:, :, 0, 0].float())


def test_reference_is_differentiable_in_float64():
    B, H, Dh, segs = 1, 2, 3, (2, 2)
    q, k, v = (t.requires_grad_(True) for t in _qkv(B, H, segs, Dh))
    rot = torch.linalg.qr(_rand(H, Dh, Dh, seed=1))[0]
    lengths = torch.tensor([[1, 2]])

    def f(q, k, v):
        return rollingq_attention(q, k, v, segs, lengths=lengths, rotation=rot, backend="reference")[0]

    assert torch.autograd.gradcheck(f, (q, k, v))


def _max_prob_inputs(class_only, seed=40):
    """Odd sizes, an empty and a full modality, NaN in every padded position."""
    B, H, Dh, segs = 3, 3, 7, (5, 4, 3)
    q, k, v = _qkv(B, H, segs, Dh, class_query_only=class_only, seed=seed)
    lengths = torch.tensor([[5, 0, 2], [1, 4, 3], [0, 0, 0]])
    valid = key_valid_mask(lengths, segs, B, q.device)  # (B, N)
    k, v = (t.masked_fill(~valid[:, None, :, None], float("nan")) for t in (k, v))
    if not class_only:
        q = q.masked_fill(~valid[:, None, :, None], float("nan"))
    return q, k, v, segs, lengths, valid


@pytest.mark.parametrize("class_only", [False, True])
def test_max_prob_is_the_largest_class_row_probability(class_only):
    q, k, v, segs, lengths, valid = _max_prob_inputs(class_only)
    rot = torch.linalg.qr(_rand(3, 7, 7, seed=41))[0]
    _, st = rollingq_attention_reference(q, k, v, segs, lengths=lengths, rotation=rot, scale=0.6)
    q0 = torch.einsum("bhd,hed->bhe", q[:, :, 0], rot)  # q0 @ R^T per head
    scores = 0.6 * torch.einsum("bhd,bhnd->bhn", q0, torch.nan_to_num(k)).masked_fill(~valid[:, None], -math.inf)
    torch.testing.assert_close(st.score_max, scores.amax(-1).float())
    torch.testing.assert_close(st.max_prob, torch.softmax(scores, -1).amax(-1).float())
    assert torch.all(st.max_prob[2] == 1.0)  # only the class key is valid: saturated by construction
    # uniform attention (q = 0): 1 / (valid keys, class key included)
    _, flat = rollingq_attention_reference(torch.zeros_like(q), k, v, segs, lengths=lengths)
    torch.testing.assert_close(flat.max_prob, (1.0 / valid.sum(-1, keepdim=True).double()).float().expand(3, 3))


def _cpu_backends():
    from rollingq_kernels._library import triton_interpret

    return ["reference"] + (["cpp"] if rollingq_kernels.HAS_CPP else []) + (["triton"] if triton_interpret() else [])


@pytest.mark.parametrize("backend", _cpu_backends())
@pytest.mark.parametrize("class_only", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_max_prob_of_every_cpu_backend_matches_the_float64_reference(backend, class_only, dtype):
    q, k, v, segs, lengths, _ = _max_prob_inputs(class_only, seed=50)
    rot = torch.linalg.qr(_rand(21, 21, seed=51))[0]
    _, want = rollingq_attention_reference(q, k, v, segs, lengths=lengths, rotation=rot, dropout_p=0.3, seed=5)
    _, got = rollingq_attention(q.to(dtype), k.to(dtype), v.to(dtype), segs, lengths=lengths, rotation=rot,
                                dropout_p=0.3, seed=5, backend=backend)
    for name in ("score_max", "max_prob"):
        torch.testing.assert_close(getattr(got, name), getattr(want, name), atol=2e-6, rtol=2e-6, msg=name)
    assert torch.isfinite(got.max_prob).all() and (got.max_prob <= 1 + 1e-6).all()


def test_max_prob_enters_the_window_as_a_mean_per_head():
    from rollingq_kernels.accumulator import StatisticsAccumulator

    acc = StatisticsAccumulator()
    batches = []
    for class_only in (False, True):
        q, k, v, segs, lengths, _ = _max_prob_inputs(class_only, seed=60 + class_only)
        batches.append(rollingq_attention(q, k, v, segs, lengths=lengths, backend="reference")[1])
    for stats in batches:
        acc.add(stats)
    want = torch.cat([s.max_prob for s in batches]).double().mean(0)
    torch.testing.assert_close(acc.reduce().max_prob_mean, want)
