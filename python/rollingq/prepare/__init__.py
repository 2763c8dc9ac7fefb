"""``rollingq prepare DATASET ...``: one-time conversions of a dataset's release into the layout its loader reads.

:data:`PREPARERS` is the registry the command line reads: one :class:`Preparer` per dataset, each with
the arguments of its subcommand and the function that runs it. Adding a dataset's preparation is one
entry here.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass

from . import mosei


@dataclass(frozen=True)
class Preparer:
    """One ``rollingq prepare <name>`` subcommand.

    Attributes:
        help: one line for ``rollingq prepare --help``.
        add_arguments: adds the subcommand's arguments to its parser.
        run: runs it from the parsed arguments; returns what it wrote (a path), printed by the command.
    """

    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], str]


PREPARERS: dict[str, Preparer] = {
    "mosei": Preparer(mosei.HELP, mosei.add_arguments, mosei.run),
}
