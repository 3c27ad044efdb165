"""One full APO round through the real driver and actors, per policy method, on the builtin task."""

from __future__ import annotations

import json

import pytest
import torch

from apo_ray.builtin.oracle import GOLD_TERMS
from apo_ray.config import load_config
from apo_ray.methods import get_method, method_names
from apo_ray.metric_catalog import lookup
from apo_ray.metrics import read_metrics_jsonl
from apo_ray.train import prepare, run
from tests.conftest import REPO_ROOT

pytestmark = pytest.mark.integration

SMALL = [
    "rounds=1",
    "samples_per_prompt=2",
    "data.builtin.n_pairs=64",
    "data.builtin.n_gold=8",
    "data.builtin.n_prompts=16",
    "data.builtin.n_eval_pairs=16",
    "reward.initial_epochs=1",
    "policy.epochs_per_round=1",
    "logging.report=false",
    "logging.ray_metrics=false",
    "eval.prompts=8",
    "eval.samples_per_prompt=3",
]


def _play(tmp_path, *overrides):
    cfg = load_config(REPO_ROOT / "configs/default.yaml", [*SMALL, f"run_dir={tmp_path / 'run'}", *overrides])
    prepared = prepare(cfg)
    summary = run(prepared)
    return prepared, summary, read_metrics_jsonl(prepared.run_dir / "metrics.jsonl")


def _weights(path):
    from transformers import AutoModelForCausalLM

    return {k: v.clone() for k, v in AutoModelForCausalLM.from_pretrained(path).state_dict().items()}


# IPO's round is played with the settings test_an_ipo_round_trains_on_best_vs_worst_pairs checks by hand, so that
# the two tests read one game: starting a game's actors is most of its time.
METHOD_SETTINGS = {"ipo": ("ipo.tau=0.25", "policy.batch_size=64")}


@pytest.fixture(scope="module")
def method_round(ray_cluster, tmp_path_factory):
    """`method_round(method)`: one hf/torch round of an offline method, played on the first test that asks."""
    played = {}

    def play(method: str):
        if method not in played:
            played[method] = _play(
                tmp_path_factory.mktemp(method),
                f"method={method}",
                *METHOD_SETTINGS.get(method, ()),
                "rollout.backend=hf",
                "learner.backend=torch",
            )
        return played[method]

    return play


# Every offline method of the registry: a new one gets its round here without an edit.
@pytest.mark.parametrize("method", method_names("offline"))
def test_one_round_per_method_hf_torch(method_round, method):
    prepared, summary, rows = method_round(method)
    assert [r["round"] for r in rows] == [0, 1]
    for key in ("rm/acc", "rm/ece", "rm/acc_policy", "eval/gold_score", "eval/rm_score", "eval/kl"):
        assert key in rows[1], key
    # 8 held-out prompts x 3 samples, every mean with its error, the gold score also by term
    assert rows[1]["eval/samples"] == 24 and 0 < rows[1]["rm/policy_pairs"] <= 8 * 3
    for key in ("eval/gold_score", "eval/rm_score", "eval/kl", "rm/acc", "eval/gold_topic", "eval/gold_length"):
        assert rows[1][f"{key}_se"] >= 0, key
    assert all(f"eval/gold_{term}" in rows[1] for term in GOLD_TERMS)
    assert 0 <= rows[1]["eval/gold_topic"] <= 1 and rows[1]["eval/gold_length"] <= 0
    assert 0 < rows[1]["rm/apo_share"] < 1
    # The APO step ran on gold-vs-sample pairs, and the samples came from the weights of version 0.
    assert "rm/loss_apo" in rows[1] and rows[1]["rollout/policy_version_lag"] == 0
    # fp32 HF sampler and fp32 learner on the same weights and the same ids: the log-probs agree.
    assert rows[1]["rollout/logprob_diff"] < 1e-4
    assert rows[0]["eval/kl"] == pytest.approx(0.0, abs=1e-4) and rows[1]["eval/kl"] != 0.0
    before = _weights(prepared.policy_path)
    after = _weights(prepared.run_dir / "checkpoints/round_0001/policy")
    assert any(not torch.equal(before[k], after[k]) for k in before), "the policy step changed no weight"
    state = json.loads((prepared.run_dir / "checkpoints/round_0001/state.json").read_text())
    assert state["policy_version"] == 1
    assert summary["final"]["eval/gold_score"] == rows[1]["eval/gold_score"]
    assert summary["gold_rise"]["end_se"] == rows[1]["eval/gold_score_se"]
    # Each phase's FLOPs and share of its processes' matmul ceiling; a pair method's (DPO's, IPO's) reference
    # log-probs are a phase of their own, and so is the policy's forward pass that measures logprob_diff.
    pairs = get_method(method).batch == "pairs"
    phases = ["generate", "score", "rm_step", "logprob_check", "policy_step", *(["logprobs"] if pairs else [])]
    assert all(rows[1][f"flops/{phase}"] > 0 and 0 < rows[1][f"efficiency/{phase}"] < 2 for phase in phases)
    assert rows[1]["flops/round"] == pytest.approx(sum(rows[1][f"flops/{phase}"] for phase in phases))
    assert rows[0]["ceiling/machine"] > 0
    # Ray's threads for a process of 1 CPU (the reference's 0.5 rounds up to 1) when learner.threads is unset.
    assert [rows[0][f"threads/{role}"] for role in ("policy", "reward", "reference", "rollout")] == [1, 1, 1, 1]


