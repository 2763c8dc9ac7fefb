"""``rollingq report``: figures and a ``report.md`` comparing runs (groups of seeds side by side).

Runs are grouped by ``(cfg["data"]["name"], cfg["name"])`` (e.g. ``vanilla_mt`` and ``vanilla_mt+rollingq``
of one dataset; labelled ``dataset/name`` when the runs span several datasets); every
table cell of a group is ``mean ± std`` over its seeds (sample std, ``n`` given).

The report is written whole or not at all: the figures and ``report.md`` are drawn into a hidden
sibling staging folder and moved into the output folder by renames only when all are done
(``report.md`` last), so a failure leaves no partial report and a previous report as it was.
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Callable, Sequence

from ..files import fsync_dir
from . import plots
from .metrics import mean_std
from .runs import RunRecord, group_runs, load_run_record

logger = logging.getLogger(__name__)

REPORT_NAME = "report.md"
FIGURES: dict[str, tuple[str, Callable[[Sequence[RunRecord], str], str | None]]] = {
    "training_dynamics.png": ("AIR and attention mass per modality over training (rotations dashed red)",
                              plots.plot_training_dynamics),
    "val_accuracy.png": ("Validation accuracy over training", plots.plot_accuracy_over_training),
    "attention_noise.png": ("Attention mass per modality, clean vs the noise modality replaced by noise",
                            plots.plot_attention_noise),
    "key_distribution.png": ("Mean-key distribution: cos(class query, mean key) vs mean-key norm",
                             plots.plot_key_distribution),
    "noise_robustness.png": ("Accuracy under Gaussian noise on the noise modality", plots.plot_noise_robustness),
}


def fmt(values: Sequence[float | None], digits: int = 3) -> str:
    """``mean ± std`` of the non-None values (``mean`` alone for one value, ``–`` for none)."""
    mean, std, count = mean_std(values)
    if mean is None:
        return "–"
    if count == 1:
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


def _eval_get(run: RunRecord, *keys):
    node = run.eval
    for key in keys:
        if not isinstance(node, dict) or key not in node:
            return None
        node = node[key]
    return node


def _final(run: RunRecord, key: str) -> float | None:
    for record in reversed(run.epochs):
        if record.get(key) is not None:
            return float(record[key])
    return None


def _max_abs_air(run: RunRecord) -> float | None:
    values = [abs(float(e["air"])) for e in run.epochs if e.get("air") is not None]
    return max(values) if values else None


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return lines


def _modalities(groups: dict[str, list[RunRecord]]) -> list[str]:
    names: list[str] = []
    for members in groups.values():
        for name in members[0].modalities:
            if name not in names:
                names.append(name)
    return names


def accuracy_table(groups: dict[str, list[RunRecord]]) -> list[str]:
    """One row per group: test accuracy, macro-F1, probe accuracies, accuracy with the noise modality replaced."""
    modalities = _modalities(groups)
    header = ["run", "n", "test acc", "macro-F1", *(f"probe acc {m}" for m in modalities),
              "acc, noise modality replaced"]
    rows = []
    for group, members in groups.items():
        evaluated = [r for r in members if r.eval]
        rows.append([
            group,
            str(len(members)),
            fmt([_eval_get(r, "accuracy") for r in evaluated]),
            fmt([_eval_get(r, "macro_f1") for r in evaluated]),
            *(fmt([_eval_get(r, "probe_accuracy", m) for r in evaluated]) for m in modalities),
            fmt([_eval_get(r, "accuracy_noise_replaced") for r in evaluated]),
        ])
    return _table(header, rows)


def dynamics_table(groups: dict[str, list[RunRecord]]) -> list[str]:
    """One row per group: AIR, rotations, attention on the noise modality clean vs replaced, Pearson r."""
    header = ["run", "n", "AIR (eval split)", "max abs AIR (training)", "rotations", "noise modality",
              "its mass: clean", "its mass: replaced", "Pearson r (quality, attention)", "max p"]
    rows = []
    for group, members in groups.items():
        evaluated = [r for r in members if r.eval]
        noise_mods = sorted({str(_eval_get(r, "noise_modality")) for r in evaluated})

        def mass_on_noise(run: RunRecord, key: str) -> float | None:
            return _eval_get(run, "attention", key, _eval_get(run, "noise_modality"))

        p_values = [p for p in (_eval_get(r, "pearson", "p_value") for r in evaluated) if p is not None]
        rows.append([
            group,
            str(len(members)),
            fmt([_eval_get(r, "air") for r in evaluated]),
            fmt([_max_abs_air(r) for r in members]),
            fmt([float(len(r.rotation_epochs)) for r in members], digits=1),
            ", ".join(noise_mods) if evaluated else "–",
            fmt([mass_on_noise(r, "clean") for r in evaluated]),
            fmt([mass_on_noise(r, "noise_replaced") for r in evaluated]),
            fmt([_eval_get(r, "pearson", "r_quality") for r in evaluated]),
            _p_value(max(p_values) if p_values else None),
        ])
    return _table(header, rows)


def noise_table(groups: dict[str, list[RunRecord]]) -> list[str]:
    """Accuracy at each noise level, one row per group (mean ± std over seeds)."""
    levels: list[float] = []
    for members in groups.values():
        for run in members:
            for level in _eval_get(run, "noise_robustness", "levels") or []:
                if level not in levels:
                    levels.append(level)
    if not levels:
        return ["No run has a noise-robustness curve (run `rollingq eval` first)."]
    rows = []
    for group, members in groups.items():
        cells = []
        for level in levels:
            values = []
            for run in members:
                curve = _eval_get(run, "noise_robustness")
                if curve and level in curve["levels"]:
                    values.append(curve["accuracy"][curve["levels"].index(level)])
            cells.append(fmt(values))
        modality = ", ".join(sorted({str(_eval_get(r, "noise_robustness", "modality")) for r in members if r.eval}))
        rows.append([group, modality or "–", *cells])
    return _table(["run", "noisy modality", *(f"level {lv:g}" for lv in levels)], rows)


def runs_table(runs: Sequence[RunRecord]) -> list[str]:
    """One row per run directory, named by its group (``dataset/name`` when the runs span several datasets)."""
    group_of = {id(run): group for group, members in group_runs(list(runs)).items() for run in members}
    rows = []
    for run in runs:
        rows.append([
            group_of[id(run)],
            "–" if run.seed is None else str(run.seed),
            f"`{run.run_dir}`",
            str(len(run.epochs)),
            fmt([_final(run, "val_acc")]),
            fmt([_eval_get(run, "accuracy")]),
            fmt([_eval_get(run, "pearson", "r_quality")]),
            _p_value(_eval_get(run, "pearson", "p_value")),
            ", ".join(str(e) for e in run.rotation_epochs) or "–",
        ])
    header = ["run", "seed", "directory", "epochs", "final val acc", "test acc", "Pearson r", "p", "rotation epochs"]
    return _table(header, rows)


def _p_value(p: float | None) -> str:
    return "–" if p is None else f"{p:.1e}"


def report_files() -> set[str]:
    """The names a report folder holds: ``report.md`` and the figures."""
    return {REPORT_NAME, *FIGURES}


def _publish(staging: str, out_dir: str) -> None:
    """Move the finished report from ``staging`` into ``out_dir`` by renames, ``report.md`` last.

    Other files in ``out_dir`` (e.g. nested reports) stay; a previous report's figure that this one
    left out is removed, so ``report.md`` and the figures beside it always belong together.
    """
    os.makedirs(out_dir, exist_ok=True)
    for name in sorted(report_files() - {REPORT_NAME}) + [REPORT_NAME]:
        source, target = os.path.join(staging, name), os.path.join(out_dir, name)
        if os.path.exists(source):
            os.replace(source, target)
        elif os.path.isfile(target):
            os.remove(target)
    fsync_dir(out_dir)
    os.rmdir(staging)


def write_report(run_dirs: list[str], out_dir: str) -> str:
    """Draw the figures and write ``out_dir/report.md`` comparing ``run_dirs``, atomically.

    Args:
        run_dirs: run directories (``config.yaml``, ``metrics.jsonl``, ideally ``eval.json``).
        out_dir: the report folder (created; a previous report there is replaced, other files
            in it are left alone).

    Returns:
        The path of report.md.
    """
    if not run_dirs:
        raise ValueError("run_dirs is empty; expected at least one run directory")
    runs = [load_run_record(d) for d in run_dirs]
    out_dir = os.path.normpath(out_dir)
    if os.path.lexists(out_dir) and not os.path.isdir(out_dir):
        raise FileExistsError(f"report --out {out_dir!r}: exists and is not a folder; choose another path")
    parent = os.path.dirname(os.path.abspath(out_dir))
    os.makedirs(parent, exist_ok=True)
    staging = os.path.join(parent, f".{os.path.basename(os.path.abspath(out_dir))}.partial-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    os.makedirs(staging)
    try:
        count = _write_report(runs, staging)
        _publish(staging, out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    path = os.path.join(out_dir, REPORT_NAME)
    logger.info("wrote %s with %d figure(s)", path, count)
    return path


def _write_report(runs: list[RunRecord], out_dir: str) -> int:
    """Write the figures and report.md of ``runs`` into the existing folder ``out_dir``; the figure count."""
    groups = group_runs(runs)

    figures: list[tuple[str, str]] = []
    for filename, (caption, draw) in FIGURES.items():
        path = draw(runs, os.path.join(out_dir, filename))
        if path is None:
            logger.warning("no run has the data for %s; figure left out", filename)
        else:
            figures.append((filename, caption))

    splits = sorted({str(_eval_get(r, "split")) for r in runs if r.eval})
    lines = [
        "# RollingQ report",
        "",
        f"{len(runs)} run(s) in {len(groups)} group(s) (grouped by dataset and `name`; "
        "cells are mean ± std over seeds, "
        f"sample std). Evaluated split: {', '.join(splits) or 'none'}. "
        "Protocols: `docs/evaluation.md`.",
        "",
        "## Accuracy",
        "",
        *accuracy_table(groups),
        "",
        "## Attention dynamics",
        "",
        *dynamics_table(groups),
        "",
        "`Pearson r (quality, attention)`: correlation between \"the noise modality is clean\" (1) / \"replaced by "
        "noise\" (0) and the attention mass it receives, over the split with a seeded half replaced; positive means "
        "attention follows input quality (the sign of the paper's Table 2).",
        "",
        "## Noise robustness (accuracy)",
        "",
        *noise_table(groups),
        "",
        "## Runs",
        "",
        *runs_table(runs),
        "",
        "## Figures",
        "",
    ]
    for filename, caption in figures:
        lines += [f"### {caption}", "", f"![{caption}]({filename})", ""]
    with open(os.path.join(out_dir, REPORT_NAME), "w", encoding="utf-8") as f:
        f.write("\n".join(lines))
    return len(figures)
