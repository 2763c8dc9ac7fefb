"""The statistics table (``rollingq_kernels.stats.STATISTICS``) drives every other list of the statistics.

The docs table, the C++ and Triton schemas, ``AttentionStats``, ``KernelOutputs``, the fake kernels and the
window sums are checked against it, so a statistic is declared once.
"""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest
import torch

from rollingq_kernels import _library, rollingq_attention
from rollingq_kernels.accumulator import COSINE_SUMS, SUM_FIELDS, WindowStatistics, batch_sums, reduce_sums, zero_sums
from rollingq_kernels.stats import (
    DERIVATIONS,
    EPILOGUE,
    KERNEL,
    KERNEL_OUTPUT_NAMES,
    KERNEL_STATISTICS,
    STATISTICS,
    SUMMED_STATISTICS,
    AttentionStats,
    KernelOutputs,
    Statistic,
    finish_stats,
    markdown_table,
)

ROOT = Path(__file__).resolve().parents[1]
#: The contract's attribute names (the controller, the trainer and the analyses read them).
CONTRACT_FIELDS = ("key_mean", "mass", "cos", "cos_per_head", "query", "valid", "tokens")


def _cpp_schema(name: str) -> str:
    """The schema string ``m.def("name(...)")`` of ``csrc/ops.cpp`` (adjacent C string literals joined)."""
    text = (ROOT / "csrc" / "ops.cpp").read_text()
    block = re.search(r"TORCH_LIBRARY\(rollingq, m\)\s*\{(.*?)\n\}", text, re.S)
    assert block, "csrc/ops.cpp: no TORCH_LIBRARY(rollingq, m) block"
    for call in re.findall(r"m\.def\(\s*((?:\"(?:[^\"\\]|\\.)*\"\s*)+)\)", block.group(1)):
        schema = "".join(re.findall(r"\"((?:[^\"\\]|\\.)*)\"", call))
        if schema.startswith(name + "("):
            return schema
    raise AssertionError(f"csrc/ops.cpp: no m.def of {name}")


def _outputs(schema: str) -> list[str]:
    return [part.split()[-1] for part in schema.split("->", 1)[1].strip()[1:-1].split(",")]


def test_attention_stats_and_kernel_outputs_are_the_table():
    assert AttentionStats._fields == tuple(s.name for s in STATISTICS)
    assert set(CONTRACT_FIELDS) <= set(AttentionStats._fields)
    assert KernelOutputs._fields == ("out", "lse") + tuple(s.name for s in STATISTICS if s.source == KERNEL)
    assert KERNEL_OUTPUT_NAMES == KernelOutputs._fields


def test_every_epilogue_statistic_has_one_derivation():
    derived = [name for names in DERIVATIONS for name in names]
    assert sorted(derived) == sorted(s.name for s in STATISTICS if s.source == EPILOGUE)


def test_the_docs_table_is_the_table():
    text = (ROOT / "docs" / "op.md").read_text()
    start = text.index("| field | shape | dtype | from |")
    end = text.index("\n\n", start)
    assert text[start:end] == markdown_table(), "docs/op.md: paste rollingq_kernels.stats.markdown_table():\n" + \
        markdown_table()


def test_the_cpp_schema_is_the_library_schema_and_the_table():
    assert _cpp_schema("attention_fwd") == _library.FWD_SCHEMA
    assert _cpp_schema("attention_bwd") == _library.BWD_SCHEMA
    assert _outputs(_library.FWD_SCHEMA) == list(KERNEL_OUTPUT_NAMES)
    schema = torch.ops.rollingq.attention_fwd.default._schema  # the registered op (C++ or the fallback)
    assert [r.name for r in schema.returns] == list(KERNEL_OUTPUT_NAMES)


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="Triton is not installed")
def test_the_triton_op_schemas_are_the_table():
    from rollingq_kernels.triton import register

    assert [r.name for r in register.triton_attention_fwd._schema.returns] == list(KERNEL_OUTPUT_NAMES)
    assert str(register.triton_attention_fwd._schema) == "rollingq::triton_" + _library.FWD_SCHEMA
    assert str(register.triton_attention_bwd._schema) == "rollingq::triton_" + _library.BWD_SCHEMA


@pytest.mark.parametrize("compute_stats", [True, False])
def test_the_fake_kernel_promises_the_table_shapes(compute_stats):
    B, H, N, Dh, segs = 3, 2, 12, 5, [4, 2, 5]
    q, k, v = (torch.empty(B, H, n, Dh, device="meta") for n in (N, N, N))
    fwd = KernelOutputs(*torch.ops.rollingq.attention_fwd(q, k, v, segs, None, None, 0.5, 0.0, 0, compute_stats))
    assert fwd.out.shape == q.shape and fwd.lse.shape == (B, H, N) and fwd.lse.dtype == torch.float32
    for s in KERNEL_STATISTICS:
        t = getattr(fwd, s.name)
        assert t.shape == (s.shape_of(B, H, len(segs), Dh) if compute_stats else (0,)), s.name
        assert t.dtype == s.dtype, s.name


