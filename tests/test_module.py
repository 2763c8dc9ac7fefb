"""FusedRollingQAttention: equals the functional op and timm's Attention, buffers, statistics, compile."""

from __future__ import annotations

import io

import pytest
import torch
from timm.models.vision_transformer import Attention

from rollingq_kernels.module import FusedRollingQAttention
from rollingq_kernels.ops import rollingq_attention
from rollingq_kernels.rebalance import plane_rotation

F64 = torch.float64
SEGS = [7, 5]  # N = 13
LENGTHS = [[7, 5], [3, 0], [0, 2], [6, 5], [1, 1]]


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _layer(dim=30, heads=3, seed=0, dtype=F64, **kw) -> FusedRollingQAttention:
    torch.manual_seed(seed)
    layer = FusedRollingQAttention(dim, num_heads=heads, qkv_bias=True, backend="reference", **kw).to(dtype)
    return layer


def _random_rotation(shape, seed: int) -> torch.Tensor:
    """A random rotation (plane rotation between two random vectors composed twice)."""
    g = _gen(seed)
    D = shape[-1]
    lead = shape[:-2]
    r1 = plane_rotation(torch.randn(*lead, D, generator=g, dtype=F64), torch.randn(*lead, D, generator=g, dtype=F64))
    r2 = plane_rotation(torch.randn(*lead, D, generator=g, dtype=F64), torch.randn(*lead, D, generator=g, dtype=F64))
    return r1 @ r2


def _functional(layer: FusedRollingQAttention, x, segments, lengths, class_query_only: bool):
    """The same computation written with the op and the layer's weights."""
    B, N, C = x.shape
    H, Dh = layer.num_heads, layer.head_dim
    qkv = torch.nn.functional.linear(x, layer.qkv.weight, layer.qkv.bias).reshape(B, N, 3, H, Dh)
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
    if class_query_only:
        q = q[:, :, :1]
    rotation = None if layer.rotation_is_identity else layer.rotation
    out, stats = rollingq_attention(q, k, v, segments, lengths=lengths, rotation=rotation, backend="reference")
    out = out.transpose(1, 2).reshape(B, q.shape[2], C)
    return torch.nn.functional.linear(out, layer.proj.weight, layer.proj.bias), stats


@pytest.mark.parametrize("mode", ["global", "per_head"])
@pytest.mark.parametrize("class_query_only", [False, True])
def test_module_equals_functional_op(mode, class_query_only):
    layer = _layer(rotation_mode=mode, class_query_only=class_query_only)
    layer.apply_rotation(_random_rotation(layer.rotation_shape(), seed=3))
    x = torch.randn(5, 1 + sum(SEGS), 30, generator=_gen(1), dtype=F64, requires_grad=True)
    lengths = torch.tensor(LENGTHS)
    grad = torch.randn(5, 1 if class_query_only else 13, 30, generator=_gen(2), dtype=F64)

    out = layer(x, SEGS, lengths)
    params = [x, layer.qkv.weight, layer.qkv.bias, layer.proj.weight, layer.proj.bias]
    got = torch.autograd.grad(out, params, grad)
    ref, ref_stats = _functional(layer, x, SEGS, lengths, class_query_only)
    want = torch.autograd.grad(ref, params, grad)

    assert out.shape == (5, 1 if class_query_only else 13, 30)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-12)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=0, atol=1e-12)
    for a, b in zip(layer.last_stats, ref_stats):
        torch.testing.assert_close(a, b)
    assert not any(t.requires_grad for t in layer.last_stats)


def test_class_query_only_equals_row_zero_of_all_query():
    full = _layer(rotation_mode="per_head")
    full.apply_rotation(_random_rotation(full.rotation_shape(), seed=4))
    cls_only = _layer(rotation_mode="per_head", class_query_only=True)
    cls_only.load_state_dict(full.state_dict())
    x = torch.randn(5, 13, 30, generator=_gen(5), dtype=F64, requires_grad=True)
    lengths = torch.tensor(LENGTHS)
    a = full(x, SEGS, lengths)[:, :1]
    b = cls_only(x, SEGS, lengths)
    torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
    ga = torch.autograd.grad(a.square().sum(), [x, full.qkv.weight])
    gb = torch.autograd.grad(b.square().sum(), [x, cls_only.qkv.weight])
    for u, w in zip(ga, gb):
        torch.testing.assert_close(u, w, rtol=0, atol=1e-12)


