#!/usr/bin/env python
"""The RollingQ study: vanilla MT vs vanilla MT + RollingQ, tuned on some seeds, reported on others.

Two tasks: ``synthetic`` (the packaged token task, configs ``synthetic`` / ``synthetic_rollingq``) and
``avdigits`` (the real-files set of ``rollingq prepare avdigits``, configs ``avdigits_vanilla_mt`` /
``avdigits_vanilla_mt_rollingq``; one dataset is written per seed). Two phases, following the
pre-registered protocol of ``docs/synthetic_study.md``:

* ``tune`` (seeds 100-104): vanilla MT and every RollingQ setting of :data:`TUNING_GRID`, evaluated on the
  **validation** split; writes ``tuning.json`` / ``tuning.md`` with the objective per setting.
* ``report`` (seeds 0-9): vanilla MT and the frozen RollingQ config (plus ``--extra`` variants), evaluated on
  the **test** split; writes ``results.json`` / ``results.md`` (every seed, the collapse criteria, paired
  differences with 95 % t-intervals) and the figures of ``rollingq report``.

Every run is trained with one torch thread, evaluated at its **last** checkpoint (the end of training) with
the dominant modality (audio) corrupted, noise seed 0. Finished runs are reused, interrupted ones resumed.

    nice -n 10 python scripts/synthetic_study.py --task synthetic --phase tune \\
        --runs runs/study --out docs/figures/synthetic_study/synthetic/tuning --jobs 2
"""

from __future__ import annotations

import argparse
import json
import logging
import multiprocessing
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [os.path.join(ROOT, "python"), ROOT]

from rollingq.config import load_config  # noqa: E402
from rollingq.files import atomic_write_bytes  # noqa: E402
from rollingq.study import (  # noqa: E402
    collapse_checks,
    pair_by_seed,
    paired_interval,
    paired_table,
    per_seed_table,
    summarize_run,
)

logger = logging.getLogger("study")

NOISE_MODALITY = "audio"
CHECKPOINT = "last"
TASKS = {
    "synthetic": {"vanilla": "synthetic", "rollingq": "synthetic_rollingq"},
    "avdigits": {"vanilla": "avdigits_vanilla_mt", "rollingq": "avdigits_vanilla_mt_rollingq"},
}
#: RollingQ settings tried in the tuning phase, per task (overrides of the task's RollingQ config). Every
#: setting keeps the first-rotation guard (rollingq.min_accuracy_gain 0.05), window "epoch", plane rotations.
def _setting(start: int, rot: int, rho: float) -> tuple[str, list[str]]:
    return (f"rq_start{start}_rot{rot}_rho{rho:g}",
            [f"rollingq.start_epoch={start}", f"rollingq.max_rotations={rot}", f"rollingq.rho={rho}",
             "rollingq.beta=0.1"])


TUNING_GRIDS: dict[str, dict[str, list[str]]] = {
    "synthetic": dict(_setting(s, r, rho) for s in (1, 3) for r in (1, 3) for rho in (1.0, 3.0)),
    "avdigits": dict(_setting(s, r, 1.0) for s in (1, 3) for r in (1, 3)),  # runs cost ~10x more
}
TUNING_GRID: dict[str, list[str]] = {k: v for grid in TUNING_GRIDS.values() for k, v in grid.items()}
EXTRA: dict[str, list[str]] = {
    "rollingq_score": ["rollingq.indicator=score"],
}


def _variant_cfg(task: str, variant: str, seed: int, data_root: str | None, common: list[str]) -> dict:
    base = TASKS[task]["vanilla"] if variant == "vanilla_mt" else TASKS[task]["rollingq"]
    overrides = list(common) + [f"seed={seed}", "train.progress=false"]
    if data_root is not None:
        overrides.append(f"data.root={data_root}")
    if variant in TUNING_GRID:
        overrides += TUNING_GRID[variant]
    elif variant in EXTRA:
        overrides += EXTRA[variant]
    elif variant not in ("vanilla_mt", "rollingq"):
        raise ValueError(f"variant: expected vanilla_mt, rollingq, {sorted(EXTRA)} or a tuning setting, "
                         f"got {variant!r}")
    cfg = load_config(base, overrides)
    if variant != "vanilla_mt":
        cfg["name"] = "vanilla_mt+rollingq" if variant == "rollingq" else variant
    return cfg


def _finished(run_dir: str, epochs: int) -> bool:
    from rollingq.records import read_metrics

    metrics = os.path.join(run_dir, "metrics.jsonl")
    return (os.path.isfile(os.path.join(run_dir, "checkpoints", "last.pt")) and os.path.isfile(metrics)
            and len(read_metrics(metrics)) >= epochs)


