"""The tables of ``scripts/synthetic_study.py``: the regime, the tuning ranking and the report (markdown + json)."""

from __future__ import annotations

import json
import os

from rollingq.files import atomic_write_bytes
from rollingq.study import (
    Paired,
    collapse_checks,
    pair_by_seed,
    paired_interval,
    paired_table,
    per_seed_table,
    summarize_run,
)
from study_indicators import indicator_lines

NOISE_MODALITY = "audio"


def tuning_objective(vanilla, treated) -> dict:
    """Paired (setting − vanilla) differences; the objective is the mean over seeds of
    (Δ clean accuracy + Δ accuracy with audio replaced) / 2; ``safe``: mean Δ clean ≥ −0.01."""
    pairs = pair_by_seed(vanilla, treated)
    clean = paired_interval([b.accuracy - a.accuracy for a, b in pairs])
    replaced = paired_interval([b.accuracy_replaced - a.accuracy_replaced for a, b in pairs])
    probe = paired_interval([None if a.probe_weak is None or b.probe_weak is None else b.probe_weak - a.probe_weak
                             for a, b in pairs])
    objective = paired_interval([((b.accuracy - a.accuracy) + (b.accuracy_replaced - a.accuracy_replaced)) / 2
                                 for a, b in pairs])
    return {"clean": clean.__dict__, "replaced": replaced.__dict__, "probe": probe.__dict__,
            "objective": objective.__dict__, "safe": clean.mean is not None and clean.mean >= -0.01,
            "rotations": [b.rotations for _, b in pairs], "seeds": [a.seed for a, _ in pairs]}


def _mean(values) -> str:
    values = [v for v in values if v is not None]
    return "n/a" if not values else f"{sum(values) / len(values):.3f}"


