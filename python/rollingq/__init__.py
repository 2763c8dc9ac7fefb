"""rollingq: train multimodal transformers with RollingQ (Ni et al., ICML 2025).

Entry points: the ``rollingq`` command (:mod:`rollingq.cli`), :func:`rollingq.train.train`,
:func:`rollingq.train.resume`, :func:`rollingq.train.load_run`.

The package needs the ``[train]`` extra (``pip install 'rollingq[train]'``); the kernels alone
(:mod:`rollingq_kernels`) need only torch and numpy. Other extras add features
(:mod:`rollingq.extras`).
"""

from .extras import MissingExtra, install_hint, missing

__version__ = "0.1.0"

if missing("train"):
    raise MissingExtra(
        f"the rollingq training package needs {', '.join(missing('train'))} (the [train] extra): "
        f"{install_hint('train')}; the kernels alone (import rollingq_kernels) do not"
    )
