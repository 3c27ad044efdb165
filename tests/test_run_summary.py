"""The end of a run: summary.json keeps every figure at full precision, and the run prints a short readable block."""

from __future__ import annotations

import json
from types import SimpleNamespace

from apo_ray.config import load_config
from apo_ray.train import summary_text, write_summary
from tests.conftest import REPO_ROOT

# Two evaluations as metrics.jsonl holds them: full float precision, rm/ece without an error.
ROWS = [
    {
        "step": 0,
        "round": 0,
        "rm/acc": 0.625,
        "rm/acc_se": 0.0701,
        "rm/ece": 0.1,
        "eval/gold_score": -0.51234567891234,
        "eval/gold_score_se": 0.0301234567,
        "eval/kl": 0.0,
        "eval/kl_se": 0.0,
    },
    {
        "step": 1,
        "round": 1,
        "rm/acc": 0.6875,
        "rm/acc_se": 0.08183170883849714,
        "rm/ece": 0.09123456789,
        "eval/gold_score": 0.4561234567891234,
        "eval/gold_score_se": 0.031234,
        "eval/kl": 0.012345678,
        "eval/kl_se": 0.00112,
        "timing/round": 10.0,
        "timing/evaluate": 2.0,
    },
]


def test_a_run_ends_with_a_readable_summary_and_summary_json_keeps_full_precision(tmp_path):
    cfg = load_config(REPO_ROOT / "configs/default.yaml", ["rounds=1", f"run_dir={tmp_path}"])
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(row) + "\n" for row in ROWS))
    summary = write_summary(tmp_path, cfg, SimpleNamespace(data=SimpleNamespace(summary=dict)), wall_s=12.3)

    assert json.loads((tmp_path / "summary.json").read_text())["final"]["eval/gold_score"] == 0.4561234567891234
    text = summary_text(summary, tmp_path, tmp_path / "report/report.md", tmp_path / "checkpoints/round_0001")
    assert text.splitlines() == [
        f"summary ({cfg.method} with APO, seed {cfg.seed}), the last evaluation (round 1):",
        "  rm/acc           0.688 +- 0.082",  # to the second significant digit of the error
        "  rm/ece           0.0912",  # no error: 3 significant digits
        "  eval/gold_score  0.456 +- 0.031",
        "  eval/kl          0.0123 +- 0.0011",
        "  eval/gold_score -0.512 -> 0.456 (+- 0.030, 0.031): change +0.968 +- 0.043, rose by more than 3 SE",
        f"  run directory {tmp_path}",
        "  in it: summary.json (full precision), report/report.md, checkpoints/round_0001 (the last round's models)",
    ]
    # A run with logging.report=false has no report to point to; a zero error is no precision to round to.
    at_start = summary_text(summary | {"final": summary["start"]}, tmp_path, None, tmp_path / "checkpoints/round_0001")
    assert "  eval/kl          0" in at_start.splitlines()
    assert at_start.endswith("  in it: summary.json (full precision), checkpoints/round_0001 (the last round's models)")
