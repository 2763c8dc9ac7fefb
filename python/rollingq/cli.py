"""The ``rollingq`` command: ``train``, ``eval``, ``report``, ``demo`` and ``prepare``.

``rollingq train --config CONFIG [key=value ...] [--out RUN_DIR] [--overwrite] [key=value ...]``,
``rollingq train --resume RUN_DIR [--force]``, ``rollingq eval --run RUN_DIR``,
``rollingq report RUN_DIR [RUN_DIR ...]``,
``rollingq demo [--out DIR] [--epochs N] [--dataset all|synthetic|avdigits] [--seeds S ...]``,
``rollingq prepare DATASET ...`` (one-time conversions, :data:`rollingq.prepare.PREPARERS`).

A user's mistake (a bad config key or value, a missing or corrupt data file or checkpoint, a run
folder that is missing, already taken or in use by another process) ends with one line on stderr and
exit code 2; ``--debug`` shows the traceback instead. The line is at most :data:`MAX_MESSAGE` characters;
an error raised in a DataLoader worker is shown as the worker's own error, not its traceback. Ctrl-C
(SIGINT) ends with one line (for ``train``: where the last checkpoint is and the command that continues
the run) and exit code 130.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import sys

from .analysis.report import write_report
from .checkpoint import CheckpointError
from .config import ConfigError, load_config
from .data import SPLITS, DataError
from .demo import run_demo
from .evaluate import evaluate_run, summarize
from .extras import MissingExtra
from .prepare import PREPARERS
from .records import CHECKPOINT_NAMES
from .train import NonFiniteError, RunLockedError, resume, train

logger = logging.getLogger("rollingq.cli")

USER_ERRORS = (ConfigError, DataError, CheckpointError, MissingExtra, OSError, ValueError, NonFiniteError,
               RunLockedError)
"""What a user's input can cause; reported in one line (the message names the key, file or argument).
A run that diverges (:class:`~rollingq.train.NonFiniteError`: bad data or too high a learning rate) too, and a
run folder held by another process (:class:`~rollingq.runlock.RunLockedError`)."""

MAX_MESSAGE = 1000
"""The longest error line printed (the message is cut in the middle beyond it)."""

INTERRUPTED = 130
"""The exit status after Ctrl-C (128 + SIGINT), as shells report it."""

_WORKER = re.compile(r"^Caught (?P<type>\w+) in DataLoader worker process (?P<worker>\d+)\.\s*\n"
                     r"Original Traceback \(most recent call last\):\n(?P<trace>.*)$", re.S)


class UsageError(SystemExit):
    """Arguments that do not go together: the message on stderr, exit code 2."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.code = 2


def _parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                        help="show the traceback of an error instead of one line")
    p = argparse.ArgumentParser(
        prog="rollingq", description="Train and evaluate multimodal transformers with RollingQ.", parents=[common]
    )
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train a run (or continue one with --resume)", parents=[common])
    t.add_argument("--config", help="a YAML file, or the name of a packaged config (e.g. synthetic)")
    t.add_argument("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR from its last checkpoint")
    t.add_argument("--checkpoint", default="last", choices=CHECKPOINT_NAMES,
                   help="with --resume: the checkpoint to continue from (default: last)")
    t.add_argument("--force", action="store_true",
                   help="with --resume: continue even if the checkpoint's config differs from config.yaml")
    t.add_argument("--out", metavar="RUN_DIR", help="the run directory (default: <out_dir>/<name>_<time>)")
    t.add_argument("--overwrite", action="store_true",
                   help="replace the run already in --out RUN_DIR (its files are removed first)")
    t.add_argument("overrides", nargs="*", metavar="key=value",
                   help="dotted overrides, e.g. optim.lr=0.01 (before or after --out)")

    e = sub.add_parser(
        "eval", help="evaluate a finished run (writes RUN_DIR/eval.json; eval_<split>.json for another split)",
        parents=[common],
    )
    e.add_argument("--run", required=True, metavar="RUN_DIR")
    e.add_argument("--split", default="test", choices=SPLITS)
    e.add_argument("--noise-modality", default=None, metavar="NAME", help="replace this modality's input by noise")
    e.add_argument("--seed", type=int, default=0)

    r = sub.add_parser("report", help="compare runs in a report (report.md and figures)", parents=[common])
    r.add_argument("runs", nargs="+", metavar="RUN_DIR")
    r.add_argument("--out", default="report", metavar="DIR")

    d = sub.add_parser("demo", help="vanilla MT's attention collapse, RollingQ beside it, unimodal and concat rows "
                                    "for scale (no downloads; a few minutes on 2 CPU cores)", parents=[common])
    d.add_argument("--out", default="runs/demo", metavar="DIR")
    d.add_argument("--epochs", type=int, default=None, help="override the demo's number of epochs")
    d.add_argument("--dataset", default="all", choices=["all", "synthetic", "avdigits"],
                   help="all (default): the synthetic token task, then avdigits (real WAV/JPEG files written "
                   "under OUT/avdigits/data, read by the CREMA-D loader); or one of them")
    d.add_argument("--seeds", type=int, nargs="+", default=[0], metavar="S",
                   help="seeds to train (two or more: paired differences with 95%% t-intervals)")
    d.add_argument("--jobs", type=int, default=2, metavar="N",
                   help="runs trained at a time, one process and one torch thread each (default 2)")

    pr = sub.add_parser("prepare", help="write a dataset in the layout its loader reads (from a raw release, "
                        "or from what the package ships)", parents=[common])
    datasets = pr.add_subparsers(dest="dataset", required=True, metavar="DATASET")
    for name, preparer in PREPARERS.items():
        preparer.add_arguments(datasets.add_parser(name, help=preparer.help, parents=[common]))
    return p


