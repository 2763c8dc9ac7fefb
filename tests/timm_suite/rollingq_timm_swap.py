"""A pytest plugin for timm's own ``tests/test_models.py``: every model it creates gets its attention swapped.

Loaded with ``-p rollingq_timm_swap`` (``tests/timm_suite`` on ``sys.path``; ``run.py`` does it). With ``--rq-swap=on``
``timm.create_model`` returns the model with every timm ``Attention`` replaced by ``FusedRollingQAttention``
through :func:`rollingq_kernels.integrations.timm.patch_timm` (segments follow the input: the patch tokens split
in two halves; the first prefix token is the query). Models without any prefix token (no class or register token)
are left plain: RollingQ needs a query token (``patch_timm`` refuses them), and the report counts them.

``--rq-models a,b`` keeps the tests parametrized by those model names (for the default-config tests, which take tagged
names, the first tag of each), ``--rq-tests x,y`` also keeps the tests whose function
name contains one of those strings; ``--rq-report FILE`` writes each test's outcome as JSON.
"""

from __future__ import annotations

import json
import logging

import pytest

logger = logging.getLogger(__name__)

#: model name -> why it was left plain (filled while the tests run)
LEFT_PLAIN: dict[str, str] = {}
SWAPPED: dict[str, int] = {}


def pytest_addoption(parser):
    group = parser.getgroup("rollingq")
    group.addoption("--rq-swap", default="on", choices=("on", "off"), help="swap timm Attention layers")
    group.addoption("--rq-models", default="", help="comma-separated model names to keep")
    group.addoption("--rq-tests", default="", help="comma-separated test-name parts to keep as well")
    group.addoption("--rq-report", default="", help="write the outcomes as JSON to this file")


def swap_attention(model, name: str = ""):
    """Swap every timm ``Attention`` of ``model`` (in place); models without a prefix token stay plain."""
    from rollingq_kernels.integrations.timm import find_vit, patch_timm, timm_attention_layers
    from rollingq_kernels.layout import EvenSplit

    vit = find_vit(model)
    if vit is None or not timm_attention_layers(model):
        return model
    if getattr(vit, "num_prefix_tokens", 0) < 1:
        LEFT_PLAIN[name or type(model).__name__] = "no class or register token"
        return model
    layers = patch_timm(model, segments=EvenSplit(2), query_token="first_prefix")
    SWAPPED[name or type(model).__name__] = len(layers)
    return model


def _patched(create_model):
    def create_model_with_rollingq(model_name, *args, **kwargs):
        return swap_attention(create_model(model_name, *args, **kwargs), str(model_name))

    create_model_with_rollingq.__wrapped__ = create_model
    return create_model_with_rollingq


def pytest_configure(config):
    config.rq_outcomes = {}
    if config.getoption("--rq-swap") != "on":
        return
    import timm
    import timm.models
    import timm.models._factory as factory

    patched = _patched(factory.create_model)
    timm.create_model = timm.models.create_model = factory.create_model = patched


def pytest_collection_modifyitems(config, items):
    models = {m for m in config.getoption("--rq-models").split(",") if m}
    parts = [p for p in config.getoption("--rq-tests").split(",") if p]
    if not models and not parts:
        return
    keep, drop, tagged = [], [], set()
    for item in items:
        params = getattr(getattr(item, "callspec", None), "params", {})
        name = getattr(item, "originalname", item.name)
        model = str(params.get("model_name", ""))
        base, _, tag = model.partition(".")
        # the default-config tests take tagged names: one tag per model (the others would download weights)
        first_tag = bool(tag) and "default_cfgs" in name and base in models and (name, base) not in tagged
        if model in models or first_tag or any(p in name for p in parts):
            keep.append(item)
            if first_tag:
                tagged.add((name, base))
        else:
            drop.append(item)
    items[:] = keep
    config.hook.pytest_deselected(items=drop)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    outcomes = item.config.rq_outcomes
    if report.failed or (report.when == "call") or report.skipped:
        previous = outcomes.get(item.nodeid)
        if previous is None or previous["outcome"] == "passed":
            params = getattr(getattr(item, "callspec", None), "params", {})
            model = params.get("model_name")
            outcomes[item.nodeid] = {
                "test": getattr(item, "originalname", item.name),
                "model": None if model is None else str(model).partition(".")[0],
                "outcome": report.outcome,
                "error": report.longreprtext.strip().splitlines()[-1][:300] if report.failed else "",
            }


def pytest_sessionfinish(session, exitstatus):
    path = session.config.getoption("--rq-report")
    if path:
        data = {"outcomes": session.config.rq_outcomes, "left_plain": LEFT_PLAIN, "swapped": SWAPPED}
        with open(path, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=1, sort_keys=True)