def test_an_ipo_round_trains_on_best_vs_worst_pairs(method_round):
    """IPO on the toy default config: the learner got the round's pairs (at most one per policy prompt) and
    reported IPO's loss on them, not DPO's: at the first step the policy is the reference, so every pair's
    log-ratio margin is 0 and the loss is (1 / (2 tau))^2."""
    prepared, _, rows = method_round("ipo")
    assert prepared.cfg.ipo.tau == 0.25 and prepared.cfg.policy.lr == 1e-4
    assert 0 < rows[1]["policy/pairs"] <= 16
    # One epoch of one minibatch: one step, from the reference's weights.
    assert rows[1]["policy/steps"] == 1
    assert rows[1]["policy/loss"] == pytest.approx((1 / (2 * 0.25)) ** 2, abs=1e-3)
    assert rows[1]["policy/rewards_margin"] == pytest.approx(0.0, abs=1e-3)


def test_fixed_rm_baseline_never_steps_the_rm(ray_cluster, tmp_path):
    prepared, _, rows = _play(tmp_path, "apo=false", "rollout.backend=hf", "learner.backend=torch")
    assert "rm/loss_apo" not in rows[1] and "rm/loss" not in rows[1]
    from transformers import AutoModelForSequenceClassification

    base = AutoModelForSequenceClassification.from_pretrained(prepared.run_dir / "checkpoints/base_reward").state_dict()
    final = AutoModelForSequenceClassification.from_pretrained(
        prepared.run_dir / "checkpoints/round_0001/reward"
    ).state_dict()
    assert all(torch.equal(base[k], final[k]) for k in base)


# Two rounds of the embedded default's stack on 2 threads a process, with the held-out evaluation in place or
# overlapping the next round (the default).
DEFAULT_STACK = ("rounds=2", "learner.threads=2", "rollout.threads=2")


@pytest.fixture(scope="module")
def overlapped_default_run(ray_cluster, tmp_path_factory):
    """The default stack's game, read by two tests below: starting its actors is most of its time."""
    return _play(tmp_path_factory.mktemp("overlapped"), *DEFAULT_STACK, "eval.overlap=true")


def test_default_stack_vllm_deepspeed_round(overlapped_default_run):
    """The embedded default's real components: vLLM rollouts and DeepSpeed ZeRO-2 learners on CPU, each process
    on the threads that learner.threads and rollout.threads give it rather than Ray's one per CPU."""
    prepared, _, rows = overlapped_default_run
    assert [r["round"] for r in rows] == [0, 1, 2]
    assert [rows[0][f"threads/{role}"] for role in ("policy", "reward", "reference", "rollout")] == [2, 2, 2, 2]
    assert rows[1]["sync/workers"] == 1 and rows[1]["rollout/tokens"] > 0
    # Round 0 was evaluated during round 1 (eval.overlap), with eval/kl from vLLM's float32 log-probs: at
    # round 0 the policy is the reference, so they must agree with the reference learner's.
    assert rows[0]["eval/kl"] == pytest.approx(0.0, abs=1e-4) and rows[0]["timing/evaluate"] >= 0
    assert rows[1]["rollout/logprob_diff"] < 1e-4 and rows[1]["rollout/logprob_diff_max"] < 1e-2
    assert (prepared.run_dir / "checkpoints/round_0001/engine_policy").is_dir()
    # Every key the embedded default logs has its entry in the metric catalog (docs/metrics.md).
    assert not {key for row in rows for key in row if key != "step" and lookup(key) is None}


def test_an_overlapped_evaluation_gives_the_figures_of_one_in_place(overlapped_default_run, tmp_path):
    """eval.overlap moves round r's evaluation into round r+1 (a frozen copy of the RM, samples drawn on the
    weights the pool still holds, scored in pieces while the policy trains); the rows must not change."""
    keys = (
        "eval/gold_score",
        "eval/gold_score_se",
        "eval/rm_score",
        "eval/kl",
        "rm/acc",
        "rm/ece",
        "rm/acc_policy",
        "rm/reward_gold",
        "eval/samples",
    )
    in_place_run = _play(tmp_path, *DEFAULT_STACK, "eval.overlap=false")
    runs = {
        overlap: [{key: row[key] for key in keys} for row in rows]
        for overlap, (_, _, rows) in ((True, overlapped_default_run), (False, in_place_run))
    }
    assert [row["eval/samples"] for row in runs[True]] == [24, 24, 24]
    for overlapped, in_place in zip(runs[True], runs[False]):
        assert overlapped == pytest.approx(in_place, rel=1e-5, abs=1e-6)
