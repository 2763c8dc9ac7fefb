"""``rollingq prepare DATASET RAW OUT``: a dataset's raw release to the layout its loader reads.

One module per dataset (:mod:`~rollingq.prepare.cremad`, :mod:`~rollingq.prepare.kinetics`,
:mod:`~rollingq.prepare.mosei`; :mod:`~rollingq.prepare.avdigits` writes a set from what the package ships); the command
reads :data:`~rollingq.prepare.registry.PREPARERS`. Video and audio are decoded with PyAV (the
``[prepare]`` extra; its wheel carries its own FFmpeg, no system binary is run).
"""

from .registry import PREPARERS, Preparer

__all__ = ["PREPARERS", "Preparer"]
