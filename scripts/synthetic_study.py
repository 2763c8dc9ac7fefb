#!/usr/bin/env python
"""The RollingQ study (protocol: ``docs/synthetic_study.md``): every arm, tuned on some seeds, reported on others.

Tasks (:data:`TASKS`): ``synthetic`` (the token task), ``avdigits`` (the fair real-files task: a dataset, a
disjoint pre-training split and pre-trained encoders per seed) and ``avdigits_independent`` (the same
configs on the independent files: plucked sounds, font scans). Arms (:data:`ARMS`): each unimodal model,
concat, vanilla MT, RollingQ (the frozen safe default), RollingQ's official mode, a random rotation of the
same angle, and the best optimiser-only change without rotation. Phases:

* ``regime`` (tuning seeds 100-104): the arms without RollingQ, evaluated on the tuning seeds' held-out split
  (:data:`TUNE_SPLIT`), with ``--set`` overrides naming a regime: the table of the regime grid.
* ``tune`` (tuning seeds): vanilla MT, every setting of :data:`RQ_GRID`, :data:`RQ_MEASURE` and
  :data:`OPTIM_GRID`, and the official mode; the objective per setting (``study_tables.tuning_objective``), ranked.
* ``choose``: from the tuning tables of both tuned tasks (``--tuning synthetic=DIR avdigits=DIR``), the shipped
  default by the protocol's rule and each task's optimiser-only winner (``choice.md``).
* ``report`` (report seeds 0-9): every arm on the test split; paired differences (arm − vanilla MT, same
  seed) with 95 % t-intervals, the collapse criteria, figures.

Every run: one torch thread, evaluated at its **last** checkpoint with audio replaced by noise (``eval.json``)
and with each modality replaced (``eval_replaced_<split>.json``). Finished runs are reused, interrupted ones
resumed.

    nice -n 10 python scripts/synthetic_study.py --task avdigits --phase regime \\
        --runs runs/study --out docs/figures/synthetic_study/avdigits/regime --jobs 2
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
from dataclasses import dataclass, field

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [os.path.join(ROOT, "python"), ROOT, os.path.join(ROOT, "scripts")]

from rollingq.config import ConfigError, load_config, parse_override  # noqa: E402
from study_tables import write_choice, write_regime, write_results, write_tuning  # noqa: E402

logger = logging.getLogger("study")

NOISE_MODALITY = "audio"
CHECKPOINT = "last"
TUNING_SEEDS = list(range(100, 105))
REPORT_SEEDS = list(range(10))


@dataclass(frozen=True)
class Task:
    """A task: the config of each role, the files written per seed, the pre-training of the encoders."""

    configs: dict[str, str]
    data: dict | None = field(default=None, hash=False)
    pretrain: dict[str, str] = field(default_factory=dict, hash=False)


_AV_CONFIGS = {"audio_only": "avdigits_audio_only", "visual_only": "avdigits_visual_only",
               "concat": "avdigits_concat", "vanilla_mt": "avdigits_vanilla_mt",
               "rollingq": "avdigits_vanilla_mt_rollingq"}
_AV_PRETRAIN = {"audio": "avdigits_pretrain_audio", "visual": "avdigits_pretrain_visual"}
AV_DATA = {"train_per_class": 60, "test_per_class": 50, "pretrain_per_class": 60, "snr_db": (-15.0, -5.0),
           "frames_per_clip": 4}
"""The fair task's files (the demo's, ``rollingq.demo.AVDIGITS_DATA``), written per seed."""
TASKS: dict[str, Task] = {
    "synthetic": Task({"audio_only": "synthetic_audio_only", "visual_only": "synthetic_visual_only",
                       "concat": "synthetic_concat", "vanilla_mt": "synthetic", "rollingq": "synthetic_rollingq"}),
    "avdigits": Task(_AV_CONFIGS, AV_DATA, _AV_PRETRAIN),
    "avdigits_independent": Task(_AV_CONFIGS, {**AV_DATA, "sounds": "plucks", "scans": "fonts"}, _AV_PRETRAIN),
}
TUNE_SPLIT = {"synthetic": "val", "avdigits": "test", "avdigits_independent": "test"}
"""Where tuning runs are scored: the synthetic validation split (512 samples); for avdigits the test split of
the tuning seeds' own datasets (300 clips; the validation hold-out has 36), never used for reporting."""

