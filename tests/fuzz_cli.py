"""A reusable fuzz harness for the command line and the loaders (``test_fuzz_cli.py`` uses it).

The promise checked for every input (issue 25): the command succeeds, or it ends with exit status 2
(130 for Ctrl-C) and ONE error line on stderr that names the key or the file at fault, never a
traceback, within a time bound, and without touching any file that existed before outside the place
it was asked to write.

* :func:`run_cli` runs ``rollingq ...`` in this process (fast: the package is imported once) and
  :func:`run_cli_process` in a fresh interpreter (the real stderr, for a handful of inputs);
  :func:`check_cli` asserts the promise on the :class:`Outcome`.
* :func:`check_loader` does the same for a loader call: it returns, or raises one of the user errors
  (:data:`rollingq.cli.USER_ERRORS`) whose one-line message names the file or key.
* :func:`snapshot` / :func:`assert_untouched`: every file under a folder, by content.
* Strategies: :func:`override_keys`, :func:`yaml_values`, :func:`list_files` (CREMA-D / Kinetics list
  lines), :func:`byte_edits` (truncations, flipped and inserted bytes).

Profiles as in ``fuzz_op.py`` (``ROLLINGQ_FUZZ=ci``, the default: derandomized, a fixed small number
of examples, no example database; ``dev``: random and many more).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from hypothesis import HealthCheck, Phase, settings
from hypothesis import strategies as st

settings.register_profile(
    "cli-ci", derandomize=True, deadline=None, database=None, print_blob=True,
    phases=(Phase.explicit, Phase.generate), suppress_health_check=list(HealthCheck),
)
settings.register_profile("cli-dev", deadline=None, print_blob=True, max_examples=200,
                          suppress_health_check=list(HealthCheck))
PROFILE = "cli-dev" if os.environ.get("ROLLINGQ_FUZZ", "ci") == "dev" else "cli-ci"

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIME_LIMIT_S = 20.0
"""The most one input may take, in process (the billion-laughs YAML took 39 s before the bound)."""
LINE_LIMIT = 1200
"""The longest error line accepted (the CLI cuts at 1000 characters plus its prefix and suffix)."""


def fuzz_settings(ci_examples: int) -> settings:
    """``ci_examples`` examples in CI (the default profile), the dev profile's count otherwise."""
    profile = settings.get_profile(PROFILE)
    return settings(profile, max_examples=ci_examples if PROFILE == "cli-ci" else profile.max_examples)


# ------------------------------------------------------------------------------------------- files
def snapshot(root: str, skip: Iterable[str] = ()) -> dict[str, str]:
    """``{relative path: sha256}`` of every file and symlink under ``root`` (folders in ``skip``, relative
    to ``root``, left out); folders are listed with an empty digest, so a new empty folder counts too."""
    skipped = {os.path.normpath(s) for s in skip}
    out = {}
    for folder, dirs, files in os.walk(root):
        rel_folder = os.path.relpath(folder, root)
        dirs[:] = [d for d in dirs if os.path.normpath(os.path.join(rel_folder, d)) not in skipped]
        for d in dirs:
            out[os.path.normpath(os.path.join(rel_folder, d)) + "/"] = ""
        for name in files:
            path = os.path.join(folder, name)
            rel = os.path.normpath(os.path.join(rel_folder, name))
            if os.path.islink(path):
                out[rel] = "link:" + os.readlink(path)
                continue
            with open(path, "rb") as f:
                out[rel] = hashlib.sha256(f.read()).hexdigest()
    return out


def assert_untouched(before: dict[str, str], after: dict[str, str], what: str) -> None:
    """No file of ``before`` changed or vanished, and nothing new appeared."""
    changed = sorted(k for k in before if after.get(k) != before[k])
    added = sorted(set(after) - set(before))
    assert not changed and not added, f"{what}: changed or removed {changed[:5]}, added {added[:5]}"


# ------------------------------------------------------------------------------------------- outcomes
@dataclass
class Outcome:
    """What one command did: its exit status, its stderr, how long it took, and an escaped exception."""

    code: int | None
    stderr: str
    seconds: float
    escaped: BaseException | None = None