def regime_lines(task: str, summaries: dict[str, list]) -> list[str]:
    """Per seed and mean: each arm's accuracy, the MT numbers and the fair-task criteria."""
    get = {a: {r.seed: r for r in runs} for a, runs in summaries.items()}
    seeds = sorted(set().union(*[set(v) for v in get.values()]))
    head = ["seed", "audio only", "visual only", "concat", "vanilla MT", "MT, visual = noise", "MT, audio = noise",
            "MT probe visual", "MT mass on audio (clean → audio = noise)", "concat − best unimodal", "MT − audio only"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    cols: dict[str, list] = {h: [] for h in head[1:]}
    for seed in seeds:
        a, v, c, m = (get.get(k, {}).get(seed) for k in ("audio_only", "visual_only", "concat", "vanilla_mt"))
        cells = {
            "audio only": a and a.accuracy, "visual only": v and v.accuracy, "concat": c and c.accuracy,
            "vanilla MT": m and m.accuracy, "MT, visual = noise": m and m.accuracy_weak_replaced,
            "MT, audio = noise": m and m.accuracy_replaced, "MT probe visual": m and m.probe_weak,
            "MT mass on audio (clean → audio = noise)": None,
            "concat − best unimodal": c.accuracy - max(a.accuracy, v.accuracy) if a and v and c else None,
            "MT − audio only": m.accuracy - a.accuracy if m and a else None,
        }
        for k, val in cells.items():
            cols[k].append(val)
        mass = f"{m.mass_clean:.3f} → {m.mass_replaced:.3f}" if m and m.mass_clean is not None else "n/a"
        lines.append(f"| {seed} | " + " | ".join(mass if k.startswith("MT mass") else
                                                  ("n/a" if val is None else f"{val:.3f}")
                                                  for k, val in cells.items()) + " |")
    lines.append("| mean | " + " | ".join("" if k.startswith("MT mass") else _mean(v) for k, v in cols.items()) + " |")
    return lines


def write_regime(out: str, task: str, done: dict[str, list[str]], split: str, common: list[str]) -> str:
    summaries = {a: [summarize_run(r, split) for r in dirs] for a, dirs in done.items()}
    lines = [f"# Regime: {task} ({split} split of the tuning seeds' data, last checkpoint)", "",
             f"Overrides: `{' '.join(common) or '(the shipped configs)'}`", ""] + regime_lines(task, summaries)
    lines += ["", "## Every run", ""] + per_seed_table([r for runs in summaries.values() for r in runs])
    os.makedirs(out, exist_ok=True)
    atomic_write_bytes(json.dumps({"task": task, "split": split, "overrides": common,
                                   "runs": {a: [r.to_dict() for r in s] for a, s in summaries.items()}},
                                  indent=1).encode(), os.path.join(out, "regime.json"))
    path = os.path.join(out, "regime.md")
    atomic_write_bytes(("\n".join(lines) + "\n").encode(), path)
    return path


def write_tuning(out: str, task: str, done: dict[str, list[str]], split: str, seeds: list[int]) -> str:
    summaries = {v: [summarize_run(r, split) for r in dirs] for v, dirs in done.items()}
    table = {v: tuning_objective(summaries["vanilla_mt"], s) for v, s in summaries.items() if v != "vanilla_mt"}
    ranked = sorted(table, key=lambda v: (not table[v]["safe"], -(table[v]["objective"]["mean"] or -1e9)))
    lines = [f"# Tuning: {task} ({split} split, last checkpoint, seeds {seeds})", "",
             "Objective: mean over seeds of ((clean acc − vanilla) + (acc with audio replaced − vanilla)) / 2; "
             "safe: mean clean difference ≥ −0.01 (safe settings rank first).", "",
             "| setting | objective [95 % CI] | clean diff | replaced diff | weak probe diff | safe | rotations |",
             "|---|---|---|---|---|---|---|"]
    for v in ranked:
        t = table[v]
        lines.append(f"| {v} | {Paired(**t['objective']).text()} | {Paired(**t['clean']).text()} | "
                     f"{Paired(**t['replaced']).text()} | {Paired(**t['probe']).text()} | "
                     f"{'yes' if t['safe'] else 'no'} | {t['rotations']} |")
    lines += ["", "## Every run", ""] + per_seed_table([r for runs in summaries.values() for r in runs], checks=True)
    os.makedirs(out, exist_ok=True)
    atomic_write_bytes(json.dumps({"task": task, "ranking": ranked, "settings": table,
                                   "runs": {v: [r.to_dict() for r in s] for v, s in summaries.items()}},
                                  indent=1).encode(), os.path.join(out, "tuning.json"))
    path = os.path.join(out, "tuning.md")
    atomic_write_bytes(("\n".join(lines) + "\n").encode(), path)
    return path


def write_results(out: str, task: str, done: dict[str, list[str]], figures: bool, static: tuple[str, ...]) -> str:
    summaries = {v: [summarize_run(r, "test") for r in dirs] for v, dirs in done.items()}
    vanilla = summaries["vanilla_mt"]
    checks = [collapse_checks(r) for r in vanilla]
    lines = [f"# {task}: every arm (test split, last checkpoint, noise on {NOISE_MODALITY})", "",
             "## The regime (means over seeds)", ""] + regime_lines(task, summaries)
    lines += ["", "## Vanilla MT: the collapse criteria", ""]
    lines += [f"- {key}: {sum(1 for c in checks if c[key])} of {len(checks)} seeds"
              for key in ("mass", "static", "air_grows", "probe_gap")]
    lines += ["", "## Every run", ""] + per_seed_table([r for runs in summaries.values() for r in runs], checks=True)
    for v, runs in summaries.items():
        if v != "vanilla_mt":
            lines += ["", f"## Paired differences: {v} − vanilla_mt (same seed)", ""]
            lines += paired_table(pair_by_seed(vanilla, runs), "vanilla_mt", v)
    indicator = indicator_lines([d for a, dirs in done.items() if a not in static for d in dirs])
    if indicator:
        lines += ["", "## AIR and the Eq. 3 score indicator vs the attention mass", ""] + indicator
    os.makedirs(out, exist_ok=True)
    atomic_write_bytes(json.dumps({"task": task, "runs": {v: [r.to_dict() for r in s] for v, s in summaries.items()},
                                   "checks": {str(r.seed): c for r, c in zip(vanilla, checks)}},
                                  indent=1).encode(), os.path.join(out, "results.json"))
    path = os.path.join(out, "results.md")
    atomic_write_bytes(("\n".join(lines) + "\n").encode(), path)
    if figures:
        from rollingq.analysis.report import write_report

        write_report([d for dirs in done.values() for d in dirs], out)
    return path