def _stats(seed=0, B=5, H=3, Dh=7, segs=(4, 6, 3)):
    g = torch.Generator().manual_seed(seed)
    N = 1 + sum(segs)
    q, k, v = (torch.randn(B, H, N, Dh, generator=g, dtype=torch.float64) for _ in range(3))
    lengths = torch.tensor([[4, 0, 3], [1, 6, 0], [2, 5, 1], [0, 6, 3], [3, 1, 2]])
    return rollingq_attention(q, k, v, list(segs), lengths=lengths, backend="reference")[1], (H, len(segs), Dh)


def test_every_statistic_has_the_table_shape_and_dtype():
    stats, (H, M, Dh) = _stats()
    for s in STATISTICS:
        t = getattr(stats, s.name)
        assert tuple(t.shape) == s.shape_of(5, H, M, Dh) and t.dtype == s.dtype, s.name


def test_window_sums_follow_the_table():
    stats, (H, M, Dh) = _stats(seed=1)
    sums = batch_sums(stats)
    zeros = zero_sums(H, M, Dh)
    assert tuple(sums) == tuple(zeros) == SUM_FIELDS
    assert SUM_FIELDS == tuple(COSINE_SUMS) + tuple(s.sum_name for s in SUMMED_STATISTICS)
    for name in SUM_FIELDS:
        assert sums[name].shape == zeros[name].shape and sums[name].dtype == torch.float64, name
    valid = stats.valid.double()
    # a presence-masked sum: key_mean enters only where the modality is present (absent ones are 0 anyway,
    # so check cos_per_head of an absent modality, set to a marker that must not enter)
    poisoned = stats._replace(cos_per_head=stats.cos_per_head.masked_fill(~stats.valid[:, None, :], 99.0))
    torch.testing.assert_close(batch_sums(poisoned)["cos_head_sum"], sums["cos_head_sum"], rtol=0, atol=0)
    torch.testing.assert_close(sums["mass_sum"], stats.mass.double().sum(0))
    window = reduce_sums(sums)
    fields = set(WindowStatistics.__dataclass_fields__)
    assert {s.mean_name for s in SUMMED_STATISTICS} <= fields
    cos_head_mean = (stats.cos_per_head.double() * valid[:, None, :]).sum(0) / valid.sum(0)
    torch.testing.assert_close(window.cos_head_mean, torch.where(valid.sum(0) > 0, cos_head_mean, torch.nan))
    torch.testing.assert_close(window.mass_mean, stats.mass.double().mean(0))


def test_finish_stats_derives_the_epilogue_from_the_kernel_statistics():
    stats, _ = _stats(seed=2)
    lengths = torch.tensor([[4, 0, 3], [1, 6, 0], [2, 5, 1], [0, 6, 3], [3, 1, 2]])
    kernel = {s.name: getattr(stats, s.name) for s in KERNEL_STATISTICS if s.name not in ("key_mean", "mass", "query")}
    lse = (stats.score_max.double() - stats.max_prob.double().log()).unsqueeze(-1)  # (B, H, 1), the class row's
    again = finish_stats(stats.key_mean, stats.mass, stats.query, lengths, [4, 6, 3], lse=lse, **kernel)
    for s in STATISTICS:
        torch.testing.assert_close(getattr(again, s.name), getattr(stats, s.name), msg=s.name)
    # a caller with the first three kernel statistics only (a benchmark's separate pass): the rest is NaN
    partial = finish_stats(stats.key_mean, stats.mass, stats.query, lengths, [4, 6, 3])
    torch.testing.assert_close(partial.cos, stats.cos)
    assert torch.isnan(partial.score_max).all() and torch.isnan(partial.max_prob).all()
    with pytest.raises(TypeError, match="unknown kernel statistics"):
        finish_stats(stats.key_mean, stats.mass, stats.query, lengths, [4, 6, 3], bogus=stats.mass)


def test_a_bad_table_entry_is_refused():
    with pytest.raises(ValueError, match="must start with 'B'"):
        Statistic("x", ("H",), torch.float32, KERNEL, "none", "x")
    with pytest.raises(ValueError, match="sum_name and mean_name"):
        Statistic("x", ("B", "H"), torch.float32, KERNEL, "sum", "x")
    with pytest.raises(ValueError, match="needs an 'M' axis"):
        Statistic("x", ("B", "H"), torch.float32, KERNEL, "sum_present", "x", "x_sum", "x_mean")
