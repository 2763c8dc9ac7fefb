"""timm's own ``tests/test_models.py`` passes with every timm ``Attention`` swapped for ``FusedRollingQAttention``
(issue 26 item 1): a few tiny models (a class token; a register token as the query, no class token) and the
NaFlexViT tests (four register tokens as the prefix, padded batches with (B, 1, N, N) float masks, other sizes).

The file comes from timm's sdist on PyPI (``tests/timm_suite/obtain.py``); without network the test skips, except
under CI (``CI`` set), where it fails. ``python tests/timm_suite/run.py --compare --models ...`` runs more models
against plain timm.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

pytest.importorskip("timm")
pytest.importorskip("torchvision")  # timm's FX tests use its feature extraction

sys.path.insert(0, str(Path(__file__).resolve().parent / "timm_suite"))
from obtain import TimmTestsUnavailable, timm_test_file  # noqa: E402
from run import CI_MODELS, CI_TESTS, by_model, run_suite  # noqa: E402

#: timm's tests per model that take a model name and run for these ViTs (forward, backward, non-standard config,
#: TorchScript, forward_intermediates (2), FX forward, FX backward, FX + TorchScript, prune_intermediate_layers).
TESTS_PER_MODEL = 10


def test_timms_model_tests_pass_with_the_layer_swapped_in():
    try:
        timm_test_file()
    except TimmTestsUnavailable as exc:
        if os.environ.get("CI"):
            raise
        pytest.skip(f"timm's test file is not available here: {exc}")
    report = run_suite(CI_MODELS, CI_TESTS, swap="on")
    outcomes = report["outcomes"]
    failed = {nodeid: e["error"] for nodeid, e in outcomes.items() if e["outcome"] != "passed"}
    assert failed == {}, f"{failed}\n{report['tail']}"
    table = by_model(report)
    for model in CI_MODELS:
        assert table[model]["passed"] == TESTS_PER_MODEL, (model, table)
        assert report["swapped"][model] > 0, f"{model} was not swapped"
    naflex = [e for e in outcomes.values() if e["model"] is None]
    assert len(naflex) == 5 and report["swapped"].get("naflexvit_base_patch16_gap", 0) > 0
    assert report["left_plain"] == {"naflexvit_base_patch16_gap": "no class or register token"}
