"""Run timm's own ``tests/test_models.py`` with every timm ``Attention`` swapped for ``FusedRollingQAttention``.

    python tests/timm_suite/run.py --models test_vit,deit_tiny_distilled_patch16_224 --tests naflexvit
    python tests/timm_suite/run.py --swap off ...     # the same tests on plain timm
    python tests/timm_suite/run.py --compare ...      # both, and a table per model: passed / failed / lost

The test file comes from timm's sdist on PyPI (:mod:`obtain`); the swap is the pytest plugin :mod:`rollingq_timm_swap`.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from obtain import timm_test_file  # noqa: E402

CI_MODELS = ("test_vit", "test_vit2")  # a class token; a register token as the query (no class token)
CI_TESTS = ("naflexvit_forward_intermediates", "naflexvit_key_only_attn_mask_output_parity",
            "naflexvit_patch_interpolation")


def run_suite(models, tests, swap: str = "on", extra_args=(), timeout: int = 3600) -> dict:
    """Run the selected tests of timm's file in a subprocess; return the plugin's report (outcome per test)."""
    test_file = timm_test_file()
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "report.json"
        cmd = [sys.executable, "-m", "pytest", str(test_file), "-p", "rollingq_timm_swap", f"--rq-swap={swap}",
               f"--rq-models={','.join(models)}", f"--rq-tests={','.join(tests)}", f"--rq-report={report}",
               "-q", "-p", "no:cacheprovider", "-W", "ignore", "--rootdir", str(test_file.parent), *extra_args]
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")]))
        done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout,
                              cwd=str(test_file.parent))
        if not report.is_file():
            raise RuntimeError(f"timm's tests did not run (exit {done.returncode}):\n{done.stdout[-3000:]}"
                               f"\n{done.stderr[-3000:]}")
        data = json.loads(report.read_text(encoding="utf-8"))
    data["returncode"] = done.returncode
    data["tail"] = done.stdout[-2000:]
    return data


def by_model(report: dict) -> dict[str, Counter]:
    table: dict[str, Counter] = {}
    for entry in report["outcomes"].values():
        key = entry["model"] or entry["test"]
        table.setdefault(key, Counter())[entry["outcome"]] += 1
    return table


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(CI_MODELS))
    parser.add_argument("--tests", default=",".join(CI_TESTS))
    parser.add_argument("--swap", default="on", choices=("on", "off"))
    parser.add_argument("--compare", action="store_true", help="run plain and swapped, report lost tests")
    parser.add_argument("--json", default="", help="write the reports here")
    args = parser.parse_args(argv)
    models, tests = [m for m in args.models.split(",") if m], [t for t in args.tests.split(",") if t]
    runs = {"off": run_suite(models, tests, "off")} if args.compare else {}
    runs[args.swap if not args.compare else "on"] = run_suite(models, tests, "on" if args.compare else args.swap)
    for swap, report in runs.items():
        print(f"== swap {swap}: exit {report['returncode']}; left plain: {report['left_plain']}")
        for key, counts in sorted(by_model(report).items()):
            print(f"  {key:45s} " + " ".join(f"{k} {v}" for k, v in sorted(counts.items())))
    lost = []
    if args.compare:
        plain, swapped = runs["off"]["outcomes"], runs["on"]["outcomes"]
        lost = [(nodeid, swapped.get(nodeid, {}).get("error", "not run")) for nodeid, e in plain.items()
                if e["outcome"] == "passed" and swapped.get(nodeid, {}).get("outcome") != "passed"]
        print(f"== lost (pass plain, not swapped): {len(lost)}")
        for nodeid, error in lost:
            print(f"  {nodeid}: {error}")
    if args.json:
        Path(args.json).write_text(json.dumps(runs, indent=1, sort_keys=True), encoding="utf-8")
    failed = any(e["outcome"] == "failed" for r in runs.values() for e in r["outcomes"].values())
    return 1 if lost or (failed and not args.compare) else 0


if __name__ == "__main__":
    sys.exit(main())
