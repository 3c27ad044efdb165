"""The metric catalog (apo_ray/metric_catalog.py): the lists the round line, dashboard, report and summary read are
derived from it, unchanged; the learners' rank reduction reads it; docs/metrics.md and the Grafana dashboard are
generated from it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from apo_ray import metric_catalog
from apo_ray.apl_step import APLPolicyStep
from apo_ray.losses import combine_share_stats, combine_stats, minibatch_stats
from apo_ray.metric_catalog import CATALOG, VIEWS, lookup, rank_reduction, round_line, shown_in
from apo_ray.metric_docs import DASHBOARD, MARKDOWN, documents, grafana_dashboard, main
from apo_ray.metrics import DASHBOARD_METRICS, PHASE_GAUGE, prometheus_name
from apo_ray.offline import OfflinePolicyStep
from apo_ray.online import OnlinePolicyStep
from apo_ray.report import GAME_TABLE_KEYS, PLOTS, TABLE_KEYS, TIMING_KEYS
from apo_ray.train import SUMMARY_KEYS

ROOT = Path(__file__).resolve().parents[1]

# The hand-written lists the catalog replaced, as they were: the derived ones must keep their keys and order.
TIMINGS = (
    "timing/generate",
    "timing/rm_step",
    "timing/score",
    "timing/logprob_check",
    "timing/logprobs",
    "timing/policy_step",
    "timing/critic_step",
    "timing/sync",
    "timing/evaluate",
)
BEFORE = {
    "offline line": (
        "rm/acc",
        "rm/ece",
        "rm/acc_policy",
        "eval/gold_score",
        "eval/gold_score_se",
        "eval/rm_score",
        "eval/kl",
        "rm/loss_apo",
        "rm/apo_share",
        "timing/round",
    ),
    "online line": (
        "eval/gold_score",
        "eval/gold_score_se",
        "eval/kl",
        "policy/reward_mean",
        "policy/kl",
        "policy/kl_coef",
        "policy/clipfrac",
        "policy/entropy",
        "critic/loss",
        "rm/acc",
        "rm/acc_policy",
        "timing/round",
    ),
    "apl line": (
        "apl/attack_success_rate",
        "apl/attack_success_rate_fixed",
        "apl/harmful_rate",
        "eval/gold_score",
        "apl/attacker_harm",
        "eval/kl",
        "timing/round",
    ),
    "aapa line": ("aapa/disc_score",),
    "dashboard": (
        "round",
        "rm/acc",
        "rm/acc_policy",
        "rm/ece",
        "eval/gold_score",
        "eval/rm_score",
        "eval/kl",
        "policy/kl",
        "rollout/tokens_per_s",
        "rollout/num_workers",
        "timing/sync",
        "rollout/policy_version_lag",
    ),
    "timings": TIMINGS,
    "table": (
        "rm/acc",
        "rm/acc_policy",
        "rm/ece",
        "rm/ece_policy",
        "eval/gold_score",
        "eval/rm_score",
        "policy/kl",
        "eval/kl",
        "rollout/tokens_per_s",
        *TIMINGS,
    ),
    "game table": (
        "aapa/disc_score",
        "apl/attack_success_rate",
        "apl/attack_success_rate_fixed",
        "apl/harmful_rate",
        "apl/utility",
        "apl/eval_harm",
    ),
    "summary": ("rm/acc", "rm/ece", "rm/acc_policy", "rm/ece_policy", "eval/gold_score", "eval/rm_score", "eval/kl"),
    "plots": {
        "rm_accuracy.png": ("rm/acc", "rm/acc_policy"),
        "rm_ece.png": ("rm/ece", "rm/ece_policy"),
        "scores.png": ("eval/gold_score", "eval/rm_score"),
        "kl.png": ("policy/kl", "eval/kl"),
        "aapa_disc_score.png": ("aapa/disc_score",),
        "apl_harm.png": ("apl/attack_success_rate", "apl/harmful_rate"),
        "apl_utility.png": ("apl/utility",),
        "timings.png": TIMINGS,
    },
}


def test_the_derived_lists_are_the_hand_written_ones_they_replaced():
    assert OfflinePolicyStep.summary_keys == BEFORE["offline line"]
    assert OnlinePolicyStep.summary_keys == BEFORE["online line"]
    assert APLPolicyStep.summary_keys == BEFORE["apl line"]
    assert round_line("aapa") == BEFORE["aapa line"]
    assert DASHBOARD_METRICS == BEFORE["dashboard"]
    assert TIMING_KEYS == BEFORE["timings"] and TABLE_KEYS == BEFORE["table"]
    assert GAME_TABLE_KEYS == BEFORE["game table"]
    assert SUMMARY_KEYS == BEFORE["summary"]
    assert {plot.file_name: plot.keys for plot in PLOTS} == BEFORE["plots"]


def test_each_entry_is_well_formed():
    keys = [m.key for m in CATALOG]
    assert len(keys) == len(set(keys)), "a key catalogued twice"
    assert all(m.description.strip() and m.ranks in ("mean", "sum", "max") for m in CATALOG)
    assert all(set(m.shown) <= set(VIEWS) for m in CATALOG), "a view not in VIEWS"
    for view in VIEWS:
        positions = [m.shown[view] for m in CATALOG if view in m.shown]
        assert positions and len(positions) == len(set(positions)), f"{view}: two keys at one position"
        # Only exact keys are shown: a pattern names no one column, gauge or line entry.
        assert all("{" not in key for key in shown_in(view)), view
    with pytest.raises(ValueError, match="view: must be one of"):
        shown_in("tables")


def test_lookup_takes_exact_keys_first_then_patterns_and_a_key_s_standard_error_with_it():
    assert lookup("eval/gold_score").description.startswith("Mean gold")
    assert lookup("eval/gold_topic").key == "eval/gold_{term}"
    assert lookup("eval/gold_topic_se").key == "eval/gold_{term}"
    assert lookup("rm/acc_se").key == "rm/acc"
    assert lookup("timing/sync").key == "timing/sync" and lookup("timing/aapa_step").key == "timing/{phase}"
    assert lookup("timing/") is None and lookup("nonsense") is None and lookup("rm/unknown") is None


def test_rank_parts_are_summed_and_the_rest_averaged_as_the_catalog_says(monkeypatch):
    assert rank_reduction("rm/loss_apo_part") == "sum" and rank_reduction("rm/loss_apo") == "mean"
    # Two ranks' shares of one minibatch of 4 APO pairs (3 + 1): each part is its mean times its fraction.
    shares = [
        {"rm/loss_apo": 1.0, "rm/loss_apo_part": 0.75, "policy/loss": 2.0},
        {"rm/loss_apo": 3.0, "rm/loss_apo_part": 0.75, "policy/loss": 4.0},
    ]
    assert combine_share_stats(shares) == {"rm/loss_apo": 2.0, "rm/loss_apo_part": 1.5, "policy/loss": 3.0}
    assert minibatch_stats(combine_share_stats(shares))["rm/loss_apo"] == 1.5
    # Across steps (not ranks) every stat is averaged, parts included.
    assert combine_stats(shares)["rm/loss_apo_part"] == 0.75
    # The reduction is the catalog's, not the key's suffix: a bound declared "max" takes the ranks' largest.
    bound = metric_catalog.Metric("policy/ratio_max", "A bound.", ranks="max")
    monkeypatch.setattr(metric_catalog, "CATALOG", (*CATALOG, bound))
    metric_catalog._index.cache_clear()
    try:
        assert combine_share_stats([{"policy/ratio_max": 1.5}, {"policy/ratio_max": 4.0}]) == {"policy/ratio_max": 4.0}
    finally:
        monkeypatch.undo()
        metric_catalog._index.cache_clear()


def test_the_grafana_dashboard_queries_the_gauges_the_driver_exports():
    dashboard = grafana_dashboard()
    exprs = [panel["targets"][0]["expr"] for panel in dashboard["panels"]]
    assert exprs[0] == f'ray_{PHASE_GAUGE}{{run=~"$run"}} == 1'
    assert exprs[1:] == [f'ray_{prometheus_name(key)}{{run=~"$run"}}' for key in DASHBOARD_METRICS]
    assert exprs[2] == 'ray_apo_rm_acc{run=~"$run"}'
    assert len({panel["id"] for panel in dashboard["panels"]}) == len(exprs)


def test_the_generated_docs_are_fresh(tmp_path, capsys):
    for path, text in documents().items():
        assert (ROOT / "docs" / path).read_text() == text, f"docs/{path} is stale: run the metric_docs command"
    json.loads((ROOT / "docs" / DASHBOARD).read_text())
    assert main(["--check", str(ROOT / "docs")]) == 0
    assert main(["--check", str(tmp_path)]) == 1 and "stale" in capsys.readouterr().err
    assert main(["--write", str(tmp_path)]) == 0 and main(["--check", str(tmp_path)]) == 0
    assert "| `rm/loss_apo_part` | A rank's part of rm/loss_apo. | sum |  |" in (tmp_path / MARKDOWN).read_text()
