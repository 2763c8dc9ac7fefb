"""examples/two_modality_example.py: its attention is not uniform, and training moves the statistics."""

from __future__ import annotations

import importlib.util
import os

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _example():
    spec = importlib.util.spec_from_file_location("two_modality_example",
                                                  os.path.join(REPO, "examples", "two_modality_example.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_example_attention_is_not_uniform_and_moves_with_training():
    ex = _example()
    torch.manual_seed(1)
    model = ex.TwoModalityModel()
    audio, visual = torch.randn(64, ex.LA, 16), torch.randn(64, ex.LV, 32)
    model.eval()
    with torch.no_grad():
        model(audio, visual)
    mass0 = model.fusion.last_stats.mass.double().mean((0, 1))
    uniform = torch.tensor([1, ex.LA, ex.LV], dtype=torch.float64) / (1 + ex.LA + ex.LV)
    assert (mass0 - uniform).abs().max() > 1e-3  # a zero class token without biases gives exactly `uniform`
    labels = torch.randint(0, ex.CLASSES, (64,))
    audio = audio + 2.0 * torch.nn.functional.one_hot(labels, 16)[:, None]
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model.train()
    for _ in range(15):
        loss = torch.nn.functional.cross_entropy(model(audio, visual), labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        model(audio, visual)
    mass1 = model.fusion.last_stats.mass.double().mean((0, 1))
    assert (mass1 - mass0).abs().max() > 0.01