# ---------------------------------------------------------------------------- arms and grids
ARMS: dict[str, tuple[str, list[str]]] = {
    "audio_only": ("audio_only", []),
    "visual_only": ("visual_only", []),
    "concat": ("concat", []),
    "vanilla_mt": ("vanilla_mt", []),
    "rollingq": ("rollingq", []),  # the frozen safe default (the task's RollingQ config)
    # vanilla MT's model with the official preset alone: no key of the task's RollingQ config overrides it
    "rollingq_official": ("vanilla_mt", ["rollingq.enabled=true", "rollingq.mode=official"]),
    "random_rotation": ("rollingq", ["rollingq.direction=random"]),  # the same angle, a random direction
    "optim_only": ("vanilla_mt", []),  # + OPTIM_ONLY[task], frozen after tuning
}
NO_ROTATION = ("audio_only", "visual_only", "concat", "vanilla_mt")
OPTIM_ONLY: dict[str, list[str] | None] = {
    "synthetic": ["optim.lr=0.025"], "avdigits": ["optim.lr=0.005"], "avdigits_independent": ["optim.lr=0.005"]}
"""The frozen optimiser-only change per task: the winner of :data:`OPTIM_GRID` on the tuning seeds, lr × 0.5 on
both tuned tasks (``docs/figures/synthetic_study/choice/choice.md``); the independent set takes avdigits'."""


def _rq(limit: int, cap: int, start: int, rotations: int, safety: bool = True) -> tuple[str, list[str]]:
    name = f"rq_lim{limit}_cap{cap}_start{start}_rot{rotations}" if safety else \
        f"nosafe_cap{cap}_start{start}_rot{rotations}"
    keys = [f"rollingq.anchor_limit_deg={limit}", f"rollingq.max_angle_deg={cap}", f"rollingq.start_epoch={start}",
            f"rollingq.max_rotations={rotations}"]
    return name, keys + ([] if safety else ["rollingq.safety=false"])


_COMMON = [(90, 30, 1, 1), (90, 30, 3, 1), (180, 15, 3, 1), (180, 30, 3, 1), (180, 60, 3, 1), (180, 30, 1, 1)]
RQ_GRID: dict[str, dict[str, list[str]]] = {
    "synthetic": dict(_rq(*g) for g in [*_COMMON, (180, 15, 1, 1), (180, 60, 1, 1), (180, 30, 1, 3)]),
    "avdigits": dict(_rq(*g) for g in _COMMON),
}
"""Safe-mode RollingQ settings per tuned task (protocol amendment 1, ``docs/synthetic_study.md``): the anchor
limit (90: refuse far anchors; 180: cap them), the angle cap, the start epoch, the rotations; every other key at
the task config's values (the safe defaults). Settings of both tasks are the candidates for the shipped default."""
RQ_MEASURE: dict[str, dict[str, list[str]]] = {
    "synthetic": dict([_rq(180, 30, 1, 1, safety=False)]),
    "avdigits": dict([_rq(180, 30, 3, 1, safety=False)]),
}
"""Settings that measure what a capped rotation does where the safety rule refuses (safety off, the cap and the
rollback on); never candidates for the shipped default."""
OPTIM_GRID: dict[str, tuple[tuple[str, float | None], ...]] = {
    "lr_x0.5": (("optim.lr", 0.5),), "lr_x2": (("optim.lr", 2.0),), "warmup_3": (("optim.warmup_epochs", None),),
}
"""Optimiser-only changes of vanilla MT (no rotation): ``(key, factor)``; a None factor sets warm-up to 3 epochs."""


def rq_settings(task: str) -> dict[str, list[str]]:
    """Every RollingQ setting tuned on ``task`` (the independent set uses avdigits')."""
    key = "avdigits" if task == "avdigits_independent" else task
    return {**RQ_GRID[key], **RQ_MEASURE[key]}


def arm_overrides(task: str, arm: str, base_cfg) -> list[str]:
    """The overrides of an arm or grid setting on top of its role's config."""
    if arm in ARMS:
        extra = list(ARMS[arm][1])
        if arm == "optim_only":
            if OPTIM_ONLY[task] is None:
                raise ValueError(f"optim_only: no frozen optimiser-only change for {task!r} yet; run --phase tune "
                                 "and write the winner of OPTIM_GRID into OPTIM_ONLY")
            extra += OPTIM_ONLY[task]
        return extra
    if arm in rq_settings(task):
        return list(rq_settings(task)[arm])
    if arm in OPTIM_GRID:
        out = []
        for key, factor in OPTIM_GRID[arm]:
            section, name = key.split(".")
            value = 3.0 if factor is None else getattr(getattr(base_cfg, section), name) * factor
            out.append(f"{key}={value:g}")
        return out
    raise ValueError(f"arm: expected one of {sorted(ARMS)} or a setting of RQ_GRID / RQ_MEASURE / OPTIM_GRID, "
                     f"got {arm!r}")


