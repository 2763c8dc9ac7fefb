"""``rollingq demo``: vanilla MT's attention collapse, and vanilla MT vs vanilla MT + RollingQ.

Trains both runs of each task (by default both: ``synthetic``, configs ``synthetic`` and
``synthetic_rollingq``, then ``avdigits``, the real-files set written first with
:func:`rollingq.prepare.avdigits.write_avdigits` and read by the CREMA-D loader, configs
``avdigits_vanilla_mt`` / ``avdigits_vanilla_mt_rollingq``) for each seed, evaluates each run at its last
checkpoint (the end of training) with :func:`rollingq.evaluate.evaluate_run` (clean test split, and the
dominant modality, audio, replaced by Gaussian noise of each sample's own mean and std: the paper's
Figure 1c protocol; the additive-noise curve of Table 3 is in ``eval.json`` too), and returns

* the phenomenon: vanilla MT's attention mass on audio, clean vs audio replaced by noise, AIR over
  training, and accuracy with audio replaced vs the visual probe (the collapse criteria of
  :func:`rollingq.study.collapse_checks`);
* a side-by-side table of both runs read from their ``eval.json`` (and, with two or more seeds, the
  paired differences with 95 % t-intervals);

and writes the report (:func:`rollingq.analysis.report.write_report`) on all runs.
"""

from __future__ import annotations

import logging
import os
import time

import torch

from .analysis.report import write_report
from .config import load_config
from .evaluate import evaluate_run
from .prepare.avdigits import write_avdigits
from .records import read_metrics
from .study import collapse_checks, pair_by_seed, paired_rows, summarize_run
from .train import train

logger = logging.getLogger("rollingq.demo")

DEMO_TASKS: dict[str, tuple[str, str]] = {
    "synthetic": ("synthetic", "synthetic_rollingq"),
    "avdigits": ("avdigits_vanilla_mt", "avdigits_vanilla_mt_rollingq"),
}
NOISE_MODALITY = "audio"
"""The dominant modality of both demo tasks, replaced by noise in every evaluation."""
CHECKPOINT = "last"
AVDIGITS_DEMO_SIZE = {"train_per_class": 60, "test_per_class": 25}


def _free_dir(path: str) -> str:
    """``path``, or ``path_2``, ``path_3``, … if it already exists."""
    candidate, k = path, 2
    while os.path.exists(candidate):
        candidate, k = f"{path}_{k}", k + 1
    return candidate


def _fmt(values, fmt: str = "{:.2f}") -> str:
    if values is None:
        return "n/a"
    return " ".join("n/a" if v is None else fmt.format(v) for v in values)


def evaluate_for_table(run_dir: str, noise_modality: str = NOISE_MODALITY, checkpoint: str = CHECKPOINT) -> dict:
    """Evaluate a run's ``checkpoint`` on the test split with :func:`rollingq.evaluate.evaluate_run`
    (writes ``eval.json``; ``noise_modality``'s input replaced by noise of each sample's own statistics,
    the paper's Figure 1c protocol) and gather what the demo's side-by-side table shows (the per-seed
    criteria and paired differences read :func:`rollingq.study.summarize_run` of the same eval.json)."""
    result = evaluate_run(run_dir, split="test", noise_modality=noise_modality, checkpoint=checkpoint)
    history = read_metrics(os.path.join(run_dir, "metrics.jsonl"))
    modalities = list(result["modalities"])
    attention = result.get("attention") or {}

    def masses(key: str) -> list[float] | None:
        node = attention.get(key)
        return None if node is None else [node[k] for k in ("class", *modalities)]

    probes = result.get("probe_accuracy")
    pearson = result.get("pearson") or {}
    return {
        "run_dir": run_dir,
        "name": result["name"],
        "seed": result.get("run_seed"),
        "modalities": modalities,
        "noise_modality": result["noise_modality"],
        "accuracy": result["accuracy"],
        "macro_f1": result["macro_f1"],
        "accuracy_noise_replaced": result["accuracy_noise_replaced"],
        "noise_curve": result["noise_robustness"]["accuracy"],
        "pearson": pearson.get("r_quality"),
        "probe_acc": None if probes is None else [probes[m] for m in modalities],
        "mass": masses("clean"),
        "mass_noise_replaced": masses("noise_replaced"),
        "air": [row["air"] for row in history],
        "rotations": sum(1 for row in history if row.get("rotated")),
        "rotation_epochs": [row["epoch"] for row in history if row.get("rotated")],
        "train_mass": history[-1]["mass"],
    }


