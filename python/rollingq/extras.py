"""Optional dependencies: which extra installs what, and a clear error when one is missing.

The core (``rollingq_kernels``: kernels, layer, controller) needs torch and numpy only. The
training package needs ``[train]``; the features below need one more extra each and import its
packages only when used, through :func:`require`, so that a missing extra costs one line naming it
(the command line reports :class:`MissingExtra` like any user error) instead of a traceback, and
never breaks the commands that do not use it.

| extra | packages | used by |
|---|---|---|
| ``train`` | timm, pyyaml, pydantic, tqdm, tensorboard, pillow | the ``rollingq`` package and command |
| ``audio`` | librosa, soundfile | CREMA-D audio (wav decoding, resampling) |
| ``analysis`` | matplotlib, scipy | ``rollingq report`` (figures), ``rollingq eval`` (Pearson r) |
| ``prepare`` | av (PyAV, its own FFmpeg), scipy, pillow, scikit-learn | ``rollingq prepare`` |
"""

from __future__ import annotations

import importlib
import importlib.util
from types import ModuleType

#: The import names of each extra's packages (``pyyaml`` imports as ``yaml``, ``pillow`` as ``PIL``).
EXTRAS: dict[str, tuple[str, ...]] = {
    "train": ("timm", "yaml", "pydantic", "tqdm", "tensorboard", "PIL"),
    "audio": ("librosa", "soundfile"),
    "analysis": ("matplotlib", "scipy"),
    "prepare": ("av", "scipy", "PIL", "sklearn"),
}


#: Distribution names where they differ from the import name (for messages).
PACKAGE_NAMES = {"yaml": "pyyaml", "PIL": "pillow", "sklearn": "scikit-learn"}


class MissingExtra(ImportError):
    """An optional dependency is not installed; the message names the extra that installs it."""


def install_hint(extra: str) -> str:
    """The pip command that installs ``extra`` into this checkout or environment."""
    return f"pip install 'rollingq[{extra}]'"


def require(module: str, extra: str, feature: str) -> ModuleType:
    """Import ``module`` (e.g. ``"matplotlib.figure"``) or raise :class:`MissingExtra` naming ``extra``.

    Args:
        module: the module to import.
        extra: the extra that installs it (a key of :data:`EXTRAS`).
        feature: what needs it, for the message (e.g. ``"rollingq report"``).
    """
    if extra not in EXTRAS:
        raise ValueError(f"extra: expected one of {sorted(EXTRAS)}, got {extra!r}")
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        top = PACKAGE_NAMES.get(module.split(".")[0], module.split(".")[0])
        raise MissingExtra(
            f"{feature} needs {top!r}, which is not installed (the [{extra}] extra): {install_hint(extra)}"
        ) from exc


def _installed(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):  # a broken or hidden installation counts as missing
        return False


def missing(extra: str) -> list[str]:
    """The packages of ``extra`` that are not installed, by distribution name (nothing is imported)."""
    return [PACKAGE_NAMES.get(name, name) for name in EXTRAS[extra] if not _installed(name)]
