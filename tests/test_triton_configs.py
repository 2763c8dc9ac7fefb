"""The Triton tile candidates and autotuning (configs.py): selection per problem and dtype, the autotune keys.

``TRITON_INTERPRET=1`` as for ``test_triton_kernels.py`` (the kernels' modules are imported).
"""

from __future__ import annotations

import pytest
import torch
from triton_cases import skip_without_triton

skip_without_triton()

from rollingq_kernels.triton import configs  # noqa: E402

pytestmark = pytest.mark.triton_interpret


def test_candidate_selection_fits_the_problem_and_dtype():
    def blocks(cands):
        return [(c.block_m, c.block_n, c.warps, c.stages) for c in cands]

    half = configs.select_candidates(configs.FWD_CANDIDATES, torch.bfloat16, 64, 2048, 2048)
    assert blocks(half)[0] == (128, 64, 8, 3) and half[0].maxnreg == 128  # the preferred Hopper tile comes first
    assert all("half" in c.dtypes and c.max_head_dim >= 64 for c in half)
    with_dropout = configs.select_candidates(configs.FWD_CANDIDATES, torch.bfloat16, 64, 2048, 2048, dropout=True)
    assert with_dropout[0].maxnreg is None  # the register cap spills with the dropout hash
    small = configs.select_candidates(configs.FWD_CANDIDATES, torch.float16, 64, 32, 32)
    assert small and all(c.block_m <= 32 and c.block_n <= 32 for c in small)  # beyond next_pow2(20): padding
    fp32 = configs.select_candidates(configs.DKDV_CANDIDATES, torch.float32, 256, 4096, 4096)
    assert fp32 and all("fp32" in c.dtypes and c.max_head_dim >= 256 for c in fp32)
    tiny = configs.select_candidates(configs.FWD_CANDIDATES, torch.float64, 256, 1, 1)
    assert len(tiny) == 1  # nothing fits: the smallest offered candidate stays
    wide = configs.select_candidates(configs.CLASS_ONLY_CANDIDATES, torch.bfloat16, 1024, 1, 4096)
    assert wide and all(c.max_head_dim >= 1024 for c in wide)
    with pytest.raises(ValueError, match="BLOCK_D"):
        configs.select_candidates(configs.FWD_CANDIDATES, torch.float16, 2048, 64, 64)

_KEY_FREE = {"BLOCK_M", "BLOCK_N", "BLOCK_D", "S_PAD", "DOT_PREC", "IS_FP64", "EMULATE_BF16"}  # follow from the key

@pytest.mark.parametrize("name", ["all_query_fwd_kernel", "all_query_dkdv_kernel", "all_query_dq_kernel",
                                  "class_only_fwd_kernel", "class_only_bwd_kernel"])
def test_autotune_keys_hold_every_variant_and_nothing_batch_dependent(name):
    import importlib
    import inspect

    module = {"all_query_fwd_kernel": "forward", "class_only_fwd_kernel": "class_only",
              "class_only_bwd_kernel": "class_only"}.get(name, "backward")
    kernel = getattr(importlib.import_module(f"rollingq_kernels.triton.{module}"), name)
    params = inspect.signature(kernel.base_fn).parameters
    constexprs = {n for n, p in params.items() if "constexpr" in str(p.annotation)}
    assert constexprs - _KEY_FREE <= set(kernel.keys), (name, constexprs - _KEY_FREE - set(kernel.keys))
    assert not {"B", "H", "CHUNK", "SPLITS"} & set(kernel.keys)

def test_fixed_config_mode_picks_one_config(monkeypatch):
    monkeypatch.setenv(configs.FIXED_ENV, "0")
    assert not configs.autotune_enabled()
    monkeypatch.setenv(configs.FIXED_ENV, "1")
    assert configs.autotune_enabled()
