"""Dependency sets: the core imports and runs without the extras, cheaply; each extra's absence is one clear line.

Every check runs in a fresh interpreter whose import system hides the extras' packages (a meta-path
finder), as an environment without them would (issue 15 items 5 and 6).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]

EXTRA_PACKAGES = ("timm", "yaml", "pydantic", "tqdm", "tensorboard", "PIL", "librosa", "soundfile", "matplotlib",
                  "scipy", "av", "sklearn")
OPTIONAL_FEATURE_PACKAGES = ("librosa", "soundfile", "matplotlib", "scipy", "av", "sklearn")

HIDE = """
import importlib.machinery, sys
HIDDEN = set({hidden!r})
class Hide(importlib.machinery.PathFinder):
    @classmethod
    def find_spec(cls, name, path=None, target=None):
        if name.split(".")[0] in HIDDEN:
            return None  # as if not installed: import fails, importlib.util.find_spec gives None
        return importlib.machinery.PathFinder.find_spec(name, path, target)
sys.meta_path[:] = [Hide if f is importlib.machinery.PathFinder else f for f in sys.meta_path]
"""


def _run(code: str, hidden: tuple[str, ...], timeout: int = 600) -> subprocess.CompletedProcess:
    program = HIDE.format(hidden=tuple(hidden)) + textwrap.dedent(code)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    return subprocess.run([sys.executable, "-c", program], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)


def test_the_core_works_without_any_extra():
    """The op, the layer and the controller: forward, backward, a rotation; the training package says what it needs."""
    res = _run("""
        import sys, torch
        import rollingq_kernels
        from rollingq_kernels import FusedRollingQAttention, RollingQ
        layer = FusedRollingQAttention(24, num_heads=2, segments=(5, 6))
        ctl = RollingQ(layer, mode="paper", beta=0.0)
        x = torch.randn(3, 12, 24, requires_grad=True)
        layer(x).square().sum().backward()
        assert x.grad is not None and ctl.step(0)[0].rotated
        loaded = sorted({m.split(".")[0] for m in sys.modules} & HIDDEN)
        assert not loaded, loaded
        try:
            import rollingq
        except ImportError as exc:
            print("ERROR:", exc)
    """, EXTRA_PACKAGES)
    assert res.returncode == 0, res.stderr
    assert ("ERROR: the rollingq training package needs timm, pyyaml, pydantic, tqdm, tensorboard, pillow (the "
            "[train] extra): pip install 'rollingq[train]'") in res.stdout


def test_importing_the_kernels_imports_neither_dynamo_nor_triton():
    """``import rollingq_kernels`` costs little next to ``import torch``: it must not pull in ``torch._dynamo``
    (about 1.5 s, what ``@torch.compiler.disable`` at import did) nor Triton (loaded on the first use of the
    Triton backend, at import only where CUDA is available). The measured times are printed."""
    res = _run("""
        import json, sys, time
        start = time.perf_counter()
        import torch
        after_torch = time.perf_counter()
        import rollingq_kernels
        done = time.perf_counter()
        print(json.dumps({"torch_s": after_torch - start, "kernels_s": done - after_torch,
                          "dynamo": "torch._dynamo" in sys.modules, "triton": "triton" in sys.modules}))
    """, ())
    assert res.returncode == 0, res.stderr
    got = json.loads(res.stdout.strip().splitlines()[-1])
    print(f"import torch: {got['torch_s']:.2f} s; import rollingq_kernels after it: {got['kernels_s']:.2f} s")
    assert not got["dynamo"]
    assert not got["triton"] or torch.cuda.is_available()


def test_training_needs_only_the_train_extra_and_other_commands_name_theirs(tmp_path):
    """``rollingq train`` runs with [train] alone; ``report`` and ``eval`` end with one line naming [analysis],
    ``prepare`` one naming [prepare]."""
    run_dir, report = tmp_path / "run", tmp_path / "report"
    res = _run(f"""
        import sys
        from rollingq.cli import main
        overrides = ["train.epochs=1", "train.progress=false", "train.bf16=false", "model.dim=16",
                     "model.encoder_depth=1", "data.synthetic.sizes={{train: 40, val: 16, test: 16}}",
                     "train.batch_size=16"]
        codes = [main(["train", "--config", "synthetic", *overrides, "--out", {str(run_dir)!r}]),
                 main(["report", {str(run_dir)!r}, "--out", {str(report)!r}]),
                 main(["eval", "--run", {str(run_dir)!r}]),
                 main(["prepare", "cremad", {str(tmp_path)!r}, {str(tmp_path / "cremad")!r}])]
        print("CODES", codes)
        loaded = sorted({{m.split(".")[0] for m in sys.modules}} & HIDDEN)
        print("LOADED", loaded)
    """, OPTIONAL_FEATURE_PACKAGES)
    assert res.returncode == 0, res.stderr
    assert "CODES [0, 2, 2, 2]" in res.stdout, res.stdout + res.stderr
    assert "LOADED []" in res.stdout
    assert (run_dir / "config.yaml").is_file() and not report.exists()
    lines = [line for line in res.stderr.splitlines() if "error:" in line]
    assert lines == [
        "rollingq report: error: rollingq report's figures needs 'matplotlib', which is not installed (the "
        "[analysis] extra): pip install 'rollingq[analysis]' (--debug shows the traceback)",
        "rollingq eval: error: the Pearson test of rollingq eval needs 'scipy', which is not installed (the "
        "[analysis] extra): pip install 'rollingq[analysis]' (--debug shows the traceback)",
        "rollingq prepare: error: rollingq prepare (decoding video) needs 'av', which is not installed (the "
        "[prepare] extra): pip install 'rollingq[prepare]' (--debug shows the traceback)",
    ], res.stderr


@pytest.mark.parametrize("extra", ["train", "audio", "analysis", "prepare", "transformers", "dev", "docs"])
def test_pyproject_and_requirements_agree(extra):
    """requirements.txt (the README's install) holds every package of every extra; [all] names them all."""
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    assert set(project["dependencies"]) == {"torch>=2.11", "numpy"}
    assert extras["all"] == ["rollingq[train,audio,analysis,prepare,transformers,dev,docs]"]
    requirements = {line.split("==")[0].split(">=")[0].strip() for line in
                    (ROOT / "requirements.txt").read_text().splitlines() if line.strip() and not line.startswith("#")}
    names = {name.split(">=")[0] for name in extras[extra]}  # a floor (pydantic>=2) stated in both files
    assert names <= requirements, names - requirements


def test_constraints_pin_every_requirement():
    """constraints.txt pins (==) every package requirements.txt installs, and nothing is pinned twice."""
    pins = [line.split("==") for line in (ROOT / "constraints.txt").read_text().splitlines()
            if line.strip() and not line.startswith("#")]
    names = [name.lower().replace("_", "-") for name, _ in pins]
    assert len(names) == len(set(names)) and all(len(p) == 2 and p[1] for p in pins)
    requirements = {line.split("==")[0].split(">=")[0].split("[")[0].strip().lower() for line in
                    (ROOT / "requirements.txt").read_text().splitlines() if line.strip() and not line.startswith("#")}
    assert requirements <= set(names), requirements - set(names)


def test_the_cpu_requirements_pin_the_cpu_builds_of_the_tested_torch():
    """requirements-cpu.txt: PyTorch's CPU index, torch/torchvision as constraints.txt pins them plus +cpu, the rest."""
    lines = [line.strip() for line in (ROOT / "requirements-cpu.txt").read_text().splitlines()
             if line.strip() and not line.startswith("#")]
    pins = dict(line.split("==") for line in (ROOT / "constraints.txt").read_text().splitlines()
                if line.strip() and not line.startswith("#"))
    assert "--extra-index-url https://download.pytorch.org/whl/cpu" in lines
    assert f"torch=={pins['torch']}+cpu" in lines and f"torchvision=={pins['torchvision']}+cpu" in lines
    assert "-r requirements.txt" in lines
