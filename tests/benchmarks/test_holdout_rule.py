"""benchmarks/holdout_rule.py: the agreement figures it prints come from the right evaluations."""

import sys
from pathlib import Path

from scipy.stats import spearmanr

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
from holdout_rule import agreement  # noqa: E402  (a script, not a package)


def test_rules_pick_the_expected_checkpoints_and_correlation_matches_scipy():
    def e(step, fq, fqh, gap, mu):
        return {
            "step": step,
            "forget_quality": fq,
            "forget_quality_holdout": fqh,
            "mia_gap": gap,
            "model_utility": mu,
        }

    histories = {
        "ga": [e(0, 0.01, 0.02, 0.40, 0.50), e(10, 0.30, 0.40, 0.10, 0.48), e(20, 0.90, 0.35, 0.02, 0.30)],
        "npo": [e(0, 0.01, 0.02, 0.40, 0.50), e(10, 0.20, 0.60, 0.20, 0.49), e(20, 0.50, 0.50, 0.05, 0.47)],
    }
    result = agreement(histories, target_utility=0.5, ratio=0.9)  # utility floor 0.45
    ga, npo = result["objectives"]["ga"], result["objectives"]["npo"]
    # ga's step 20 (fq 0.90) lost too much utility: the best eligible is step 10
    assert ga["eligible"] == 2 and ga["best_forget_quality"] == 0.30
    assert ga["forget_quality_holdout"]["step"] == 10 and ga["mia_gap"]["step"] == 10
    # npo: the holdout rule stops at step 10 (fq 0.20) while the best is step 20 (0.50)
    assert npo["best_forget_quality"] == 0.50 and npo["forget_quality_holdout"]["forget_quality"] == 0.20
    assert npo["mia_gap"]["step"] == 20
    every = [x for h in histories.values() for x in h]
    want = spearmanr(
        [x["forget_quality_holdout"] for x in every], [x["forget_quality"] for x in every]
    ).statistic
    assert abs(result["spearman"]["forget_quality_holdout"] - want) < 1e-12 and result["evaluations"] == 6


def test_a_sweep_gives_one_history_per_finished_trial(tmp_path):
    import json

    from holdout_rule import load_histories

    evaluations = [{"step": 0, "forget_quality": 0.1}, {"step": 5, "forget_quality": 0.4}]
    trials = [
        {"name": "trial000", "state": "COMPLETE", "evaluations": evaluations},
        {"name": "trial001", "state": "FAIL", "evaluations": evaluations[:1]},  # killed, rerun later
    ]
    # Named by the sweep, not its objective: two sweeps of one objective (RMU at two steering
    # coefficients) keep their trials apart.
    summary = {"name": "smollm2_npo", "objective": "npo", "trials": trials}
    (tmp_path / "sweep.json").write_text(json.dumps(summary))
    assert load_histories(tmp_path) == {"smollm2_npo/trial000": evaluations}