def format_table(summaries: list[dict]) -> str:
    """A plain-text side-by-side table of :func:`evaluate_for_table` results."""
    mods = summaries[0]["modalities"]
    noisy_name = summaries[0]["noise_modality"]
    rows = [
        ("run", [s["name"] + ("" if s.get("seed") is None else f" (seed {s['seed']})") for s in summaries]),
        ("test accuracy (clean)", [f"{s['accuracy']:.4f}" for s in summaries]),
        ("test macro-F1 (clean)", [f"{s['macro_f1']:.4f}" for s in summaries]),
        (f"test accuracy ({noisy_name} = noise)", [f"{s['accuracy_noise_replaced']:.4f}" for s in summaries]),
        (f"accuracy, noise on {noisy_name} 0.25/0.5/0.75/1", [_fmt(s["noise_curve"][1:], "{:.3f}") for s in summaries]),
        ("Pearson r (quality vs attention)", [_fmt([s["pearson"]], "{:+.3f}") for s in summaries]),
        ("probe accuracy " + "/".join(mods), [_fmt(s["probe_acc"], "{:.3f}") for s in summaries]),
        ("attention mass cls/" + "/".join(mods) + " (test)", [_fmt(s["mass"]) for s in summaries]),
        (f"attention mass ({noisy_name} = noise)", [_fmt(s["mass_noise_replaced"]) for s in summaries]),
        ("attention mass (last train epoch)", [_fmt(s["train_mass"]) for s in summaries]),
        ("rotations made (epochs)", [f"{s['rotations']} ({_fmt(s['rotation_epochs'], '{}') or '-'})"
                                     for s in summaries]),
    ]
    for e in range(max(len(s["air"]) for s in summaries)):
        cells = [_fmt([s["air"][e]], "{:+.3f}") if e < len(s["air"]) else "" for s in summaries]
        rows.append((f"AIR epoch {e + 1}", cells))
    width = max(len(r[0]) for r in rows)
    cols = [max(len(r[1][i]) for r in rows) for i in range(len(summaries))]
    lines = []
    for k, (label, cells) in enumerate(rows):
        lines.append(f"{label:<{width}} | " + " | ".join(f"{c:>{cols[i]}}" for i, c in enumerate(cells)))
        if k == 0:
            lines.append("-" * width + "-+-" + "-+-".join("-" * c for c in cols))
    return "\n".join(lines)


def format_phenomenon(run_dirs: list[str]) -> str:
    """Vanilla MT's collapse, per seed: mass on the dominant modality clean vs replaced, AIR first -> last
    epoch, accuracy with the dominant modality replaced vs the weak modality's probe, and the criteria met."""
    lines = ["Vanilla MT (the paper's Figure 1c): attention on audio, clean test vs audio replaced by noise"]
    for run_dir in run_dirs:
        r = summarize_run(run_dir)
        checks = collapse_checks(r)
        air = [a for a in r.air_epochs if a is not None]
        met = sum(1 for v in checks.values() if v)
        lines.append(
            f"  seed {r.seed}: mass on {r.dominant} {r.mass_clean:.3f} clean -> {r.mass_replaced:.3f} "
            f"with {r.dominant} "
            f"= noise (shift {r.mass_replaced - r.mass_clean:+.3f}); AIR {air[0]:+.3f} (epoch 1) -> {air[-1]:+.3f} "
            f"(epoch {len(air)}); accuracy {r.accuracy:.3f} clean, {r.accuracy_replaced:.3f} with {r.dominant} = noise "
            f"vs {r.weak} probe {r.probe_weak:.3f}; collapse criteria met: {met}/4 "
            f"({', '.join(k for k, v in checks.items() if not v) or 'all'}"
            f"{' failed' if met < 4 else ''})")
    return "\n".join(lines)


def format_paired(vanilla_dirs: list[str], rollingq_dirs: list[str]) -> str:
    """RollingQ − vanilla per quantity (same seed), mean and 95 % t-interval, for two or more seeds."""
    pairs = pair_by_seed([summarize_run(d) for d in vanilla_dirs], [summarize_run(d) for d in rollingq_dirs])
    if len(pairs) < 2:
        return ""
    rows = [(label, stat.text()) for label, stat in paired_rows(pairs) if "epoch" not in label]
    width = max(len(label) for label, _ in rows)
    head = f"RollingQ - vanilla MT, paired over {len(pairs)} seeds: mean [95 % t-interval]"
    return "\n".join([head] + [f"  {label:<{width}}  {text}" for label, text in rows])


