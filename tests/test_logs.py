"""rollingq.logs: the one-line summary of a controller record names what decided."""

from __future__ import annotations

from rollingq.logs import record_summary


def test_record_summary_names_the_decision_the_indicator_and_the_warning():
    base = {"layer": "0", "air": 0.1234, "count": 40, "num_rotations": 1, "rotated": True, "angle_deg": 33.3}
    line = record_summary(base)
    assert line == "layer 0 rotated: AIR +0.1234, samples 40, angle 33.30 deg, rotations 1"
    held = record_summary({**base, "rotated": False, "reason": "below_threshold", "indicator": "score",
                           "value": -0.05, "assumption_warning": True})
    assert held.startswith("layer 0 not rotated (below_threshold): AIR +0.1234, score -0.0500, samples 40")
    assert held.endswith("the indicator and the attention mass favour different modalities")
