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


SAFE_MEAN = -0.01
"""A setting is safe on a task when its mean clean difference to vanilla is at least this ..."""
SAFE_LOW = -0.02
"""... and the low end of its 95 % interval at least this (protocol amendment 1: the done-when bound)."""


def tuning_objective(vanilla, treated) -> dict:
    """Paired (setting − vanilla) differences; the objective is the mean over seeds of
    (Δ clean accuracy + Δ accuracy with audio replaced) / 2; ``safe``: mean Δ clean ≥ :data:`SAFE_MEAN` and the
    low end of its 95 % interval ≥ :data:`SAFE_LOW` (a single seed: the mean for both)."""
    pairs = pair_by_seed(vanilla, treated)
    clean = paired_interval([b.accuracy - a.accuracy for a, b in pairs])
    replaced = paired_interval([b.accuracy_replaced - a.accuracy_replaced for a, b in pairs])
    probe = paired_interval([None if a.probe_weak is None or b.probe_weak is None else b.probe_weak - a.probe_weak
                             for a, b in pairs])
    objective = paired_interval([((b.accuracy - a.accuracy) + (b.accuracy_replaced - a.accuracy_replaced)) / 2
                                 for a, b in pairs])
    return {"clean": clean.__dict__, "replaced": replaced.__dict__, "probe": probe.__dict__,
            "objective": objective.__dict__,
            "safe": clean.mean is not None and clean.mean >= SAFE_MEAN
            and (clean.mean if clean.low is None else clean.low) >= SAFE_LOW,
            "rotations": [b.rotations for _, b in pairs], "seeds": [a.seed for a, _ in pairs]}


def decisions(run_dir: str) -> dict:
    """The controller's records of one run (``metrics.jsonl``, :func:`rollingq.demo_text.controller_summary`):
    ``reasons`` {"action/reason": count} over every epoch end, ``applied`` the applied angle of each rotation
    (degrees), ``proposed`` the angle each rotation or refusal proposed, ``cos_query_keys`` cos(E[q], E[k̄_m]) at
    each refusal or rotation."""
    from rollingq.demo_text import controller_summary
    from rollingq.records import read_metrics

    summary = controller_summary(read_metrics(os.path.join(run_dir, "metrics.jsonl")))
    return {"reasons": summary["reasons"], "applied": summary["applied"], "proposed": summary["considered"],
            "cos_query_keys": summary["cos_query_keys"]}


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


def write_table(out: str, stem: str, lines: list[str], payload: dict) -> str:
    """``<out>/<stem>.md`` (``lines``) and ``<out>/<stem>.json`` (``payload``), each written atomically;
    returns the Markdown file's path."""
    os.makedirs(out, exist_ok=True)
    atomic_write_bytes(json.dumps(payload, indent=1).encode(), os.path.join(out, f"{stem}.json"))
    path = os.path.join(out, f"{stem}.md")
    atomic_write_bytes(("\n".join(lines) + "\n").encode(), path)
    return path


def write_regime(out: str, task: str, done: dict[str, list[str]], split: str, common: list[str]) -> str:
    summaries = {a: [summarize_run(r, split) for r in dirs] for a, dirs in done.items()}
    lines = [f"# Regime: {task} ({split} split of the tuning seeds' data, last checkpoint)", "",
             f"Overrides: `{' '.join(common) or '(the shipped configs)'}`", ""] + regime_lines(task, summaries)
    lines += ["", "## Every run", ""] + per_seed_table([r for runs in summaries.values() for r in runs])
    return write_table(out, "regime", lines, {"task": task, "split": split, "overrides": common,
                                              "runs": {a: [r.to_dict() for r in s] for a, s in summaries.items()}})


