"""A two-modality classifier fused by FusedRollingQAttention, with the RollingQ controller.

Run: ``python examples/two_modality_example.py`` (a few seconds on CPU, random data).
"""

import logging
import sys
from pathlib import Path

import torch
from torch import nn

try:
    import rollingq_kernels  # noqa: F401  (installed with `pip install --no-build-isolation -e .`)
except ImportError:  # run from a source checkout without installing
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from rollingq_kernels.controller import RollingQ  # noqa: E402
from rollingq_kernels.module import FusedRollingQAttention  # noqa: E402

LA, LV, DIM, CLASSES = 12, 8, 64, 5
log = logging.getLogger("two_modality_example")


class TwoModalityModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.audio, self.visual = nn.Linear(16, DIM), nn.Linear(32, DIM)  # stand-ins for the encoders
        self.cls = nn.Parameter(torch.zeros(1, 1, DIM))
        self.fusion = FusedRollingQAttention(DIM, num_heads=4, class_query_only=True, attn_drop=0.1)
        self.head = nn.Linear(DIM, CLASSES)

    def forward(self, audio: torch.Tensor, visual: torch.Tensor) -> torch.Tensor:
        tokens = torch.cat([self.cls.expand(audio.shape[0], -1, -1), self.audio(audio), self.visual(visual)], 1)
        return self.head(self.fusion(tokens, [LA, LV])[:, 0])


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    torch.manual_seed(0)
    labels = torch.randint(0, CLASSES, (384,))
    audio = torch.randn(384, LA, 16) + 2.0 * nn.functional.one_hot(labels, 16)[:, None]  # the easy modality
    visual = torch.randn(384, LV, 32) + 0.5 * nn.functional.one_hot(labels, 32)[:, None]
    model = TwoModalityModel()
    controller = RollingQ(model.fusion, rho=1.0, beta=0.05, max_rotations=1)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    for epoch in range(3):
        model.train()
        for i in range(0, 384, 48):
            loss = nn.functional.cross_entropy(model(audio[i : i + 48], visual[i : i + 48]), labels[i : i + 48])
            opt.zero_grad()
            loss.backward()
            opt.step()
        for record in controller.step(epoch):
            log.info("epoch %d loss %.3f %s", epoch, loss.item(), record.to_dict())


if __name__ == "__main__":
    main()
