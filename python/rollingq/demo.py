"""``rollingq demo``: vanilla MT's attention collapse, and RollingQ beside it, with rows for scale.

Two tasks, by default both (``--dataset``):

* ``synthetic``: the token task (configs ``synthetic_audio_only``, ``synthetic_visual_only``,
  ``synthetic_concat``, ``synthetic``, ``synthetic_rollingq``);
* ``avdigits``: the fair real-files task (``docs/synthetic_data.md``), written first with
  :func:`rollingq.prepare.avdigits.write_avdigits` (with a disjoint pre-training split) and read by the
  CREMA-D loader. Its encoders start from useful features, as in the paper: an audio-only and a
  visual-only model are first trained on the pre-training split (``avdigits_pretrain_audio`` /
  ``_visual``), and every arm (``avdigits_audio_only``, ``_visual_only``, ``_concat``,
  ``avdigits_vanilla_mt``, ``avdigits_vanilla_mt_rollingq``) starts from their encoders
  (``model.init_encoders``).

Each arm is trained per seed, evaluated at its last checkpoint with :func:`rollingq.evaluate.evaluate_run`
(clean test split; audio, the dominant modality, replaced by noise; the noise curve) and with each
modality replaced (:func:`rollingq.study.evaluate_replaced`). The text printed per task: vanilla MT's
collapse against the unimodal and concat models, one table with every arm, and with two or more seeds the
paired differences of RollingQ against vanilla MT; a report with figures is written per task.
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
import time
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass, field

import torch

from .analysis.report import write_report
from .config import load_config
from .demo_text import format_paired, format_phenomenon, format_table, format_verdict, table_entry
from .evaluate import evaluate_run
from .prepare.avdigits import write_avdigits
from .study import evaluate_replaced
from .train import train

logger = logging.getLogger("rollingq.demo")

NOISE_MODALITY = "audio"
"""The dominant modality of both demo tasks, replaced by noise in every evaluation."""
CHECKPOINT = "last"


@dataclass(frozen=True)
class DemoTask:
    """One demo task.

    Attributes:
        heading: printed above its text.
        arms: ``(role, column label, config)`` in table order; the roles ``vanilla_mt`` and ``rollingq`` must be
            there, ``audio_only``, ``visual_only``, ``concat`` are the rows for scale.
        pretrain: ``(modality, config)``: unimodal runs on the pre-training split whose encoders every arm
            starts from (``model.init_encoders``); empty: from scratch.
        data: ``write_avdigits`` keyword arguments (files written under ``OUT/data``), or None (no files).
    """

    heading: str
    arms: tuple[tuple[str, str, str], ...]
    pretrain: tuple[tuple[str, str], ...] = ()
    data: dict | None = field(default=None, hash=False)


SCALE_ROLES = ("audio_only", "visual_only", "concat")
AVDIGITS_DATA = {"train_per_class": 60, "test_per_class": 50, "pretrain_per_class": 60, "snr_db": (-15.0, -5.0),
                 "frames_per_clip": 4, "seed": 0}
"""The demo's avdigits files (``docs/synthetic_data.md``: the fair task's settings)."""

DEMO_TASKS: dict[str, DemoTask] = {
    "synthetic": DemoTask(
        "=== synthetic token task (8 + 8 tokens): the collapse, and RollingQ beside it ===",
        (("audio_only", "audio only", "synthetic_audio_only"), ("visual_only", "visual only", "synthetic_visual_only"),
         ("concat", "concat", "synthetic_concat"), ("vanilla_mt", "vanilla MT", "synthetic"),
         ("rollingq", "MT + RollingQ", "synthetic_rollingq"))),
    "avdigits": DemoTask(
        "=== avdigits: real files (WAV + JPEG) through the CREMA-D loader, pre-trained encoders ===",
        (("audio_only", "audio only", "avdigits_audio_only"), ("visual_only", "visual only", "avdigits_visual_only"),
         ("concat", "concat", "avdigits_concat"), ("vanilla_mt", "vanilla MT", "avdigits_vanilla_mt"),
         ("rollingq", "MT + RollingQ", "avdigits_vanilla_mt_rollingq")),
        pretrain=(("audio", "avdigits_pretrain_audio"), ("visual", "avdigits_pretrain_visual")),
        data=AVDIGITS_DATA),
}
DATASET_CHOICES = ("all", *DEMO_TASKS)


def _free_dir(path: str) -> str:
    """``path``, or ``path_2``, ``path_3``, … if it already exists."""
    candidate, k = path, 2
    while os.path.exists(candidate):
        candidate, k = f"{path}_{k}", k + 1
    return candidate


def _prepare_data(task: DemoTask, out: str, overrides: list[str]) -> list[str]:
    """Write the task's files once under ``out/data`` (unless ``data.root`` is overridden)."""
    if task.data is None or any(o.startswith("data.root=") for o in overrides):
        return overrides
    root = os.path.join(out, "data", "avdigits")
    if not os.path.isfile(os.path.join(root, "avdigits.json")):
        start = time.time()
        write_avdigits(root, overwrite=True, **task.data)
        logger.info("demo: wrote the avdigits files in %.0f s", time.time() - start)
    return [*overrides, f"data.root={root}"]


