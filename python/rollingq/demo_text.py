"""What ``rollingq demo`` prints: the collapse at a glance, one table with every arm, paired differences.

Every number is read from the runs' ``eval.json`` (:func:`rollingq.evaluate.evaluate_run`),
``eval_replaced_test.json`` (:func:`rollingq.study.evaluate_replaced`) and ``metrics.jsonl``.
"""

from __future__ import annotations

import json
import os

from .records import read_metrics
from .study import collapse_checks, pair_by_seed, paired_rows, replaced_filename, summarize_run


def _fmt(values, fmt: str = "{:.2f}") -> str:
    if values is None:
        return "n/a"
    return " ".join("n/a" if v is None else fmt.format(v) for v in values)


def table_entry(run_dir: str, label: str) -> dict:
    """The numbers of one evaluated run that the table shows (``label`` heads its column)."""
    with open(os.path.join(run_dir, "eval.json"), encoding="utf-8") as f:
        result = json.load(f)
    history = read_metrics(os.path.join(run_dir, "metrics.jsonl"))
    modalities = list(result["modalities"])
    attention = result.get("attention") or {}
    replaced = {}
    path = os.path.join(run_dir, replaced_filename("test"))
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            replaced = json.load(f)

    def masses(key: str) -> list[float] | None:
        node = attention.get(key)
        return None if node is None else [node[k] for k in ("class", *modalities)]

    probes = result.get("probe_accuracy")
    return {
        "run_dir": run_dir, "label": label, "name": result["name"], "seed": result.get("run_seed"),
        "modalities": modalities, "noise_modality": result["noise_modality"],
        "accuracy": result["accuracy"], "macro_f1": result["macro_f1"],
        # the noise modality's number is eval.json's (one definition; evaluate_replaced draws the same noise)
        "replaced": {m: result["accuracy_noise_replaced"] if m == result["noise_modality"]
                     else (replaced.get(m) or {}).get("accuracy") for m in modalities},
        "noise_curve": result["noise_robustness"]["accuracy"],
        "pearson": (result.get("pearson") or {}).get("r_quality"),
        "probe_acc": None if probes is None else [probes[m] for m in modalities],
        "mass": masses("clean"), "mass_noise_replaced": masses("noise_replaced"),
        "air": [row["air"] for row in history],
        "rotation_epochs": [row["epoch"] for row in history if row.get("rotated")],
        "decisions": controller_summary(history),
        "attention": result.get("attention") is not None,
    }


def controller_summary(history: list[dict]) -> dict:
    """What the RollingQ controller decided over a run (``metrics.jsonl`` rows): ``counts`` per action, ``reasons``
    per ``action/reason``, ``applied`` / ``proposed`` angles (degrees) of each rotation, ``rolled_back`` epochs;
    ``considered`` the proposed angle of each rotation or refusal that measured the query, with its
    cos(E[q], E[k̄_m]) in ``cos_query_keys``; empty counts for a run without a controller."""
    out: dict = {"counts": {}, "reasons": {}, "applied": [], "proposed": [], "rolled_back": [], "considered": [],
                 "cos_query_keys": []}
    for row in history:
        for rec in row.get("rollingq") or []:
            action, reason = rec["action"], rec["reason"]
            out["counts"][action] = out["counts"].get(action, 0) + 1
            out["reasons"][f"{action}/{reason}"] = out["reasons"].get(f"{action}/{reason}", 0) + 1
            if action in ("rotate", "cap"):
                out["applied"].append(float(rec.get("applied_angle_deg") or 0.0))
                out["proposed"].append(float(rec.get("angle_deg") or 0.0))
            if action in ("rotate", "cap", "refuse") and rec.get("cos_query_keys"):
                out["considered"].append(float(rec.get("angle_deg") or 0.0))
                out["cos_query_keys"].append(rec["cos_query_keys"])
            if action == "rollback":
                out["rolled_back"].append(row["epoch"])
    return out


