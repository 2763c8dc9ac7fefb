"""The paper's analyses: metrics, input corruptions and the comparison report.

* :mod:`rollingq.analysis.metrics` — accuracy, macro-F1, probe accuracy, attention mass,
  AIR, mean-key norms, the quality–attention Pearson correlation;
* :mod:`rollingq.analysis.noise` — noise replacement, additive noise, the replaced half;
* :mod:`rollingq.analysis.report` — figures and ``report.md`` over several runs.

``rollingq.evaluate.evaluate_run`` runs them on a trained run; :mod:`rollingq.analysis.runs` reads
run folders for the report.
"""
