"""scripts/same_metrics.py: the check that a refactor left a seeded run's numbers as they were."""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))

from same_metrics import main


def write_run(path: Path, rows: list[dict]) -> Path:
    path.mkdir()
    (path / "metrics.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def test_equal_runs_pass_and_wall_clock_metrics_are_left_out(tmp_path, capsys):
    a = write_run(
        tmp_path / "a",
        [
            {
                "step": 0,
                "rm/acc": 0.5,
                "timing/round": 3.0,
                "rollout/tokens_per_s": 10.0,
                "efficiency/generate": 0.2,
                "ceiling/machine": 1e11,
            }
        ],
    )
    b = write_run(
        tmp_path / "b",
        [
            {
                "step": 0,
                "rm/acc": 0.5,
                "timing/round": 9.0,
                "rollout/tokens_per_s": 99.0,
                "efficiency/generate": 0.3,
                "ceiling/machine": 2e11,
            }
        ],
    )
    assert main([str(a), str(b)]) == 0
    assert "same metrics" in capsys.readouterr().out


def test_a_changed_value_or_a_missing_metric_fails(tmp_path, capsys):
    a = write_run(tmp_path / "a", [{"step": 0, "rm/acc": 0.5}, {"step": 1, "eval/gold_score": -0.1}])
    b = write_run(tmp_path / "b", [{"step": 0, "rm/acc": 0.5001}, {"step": 1, "eval/gold_score": -0.1}])
    assert main([str(a), str(b)]) == 1
    assert "DIFFERENT: rm/acc" in capsys.readouterr().out
    c = write_run(tmp_path / "c", [{"step": 0, "rm/acc": 0.5}, {"step": 1}])
    assert main([str(a), str(c)]) == 1
    assert "eval/gold_score only in before" in capsys.readouterr().out


def test_a_renamed_metric_is_compared_under_its_new_name(tmp_path):
    old = write_run(tmp_path / "old", [{"step": 0, "policy/kl": 0.25}])
    new = write_run(tmp_path / "new", [{"step": 0, "eval/kl": 0.25}])
    assert main([str(old), str(new)]) == 1
    assert main([str(old), str(new), "--rename", "policy/kl=eval/kl"]) == 0


def test_a_dropped_metric_is_left_out_of_the_comparison(tmp_path):
    old = write_run(tmp_path / "old", [{"step": 0, "rm/acc": 0.5, "rm/reward_sample": 1.0}])
    new = write_run(tmp_path / "new", [{"step": 0, "rm/acc": 0.5}])
    assert main([str(old), str(new)]) == 1
    assert main([str(old), str(new), "--dropped", "rm/reward_sample"]) == 0