def _decisions_cell(summary: dict) -> str:
    counts = summary["counts"]
    if not counts:
        return "-"
    return " ".join(f"{a} {counts[a]}" for a in ("rotate", "cap", "refuse", "rollback", "wait") if a in counts)


def format_verdict(vanilla: list[str], rollingq: list[str], label: str = "MT + RollingQ", split: str = "test") -> str:
    """RollingQ beside vanilla MT in three lines per seed: clean accuracy, accuracy with the dominant modality
    replaced and the weak modality's probe (RollingQ − vanilla), then what the controller did and why."""
    lines = [f"{label} (the shipped safe default) beside vanilla MT:"]
    for v_dir, r_dir in zip(vanilla, rollingq):
        v, r = summarize_run(v_dir, split), summarize_run(r_dir, split)
        decided = controller_summary(read_metrics(os.path.join(r_dir, "metrics.jsonl")))

        def pair(a, b):
            return "n/a" if a is None or b is None else f"{b:.3f} vs {a:.3f} ({b - a:+.3f})"

        lines.append(f"  seed {r.seed}: clean {pair(v.accuracy, r.accuracy)}; {v.dominant} = noise "
                     f"{pair(v.accuracy_replaced, r.accuracy_replaced)}; {v.weak} probe "
                     f"{pair(v.probe_weak, r.probe_weak)}")
        reasons = decided["reasons"]
        refused = {k.split("/", 1)[1]: n for k, n in reasons.items() if k.startswith("refuse/")}
        if decided["applied"]:
            angles = ", ".join(f"{a:.0f} deg" + (f" (cut from {p:.0f})" if p > a + 0.5 else "")
                               for a, p in zip(decided["applied"], decided["proposed"]))
            what = f"rotated {len(decided['applied'])} time(s): {angles}"
            if decided["rolled_back"]:
                what += (f"; rolled back at the end of epoch(s) {', '.join(map(str, decided['rolled_back']))} "
                         "(training collapsed after the rotation)")
        elif refused:
            what = "never rotated: the safety rule refused every rotation that was due"
        else:
            what = "never rotated: no rotation was due (start epoch, guard or |AIR| below beta)"
        if refused:
            ranked = sorted(refused.items(), key=lambda item: -item[1])
            what += " (refused: " + ", ".join(f"{k} x{n}" for k, n in ranked) + ")"
        lines.append(f"    RollingQ {what}.")
    return "\n".join(lines)


