"""benchmarks/recipes.py: the README's recipe rows come from the right evaluations."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
from recipes import rows, table  # noqa: E402  (a script, not a package)


def _e(step, fq, mu, **extra):
    return {"step": step, "forget_quality": fq, "model_utility": mu, **extra}


def _summary():
    start = _e(0, 0.99, 0.40)  # the target: never a pick, whatever its numbers
    trials = [
        {"state": "COMPLETE", "settings": {"a.lr": 1e-5}, "wall_time_s": 100.0,
         "evaluations": [start, _e(5, 0.30, 0.39), _e(10, 0.90, 0.30)]},
        {"state": "COMPLETE", "settings": {"a.lr": 5e-5}, "wall_time_s": 90.0,
         "evaluations": [start, _e(5, 0.50, 0.38), _e(10, 0.50, 0.392, privleak=-12.5)]},
        {"state": "FAIL", "settings": {"a.lr": 1e-4}, "wall_time_s": 10.0,
         "evaluations": [start, _e(5, 1.0, 0.40)]},  # killed: not finished, not counted
    ]  # fmt: skip
    return {"objective": "npo", "target": start, "retain": _e(0, 1.0, 0.41), "trials": trials}


def test_rule_and_any_utility_picks():
    picked = rows(_summary(), ratio=0.95)  # floor 0.38
    trial, e = picked["rule"]
    # 0.90 loses utility; 0.50 at steps 5 and 10 tie: the higher utility wins; the FAIL trial is out
    assert (trial["settings"]["a.lr"], e["step"], e["forget_quality"]) == (5e-5, 10, 0.50)
    trial, e = picked["any"]
    assert (trial["settings"]["a.lr"], e["step"], e["forget_quality"]) == (1e-5, 10, 0.90)
    assert rows(_summary(), ratio=1.01)["rule"] is None


def test_table_rows():
    lines = table([_summary()], ratio=0.95).splitlines()
    assert lines[2].startswith("| target |") and lines[3].startswith("| retain |")
    rule = lines[4].split(" | ")
    assert rule[1:5] == ["rule (>= 0.95x)", "lr=5e-05", "10", "0.5000"]
    assert rule[5:7] == ["0.3920", "0.98x"] and rule[9] == "-12.5" and rule[10] == "90 |"
    assert all(line.count("|") == lines[0].count("|") for line in lines)
