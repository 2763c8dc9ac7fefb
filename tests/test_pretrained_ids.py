"""``model.pretrained`` as a timm model id: resolved through timm's pretrained config, offline from the
Hugging Face cache, and never downloaded here (a file overlay and a fake cache stand in for the Hub)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
from rollingq.config import load_config
from rollingq.models.pretrained import PretrainedError, read_pretrained, read_timm_pretrained
from safetensors.torch import save_file

MODEL_ID = "vit_tiny_patch16_224.augreg_in21k"  # a real timm id with a Hub repository; 5.7M parameters
ROOT = Path(__file__).resolve().parents[1]


def _random_vit_tiny(seed: int) -> dict[str, torch.Tensor]:
    """A state dict with the architecture of MODEL_ID and random, informative values (no classifier)."""
    torch.manual_seed(seed)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return {k: v.contiguous() for k, v in model.state_dict().items()}


def test_a_model_id_loads_its_weights_through_timms_file_overlay(tmp_path):
    state = _random_vit_tiny(seed=3)
    path = tmp_path / "local_copy.safetensors"
    save_file(state, str(path))
    loaded = read_timm_pretrained(MODEL_ID, overlay=dict(file=str(path)))
    assert sorted(loaded) == sorted(state)
    for key, value in state.items():
        assert torch.equal(loaded[key], value), key


def test_files_and_ids_are_told_apart_and_bad_ids_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoint file"):
        read_pretrained(str(tmp_path / "weights"))  # a path (separator): a file, never an id
    with pytest.raises(FileNotFoundError, match="no checkpoint file"):
        read_pretrained("vit_b16.npz")  # a checkpoint extension: a file
    with pytest.raises(PretrainedError, match="neither a checkpoint file nor a timm model id"):
        read_pretrained("no_such_architecture_xyz.in21k")
    with pytest.raises(PretrainedError, match=r"timm has no pretrained config 'vit_tiny_patch16_224\.nope'.*"
                                              r"vit_tiny_patch16_224\.augreg_in21k"):
        read_pretrained("vit_tiny_patch16_224.nope")


def test_the_paper_configs_name_imagenet21k_vit_b_by_timm_id():
    from timm.models import get_pretrained_cfg

    for config in ("cremad_vanilla_mt_rollingq", "kinetics_sounds_vanilla_mt_rollingq"):
        model_id = load_config(config).model.pretrained
        assert model_id == "vit_base_patch16_224.augreg_in21k"
        cfg = get_pretrained_cfg(model_id)
        assert cfg.hf_hub_id == "timm/" + model_id and cfg.num_classes == 21843  # ImageNet-21k


_OFFLINE_PROGRAM = r"""
import json, sys, torch
from rollingq.build import build_model
from rollingq.config import load_config
from rollingq.models.pretrained import PretrainedError
overrides = ["model.dim=192", "model.encoder_heads=3", "model.encoder_depth=2", "model.mlp_ratio=4.0",
             "data.image_size=32", "model.pretrained=" + sys.argv[1]]
try:
    model = build_model(load_config("cremad_vanilla_mt", overrides))
except PretrainedError as exc:
    print(json.dumps({"error": str(exc)}))
    raise SystemExit(0)
visual = model.encoders[1]
print(json.dumps({"qkv": visual.blocks[1].attn.qkv.weight.flatten()[:50].tolist(),
                  "proj": visual.embed.proj.weight.flatten()[:50].tolist()}))
"""


def _offline_run(cache: Path, model_id: str) -> dict:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(cache), "HF_HOME": str(cache.parent / "hf"),
           "HF_ENDPOINT": "http://127.0.0.1:9", "TORCH_HOME": str(cache.parent / "torch")}  # no network reachable
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "python"), str(ROOT), env.get("PYTHONPATH", "")])
    res = subprocess.run([sys.executable, "-c", _OFFLINE_PROGRAM, model_id], env=env, capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    return json.loads(res.stdout.strip().splitlines()[-1])


def test_an_id_resolves_offline_from_the_hugging_face_cache_and_names_the_cache_when_missing(tmp_path):
    state = _random_vit_tiny(seed=5)
    cache = tmp_path / "hub"
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = cache / f"models--timm--{MODEL_ID}"
    (repo / "snapshots" / commit).mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    save_file(state, str(repo / "snapshots" / commit / "model.safetensors"))  # the Hub's file name for timm repos

    found = _offline_run(cache, MODEL_ID)
    assert found["qkv"] == state["blocks.1.attn.qkv.weight"].flatten()[:50].tolist()
    assert found["proj"] == state["patch_embed.proj.weight"].flatten()[:50].tolist()

    other = "vit_tiny_patch16_224.augreg_in21k_ft_in1k"  # a real id whose weights are not in this cache
    missing = _offline_run(cache, other)["error"]
    assert f"timm could not load the weights of '{other}'" in missing
    assert f"the Hugging Face Hub repository 'timm/{other}' (cache: {cache}, offline: HF_HUB_OFFLINE=1)" in missing
    assert "set model.pretrained to a local checkpoint file" in missing