@pytest.mark.parametrize("dtype,atol", [(torch.float32, 1e-6), (F64, 1e-13)])
def test_from_timm_reproduces_timm_attention(dtype, atol):
    torch.manual_seed(11)
    attn = Attention(36, num_heads=4, qkv_bias=True).to(dtype).eval()
    layer = FusedRollingQAttention.from_timm(attn, backend="auto").eval()
    assert layer.qkv.weight.dtype == dtype and layer.rotation.dtype == (F64 if dtype == F64 else torch.float32)
    x = torch.randn(3, 1 + 11 + 6, 36, generator=_gen(12), dtype=dtype)
    torch.testing.assert_close(layer(x, [11, 6]), attn(x), rtol=0, atol=atol)
    # timm's state_dict loads into the layer strictly: absent rotation keys mean the identity
    fresh = FusedRollingQAttention(36, num_heads=4, qkv_bias=True).to(dtype).eval()
    fresh.apply_rotation(_random_rotation((36, 36), seed=13))
    missing, unexpected = fresh.load_state_dict(attn.state_dict(), strict=True)
    assert missing == [] and unexpected == [] and fresh.rotation_is_identity and int(fresh.num_rotations) == 0
    torch.testing.assert_close(fresh(x, [11, 6]), attn(x), rtol=0, atol=atol)


def test_from_timm_rejects_qk_norm():
    attn = Attention(16, num_heads=2, qk_norm=True, norm_layer=torch.nn.LayerNorm)
    with pytest.raises(ValueError, match="qk_norm"):
        FusedRollingQAttention.from_timm(attn)


def test_buffers_state_dict_and_wrong_shape():
    layer = _layer(rotation_mode="per_head")
    assert layer.rotation.shape == (3, 10, 10) and layer.rotation.dtype == F64
    torch.testing.assert_close(layer.rotation, torch.eye(10, dtype=F64).expand(3, 10, 10))
    assert int(layer.num_rotations) == 0 and layer.rotation_is_identity
    layer.apply_rotation(_random_rotation((3, 10, 10), seed=6))
    buf = io.BytesIO()
    torch.save(layer.state_dict(), buf)
    buf.seek(0)
    other = _layer(rotation_mode="per_head", seed=1)
    other.load_state_dict(torch.load(buf))
    assert int(other.num_rotations) == 1 and not other.rotation_is_identity
    x = torch.randn(2, 13, 30, generator=_gen(7), dtype=F64)
    torch.testing.assert_close(other(x, SEGS), layer(x, SEGS), rtol=0, atol=0)

    glob = _layer(rotation_mode="global")
    with pytest.raises(ValueError, match=r"rotation.*\(30, 30\).*per_head|rotation.*\(30, 30\)"):
        glob.load_state_dict(layer.state_dict())


def test_rotation_stays_float32_when_cast():
    layer = FusedRollingQAttention(16, num_heads=2, backend="reference").to(torch.bfloat16)
    assert layer.rotation.dtype == torch.float32 and layer.qkv.weight.dtype == torch.bfloat16
    layer.apply_rotation(_random_rotation((16, 16), seed=8))
    out = layer(torch.randn(2, 1 + 3 + 4, 16, generator=_gen(9)).to(torch.bfloat16), [3, 4])
    assert out.dtype == torch.bfloat16 and torch.isfinite(out.float()).all()


def test_statistics_accumulate_in_training_only():
    layer = _layer()
    x = torch.randn(5, 13, 30, generator=_gen(10), dtype=F64)
    layer.eval()
    layer(x, SEGS)
    assert layer.statistics.num_batches == 0 and layer.window_statistics() is None
    assert layer.last_stats is not None and layer.last_stats.cos.shape == (5, 2)
    layer.train()
    layer(x, SEGS, torch.tensor(LENGTHS))
    layer(x[:2], SEGS)
    st = layer.window_statistics()
    assert st.samples == 7 and st.present.tolist() == [6.0, 6.0]
    layer.reset_statistics()
    assert layer.window_statistics() is None


def test_attention_dropout_training_only_and_fresh_masks():
    layer = _layer(attn_drop=0.3)
    x = torch.randn(4, 13, 30, generator=_gen(13), dtype=F64)
    layer.eval()
    torch.testing.assert_close(layer(x, SEGS), layer(x, SEGS), rtol=0, atol=0)
    layer.train()
    a, b = layer(x, SEGS), layer(x, SEGS)
    assert not torch.allclose(a, b)
    layer.eval()
    with torch.no_grad():
        clean = layer(x, SEGS)
    assert not torch.allclose(a, clean)