def _prepare_avdigits(out: str, overrides: list[str]) -> list[str]:
    if any(o.startswith("data.root=") for o in overrides):
        return overrides
    root = os.path.join(out, "data", "avdigits")
    if not os.path.isfile(os.path.join(root, "avdigits.json")):
        start = time.time()
        write_avdigits(root, seed=0, overwrite=True, **AVDIGITS_DEMO_SIZE)
        logger.info("demo: wrote the avdigits files in %.0f s", time.time() - start)
    return [*overrides, f"data.root={root}"]


DATASET_CHOICES = ("all", *DEMO_TASKS)
HEADINGS = {
    "synthetic": "=== synthetic token task (8 + 8 tokens): the collapse, and RollingQ vs vanilla ===",
    "avdigits": "=== avdigits: real files (WAV + JPEG) through the CREMA-D loader, 176 + 64 tokens ===",
}


def run_demo(out: str = "runs/demo", epochs: int | None = None, overrides: list[str] | None = None,
             dataset: str = "all", seeds: list[int] | tuple[int, ...] = (0,),
             task_overrides: dict[str, list[str]] | None = None) -> tuple[str, str]:
    """Train both demo runs of ``dataset`` for each seed under ``out``, evaluate them; return (the printed
    text: the phenomenon, the side-by-side table and, with several seeds, the paired differences; the
    report path).

    ``dataset="all"`` (the default) runs ``synthetic`` into ``out/synthetic`` and then ``avdigits`` into
    ``out/avdigits`` (its files written under ``out/avdigits/data``); the text holds both, and the path
    returned is the synthetic report (the avdigits one is named in the text). ``overrides`` apply to
    every task, ``task_overrides[task]`` to one (configs are strict: a key of one dataset is an error
    in the other's config).
    """
    unknown = sorted(set(task_overrides or {}) - set(DEMO_TASKS))
    if unknown:
        raise ValueError(f"task_overrides: expected keys among {sorted(DEMO_TASKS)}, got {unknown}")
    if dataset == "all":
        texts, reports = [], []
        for name in DEMO_TASKS:
            text, report = run_demo(os.path.join(out, name), epochs, overrides, name, seeds, task_overrides)
            texts.append(f"{HEADINGS[name]}\n{text}\n\nreport: {report}")
            reports.append(report)
        return "\n\n".join(texts), reports[0]
    if dataset not in DEMO_TASKS:
        raise ValueError(f"dataset: expected one of {list(DATASET_CHOICES)}, got {dataset!r}")
    seeds = list(seeds)
    if not seeds or len(set(seeds)) != len(seeds):
        raise ValueError(f"seeds: expected distinct seeds, got {seeds}")
    extra = list(overrides or []) + list((task_overrides or {}).get(dataset, []))
    extra += [f"train.epochs={int(epochs)}"] if epochs is not None else []
    for name in DEMO_TASKS[dataset]:  # every config valid before a folder is made
        load_config(name, [*extra, "data.root=."] if dataset == "avdigits" else extra)
    os.makedirs(out, exist_ok=True)
    if dataset == "avdigits":
        extra = _prepare_avdigits(out, extra)
    runs: dict[str, list[str]] = {name: [] for name in DEMO_TASKS[dataset]}
    for seed in seeds:
        for name in DEMO_TASKS[dataset]:
            cfg = load_config(name, [*extra, f"seed={seed}"])
            label = cfg.name.replace("+", "_") + ("" if len(seeds) == 1 else f"_seed{seed}")
            run_dir = _free_dir(os.path.join(out, label))
            logger.info("demo: training %s (seed %d) into %s", cfg.name, seed, run_dir)
            runs[name].append(train(cfg, run_dir))
    threads = load_config(DEMO_TASKS[dataset][0], extra).train.num_threads
    if threads:
        torch.set_num_threads(threads)
    vanilla, rollingq = (runs[name] for name in DEMO_TASKS[dataset])
    summaries = [evaluate_for_table(r) for pair in zip(vanilla, rollingq) for r in pair]
    parts = [format_phenomenon(vanilla), "", format_table(summaries)]
    paired = format_paired(vanilla, rollingq)
    if paired:
        parts += ["", paired]
    return "\n".join(parts), write_report(vanilla + rollingq, os.path.join(out, "report"))