def write_tuning(out: str, task: str, done: dict[str, list[str]], split: str, seeds: list[int]) -> str:
    summaries = {v: [summarize_run(r, split) for r in dirs] for v, dirs in done.items()}
    table = {v: tuning_objective(summaries["vanilla_mt"], s) for v, s in summaries.items() if v != "vanilla_mt"}
    for v, t in table.items():
        counts: dict[str, int] = {}
        angles: list[str] = []
        for d in done[v]:
            for key, n in decisions(d)["reasons"].items():
                counts[key] = counts.get(key, 0) + n
            angles += [f"{a:.0f}" for a in decisions(d)["applied"]]
        t["decisions"] = ", ".join(f"{k}: {n}" for k, n in sorted(counts.items())) or "-"
        t["angles"] = " ".join(angles) or "-"
    ranked = sorted(table, key=lambda v: (not table[v]["safe"], -(table[v]["objective"]["mean"] or -1e9)))
    lines = [f"# Tuning: {task} ({split} split, last checkpoint, seeds {seeds})", "",
             "Objective: mean over seeds of ((clean acc − vanilla) + (acc with audio replaced − vanilla)) / 2; "
             "safe: mean clean difference ≥ −0.01 and its 95 % interval's low end ≥ −0.02 (safe settings rank "
             "first). Decisions: the controller's actions over every epoch end of the five runs (reason: count); "
             "angles: the applied angle of each rotation.", "",
             "| setting | objective [95 % CI] | clean diff | replaced diff | weak probe diff | safe | rotations | "
             "decisions | angles (deg) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for v in ranked:
        t = table[v]
        lines.append(f"| {v} | {Paired(**t['objective']).text()} | {Paired(**t['clean']).text()} | "
                     f"{Paired(**t['replaced']).text()} | {Paired(**t['probe']).text()} | "
                     f"{'yes' if t['safe'] else 'no'} | {t['rotations']} | {t['decisions']} | {t['angles']} |")
    lines += ["", "## Every run", ""] + per_seed_table([r for runs in summaries.values() for r in runs], checks=True)
    return write_table(out, "tuning", lines, {"task": task, "ranking": ranked, "settings": table,
                                              "runs": {v: [r.to_dict() for r in s] for v, s in summaries.items()}})


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
    lines += ["", "## What the controllers decided (every epoch end of every seed)", "",
              "| arm | seeds that rotated | decisions (action/reason: count) | applied angles (deg) | "
              "proposed angles (deg) |", "|---|---|---|---|---|"]
    for v, dirs in done.items():
        per_run = [decisions(d) for d in dirs]
        if not any(p["reasons"] for p in per_run):
            continue
        counts: dict[str, int] = {}
        for p in per_run:
            for key, n in p["reasons"].items():
                counts[key] = counts.get(key, 0) + n
        rotated = sorted(r.seed for r, p in zip(summaries[v], per_run) if p["applied"])
        lines.append(f"| {v} | {len(rotated)} of {len(dirs)} ({', '.join(map(str, rotated)) or 'none'}) | "
                     + ", ".join(f"{k}: {n}" for k, n in sorted(counts.items())) + " | "
                     + (" ".join(f"{a:.0f}" for p in per_run for a in p["applied"]) or "-") + " | "
                     + (" ".join(f"{a:.0f}" for p in per_run for a in p["proposed"]) or "-") + " |")
    indicator = indicator_lines([d for a, dirs in done.items() if a not in static for d in dirs])
    if indicator:
        lines += ["", "## AIR and the Eq. 3 score indicator vs the attention mass", ""] + indicator
    path = write_table(out, "results", lines, {
        "task": task, "runs": {v: [r.to_dict() for r in s] for v, s in summaries.items()},
        "checks": {str(r.seed): c for r, c in zip(vanilla, checks)}})
    if figures:
        from rollingq.analysis.report import write_report

        write_report([d for dirs in done.values() for d in dirs], out)
    return path


# ---------------------------------------------------------------------------- the frozen choice
TIE = 0.005
"""Objectives within this of the best tie (then: weak-probe difference, the more conservative setting)."""
FALLBACK = "rq_lim90_cap30_start3_rot1"
"""Shipped when no candidate is safe on every tuned task: the library's defaults, the later start, one rotation."""


def _conservative(name: str) -> tuple:
    """Sort key, most conservative first: anchor limit, cap, later start, fewer rotations (``rq_lim…`` names)."""
    fields: dict[str, int] = {}
    for part in name.split("_")[1:]:
        for key in ("lim", "cap", "start", "rot"):
            if part.startswith(key) and part[len(key):].isdigit():
                fields[key] = int(part[len(key):])
    return (fields.get("lim", 0), fields.get("cap", 0), -fields.get("start", 0), fields.get("rot", 0))


def _score(tables: dict[str, dict], name: str, key: str) -> float:
    values = [tables[t]["settings"][name][key]["mean"] for t in tables]
    return sum(0.0 if v is None else v for v in values) / len(values)


def choose_default(tables: dict[str, dict], candidates: list[str]) -> tuple[str, list[str]]:
    """The shipped default by the protocol's rule: among ``candidates`` safe on every task of ``tables`` (task ->
    ``tuning.json``), the highest objective averaged over the tasks; ties (within :data:`TIE`) go to the higher
    mean weak-probe difference, then to the more conservative setting (anchor limit 90 before 180, the smaller
    cap, the later start, fewer rotations). None safe: :data:`FALLBACK`. Returns (name, the lines that say why)."""
    safe = [c for c in candidates if all(c in t["settings"] and t["settings"][c]["safe"] for t in tables.values())]
    lines = [f"candidates safe on {', '.join(sorted(tables))}: {', '.join(safe) or 'none'}"]
    if not safe:
        return FALLBACK, lines + [f"no candidate is safe on every task: the fallback {FALLBACK}"]
    best = max(_score(tables, c, "objective") for c in safe)
    tied = [c for c in safe if _score(tables, c, "objective") >= best - TIE]
    tied.sort(key=lambda c: (-round(_score(tables, c, "probe"), 6), _conservative(c)))
    lines.append(f"best mean objective {best:+.4f}; within {TIE}: {', '.join(tied)}")
    return tied[0], lines + [f"chosen: {tied[0]} (objective {_score(tables, tied[0], 'objective'):+.4f}, weak "
                             f"probe {_score(tables, tied[0], 'probe'):+.4f})"]


def choose_optimiser(table: dict, candidates: list[str]) -> str | None:
    """The optimiser-only winner of one task: the first of ``candidates`` in the tuning ranking (safe first,
    then the objective); ties (within :data:`TIE`) go to the higher weak-probe difference, then grid order."""
    ranked = [c for c in table["ranking"] if c in candidates]
    if not ranked:
        return None
    top = ranked[0]
    s = table["settings"]
    tied = [c for c in ranked if s[c]["safe"] == s[top]["safe"]
            and (s[c]["objective"]["mean"] or 0.0) >= (s[top]["objective"]["mean"] or 0.0) - TIE]
    tied.sort(key=lambda c: (-(s[c]["probe"]["mean"] or 0.0), candidates.index(c)))
    return tied[0]


def write_choice(out: str, tuning_dirs: dict[str, str], candidates: list[str], optim: list[str]) -> str:
    """``choice.md`` / ``choice.json``: the shipped default over the tasks of ``tuning_dirs`` (task -> folder with
    ``tuning.json``) and each task's optimiser-only winner."""
    tables = {}
    for task, folder in tuning_dirs.items():
        with open(os.path.join(folder, "tuning.json"), encoding="utf-8") as f:
            tables[task] = json.load(f)
    name, why = choose_default(tables, candidates)
    winners = {task: choose_optimiser(t, optim) for task, t in tables.items()}
    lines = ["# The frozen settings (tuning seeds)", "", *[f"- {line}" for line in why], "",
             "| setting | " + " | ".join(f"{t} objective | {t} clean | {t} probe | {t} safe" for t in tables) + " |",
             "|---|" + "---|---|---|---|" * len(tables)]
    for c in candidates:
        cells = []
        for t in tables.values():
            s = t["settings"].get(c)
            cells += ["n/a"] * 4 if s is None else [
                Paired(**s["objective"]).text(), Paired(**s["clean"]).text(), Paired(**s["probe"]).text(),
                "yes" if s["safe"] else "no"]
        lines.append(f"| {c} | " + " | ".join(cells) + " |")
    lines += ["", "Optimiser only: " + ", ".join(f"{t}: {w}" for t, w in winners.items())]
    return write_table(out, "choice", lines, {"default": name, "why": why, "optim_only": winners})