def run_one(cfg: dict, run_dir: str, split: str) -> tuple[str, float, float]:
    """Train (or resume) and evaluate one run; returns (run_dir, train seconds, eval seconds)."""
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    import torch
    from rollingq.evaluate import eval_filename, evaluate_run
    from rollingq.train import resume, train

    torch.set_num_threads(1)
    t0 = time.time()
    if not _finished(run_dir, int(cfg["train"]["epochs"])):
        if os.path.isfile(os.path.join(run_dir, "checkpoints", "last.pt")):
            resume(run_dir)
        else:
            train(cfg, run_dir, overwrite=True)  # no last.pt: at most a run cut short in epoch 1
    t1 = time.time()
    if not os.path.isfile(os.path.join(run_dir, eval_filename(split))):
        evaluate_run(run_dir, split=split, noise_modality=NOISE_MODALITY, seed=0, checkpoint=CHECKPOINT)
    return run_dir, t1 - t0, time.time() - t1


def prepare_data(task: str, runs_root: str, seed: int) -> str | None:
    if task != "avdigits":
        return None
    from rollingq.prepare.avdigits import write_avdigits

    root = os.path.join(runs_root, "data", f"avdigits_seed{seed}")
    if not os.path.isfile(os.path.join(root, "avdigits.json")):
        write_avdigits(root, seed=seed, overwrite=True)
    return root


def run_all(task: str, phase: str, runs_root: str, seeds: list[int], variants: list[str], jobs: int,
            common: list[str]) -> dict[str, list[str]]:
    split = "val" if phase == "tune" else "test"
    plan = []
    for seed in seeds:
        data_root = prepare_data(task, runs_root, seed)
        for variant in variants:
            cfg = _variant_cfg(task, variant, seed, data_root, common)
            plan.append((variant, cfg, os.path.join(runs_root, task, f"{variant}_seed{seed}".replace("+", "_")), split))
    done: dict[str, list[str]] = {v: [] for v in variants}
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=jobs, mp_context=ctx) as pool:
        futures = [(variant, pool.submit(run_one, cfg, run_dir, sp)) for variant, cfg, run_dir, sp in plan]
        for variant, fut in futures:
            run_dir, t_train, t_eval = fut.result()
            logger.info("%s: trained in %.0f s, evaluated in %.0f s", run_dir, t_train, t_eval)
            done[variant].append(run_dir)
    return done


# ---------------------------------------------------------------------------- tuning
def tuning_objective(vanilla, treated) -> dict:
    """Paired (setting − vanilla) validation differences; the objective is their mean of clean and replaced."""
    pairs = pair_by_seed(vanilla, treated)
    clean = paired_interval([b.accuracy - a.accuracy for a, b in pairs])
    replaced = paired_interval([b.accuracy_replaced - a.accuracy_replaced for a, b in pairs])
    objective = paired_interval([((b.accuracy - a.accuracy) + (b.accuracy_replaced - a.accuracy_replaced)) / 2
                                 for a, b in pairs])
    return {"clean": clean.__dict__, "replaced": replaced.__dict__, "objective": objective.__dict__,
            "rotations": [b.rotations for _, b in pairs], "seeds": [a.seed for a, _ in pairs]}


def write_tuning(out: str, task: str, done: dict[str, list[str]]) -> str:
    summaries = {v: [summarize_run(r, "val") for r in dirs] for v, dirs in done.items()}
    vanilla = summaries["vanilla_mt"]
    table = {v: tuning_objective(vanilla, s) for v, s in summaries.items() if v != "vanilla_mt"}
    ranked = sorted(table, key=lambda v: -(table[v]["objective"]["mean"] or -1e9))
    lines = [f"# Tuning: {task} (validation split, last checkpoint, seeds {sorted(r.seed for r in vanilla)})", "",
             "Objective: mean over seeds of ((clean acc − vanilla) + (acc with audio replaced − vanilla)) / 2.", "",
             "| setting | objective [95 % CI] | clean acc diff | replaced acc diff | rotation epochs per seed |",
             "|---|---|---|---|---|"]
    from rollingq.study import Paired

    for v in ranked:
        t = table[v]
        lines.append(f"| {v} | {Paired(**t['objective']).text()} | {Paired(**t['clean']).text()} | "
                     f"{Paired(**t['replaced']).text()} | {t['rotations']} |")
    lines += ["", "## Every run (validation split)", ""]
    lines += per_seed_table([r for runs in summaries.values() for r in runs], checks=True)
    os.makedirs(out, exist_ok=True)
    atomic_write_bytes(json.dumps({"task": task, "ranking": ranked, "settings": table,
                                   "grid": {v: TUNING_GRID.get(v, []) for v in table},
                                   "runs": {v: [r.to_dict() for r in s] for v, s in summaries.items()}},
                                  indent=1).encode(), os.path.join(out, "tuning.json"))
    path = os.path.join(out, "tuning.md")
    atomic_write_bytes(("\n".join(lines) + "\n").encode(), path)
    return path