def _parse(argv: list[str] | None) -> argparse.Namespace:
    """Parse ``argv``; ``train`` takes ``key=value`` overrides anywhere, before or after its options."""
    parser = _parser()
    args, extra = parser.parse_known_args(argv)
    if extra and args.command == "train" and all("=" in x and not x.startswith("-") for x in extra):
        args.overrides = list(args.overrides) + extra
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    args.debug = getattr(args, "debug", False)  # given before or after the command
    return args


def _cmd_train(args: argparse.Namespace) -> int:
    if args.resume:
        if args.config or args.overrides or args.out or args.overwrite:
            raise UsageError("rollingq train: --resume takes the saved config; drop --config, --out, --overwrite "
                             "and overrides")
        run_dir = resume(args.resume, args.checkpoint, force=args.force)
    else:
        if not args.config:
            raise UsageError("rollingq train: expected --config CONFIG (or --resume RUN_DIR)")
        if args.force:
            raise UsageError("rollingq train: --force goes with --resume; to replace a run in --out use --overwrite")
        run_dir = train(load_config(args.config, args.overrides), args.out, overwrite=args.overwrite)
    if _main_process():  # torchrun: the run folder is printed once
        print(run_dir)
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    result = evaluate_run(args.run, split=args.split, noise_modality=args.noise_modality, seed=args.seed)
    print(json.dumps(summarize(result), indent=2, default=str))
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    print(write_report(args.runs, args.out))
    return 0


def _cmd_prepare(args: argparse.Namespace) -> int:
    print(PREPARERS[args.dataset].run(args))
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    table, report = run_demo(args.out, epochs=args.epochs, dataset=args.dataset, seeds=args.seeds, jobs=args.jobs)
    print(table)
    if f"report: {report}" not in table:
        print(f"\nreport: {report}")
    return 0


def one_line(exc: BaseException, limit: int = MAX_MESSAGE) -> str:
    """The message of ``exc`` on one line of at most ``limit`` characters.

    A DataLoader worker's error arrives as ``Caught X in DataLoader worker process N`` followed by the
    worker's whole traceback; only the worker's own message is kept (with the worker named).
    """
    text = str(exc)
    worker = _WORKER.match(text)
    if worker is not None:
        lines = worker["trace"].rstrip().splitlines()
        frames = [i for i, line in enumerate(lines) if line.startswith("  File ")]
        cause = [line for line in lines[frames[-1] + 1 if frames else 0:] if not line.startswith(" ")]
        message = " ".join(cause).split(": ", 1)[-1] if cause else worker["type"]
        text = f"{message} (in DataLoader worker process {worker['worker']})"
    text = " ".join(text.split())
    if len(text) > limit:
        half = (limit - 5) // 2
        text = f"{text[:half]} [...] {text[-half:]}"
    return text


def _main_process() -> bool:
    """Rank 0 of a torchrun launch, or a single process."""
    return os.environ.get("RANK", "0") == "0"


def main(argv: list[str] | None = None) -> int:
    """Parse ``argv`` and run the command; returns the exit status (2 for a user's mistake)."""
    args = _parse(argv)
    main_process = _main_process()  # torchrun: only rank 0 talks
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else (logging.INFO if main_process else logging.WARNING),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    commands = {"train": _cmd_train, "eval": _cmd_eval, "report": _cmd_report, "demo": _cmd_demo,
                "prepare": _cmd_prepare}
    try:
        return commands[args.command](args)
    except UsageError as exc:
        print(f"rollingq: error: {exc}", file=sys.stderr)
        raise
    except USER_ERRORS as exc:
        if args.debug:
            raise
        print(f"rollingq {args.command}: error: {one_line(exc)} (--debug shows the traceback)", file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:  # Ctrl-C; train's TrainingInterrupted says where the run stands
        if args.debug:
            raise
        detail = f": {one_line(exc)}" if str(exc) else ""
        print(f"rollingq {args.command}: interrupted (Ctrl-C){detail}", file=sys.stderr)
        return INTERRUPTED


if __name__ == "__main__":
    raise SystemExit(main())
