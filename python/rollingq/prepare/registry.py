"""The one registry of ``rollingq prepare DATASET``: a dataset's name, its help line, its arguments and
the function that runs it. Adding a dataset is one module in this package and one entry here."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass

from . import avdigits, cremad, kinetics, mosei


@dataclass(frozen=True)
class Preparer:
    """One ``rollingq prepare`` subcommand.

    Attributes:
        help: the one-line description ``rollingq prepare -h`` shows.
        add_arguments: adds the subcommand's arguments (``RAW``, ``OUT``, options) to its parser.
        run: prepares the dataset from the parsed arguments; returns a one-line summary (printed).
    """

    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], str]


PREPARERS: dict[str, Preparer] = {
    "avdigits": Preparer(avdigits.HELP, avdigits.add_arguments, avdigits.run),
    "cremad": Preparer(cremad.HELP, cremad.add_arguments, cremad.run),
    "kinetics-sounds": Preparer(kinetics.HELP, kinetics.add_arguments, kinetics.run),
    "mosei": Preparer(mosei.HELP, mosei.add_arguments, mosei.run),
}
