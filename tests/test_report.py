import json
from pathlib import Path

import pytest
from matplotlib.image import imread

from apo_ray.report import compare_runs, load_rounds, write_report

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

FULL_ROUND_KEYS = {
    "rm/acc": 0.62,
    "rm/acc_policy": 0.55,
    "rm/ece": 0.08,
    "rm/ece_policy": 0.12,
    "eval/gold_score": -0.4,
    "eval/rm_score": 1.3,
    "policy/kl": 0.02,
    "eval/kl": 0.03,
    "timing/generate": 12.0,
    "timing/score": 1.5,
    "timing/rm_step": 8.0,
    "timing/policy_step": 20.0,
    "timing/sync": 0.4,
    "rollout/tokens_per_s": 1070.0,
}


def _write_metrics(run_dir: Path, rows: list[dict]) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))


def _synthetic_run(run_dir: Path, rounds: int = 4, gold_gain: float = 0.3, gold_se: float | None = None) -> None:
    errors = {"eval/gold_score_se": gold_se} if gold_se is not None else {}
    _write_metrics(
        run_dir,
        [
            {
                "step": number,
                "round": number,
                **{key: value + 0.05 * number for key, value in FULL_ROUND_KEYS.items()},
                "eval/gold_score": FULL_ROUND_KEYS["eval/gold_score"] + gold_gain * number,
                **errors,
            }
            for number in range(1, rounds + 1)
        ],
    )


def _assert_valid_png(path: Path) -> None:
    assert path.read_bytes()[:8] == PNG_SIGNATURE
    height, width, _channels = imread(path).shape
    assert height > 200 and width > 300


def test_report_draws_every_plot_and_embeds_it(tmp_path):
    _synthetic_run(tmp_path)
    (tmp_path / "summary.json").write_text(json.dumps({"method": "rjs", "final": {"gold_score": 0.8}}))
    report = write_report(tmp_path)
    assert report == tmp_path / "report" / "report.md"
    text = report.read_text()
    for name in ("rm_accuracy.png", "rm_ece.png", "scores.png", "kl.png", "timings.png"):
        _assert_valid_png(tmp_path / "report" / name)
        assert f"]({name})" in text
    assert "| method | rjs |" in text
    assert "| final/gold_score | 0.8 |" in text
    # round 2: rm/acc 0.62 + 0.1, gold -0.4 + 0.6
    round_two = next(line for line in text.splitlines() if line.startswith("| 2 |"))
    assert "| 0.72 |" in round_two and "| 0.2 |" in round_two
    assert "Not recorded" not in text


def test_missing_metrics_leave_out_their_plots(tmp_path):
    _write_metrics(
        tmp_path,
        [{"step": 1, "round": 1, "rm/acc": 0.6, "timing/generate": 3.0}, {"step": 2, "round": 2, "rm/acc": 0.7}],
    )
    text = write_report(tmp_path).read_text()
    written = sorted(path.name for path in (tmp_path / "report").glob("*.png"))
    assert written == ["rm_accuracy.png", "timings.png"]
    assert "](kl.png)" not in text
    assert "`eval/kl`" in text.split("Not recorded")[1]
    assert "## Summary" not in text


def test_rows_of_one_round_are_merged_and_rows_without_round_use_step(tmp_path):
    _write_metrics(
        tmp_path,
        [
            {"step": 10, "round": 1, "rm/acc": 0.6},
            {"step": 11, "round": 1, "policy/kl": 0.1, "rm/acc": 0.65},
            {"step": 3, "eval/gold_score": 0.2},
        ],
    )
    assert load_rounds(tmp_path) == [
        {"step": 11, "round": 1, "rm/acc": 0.65, "policy/kl": 0.1},
        {"step": 3, "round": 3, "eval/gold_score": 0.2},
    ]


def test_report_errors_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="metrics.jsonl"):
        write_report(tmp_path)
    (tmp_path / "metrics.jsonl").write_text("")
    with pytest.raises(ValueError, match="no metrics logged"):
        write_report(tmp_path)
    _write_metrics(tmp_path, [{"step": 1, "round": "one"}])
    with pytest.raises(ValueError, match="'round' must be an integer, got 'one' at step 1"):
        write_report(tmp_path)
    _write_metrics(tmp_path, [{"step": 1, "rm/acc": 0.6}])
    (tmp_path / "summary.json").write_text('{"method": \n')
    with pytest.raises(ValueError, match=r"summary.json:2:"):
        write_report(tmp_path)


