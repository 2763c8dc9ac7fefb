"""A two-modality classifier fused by FusedRollingQAttention, with the RollingQ controller.

Run: ``python examples/two_modality_example.py`` (a few seconds on CPU, random data).

Audio is the easy modality (a strong class signal on every token), visual the hard one. Each epoch
prints what the controller saw (the class token's attention mass on [class, audio, visual], AIR,
the token counts and mean-key norms) and what it decided: rotate, cap, refuse, wait or roll back,
and why (``docs/controller.md``). The class token starts
random and the query/key projections have a bias, so the attention is not uniform from the start
(a zero class token with bias-free projections would give every token the same score, and the
statistics would never move).
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

LA, LV, DIM, CLASSES, EPOCHS = 12, 12, 64, 5, 6
log = logging.getLogger("two_modality_example")


class TwoModalityModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.audio, self.visual = nn.Linear(16, DIM), nn.Linear(32, DIM)  # stand-ins for the encoders
        self.cls = nn.Parameter(torch.randn(1, 1, DIM))
        self.norm = nn.LayerNorm(DIM)
        self.fusion = FusedRollingQAttention(DIM, num_heads=4, qkv_bias=True, class_query_only=True)
        self.head = nn.Linear(DIM, CLASSES)

    def forward(self, audio: torch.Tensor, visual: torch.Tensor) -> torch.Tensor:
        tokens = torch.cat([self.cls.expand(audio.shape[0], -1, -1), self.audio(audio), self.visual(visual)], 1)
        return self.head(self.fusion(self.norm(tokens), [LA, LV])[:, 0])


def main() -> None:
    logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s")
    log.setLevel(logging.INFO)
    torch.manual_seed(0)
    n = 512
    labels = torch.randint(0, CLASSES, (n,))
    audio = torch.randn(n, LA, 16) + 1.5 * nn.functional.one_hot(labels, 16)[:, None]  # the easy modality
    visual = torch.randn(n, LV, 32) + 0.3 * nn.functional.one_hot(labels, 32)[:, None]
    model = TwoModalityModel()
    # the safe default rule: rotate at most once, when |AIR| >= 0.1, not before epoch 3 and only once the model
    # beats the majority class by 0.05 (a query that has learned nothing has no preference worth correcting);
    # never a rotation that would reverse what the query attends to, at most 30 degrees, rolled back if the
    # next epoch collapses. `rollingq train` calls it the same way (the rollingq: section of the config).
    controller = RollingQ(model.fusion, rho=1.0, beta=0.1, max_rotations=1, start_epoch=3)
    majority = float(torch.bincount(labels, minlength=CLASSES).max()) / n  # the accuracy of guessing priors
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for epoch in range(1, EPOCHS + 1):
        model.train()
        correct, total_loss = 0, 0.0
        for i in range(0, n, 32):
            logits = model(audio[i : i + 32], visual[i : i + 32])
            loss = nn.functional.cross_entropy(logits, labels[i : i + 32])
            opt.zero_grad()
            loss.backward()
            opt.step()
            correct += int((logits.argmax(1) == labels[i : i + 32]).sum())
            total_loss += float(loss.detach()) * logits.shape[0]
        for rec in controller.step(epoch, accuracy=correct / n, majority=majority, loss=total_loss / n):
            log.info("epoch %d: acc %.3f mass [%s] AIR %+.3f tokens %s |E k| [%s] -> %s (%s)%s", epoch, correct / n,
                     ", ".join(f"{m:.3f}" for m in rec.mass), rec.air, rec.tokens,
                     ", ".join(f"{k:.2f}" for k in rec.key_norm), rec.action, rec.reason,
                     f" by {rec.applied_angle_deg:.0f} of {rec.angle_deg:.0f} deg" if rec.rotated else "")


if __name__ == "__main__":
    main()