def format_table(entries: list[dict]) -> str:
    """A plain-text table, one column per run (static heads show n/a for the attention rows)."""
    mods = entries[0]["modalities"]
    noisy = entries[0]["noise_modality"]
    rows = [
        ("", [e["label"] for e in entries]),
        ("test accuracy (clean)", [f"{e['accuracy']:.3f}" for e in entries]),
        *[(f"test accuracy ({m} = noise)", [_fmt([e["replaced"].get(m)], "{:.3f}") for e in entries]) for m in mods],
        (f"accuracy, noise on {noisy} 0.25/0.5/0.75/1", [_fmt(e["noise_curve"][1:], "{:.2f}") for e in entries]),
        ("probe accuracy " + "/".join(mods) + " (mean-pooled)", [_fmt(e["probe_acc"], "{:.3f}") for e in entries]),
        ("attention mass cls/" + "/".join(mods), [_fmt(e["mass"]) if e["attention"] else "-" for e in entries]),
        (f"attention mass ({noisy} = noise)",
         [_fmt(e["mass_noise_replaced"]) if e["attention"] else "-" for e in entries]),
        ("Pearson r (quality vs attention)", [_fmt([e["pearson"]], "{:+.3f}") if e["attention"] else "-"
                                             for e in entries]),
        ("rotations (epochs)", [(", ".join(map(str, e["rotation_epochs"])) or "none") if e["attention"] else "-"
                                for e in entries]),
        ("RollingQ decisions (epoch ends)", [_decisions_cell(e["decisions"]) for e in entries]),
    ]
    epochs = max(len(e["air"]) for e in entries)
    shown = sorted({0, epochs // 2, epochs - 1}) if epochs else []
    for i in shown:
        rows.append((f"AIR epoch {i + 1}", [_fmt([e["air"][i]], "{:+.3f}") if e["attention"] and i < len(e["air"])
                                           else "-" for e in entries]))
    width = max(len(r[0]) for r in rows)
    cols = [max(len(r[1][i]) for r in rows) for i in range(len(entries))]
    lines = []
    for k, (label, cells) in enumerate(rows):
        lines.append(f"{label:<{width}} | " + " | ".join(f"{c:>{cols[i]}}" for i, c in enumerate(cells)))
        if k == 0:
            lines.append("-" * width + "-+-" + "-+-".join("-" * c for c in cols))
    return "\n".join(lines)


def format_phenomenon(vanilla: list[str], scale: dict[str, list[str]]) -> str:
    """Vanilla MT's collapse per seed, against the unimodal and concat rows of the same seed.

    ``scale`` maps ``audio_only``/``visual_only``/``concat`` (those that ran) to their run folders, in seed order.
    """
    lines = ["Vanilla MT's collapse (the paper's Figure 1c), per seed:"]
    for i, run_dir in enumerate(vanilla):
        r = summarize_run(run_dir)
        checks = collapse_checks(r)
        met = sum(1 for v in checks.values() if v)
        air = [a for a in r.air_epochs if a is not None]
        others = {k: summarize_run(v[i]) for k, v in scale.items() if i < len(v)}
        weak_alone = others.get(f"{r.weak}_only")
        strong_alone = others.get(f"{r.dominant}_only")
        concat = others.get("concat")
        text = (f"  seed {r.seed}: attention on {r.dominant} {r.mass_clean:.3f} clean -> {r.mass_replaced:.3f} with "
                f"{r.dominant} = noise; AIR {air[0]:+.3f} (epoch 1) -> {air[-1]:+.3f} (epoch {len(air)}).\n"
                f"    accuracy {r.accuracy:.3f}")
        if strong_alone is not None:
            text += f" (the {r.dominant}-only model: {strong_alone.accuracy:.3f}"
            text += f", concat: {concat.accuracy:.3f})" if concat is not None else ")"
        if r.accuracy_weak_replaced is not None:
            text += f"; with {r.weak} = noise {r.accuracy_weak_replaced:.3f}"
        text += f"; with {r.dominant} = noise {r.accuracy_replaced:.3f}"
        if weak_alone is not None:
            text += f" although the {r.weak}-only model reaches {weak_alone.accuracy:.3f}"
        text += (f".\n    the {r.weak} encoder's linear probe inside vanilla MT: {r.probe_weak:.3f}"
                 + (f" (the {r.weak}-only model's linear head on the same pooling: {weak_alone.accuracy:.3f})"
                    if weak_alone is not None else "")
                 + f". Collapse criteria met: {met}/4 ({', '.join(k for k, v in checks.items() if not v) or 'all'}"
                 + f"{' failed' if met < 4 else ''})")
        lines.append(text)
    return "\n".join(lines)


def format_paired(vanilla: list[str], rollingq: list[str]) -> str:
    """RollingQ − vanilla per quantity (same seed), mean and 95 % t-interval, for two or more seeds."""
    pairs = pair_by_seed([summarize_run(d) for d in vanilla], [summarize_run(d) for d in rollingq])
    if len(pairs) < 2:
        return ""
    rows = [(label, stat.text()) for label, stat in paired_rows(pairs) if "epoch" not in label]
    width = max(len(label) for label, _ in rows)
    head = f"MT + RollingQ - vanilla MT, paired over {len(pairs)} seeds: mean [95 % t-interval]"
    return "\n".join([head] + [f"  {label:<{width}}  {text}" for label, text in rows])
