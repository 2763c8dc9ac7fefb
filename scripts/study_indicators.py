"""The indicators against the attention mass, over finished runs (a part of ``scripts/synthetic_study.py``).

For every (run, condition) where the mass favours one modality by >= 0.1: whether the sign of AIR
(cos_a − cos_v) and of the Eq. 3 score indicator (L·‖k̄‖·cos, normalised) agree with the mass imbalance.
"""

from __future__ import annotations

import json
import os


def _sign(x: float, dead: float = 0.0) -> int:
    return 0 if abs(x) <= dead else (1 if x > 0 else -1)


def _token_counts(run_dir: str) -> list[int]:
    """Tokens per modality of a run's model (the embeddings' sizes; no varlen in these tasks)."""
    from rollingq.build import build_model
    from rollingq.config import read_config

    model = build_model(read_config(os.path.join(run_dir, "config.yaml")))
    return [int(getattr(e.embed, "num_tokens", getattr(e.embed, "length", 0))) for e in model.encoders]


def indicator_cases(run_dirs: list[str], mass_margin: float = 0.1, split: str = "test") -> list[dict]:
    """Every (run, condition) where the mass favours one modality by >= ``mass_margin``: the signs of AIR
    (cos_a − cos_v) and of the Eq. 3 score indicator (L·‖k̄‖·cos, normalised) against the mass imbalance.

    Conditions: the final model on the test split, clean and with audio replaced (eval.json; key norms are
    the per-sample E‖k̄‖), and every epoch-end controller record of a RollingQ run (training window; key norms
    ‖E k̄‖, token counts from the forwards)."""
    from rollingq.evaluate import eval_filename
    from rollingq.records import read_metrics

    cases = []
    for run_dir in run_dirs:
        with open(os.path.join(run_dir, eval_filename(split)), encoding="utf-8") as f:
            result = json.load(f)
        mods = result["modalities"]
        tokens = _token_counts(run_dir)
        summary = (result.get("key_distribution") or {}).get("summary") or {}
        for cond in ("clean", "noise_replaced"):
            keys, mass = summary.get(cond), (result.get("attention") or {}).get(cond)
            if not keys or not mass:
                continue
            cos = [keys[m]["cos_mean"] for m in mods]
            norm = [keys[m]["norm_mean"] for m in mods]
            cases.append({"run": os.path.basename(run_dir), "where": f"final, {cond}", "tokens": tokens,
                          "cos": cos, "norm": norm, "mass": [mass[m] for m in mods]})
        for row in read_metrics(os.path.join(run_dir, "metrics.jsonl")):
            for rec in row.get("rollingq") or []:
                if rec.get("tokens") and rec.get("key_norm"):
                    cases.append({"run": os.path.basename(run_dir), "where": f"epoch {row['epoch']} (training)",
                                  "tokens": rec["tokens"], "cos": rec["cos_mean"], "norm": rec["key_norm"],
                                  "mass": rec["mass"][1:]})
    out = []
    for c in cases:
        d_mass = c["mass"][0] - c["mass"][1]
        if abs(d_mass) < mass_margin:
            continue
        w = [t * n for t, n in zip(c["tokens"], c["norm"])]
        mean_w = sum(w) / len(w)
        air = c["cos"][0] - c["cos"][1]
        score = (w[0] * c["cos"][0] - w[1] * c["cos"][1]) / mean_w if mean_w > 0 else air
        out.append({**c, "air": air, "score": score, "mass_diff": d_mass,
                    "air_agrees": _sign(air) == _sign(d_mass), "score_agrees": _sign(score) == _sign(d_mass),
                    "cos_negative": all(x < 0 for x in c["cos"])})
    return out


def indicator_lines(run_dirs: list[str], split: str = "test") -> list[str]:
    cases = indicator_cases(run_dirs, split=split)
    if not cases:
        return []
    lines = ["| where | cases (mass lead ≥ 0.1) | AIR sign agrees with the mass | score sign agrees | "
             "both mean cosines < 0 | score agrees when a cosine ≥ 0 | score agrees when both < 0 |",
             "|---|---|---|---|---|---|---|"]
    for label, keep in ((f"final model, clean {split}", lambda c: c["where"] == "final, clean"),
                        ("final model, audio replaced", lambda c: c["where"] == "final, noise_replaced"),
                        ("epoch ends (training window)", lambda c: c["where"].startswith("epoch"))):
        sel = [c for c in cases if keep(c)]
        if not sel:
            continue
        pos = [c for c in sel if not c["cos_negative"]]
        neg = [c for c in sel if c["cos_negative"]]
        lines.append(f"| {label} | {len(sel)} | {sum(c['air_agrees'] for c in sel)} | "
                     f"{sum(c['score_agrees'] for c in sel)} | {len(neg)} | "
                     f"{sum(c['score_agrees'] for c in pos)} of {len(pos)} | "
                     f"{sum(c['score_agrees'] for c in neg)} of {len(neg)} |")
    ratios = sorted(c["norm"][0] / c["norm"][1] for c in cases if c["where"].startswith("epoch") and c["norm"][1] > 0)
    if ratios:
        lines += ["", f"Mean-key norm ratio ‖k̄_a‖ / ‖k̄_v‖ at those epoch ends: median {ratios[len(ratios) // 2]:.2f}, "
                  f"range {ratios[0]:.2f}–{ratios[-1]:.2f} (the paper's AIR assumes about 1 and equal token counts)."]
    tokens = sorted({tuple(c["tokens"]) for c in cases})
    lines += ["", f"Token counts seen: {[list(t) for t in tokens]}. Key norms: per-sample E‖k̄‖ of the final "
              "model, ‖E k̄‖ of the training window at epoch ends."]
    return lines


