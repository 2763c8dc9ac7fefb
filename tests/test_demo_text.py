"""What the demo prints about the controller: the decisions of a run, counted from its metrics rows."""

from __future__ import annotations

from rollingq.demo_text import _decisions_cell, controller_summary


def _rec(action: str, reason: str, angle: float = 0.0, applied: float = 0.0) -> dict:
    return {"action": action, "reason": reason, "angle_deg": angle, "applied_angle_deg": applied}


def test_controller_summary_counts_actions_reasons_angles_and_rollbacks():
    history = [
        {"epoch": 1, "rollingq": [_rec("wait", "below_threshold")]},
        {"epoch": 2, "rollingq": [_rec("refuse", "query_opposes_keys", 127.3)]},
        {"epoch": 3, "rollingq": [_rec("cap", "capped", 116.2, 30.0)]},
        {"epoch": 4, "rollingq": [_rec("rollback", "collapsed")]},
        {"epoch": 5, "rollingq": [_rec("refuse", "after_rollback")]},
        {"epoch": 6},  # a row without a controller record
    ]
    out = controller_summary(history)
    assert out["counts"] == {"wait": 1, "refuse": 2, "cap": 1, "rollback": 1}
    assert out["reasons"]["refuse/query_opposes_keys"] == 1 and out["reasons"]["refuse/after_rollback"] == 1
    assert out["applied"] == [30.0] and out["proposed"] == [116.2] and out["rolled_back"] == [4]
    assert _decisions_cell(out) == "cap 1 refuse 2 rollback 1 wait 1"
    assert _decisions_cell(controller_summary([{"epoch": 1}])) == "-"
