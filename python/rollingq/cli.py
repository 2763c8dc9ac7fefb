"""The ``rollingq`` command: ``train``, ``eval``, ``report``, ``demo`` and ``prepare``.

``rollingq train --config CONFIG [key=value ...] [--out RUN_DIR]``,
``rollingq train --resume RUN_DIR``, ``rollingq eval --run RUN_DIR``,
``rollingq report RUN_DIR [RUN_DIR ...]``, ``rollingq demo [--out DIR] [--epochs N]``,
``rollingq prepare avdigits OUT [--seed S] [--overwrite]``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys

logger = logging.getLogger("rollingq.cli")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="rollingq", description="Train and evaluate multimodal transformers with RollingQ.")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train a run (or continue one with --resume)")
    t.add_argument("--config", help="a YAML file, or the name of a packaged config (e.g. synthetic)")
    t.add_argument("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR from its last checkpoint")
    t.add_argument("--checkpoint", default="last", choices=["best", "last", "previous"],
                   help="with --resume: the checkpoint to continue from (default: last)")
    t.add_argument("--out", metavar="RUN_DIR", help="the run directory (default: <out_dir>/<name>_<time>)")
    t.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. optim.lr=0.01")

    e = sub.add_parser(
        "eval", help="evaluate a finished run (writes RUN_DIR/eval.json; eval_<split>.json for another split)"
    )
    e.add_argument("--run", required=True, metavar="RUN_DIR")
    e.add_argument("--split", default="test", choices=["train", "val", "test"])
    e.add_argument("--noise-modality", default=None, metavar="NAME", help="replace this modality's input by noise")
    e.add_argument("--seed", type=int, default=0)

    r = sub.add_parser("report", help="compare runs in a report (report.md and figures)")
    r.add_argument("runs", nargs="+", metavar="RUN_DIR")
    r.add_argument("--out", default="report", metavar="DIR")

    d = sub.add_parser("demo", help="vanilla MT's attention collapse, and vanilla MT vs vanilla MT + RollingQ "
                                    "(no downloads; about a minute on 2 quiet CPU cores)")
    d.add_argument("--out", default="runs/demo", metavar="DIR")
    d.add_argument("--epochs", type=int, default=None, help="override the demo's number of epochs")
    d.add_argument("--dataset", default="all", choices=["all", "synthetic", "avdigits"],
                   help="all (default): the synthetic token task, then avdigits (real WAV/JPEG files written "
                   "under OUT/avdigits/data, read by the CREMA-D loader); or one of them")
    d.add_argument("--seeds", type=int, nargs="+", default=[0], metavar="S",
                   help="seeds to train (two or more: paired differences with 95%% t-intervals)")

    pr = sub.add_parser("prepare", help="write a dataset that ships with the package as files (no download)")
    pr.add_argument("dataset", choices=["avdigits"],
                    help="avdigits: audio (class-specific vowels) + frames (scikit-learn's digit scans), CREMA-D layout")
    pr.add_argument("out", metavar="OUT", help="the dataset folder to write (missing or empty)")
    pr.add_argument("--seed", type=int, default=0)
    pr.add_argument("--train-per-class", type=int, default=120, metavar="N")
    pr.add_argument("--test-per-class", type=int, default=50, metavar="N")
    pr.add_argument("--overwrite", action="store_true", help="replace a non-empty OUT")
    return p


def _analysis(module: str, name: str):
    """Import ``rollingq.<module>.<name>`` lazily (the analyses live in their own modules)."""
    import importlib

    try:
        return getattr(importlib.import_module(f"rollingq.{module}"), name)
    except (ImportError, AttributeError) as exc:
        raise SystemExit(f"rollingq: rollingq.{module}.{name} is not available in this installation ({exc})") from exc


def _cmd_train(args: argparse.Namespace) -> int:
    from .config import load_config
    from .train import resume, train

    if args.resume:
        if args.config or args.overrides or args.out:
            raise SystemExit("rollingq train: --resume takes the saved config; drop --config, --out and overrides")
        run_dir = resume(args.resume, args.checkpoint)
    else:
        if not args.config:
            raise SystemExit("rollingq train: expected --config CONFIG (or --resume RUN_DIR)")
        run_dir = train(load_config(args.config, args.overrides), args.out)
    print(run_dir)
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    evaluate_run = _analysis("evaluate", "evaluate_run")
    summarize = _analysis("evaluate", "summarize")
    result = evaluate_run(args.run, split=args.split, noise_modality=args.noise_modality, seed=args.seed)
    print(json.dumps(summarize(result), indent=2, default=str))
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    write_report = _analysis("analysis.report", "write_report")
    print(write_report(args.runs, args.out))
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    table, report = run_demo(args.out, epochs=args.epochs, dataset=args.dataset, seeds=args.seeds)
    print(table)
    if f"report: {report}" not in table:
        print(f"\nreport: {report}")
    return 0


def _cmd_prepare(args: argparse.Namespace) -> int:
    from .data.avdigits import write_avdigits

    try:
        root = write_avdigits(args.out, seed=args.seed, train_per_class=args.train_per_class,
                              test_per_class=args.test_per_class, overwrite=args.overwrite)
    except (FileExistsError, ValueError) as exc:
        raise SystemExit(f"rollingq prepare {args.dataset}: {exc}") from exc
    print(root)
    return 0


def main(argv: list[str] | None = None) -> int:
    """Parse ``argv`` and run the command; returns the exit status."""
    args = _parser().parse_args(argv)
    main_process = os.environ.get("RANK", "0") == "0"  # torchrun: only rank 0 talks
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else (logging.INFO if main_process else logging.WARNING),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    commands = {"train": _cmd_train, "eval": _cmd_eval, "report": _cmd_report, "demo": _cmd_demo,
                "prepare": _cmd_prepare}
    return commands[args.command](args)


if __name__ == "__main__":
    raise SystemExit(main())
