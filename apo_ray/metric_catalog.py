"""The metric catalog: every key a run logs, what it means, how a learner's ranks combine it, and where it shows.

The round line, the Ray dashboard's gauges, the report's table and plots and the run's summary read their keys
from here (`shown_in`), and so does the learners' rank reduction (`rank_reduction`); docs/metrics.md and the
Grafana dashboard are generated from it (apo_ray/metric_docs.py). A new metric is one `Metric(...)` below, with
`shown` naming the places it appears in and its position among their keys. Pure: no imports beyond the standard
library.

A key is exact ("rm/acc") or a pattern with one `{name}` placeholder ("timing/{phase}"), which stands for any run
of characters; an exact entry wins over a pattern. Any catalogued key's standard error `<key>_se` is catalogued
with it (the evaluation logs one beside each mean it measures).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from functools import cache
from typing import Literal

Reduction = Literal["mean", "sum", "max"]

# Where a key can show. "line:<step>": the one-line summary of each round for that policy step (offline, online,
# apl; aapa: appended when AAPA's anchoring runs); "dashboard": a Ray gauge (Prometheus, Grafana); "table" and
# "game_table": columns of the report's per-round table (a game key is never reported missing); "timings": the
# phases of the report's timing plot; "summary": the run summary's start/final figures; "plot:<file>": the keys
# whose presence draws that report plot.
VIEWS = (
    "line:offline",
    "line:online",
    "line:apl",
    "line:aapa",
    "dashboard",
    "table",
    "game_table",
    "timings",
    "summary",
    "plot:rm_accuracy.png",
    "plot:rm_ece.png",
    "plot:scores.png",
    "plot:kl.png",
    "plot:aapa_disc_score.png",
    "plot:apl_harm.png",
    "plot:apl_utility.png",
)
STDERR_SUFFIX = "_se"


@dataclass(frozen=True)
class Metric:
    key: str
    description: str
    # How one step's learner ranks combine their values: "sum" for a rank's part of a minibatch mean (the parts
    # add up to the mean), "mean" for the rest, "max" for a bound.
    ranks: Reduction = "mean"
    # {view: position}: the views it shows in (VIEWS) and its place among their keys.
    shown: dict[str, float] = field(default_factory=dict)


def _timing(phase: str, meaning: str, table: int, timings: int) -> Metric:
    return Metric(f"timing/{phase}", f"Seconds of the round's {meaning}.", shown={"table": table, "timings": timings})


CATALOG: tuple[Metric, ...] = (
    Metric(
        "round",
        "The round number (0: the starting policy and the RM fitted on the human pairs).",
        shown={"dashboard": 0},
    ),
    Metric("epoch", "The epoch of a stage's (sft, rm) training step."),
    Metric("eval_epoch", "The epoch after which a stage evaluated."),
    Metric("learning_rate", "A stage's learning rate at the step (apo_ray.stages.lr_schedule)."),
    # The reward model
    Metric(
        "rm/acc",
        "RM accuracy on the held-out human preference pairs.",
        shown={
            "line:offline": 0,
            "line:online": 9,
            "dashboard": 1,
            "table": 0,
            "summary": 0,
            "plot:rm_accuracy.png": 0,
        },
    ),
    Metric(
        "rm/acc_policy",
        "RM accuracy on policy pairs: a golden answer against a policy sample of its prompt.",
        shown={
            "line:offline": 2,
            "line:online": 10,
            "dashboard": 2,
            "table": 1,
            "summary": 2,
            "plot:rm_accuracy.png": 1,
        },
    ),
    Metric(
        "rm/ece",
        "RM expected calibration error on the held-out human pairs.",
        shown={"line:offline": 1, "dashboard": 3, "table": 2, "summary": 1, "plot:rm_ece.png": 0},
    ),
    Metric(
        "rm/ece_policy",
        "RM expected calibration error on policy pairs.",
        shown={"table": 3, "summary": 3, "plot:rm_ece.png": 1},
    ),
    Metric("rm/policy_pairs", "Policy pairs the RM's policy-pair accuracy is measured on."),
    Metric("rm/reward_gold", "Mean RM score of the golden answers of the evaluation."),
    Metric("rm/reward_sample", "Mean RM score of the policy samples the RM step trained on."),
    Metric("rm/loss", "The RM step's loss (APO term plus human term), averaged over its steps."),
    Metric(
        "rm/loss_apo",
        "The APO term's loss, golden answer against policy sample, averaged over its pairs.",
        shown={"line:offline": 7},
    ),
    Metric("rm/loss_pref", "The human term's Bradley-Terry loss, averaged over its pairs."),
    Metric("rm/margin", "Mean RM margin, chosen minus rejected, on the human pairs trained on."),
    Metric("rm/margin_apo", "Mean RM margin, golden answer minus sample, on the APO pairs trained on."),
    Metric("rm/acc_train_pref", "RM accuracy on the human pairs trained on."),
    Metric(
        "rm/apo_share",
        "The APO term's part of the RM loss, |APO| / (|APO| + |human|) (apo_ray.apo_activity).",
        shown={"line:offline": 8},
    ),
    Metric("rm/grad_norm", "The RM's gradient norm, averaged over the step's minibatches."),
    Metric("rm/steps", "Optimizer steps of the RM step."),
    Metric("rm/acc_train", "A stage's (rm) accuracy on its training pairs."),
    Metric("rm/margin_train", "A stage's (rm) mean margin on its training pairs."),
    Metric("rm/eval_pairs", "Pairs a stage's (rm) evaluation scored."),
    # One rank's part of a minibatch mean (apo_ray.losses.apo_reward_loss): the ranks' parts add up to it. They
    # never reach metrics.jsonl: minibatch_stats turns them back into the means.
    Metric("rm/apo_part", "A rank's part of the APO term of the RM loss.", ranks="sum"),
    Metric("rm/pref_part", "A rank's part of the human term of the RM loss.", ranks="sum"),
    Metric("rm/loss_apo_part", "A rank's part of rm/loss_apo.", ranks="sum"),
    Metric("rm/margin_apo_part", "A rank's part of rm/margin_apo.", ranks="sum"),
    Metric("rm/loss_pref_part", "A rank's part of rm/loss_pref.", ranks="sum"),
    Metric("rm/margin_part", "A rank's part of rm/margin.", ranks="sum"),
    Metric("rm/acc_train_pref_part", "A rank's part of rm/acc_train_pref.", ranks="sum"),
    # The held-out evaluation
    Metric(
        "eval/gold_score",
        "Mean gold (oracle) score of the policy's samples on the held-out prompts.",
        shown={
            "line:offline": 3,
            "line:online": 0,
            "line:apl": 3,
            "dashboard": 4,
            "table": 4,
            "summary": 4,
            "plot:scores.png": 0,
        },
    ),
    Metric("eval/gold_score_se", "Standard error of eval/gold_score.", shown={"line:offline": 4, "line:online": 1}),
    Metric("eval/gold_{term}", "Mean of one term of the builtin task's gold score (apo_ray/builtin/oracle.py)."),
    Metric(
        "eval/rm_score",
        "Mean RM score of the policy's samples on the held-out prompts.",
        shown={"line:offline": 5, "dashboard": 5, "table": 5, "summary": 5, "plot:scores.png": 1},
    ),
    Metric(
        "eval/kl",
        "KL(policy || reference) on the held-out prompts' samples, per response.",
        shown={
            "line:offline": 6,
            "line:online": 2,
            "line:apl": 5,
            "dashboard": 6,
            "table": 7,
            "summary": 6,
            "plot:kl.png": 1,
        },
    ),
    Metric("eval/samples", "Samples the evaluation drew."),
    Metric("eval/response_length", "Mean response length of the evaluation's samples, in tokens."),
    # The policy step
    Metric("policy/reward_mean", "Mean RM score of the round's samples.", shown={"line:online": 3}),
    Metric("policy/reward_std", "Standard deviation of the RM scores of the round's samples."),
    Metric(
        "policy/kl",
        "KL(policy || reference) of an online iteration's own samples.",
        shown={"line:online": 4, "dashboard": 7, "table": 6, "plot:kl.png": 0},
    ),
    Metric("policy/kl_coef", "The (adaptive) KL coefficient of an online iteration.", shown={"line:online": 5}),
    Metric("policy/clipfrac", "Fraction of PPO ratios clipped.", shown={"line:online": 6}),
    Metric("policy/entropy", "Mean per-token entropy of the policy on its samples.", shown={"line:online": 7}),
    Metric("policy/{stat}", "A policy step statistic (loss, grad_norm, steps, pairs, rewards_*, approx_kl, ...)."),
    Metric("critic/loss", "The critic's value loss (PPO).", shown={"line:online": 8}),
    Metric("critic/{stat}", "A critic step statistic (PPO: values, returns, clipfrac, grad_norm, steps)."),
    # Rollouts and weight sync
    Metric(
        "rollout/tokens_per_s",
        "Generated tokens per second of the round's generation.",
        shown={"dashboard": 8, "table": 8},
    ),
    Metric("rollout/num_workers", "Rollout workers serving.", shown={"dashboard": 9}),
    Metric(
        "rollout/policy_version_lag",
        "Policy versions between the weights that sampled and the learner's.",
        shown={"dashboard": 11},
    ),
    Metric("rollout/{stat}", "A generation statistic (tokens, samples, worker_failures, logprob_diff, ...)."),
    Metric("sync/{stat}", "A weight sync statistic (bytes, workers)."),
    # Time and arithmetic
    _timing("generate", "generation", 9, 0),
    _timing("rm_step", "RM step", 10, 1),
    _timing("score", "scoring of samples by the RM", 11, 2),
    _timing("logprob_check", "forward pass that checks the sampler's log-probs", 12, 3),
    _timing("logprobs", "reference and policy log-probs of a pair method", 13, 4),
    _timing("policy_step", "policy step", 14, 5),
    _timing("critic_step", "critic step (PPO)", 15, 6),
    Metric("timing/sync", "Seconds of the round's weight sync.", shown={"table": 16, "timings": 7, "dashboard": 10}),
    _timing("evaluate", "held-out evaluation", 17, 8),
    Metric("timing/round", "Seconds of the whole round.", shown={"line:offline": 9, "line:online": 11, "line:apl": 6}),
    Metric("timing/{phase}", "Seconds of another phase (sync_fingerprint, the sibling games' steps)."),
    Metric("flops/{phase}", "Model FLOPs of a phase (apo_ray/flops.py); flops/round is the round's."),
    Metric("efficiency/{phase}", "A phase's FLOPs per second as a share of its processes' matmul ceiling."),
    Metric("ceiling/{role}", "Measured matmul FLOP/s ceiling of a role's processes (machine: the whole machine)."),
    Metric("threads/{role}", "Threads a role's processes compute on."),
    # The sibling games
    Metric(
        "aapa/disc_score",
        "AAPA: mean discriminator score D(x, y) of the round's samples (1: expert-like).",
        shown={"line:aapa": 0, "game_table": 0, "plot:aapa_disc_score.png": 0},
    ),
    Metric("aapa/{stat}", "An AAPA discriminator or anchoring statistic."),
    Metric(
        "apl/attack_success_rate",
        "APL: fraction of the trained attacker's prompts that drew a harmful answer.",
        shown={"line:apl": 0, "game_table": 1, "plot:apl_harm.png": 0},
    ),
    Metric(
        "apl/attack_success_rate_fixed",
        "APL: attack success of the fixed (untrained) attacker.",
        shown={"line:apl": 1, "game_table": 2},
    ),
    Metric(
        "apl/harmful_rate",
        "APL: fraction of harmful answers on clean prompts.",
        shown={"line:apl": 2, "game_table": 3, "plot:apl_harm.png": 1},
    ),
    Metric("apl/attacker_harm", "APL: mean harm of the attacker's round samples.", shown={"line:apl": 4}),
    Metric(
        "apl/utility",
        "APL: the defender's gold score on clean prompts.",
        shown={"game_table": 4, "plot:apl_utility.png": 0},
    ),
    Metric(
        "apl/eval_harm", "APL: harmfulness of the trained attacker's attacks at evaluation.", shown={"game_table": 5}
    ),
    Metric("apl/{stat}", "An APL attacker or evaluation statistic."),
    # The stages (apo-ray sft, apo-ray rm)
    Metric("sft/{stat}", "An SFT stage statistic (loss, response_tokens, eval_loss, eval_ppl, eval_examples)."),
)


def _pattern(key: str) -> re.Pattern[str]:
    literal = re.split(r"\{\w+\}", key)
    return re.compile("^" + ".+".join(map(re.escape, literal)) + "$")


@cache
def _index() -> tuple[dict[str, Metric], list[tuple[re.Pattern[str], Metric]]]:
    exact = {m.key: m for m in CATALOG if "{" not in m.key}
    patterns = [(_pattern(m.key), m) for m in CATALOG if "{" in m.key]
    return exact, patterns


def lookup(key: str) -> Metric | None:
    """The catalog's entry for a logged key (its base key's for a `_se`), or None where it has none."""
    exact, patterns = _index()
    for name in (key, key.removesuffix(STDERR_SUFFIX)) if key.endswith(STDERR_SUFFIX) else (key,):
        if name in exact:
            return exact[name]
        for pattern, metric in patterns:
            if pattern.match(name):
                return metric
    return None


def rank_reduction(key: str) -> Reduction:
    """How a learner's ranks combine one step's `key`; a key the catalog lacks is averaged, as most are."""
    metric = lookup(key)
    return metric.ranks if metric is not None else "mean"


def shown_in(view: str) -> tuple[str, ...]:
    """The keys a view shows, in its order."""
    if view not in VIEWS:
        raise ValueError(f"view: must be one of {', '.join(VIEWS)}, got {view!r}")
    placed = sorted((m.shown[view], m.key) for m in CATALOG if view in m.shown)
    return tuple(key for _, key in placed)


def round_line(step: str) -> tuple[str, ...]:
    """The keys of the one-line summary of each round for a policy step (offline, online, apl) or AAPA (aapa)."""
    return shown_in(f"line:{step}")
