"""rollingq: train multimodal transformers with RollingQ (Ni et al., ICML 2025).

Entry points: the ``rollingq`` command (:mod:`rollingq.cli`), :func:`rollingq.train.train`,
:func:`rollingq.train.resume`, :func:`rollingq.train.load_run`.
"""

__version__ = "0.1.0"