def _label(name: str, seed: int, seeds: list[int]) -> str:
    return name.replace("+", "_") + ("" if len(seeds) == 1 else f"_seed{seed}")


def run_arm(cfg, run_dir: str, evaluate: bool) -> str:
    """Train one run and, with ``evaluate``, evaluate it (``eval.json``, ``eval_replaced_test.json``); returns
    its folder. A top-level function, so that a worker process can run it."""
    run_dir = train(cfg, run_dir)
    if evaluate:
        threads = torch.get_num_threads()
        if cfg.train.num_threads:
            torch.set_num_threads(cfg.train.num_threads)
        try:
            evaluate_run(run_dir, split="test", noise_modality=NOISE_MODALITY, checkpoint=CHECKPOINT)
            evaluate_replaced(run_dir, split="test", checkpoint=CHECKPOINT)
        finally:
            torch.set_num_threads(threads)
    return os.path.abspath(run_dir)


class _Inline:
    """The executor of ``jobs=1``: runs each call at once, in this process."""

    def __enter__(self) -> _Inline:
        return self

    def __exit__(self, *exc) -> None:
        return None

    def submit(self, fn, *args) -> Future:
        future: Future = Future()
        future.set_result(fn(*args))
        return future


def _executor(jobs: int):
    if jobs == 1:
        return _Inline()
    return ProcessPoolExecutor(max_workers=jobs, mp_context=multiprocessing.get_context("spawn"))


def _submit_arms(pool, task: DemoTask, out: str, extra: list[str], seed: int, seeds: list[int],
                 init: dict[str, str]) -> dict[str, Future]:
    warm = [f"model.init_encoders={json.dumps(init)}"] if init else []
    futures = {}
    for role, _, config in task.arms:
        cfg = load_config(config, [*extra, *warm, f"seed={seed}"])
        run_dir = _free_dir(os.path.join(out, _label(cfg.name, seed, seeds)))
        logger.info("demo: training %s (seed %d) into %s", cfg.name, seed, run_dir)
        futures[role] = pool.submit(run_arm, cfg, run_dir, True)
    return futures


def _run_tasks(plans: dict[str, tuple[DemoTask, str, list[str]]], seeds: list[int], jobs: int
               ) -> dict[str, dict[str, list[str]]]:
    """Pre-train (per seed, where a task does), train and evaluate every arm of every task, ``jobs`` runs at a
    time; returns task -> role -> run folders in seed order. Tasks without pre-training go first in the
    queue, behind the pre-training runs of the others."""
    with _executor(jobs) as pool:
        pre: dict[str, dict[int, dict[str, Future]]] = {}
        for name, (task, out, extra) in plans.items():
            for seed in seeds:
                for modality, config in task.pretrain:
                    cfg = load_config(config, [*extra, f"seed={seed}"])
                    run_dir = _free_dir(os.path.join(out, "pretrain", _label(cfg.name, seed, seeds)))
                    logger.info("demo: pre-training the %s encoder (seed %d) into %s", modality, seed, run_dir)
                    pre.setdefault(name, {}).setdefault(seed, {})[modality] = pool.submit(run_arm, cfg, run_dir, False)
        arms: dict[str, dict[int, dict[str, Future]]] = {name: {} for name in plans}
        for name, (task, out, extra) in sorted(plans.items(), key=lambda item: bool(item[1][0].pretrain)):
            for seed in seeds:
                init = {m: f.result() for m, f in pre.get(name, {}).get(seed, {}).items()}
                arms[name][seed] = _submit_arms(pool, task, out, extra, seed, seeds, init)
        return {name: {role: [arms[name][seed][role].result() for seed in seeds] for role, _, _ in plans[name][0].arms}
                for name in plans}