def test_compare_runs_writes_one_plot_and_one_table(tmp_path):
    _synthetic_run(tmp_path / "apo", gold_gain=0.3, gold_se=0.02)
    _synthetic_run(tmp_path / "fixed_rm", gold_gain=0.01, gold_se=0.02)
    table = compare_runs([tmp_path / "apo", tmp_path / "fixed_rm"], tmp_path / "compare", labels=["APO", "fixed RM"])
    assert table == tmp_path / "compare" / "comparison.md"
    _assert_valid_png(tmp_path / "compare" / "comparison.png")
    text = table.read_text()
    assert "![comparison](comparison.png)" in text
    apo = next(line for line in text.splitlines() if line.startswith("| APO |"))
    # gold -0.4 + 0.3 at round 1 and + 1.2 at round 4, each +- 0.02: the change 0.9 +- 0.028
    assert "| 1-4 | -0.1 +- 0.02 | 0.8 +- 0.02 |" in apo
    assert apo.endswith("change +0.900 +- 0.028, rose by more than 3 SE |")
    fixed = next(line for line in text.splitlines() if line.startswith("| fixed RM |"))
    assert fixed.endswith("within 3 SE (no clear change) |")
    with pytest.raises(ValueError, match="2 run directories but 1 labels"):
        compare_runs([tmp_path / "apo", tmp_path / "fixed_rm"], tmp_path / "compare", labels=["APO"])


@pytest.mark.parametrize("command", ["compare", "report"])
def test_apo_ray_compare_puts_several_run_directories_side_by_side(tmp_path, capsys, command):
    from apo_ray.cli import main

    _synthetic_run(tmp_path / "apo", gold_gain=0.3)
    _synthetic_run(tmp_path / "fixed_rm", gold_gain=0.1)
    assert (
        main(
            [
                command,
                str(tmp_path / "apo"),
                str(tmp_path / "fixed_rm"),
                "--out",
                str(tmp_path / "cmp"),
                "--labels",
                "APO",
                "fixed",
            ]
        )
        == 0
    )
    _assert_valid_png(tmp_path / "cmp" / "comparison.png")
    assert "| fixed |" in (tmp_path / "cmp" / "comparison.md").read_text()
    assert main([command, str(tmp_path / "apo"), str(tmp_path / "missing")]) == 2
    assert "missing: no metrics.jsonl" in capsys.readouterr().err
    assert main([command, str(tmp_path / "apo"), "--labels", "a", "b"]) == 2
    assert "--labels: 2 labels for 1 run directories" in capsys.readouterr().err


def test_report_breaks_the_gold_score_into_its_terms(tmp_path):
    _write_metrics(
        tmp_path,
        [
            {
                "step": 0,
                "round": 0,
                "eval/gold_score": -0.5,
                "eval/gold_score_se": 0.02,
                "eval/gold_praise": 0.4,
                "eval/gold_praise_se": 0.01,
                "eval/gold_repeats": -0.1,
                "eval/gold_repeats_se": 0.01,
            },
            {
                "step": 1,
                "round": 1,
                "eval/gold_score": -0.2,
                "eval/gold_score_se": 0.02,
                "eval/gold_praise": 0.9,
                "eval/gold_praise_se": 0.02,
                "eval/gold_repeats": -0.5,
                "eval/gold_repeats_se": 0.03,
            },
        ],
    )
    text = write_report(tmp_path).read_text()
    _assert_valid_png(tmp_path / "report" / "gold_terms.png")
    assert "](gold_terms.png)" in text
    assert "| praise | 0.4 +- 0.01 | 0.9 +- 0.02 | +0.500 +- 0.022 |" in text
    assert "| repeats | -0.1 +- 0.01 | -0.5 +- 0.03 | -0.400 +- 0.032 |" in text
    assert (
        "**Gold score:** eval/gold_score -0.500 -> -0.200 (+- 0.020, 0.020): change +0.300 +- 0.028, "
        "rose by more than 3 SE"
    ) in text
    round_one = next(line for line in text.splitlines() if line.startswith("| 1 |"))
    assert "| -0.2 +- 0.02 |" in round_one


def test_the_sibling_games_plots_carry_their_standard_errors(tmp_path):
    _write_metrics(
        tmp_path,
        [
            {
                "step": r,
                "round": r,
                "aapa/disc_score": 0.2 + 0.1 * r,
                "aapa/disc_score_se": 0.02,
                "apl/attack_success_rate": 0.6 - 0.1 * r,
                "apl/attack_success_rate_se": 0.05,
                "apl/attack_success_rate_fixed": 0.5,
                "apl/harmful_rate": 0.3,
                "apl/harmful_rate_se": float("nan"),
                "apl/utility": -0.5,
                "apl/utility_se": 0.1,
            }
            for r in range(3)
        ],
    )
    text = write_report(tmp_path).read_text()
    for name in ("aapa_disc_score.png", "apl_harm.png", "apl_utility.png"):
        _assert_valid_png(tmp_path / "report" / name)
        assert f"]({name})" in text
    round_one = next(line for line in text.splitlines() if line.startswith("| 1 |"))
    # disc score 0.2 + 0.1, attack success 0.6 - 0.1, each with its error; harmful rate's NaN error is not shown
    assert "| 0.3 +- 0.02 |" in round_one and "| 0.5 +- 0.05 |" in round_one and "| 0.3 |" in round_one