def role_of(task: str, arm: str) -> str:
    return ARMS[arm][0] if arm in ARMS else ("rollingq" if arm in rq_settings(task) else "vanilla_mt")


def arm_config(task: str, arm: str, seed: int, data_root: str | None, init: dict[str, str], common: list[str]):
    config = TASKS[task].configs[role_of(task, arm)]
    base = [f"seed={seed}", "train.progress=false", "train.num_threads=1", *common]
    base += [f"data.root={data_root}"] if data_root else []
    base += [f"model.init_encoders={json.dumps(init)}"] if init else []
    try:
        cfg = load_config(config, [*base, *arm_overrides(task, arm, load_config(config, base))])
    except ConfigError as exc:
        raise ConfigError(f"arm {arm!r} of {task!r}: {exc}") from exc
    cfg.name = arm
    return cfg


# ---------------------------------------------------------------------------- running
def _finished(run_dir: str, epochs: int) -> bool:
    from rollingq.records import read_metrics

    metrics = os.path.join(run_dir, "metrics.jsonl")
    return (os.path.isfile(os.path.join(run_dir, "checkpoints", "last.pt")) and os.path.isfile(metrics)
            and len(read_metrics(metrics)) >= epochs)


def run_one(cfg, run_dir: str, split: str | None) -> tuple[str, float, float]:
    """Train (or resume) and, unless ``split`` is None, evaluate one run; returns (run_dir, train s, eval s)."""
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    import torch
    from rollingq.evaluate import eval_filename, evaluate_run
    from rollingq.study import evaluate_replaced, replaced_filename
    from rollingq.train import resume, train

    torch.set_num_threads(1)
    t0 = time.time()
    if not _finished(run_dir, int(cfg["train"]["epochs"])):
        if os.path.isfile(os.path.join(run_dir, "checkpoints", "last.pt")):
            resume(run_dir)
        else:
            train(cfg, run_dir, overwrite=True)  # no last.pt: at most a run cut short in epoch 1
    t1 = time.time()
    if split is not None:
        if not os.path.isfile(os.path.join(run_dir, eval_filename(split))):
            evaluate_run(run_dir, split=split, noise_modality=NOISE_MODALITY, seed=0, checkpoint=CHECKPOINT)
        if not os.path.isfile(os.path.join(run_dir, replaced_filename(split))):
            evaluate_replaced(run_dir, split=split, seed=0, checkpoint=CHECKPOINT)
    return run_dir, t1 - t0, time.time() - t1


def prepare_data(task: str, runs_root: str, seed: int, data: dict | None = None) -> str | None:
    """The task's files for ``seed`` (written once under ``runs_root/data``); ``data`` overrides the
    ``write_avdigits`` arguments of :data:`TASKS` (a regime's files get their own folder)."""
    spec = TASKS[task].data
    if spec is None:
        if data:
            raise ValueError(f"--data: the {task} task writes no files")
        return None
    from rollingq.prepare.avdigits import write_avdigits

    spec = {**spec, **(data or {})}
    tag = "".join(f"_{k}{v}" for k, v in sorted((data or {}).items())).replace(" ", "")
    root = os.path.join(runs_root, "data", f"{task}_seed{seed}{tag}")
    if not os.path.isfile(os.path.join(root, "avdigits.json")):
        write_avdigits(root, seed=seed, overwrite=True, **spec)
    return root


