"""``rollingq prepare mosei --trust PICKLE OUT``: MultiBench's MOSEI pickle, once, into an ``.npz``.

A pickle runs code when it is loaded, so the MOSEI loader reads an ``.npz`` by default (NumPy arrays,
read with ``allow_pickle=False``). This command is the one place that unpickles the release: it needs
``--trust`` (you vouch for the file), checks the file's ownership and permissions and those of its
folders (:func:`rollingq.data.mosei.ownership_problems`), and writes the same arrays, keyed
``<split>/<key>`` (``train/vision``, ``valid/labels``, …), atomically to ``OUT`` (a folder: then
``OUT/mosei_senti_data.npz``, the loader's default ``data.file``; or a path ending in ``.npz``).

The MultiBench file is ``mosei_senti_data.pkl`` of MultiBench's "Affective computing" datasets
(https://github.com/pliang279/MultiBench, CMU-MOSEI "aligned" features).
"""

from __future__ import annotations

import argparse
import io
import logging
import os

import numpy as np

from ..data.common import DataError
from ..data.mosei import NPZ_NAME, npz_arrays, read_pickle
from ..files import atomic_write_bytes

logger = logging.getLogger("rollingq.prepare")

HELP = "convert MultiBench's MOSEI pickle once into an .npz that loads without running code"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The subcommand's arguments: ``--trust``, the pickle and the output."""
    parser.add_argument("--trust", action="store_true",
                        help="required: you trust PICKLE (unpickling runs the code it holds)")
    parser.add_argument("pickle", metavar="PICKLE", help="MultiBench's mosei_senti_data.pkl")
    parser.add_argument("out", metavar="OUT", help=f"the dataset folder (writes OUT/{NPZ_NAME}) or a .npz path")


def output_path(out: str) -> str:
    """``out`` itself if it ends in ``.npz``, else ``out/mosei_senti_data.npz``."""
    return out if out.endswith(".npz") else os.path.join(out, NPZ_NAME)


def convert_mosei_pickle(pickle_path: str, out: str, trust: bool) -> str:
    """Convert the pickle at ``pickle_path`` into an ``.npz`` at :func:`output_path` ``(out)``; returns that path.

    Raises:
        ValueError: ``trust`` is not set (naming ``--trust``).
        DataError: the pickle's ownership or permissions are unsafe, or its content is not MultiBench's.
    """
    if not trust:
        raise ValueError(f"--trust: converting {pickle_path!r} unpickles it, which runs the code it holds; pass "
                         "--trust if you trust the file (MultiBench's mosei_senti_data.pkl)")
    target = output_path(out)
    if os.path.abspath(target) == os.path.abspath(pickle_path):
        raise ValueError(f"OUT: {target!r} is the pickle itself")
    arrays = npz_arrays(read_pickle(pickle_path, None, trusted=False), pickle_path)
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    atomic_write_bytes(buffer.getbuffer(), target)
    logger.info("wrote %s (%d arrays) from %s", target, len(arrays), pickle_path)
    return target


def run(args: argparse.Namespace) -> str:
    """``rollingq prepare mosei``."""
    if not os.path.isfile(args.pickle):
        raise DataError(f"PICKLE: {args.pickle!r} does not exist")
    return convert_mosei_pickle(args.pickle, args.out, args.trust)