def test_bad_arguments():
    with pytest.raises(ValueError, match="num_heads"):
        FusedRollingQAttention(30, num_heads=4)
    with pytest.raises(ValueError, match="rotation"):
        FusedRollingQAttention(30, num_heads=3, rotation_mode="local")
    with pytest.raises(ValueError, match="num_modalities"):
        FusedRollingQAttention(30, num_heads=3, num_modalities=1)
    with pytest.raises(ValueError, match="window"):
        FusedRollingQAttention(30, num_heads=3, window=0)
    layer = _layer()
    with pytest.raises(ValueError, match="segments"):
        layer(torch.randn(2, 13, 30, dtype=F64), [7, 3, 2])
    with pytest.raises(ValueError, match="x: expected shape"):
        layer(torch.randn(2, 13, 29, dtype=F64), SEGS)
    with pytest.raises(ValueError, match="new"):
        layer.apply_rotation(torch.full((30, 30), float("nan"), dtype=F64))
    assert layer.rotation_is_identity and torch.isfinite(layer.rotation).all()


class _Tiny(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Linear(6, 24)
        self.attn = FusedRollingQAttention(24, num_heads=3, class_query_only=True, backend="auto")
        self.head = torch.nn.Linear(24, 3)

    def forward(self, x):
        return self.head(self.attn(self.embed(x), [5, 4])[:, 0])


@pytest.mark.parametrize("attn_drop, fullgraph", [(0.0, True), (0.3, False)])
def test_compiled_training_steps_do_not_recompile(attn_drop, fullgraph):
    """Step after step, a compiled training step reuses its graphs (the statistics window and the
    dropout seed must not be baked into the graph); with dropout the attention runs eagerly."""
    import torch._dynamo.testing as dynamo_testing

    torch._dynamo.reset()
    layer = FusedRollingQAttention(24, num_heads=2, attn_drop=attn_drop, class_query_only=True).train()
    counter = dynamo_testing.CompileCounterWithBackend("aot_eager")
    step = torch.compile(layer, backend=counter, fullgraph=fullgraph)
    x = torch.randn(3, 12, 24, generator=_gen(40), requires_grad=True)
    frames, outs = [], []
    for _ in range(10):
        out = step(x, (5, 6))
        out.square().sum().backward()
        frames.append(counter.frame_count)
        outs.append(out.detach())
    assert frames[3:] == [frames[3]] * 7, frames
    assert layer.statistics.num_batches == 10
    if attn_drop > 0:
        assert not torch.equal(outs[0], outs[1])  # a fresh dropout mask each step


def test_torch_compile_forward_backward_matches_eager():
    torch.manual_seed(14)
    model = _Tiny()
    model.attn.apply_rotation(_random_rotation((24, 24), seed=15).float())
    x = torch.randn(4, 10, 6, generator=_gen(16))
    eager_out = model(x)
    eager_grads = torch.autograd.grad(eager_out.square().sum(), list(model.parameters()))
    eager_sums = model.attn.statistics.sums()
    model.attn.reset_statistics()
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    out = compiled(x)
    grads = torch.autograd.grad(out.square().sum(), list(model.parameters()))
    torch.testing.assert_close(out, eager_out, rtol=1e-5, atol=1e-6)
    for g, w in zip(grads, eager_grads):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-6)
    compiled(x)  # the compiled forward feeds the statistics window like the eager one, call after call
    assert model.attn.statistics.num_batches == 2
    for name, value in model.attn.statistics.sums().items():
        torch.testing.assert_close(value, 2 * eager_sums[name], rtol=1e-5, atol=1e-6)


def test_collecting_feeds_an_accumulator_in_any_mode_and_can_pause_the_window():
    """collecting(acc) adds every forward's statistics to acc (training and eval); window=False keeps
    those forwards out of the layer's own window; contexts nest and close cleanly."""
    from rollingq_kernels.accumulator import StatisticsAccumulator, batch_sums

    layer = _layer()
    x = torch.randn(4, 13, 30, generator=_gen(21), dtype=F64)
    lengths = torch.tensor(LENGTHS[:4])
    outer, inner = StatisticsAccumulator(), StatisticsAccumulator()
    with layer.collecting(outer):
        layer.train()
        layer(x, SEGS, lengths)
        expected = batch_sums(layer.last_stats)
        layer.eval()
        layer(x, SEGS, lengths)
        with layer.collecting(inner, window=False):
            layer.train()
            layer(x, SEGS, lengths)
    layer(x, SEGS, lengths)  # after the contexts: the window only
    assert (outer.num_batches, inner.num_batches, layer.statistics.num_batches) == (3, 1, 2)
    for name, value in inner.sums().items():
        torch.testing.assert_close(value, expected[name], rtol=0, atol=1e-12)
        torch.testing.assert_close(outer.sums()[name], 3 * expected[name], rtol=0, atol=1e-12)
    with pytest.raises(TypeError, match="accumulator"):
        with layer.collecting({}):
            pass
    layer(x, SEGS, lengths)
    assert outer.num_batches == 3 and layer.statistics.num_batches == 3