# ---------------------------------------------------------------------------- report
def write_results(out: str, task: str, done: dict[str, list[str]], figures: bool) -> str:
    summaries = {v: [summarize_run(r, "test") for r in dirs] for v, dirs in done.items()}
    vanilla = summaries["vanilla_mt"]
    lines = [f"# {task}: vanilla MT vs RollingQ (test split, last checkpoint, noise on {NOISE_MODALITY})", ""]
    checks = [collapse_checks(r) for r in vanilla]
    lines += ["## Vanilla MT: the collapse criteria", "",
              "mass ≥ 0.70 on audio / moves ≤ 0.05 when audio is noise / AIR last epoch > first / "
              "acc with audio replaced ≤ weak probe − 0.10:", ""]
    for key in ("mass", "static", "air_grows", "probe_gap"):
        met = sum(1 for c in checks if c[key])
        lines.append(f"- {key}: {met} of {len(checks)} seeds")
    lines += ["", "## Every run", ""] + per_seed_table([r for runs in summaries.values() for r in runs], checks=True)
    for v, runs in summaries.items():
        if v == "vanilla_mt":
            continue
        lines += ["", f"## Paired differences: {v} − vanilla_mt (same seed)", ""]
        lines += paired_table(pair_by_seed(vanilla, runs), "vanilla_mt", v)
    indicator = indicator_lines([d for dirs in done.values() for d in dirs])
    if indicator:
        lines += ["", "## AIR and the Eq. 3 score indicator vs the attention mass (every run)", ""] + indicator
    os.makedirs(out, exist_ok=True)
    atomic_write_bytes(json.dumps({"task": task, "runs": {v: [r.to_dict() for r in s] for v, s in summaries.items()},
                                   "checks": {str(r.seed): c for r, c in zip(vanilla, checks)}},
                                  indent=1).encode(), os.path.join(out, "results.json"))
    path = os.path.join(out, "results.md")
    atomic_write_bytes(("\n".join(lines) + "\n").encode(), path)
    if figures:
        from rollingq.analysis.report import write_report

        write_report([d for v in ("vanilla_mt", "rollingq") if v in done for d in done[v]], out)
    return path


# ---------------------------------------------------------------------------- the indicators vs the mass
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
    tokens = sorted({tuple(c["tokens"]) for c in cases})
    lines += ["", f"Token counts seen: {[list(t) for t in tokens]}. Key norms: per-sample E‖k̄‖ of the final "
              "model, ‖E k̄‖ of the training window at epoch ends."]
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--task", choices=sorted(TASKS), required=True)
    parser.add_argument("--phase", choices=["tune", "report"], required=True)
    parser.add_argument("--runs", default="runs/study", help="where run directories (and avdigits data) go")
    parser.add_argument("--out", required=True, help="where the tables (and report figures) go")
    parser.add_argument("--seeds", type=int, nargs="+", default=None,
                        help="default: 100-104 for tune, 0-9 for report")
    parser.add_argument("--variants", nargs="+", default=None,
                        help="default: vanilla_mt + the tuning grid (tune), vanilla_mt + rollingq (report)")
    parser.add_argument("--extra", nargs="*", default=[], choices=sorted(EXTRA),
                        help="report phase: more variants (rollingq_score: the Eq. 3 indicator)")
    parser.add_argument("--jobs", type=int, default=2, help="runs in parallel (one torch thread each)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="key=value",
                        help="dotted override applied to every run")
    parser.add_argument("--no-figures", action="store_true")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    seeds = args.seeds or (list(range(100, 105)) if args.phase == "tune" else list(range(10)))
    if args.variants:
        variants = args.variants
    elif args.phase == "tune":
        variants = ["vanilla_mt", *TUNING_GRIDS[args.task]]
    else:
        variants = ["vanilla_mt", "rollingq", *args.extra]
    start = time.time()
    done = run_all(args.task, args.phase, args.runs, seeds, variants, args.jobs, args.overrides)
    if args.phase == "tune":
        path = write_tuning(args.out, args.task, done)
    else:
        path = write_results(args.out, args.task, done, figures=not args.no_figures)
    logger.info("wrote %s (%.0f s)", path, time.time() - start)


if __name__ == "__main__":
    main()