def _task_text(task: DemoTask, runs: dict[str, list[str]], seeds: list[int], out: str) -> tuple[str, str]:
    entries = [table_entry(runs[role][i], label + ("" if len(seeds) == 1 else f" ({seeds[i]})"))
               for i in range(len(seeds)) for role, label, _ in task.arms]
    scale = {role: runs[role] for role in SCALE_ROLES if role in runs}
    parts = [format_phenomenon(runs["vanilla_mt"], scale), "", format_verdict(runs["vanilla_mt"], runs["rollingq"]), "",
             format_table(entries)]
    paired = format_paired(runs["vanilla_mt"], runs["rollingq"])
    if paired:
        parts += ["", paired]
    every = [d for role, _, _ in task.arms for d in runs[role]]
    return "\n".join(parts), write_report(every, os.path.join(out, "report"))


def run_demo(out: str = "runs/demo", epochs: int | None = None, overrides: list[str] | None = None,
             dataset: str = "all", seeds: list[int] | tuple[int, ...] = (0,),
             task_overrides: dict[str, list[str]] | None = None, jobs: int = 1) -> tuple[str, str]:
    """Train every arm of ``dataset`` for each seed under ``out``, evaluate them; return (the printed text,
    the report path).

    ``dataset="all"`` (the default) runs ``synthetic`` into ``out/synthetic`` and ``avdigits`` into
    ``out/avdigits``; the text holds both and the path returned is the synthetic report (the avdigits one
    is named in the text). ``overrides`` apply to every run of every task (pre-training too),
    ``task_overrides[task]`` to one task's runs; ``epochs`` sets ``train.epochs`` of every run. ``jobs``
    runs train at a time, each in its own process (one torch thread each by the configs); 1 trains in
    this process.
    """
    unknown = sorted(set(task_overrides or {}) - set(DEMO_TASKS))
    if unknown:
        raise ValueError(f"task_overrides: expected keys among {sorted(DEMO_TASKS)}, got {unknown}")
    if dataset not in DATASET_CHOICES:
        raise ValueError(f"dataset: expected one of {list(DATASET_CHOICES)}, got {dataset!r}")
    seeds = list(seeds)
    if not seeds or len(set(seeds)) != len(seeds):
        raise ValueError(f"seeds: expected distinct seeds, got {seeds}")
    if isinstance(jobs, bool) or not isinstance(jobs, int) or jobs < 1:
        raise ValueError(f"jobs: expected an integer >= 1, got {jobs!r}")
    names = list(DEMO_TASKS) if dataset == "all" else [dataset]
    plans = {}
    for name in names:
        task = DEMO_TASKS[name]
        extra = list(overrides or []) + list((task_overrides or {}).get(name, []))
        extra += [f"train.epochs={int(epochs)}"] if epochs is not None else []
        probe = [*extra, "data.root=."] if task.data is not None else extra
        for config in [c for _, _, c in task.arms] + [c for _, c in task.pretrain]:  # all valid before any folder
            load_config(config, probe)
        plans[name] = (task, os.path.join(out, name) if dataset == "all" else out, extra)
    for name, (task, task_out, extra) in plans.items():
        os.makedirs(task_out, exist_ok=True)
        plans[name] = (task, task_out, _prepare_data(task, task_out, extra))
    runs = _run_tasks(plans, seeds, jobs)
    texts, reports = [], []
    for name, (task, task_out, _) in plans.items():
        text, report = _task_text(task, runs[name], seeds, task_out)
        texts.append(f"{task.heading}\n{text}\n\nreport: {report}" if dataset == "all" else text)
        reports.append(report)
    return "\n\n".join(texts), reports[0]