def run_cli(argv: list[str]) -> Outcome:
    """``rollingq.cli.main(argv)`` in this process, stderr captured (log records go to the logging
    handlers pytest installs, as they go to stderr with a timestamp in a real run)."""
    from rollingq.cli import main

    err = io.StringIO()
    start = time.perf_counter()
    code, escaped = None, None
    with contextlib.redirect_stderr(err):
        try:
            code = main(argv)
        except SystemExit as exc:  # argparse's usage errors
            code = exc.code if isinstance(exc.code, int) else 2
        except BaseException as exc:  # noqa: BLE001 - a traceback a user would see: reported by check_cli
            escaped = exc
    return Outcome(code, err.getvalue(), time.perf_counter() - start, escaped)


def run_cli_process(argv: list[str], timeout: float = 120.0, cwd: str | None = None) -> Outcome:
    """``python -m rollingq argv`` in a fresh interpreter (the real stderr, log lines included)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([os.path.join(REPO, "python"), REPO, env.get("PYTHONPATH", "")])
    env["OMP_NUM_THREADS"] = "1"
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "rollingq", *argv], env=env, cwd=cwd, capture_output=True,
                          text=True, timeout=timeout)
    return Outcome(proc.returncode, proc.stderr, time.perf_counter() - start)


def error_lines(stderr: str) -> list[str]:
    """The lines of ``stderr`` that report an error (not log records, not argparse's usage text)."""
    return [line for line in stderr.splitlines() if line.startswith("rollingq") and (
        ": error:" in line or ": interrupted" in line)]


def check_cli(outcome: Outcome, names: Iterable[str], what: str, limit_s: float = TIME_LIMIT_S) -> None:
    """Success, or exit status 2 / 130 with one error line naming one of ``names``; never a traceback."""
    detail = f"{what}: exit {outcome.code}, {outcome.seconds:.1f} s, stderr {outcome.stderr[-1500:]!r}"
    assert outcome.escaped is None, f"{what}: an exception escaped the command: {outcome.escaped!r}"
    assert "Traceback" not in outcome.stderr, detail
    assert outcome.seconds <= limit_s, detail
    if outcome.code == 0:
        return
    assert outcome.code in (2, 130), detail
    lines = error_lines(outcome.stderr)
    assert len(lines) == 1 and len(lines[0]) <= LINE_LIMIT, detail
    assert any(name in lines[0] for name in names), f"{detail}: the line names none of {list(names)}"


def check_loader(call: Callable[..., Any], args: tuple, names: Iterable[str], what: str,
                 limit_s: float = TIME_LIMIT_S) -> Any:
    """Run ``call(*args)``: it returns (the result), or raises a user error whose one-line message names one
    of ``names`` (then None)."""
    from rollingq.cli import USER_ERRORS, one_line

    start = time.perf_counter()
    try:
        result = call(*args)
    except USER_ERRORS as exc:
        seconds = time.perf_counter() - start
        line = one_line(exc)
        assert seconds <= limit_s, f"{what}: {seconds:.1f} s"
        assert any(name in line for name in names), f"{what}: {line!r} names none of {list(names)}"
        return None
    assert time.perf_counter() - start <= limit_s, what
    return result


# ------------------------------------------------------------------------------------------- strategies
def flat_keys(tree: dict, prefix: str = "") -> list[str]:
    """The dotted keys of a nested dict (its leaves and its sections)."""
    out = []
    for key, value in tree.items():
        dotted = f"{prefix}{key}"
        out.append(dotted)
        if isinstance(value, dict):
            out.extend(flat_keys(value, dotted + "."))
    return out


def _typo(word: str) -> st.SearchStrategy[str]:
    def edit(data: tuple[int, int, str]) -> str:
        i, kind, char = data
        i %= max(1, len(word))
        return [word[:i] + word[i + 1:], word[:i] + char + word[i:], word[:i] + char + word[i + 1:]][kind % 3]

    return st.tuples(st.integers(0, 60), st.integers(0, 2), st.sampled_from("._xé0 /")).map(edit)


def override_keys(valid: list[str]) -> st.SearchStrategy[str]:
    """Valid dotted keys, typos of them, extra or missing segments, and junk."""
    key = st.sampled_from(valid)
    return st.one_of(
        key, key, key,
        key.flatmap(_typo),
        key.map(lambda k: k + ".deeper"),
        key.map(lambda k: "." + k),
        st.text(alphabet="abz._ é\t", min_size=0, max_size=12).filter(lambda k: "=" not in k),
    )


SPECIAL_VALUES = [
    "", "~", "null", "true", "yes", "1e308", "-1e308", "1e309", ".inf", "-.inf", ".nan", "1e-320", "-0.0",
    "0x1F", "0o17", "18446744073709551616", "-9223372036854775809", "9" * 30, "[]", "{}", "[[[]]]",
    "'unterminated", "[1, 2", "{a: 1", "&a [1, *a]", "!!python/object/apply:os.system ['true']",
    "!!binary aGVsbG8=", "2026-12-03", "../../../escape", "/etc/passwd", "x" * 300, "é²½", "a: b: c",
    "- - - x", "[&a [1,1,1,1], &b [*a,*a,*a,*a], &c [*b,*b,*b,*b], &d [*c,*c,*c,*c], [*d,*d,*d,*d]]",
    "cremad", "mosei", "kinetics_sounds", "svd", "per_head", "epoch", "audio", "[audio, visual]",
    "[visual, audio]", "[audio]", "[audio, audio]", "cuda", "adamw", "unimodal", "ogm_ge", "vanilla_mt_star",
]


def yaml_values() -> st.SearchStrategy[str]:
    """Override values: small and extreme numbers, YAML specials (aliases, tags, broken syntax), names."""
    small_int = st.integers(-3, 64).map(str)
    number = st.floats(-4.0, 4.0, allow_nan=False).map(repr)
    text = st.text(alphabet="ab ,:[]{}&*!|>'\"#%@`é\\-", max_size=16)
    return st.one_of(st.sampled_from(SPECIAL_VALUES), small_int, small_int, number, text,
                     st.lists(st.one_of(small_int, st.sampled_from(["audio", "visual", "x"])), max_size=4)
                     .map(lambda xs: "[" + ", ".join(xs) + "]"))


def list_files(names: list[str], labels: list[str], sep: str) -> st.SearchStrategy[str]:
    """The text of a list file: rows of known and hostile names and labels, headers, blank lines, a BOM."""
    name = st.one_of(st.sampled_from(names), st.sampled_from(names),
                     st.sampled_from(["../x", "a/b", "", ".", "..", "/etc/passwd", "é", "x" * 200, "a\\b"]))
    label = st.one_of(st.sampled_from(labels), st.sampled_from(["", "²", "-1", "999", "NaN", "é", "1.5", "0x1"]))
    row = st.one_of(
        st.tuples(name, label).map(lambda r: f"{r[0]}{sep}{r[1]}"),
        st.tuples(name, st.integers(0, 9), label).map(lambda r: f"{r[0]}{sep}{r[1]}{sep}{r[2]}"),
        st.sampled_from(["", "   ", "clip,label", "#", ",,,", "just-one-field", "\x00"]),
    )
    return st.tuples(st.booleans(), st.lists(row, min_size=0, max_size=8)).map(
        lambda t: ("\ufeff" if t[0] else "") + "\n".join(t[1]) + "\n")


def byte_edits() -> st.SearchStrategy[Callable[[bytes], bytes]]:
    """Edits of a file's bytes: cut at a point, bytes overwritten, bytes inserted, emptied, or kept."""
    def cut(at: float) -> Callable[[bytes], bytes]:
        return lambda b: b[: int(len(b) * at)]

    def flip(at: float, value: int, count: int) -> Callable[[bytes], bytes]:
        def edit(b: bytes) -> bytes:
            i = min(len(b) - 1, int(len(b) * at))
            return b[:i] + bytes([value]) * count + b[i + count:] if b else b
        return edit

    def insert(at: float, count: int) -> Callable[[bytes], bytes]:
        return lambda b: b[: int(len(b) * at)] + b"\xff" * count + b[int(len(b) * at):]

    return st.one_of(
        st.floats(0.0, 0.999).map(cut),
        st.tuples(st.floats(0.0, 1.0), st.integers(0, 255), st.integers(1, 64)).map(lambda t: flip(*t)),
        st.tuples(st.floats(0.0, 1.0), st.integers(1, 64)).map(lambda t: insert(*t)),
        st.just(lambda b: b""),
        st.just(lambda b: b),
    )