def run_all(task: str, split: str, runs_root: str, seeds: list[int], arms: list[str], jobs: int,
            common: list[str], data: dict | None = None) -> dict[str, list[str]]:
    """Pre-train (where the task does) and run every arm for every seed; returns arm -> run folders."""
    t = TASKS[task]
    roots = {seed: prepare_data(task, runs_root, seed, data) for seed in seeds}
    ctx = multiprocessing.get_context("spawn")
    done: dict[str, list[str]] = {a: [] for a in arms}
    with ProcessPoolExecutor(max_workers=jobs, mp_context=ctx) as pool:
        init: dict[int, dict[str, str]] = {seed: {} for seed in seeds}
        futures = []
        for seed in seeds:
            for modality, config in t.pretrain.items():
                cfg = load_config(config, [f"seed={seed}", "train.progress=false", "train.num_threads=1",
                                           f"data.root={roots[seed]}", *common])
                run_dir = os.path.abspath(os.path.join(runs_root, task, f"pretrain_{modality}_seed{seed}"))
                init[seed][modality] = run_dir
                futures.append(pool.submit(run_one, cfg, run_dir, None))
        for fut in futures:
            fut.result()
        futures = []
        for seed in seeds:
            for arm in arms:
                cfg = arm_config(task, arm, seed, roots[seed], init[seed], common)
                run_dir = os.path.join(runs_root, task, f"{arm}_seed{seed}")
                futures.append((arm, pool.submit(run_one, cfg, run_dir, split)))
        for arm, fut in futures:
            run_dir, t_train, t_eval = fut.result()
            logger.info("%s: trained in %.0f s, evaluated in %.0f s", run_dir, t_train, t_eval)
            done[arm].append(run_dir)
    return done


def default_arms(phase: str, task: str) -> list[str]:
    if phase == "regime":
        return list(NO_ROTATION)
    if phase == "tune":
        return ["vanilla_mt", *rq_settings(task), "rollingq_official", *OPTIM_GRID]
    return list(ARMS)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--task", choices=sorted(TASKS), required=True)
    parser.add_argument("--phase", choices=["regime", "tune", "choose", "report"], required=True)
    parser.add_argument("--runs", default="runs/study", help="where run directories (and avdigits data) go")
    parser.add_argument("--out", required=True, help="where the tables (and report figures) go")
    parser.add_argument("--seeds", type=int, nargs="+", default=None,
                        help="default: 100-104 for regime/tune, 0-9 for report")
    parser.add_argument("--arms", nargs="+", default=None, help="default: every arm of the phase")
    parser.add_argument("--jobs", type=int, default=2, help="runs in parallel (one torch thread each)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="key=value",
                        help="dotted override applied to every run (pre-training too)")
    parser.add_argument("--data", dest="data", action="append", default=[], metavar="key=value",
                        help="a write_avdigits argument of the files (e.g. snr_db=[-15,-5], blank_frames=0.3)")
    parser.add_argument("--tuning", nargs="+", default=[], metavar="task=folder",
                        help="choose phase: each tuned task's tuning folder (with tuning.json)")
    parser.add_argument("--no-figures", action="store_true")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.phase == "choose":
        folders = dict(item.split("=", 1) for item in args.tuning)
        if set(folders) != set(RQ_GRID):
            parser.error(f"--tuning: expected a folder for each of {sorted(RQ_GRID)}, got {sorted(folders)}")
        candidates = [c for c in RQ_GRID["synthetic"] if all(c in RQ_GRID[t] for t in RQ_GRID)]
        logger.info("wrote %s", write_choice(args.out, folders, candidates, list(OPTIM_GRID)))
        return
    seeds = args.seeds or (REPORT_SEEDS if args.phase == "report" else TUNING_SEEDS)
    if args.phase != "report" and set(seeds) & set(REPORT_SEEDS):
        parser.error(f"--seeds: the {args.phase} phase never uses the report seeds {REPORT_SEEDS}")
    arms = args.arms or default_arms(args.phase, args.task)
    if args.phase != "report" and "vanilla_mt" not in arms:
        arms = ["vanilla_mt", *arms]
    split = "test" if args.phase == "report" else TUNE_SPLIT[args.task]
    start = time.time()
    data = {}
    for text in args.data:
        key, value = parse_override(text)
        data[key] = tuple(value) if isinstance(value, list) else value
    done = run_all(args.task, split, args.runs, seeds, arms, args.jobs, args.overrides, data)
    if args.phase == "regime":
        path = write_regime(args.out, args.task, done, split, args.overrides + args.data)
    elif args.phase == "tune":
        path = write_tuning(args.out, args.task, done, split, seeds)
    else:
        path = write_results(args.out, args.task, done, figures=not args.no_figures, static=NO_ROTATION[:3])
    logger.info("wrote %s (%.0f s)", path, time.time() - start)


if __name__ == "__main__":
    main()
