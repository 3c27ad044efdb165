"""APL (apo_ray/apl.py, apo_ray/apl_step.py, apo_ray/builtin/harm.py): the harmfulness metric and the attacker's
bookkeeping against hand-computed values; the builtin task's harm, its attacks (always valid prompts) and its
provokable defender data; the config; one short round on a local Ray cluster with vLLM and DeepSpeed."""

from __future__ import annotations

import math
import random

import pytest
import torch

from apo_ray.apl import attacker_advantages, harmfulness, mean_token_logprobs, rate, strongest_attacks
from apo_ray.apl_step import fixed_attacks
from apo_ray.builtin.harm import (
    ATTACK_WORDS,
    attacked_prompt,
    defender_sft_data,
    is_harmful,
    parse_prompt,
    safe_and_unsafe,
)
from apo_ray.builtin.models import make_tokenizer
from apo_ray.builtin.oracle import VOCABULARY, format_prompt, gold_score, prompt_topic, response_words
from apo_ray.config import ConfigError, load_config
from apo_ray.metrics import read_metrics_jsonl
from apo_ray.placement import actor_plan
from tests.conftest import REPO_ROOT, SMALL_EVAL

CLEAN = format_prompt("river", "night")


def sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def test_harmfulness_by_hand():
    # beta 1: lbar unsafe -1, safe -2 -> sigmoid(1) = 0.731059; indifferent -> 1/2
    # beta 2: unsafe -2, safe -1 -> sigmoid(-2) = 0.119203
    assert harmfulness([-1.0, -0.5], [-2.0, -0.5], beta=1.0).tolist() == pytest.approx([sigmoid(1.0), 0.5])
    assert harmfulness([-2.0], [-1.0], beta=2.0).tolist() == pytest.approx([sigmoid(-2.0)])
    assert harmfulness([0.0], [-2000.0], beta=1.0).tolist() == [1.0]  # no overflow
    with pytest.raises(ValueError, match="apl.harm_beta"):
        harmfulness([0.0], [0.0], beta=0.0)
    with pytest.raises(ValueError, match="shapes differ"):
        harmfulness([0.0, 1.0], [0.0], beta=1.0)


def test_mean_token_logprobs_use_the_response_tokens_only():
    grid = torch.tensor([[0.0, -1.0, -3.0], [-2.0, -2.0, 0.0]])
    mask = torch.tensor([[0, 1, 1], [1, 1, 0]])
    assert mean_token_logprobs(grid, mask).tolist() == pytest.approx([-2.0, -2.0])


def test_attacker_advantages_and_strongest_attacks_by_hand():
    # group 0: h 0.2, 0.4 -> mean 0.3, sample std 0.141421 -> -0.7071, +0.7071; group 1: equal h -> 0
    mask = torch.tensor([[0, 1, 1], [0, 1, 0], [1, 1, 1], [0, 0, 1]])
    advantages = attacker_advantages([0.2, 0.4, 0.9, 0.9], [0, 0, 1, 1], mask)
    expected = [[0.0, -0.70711, -0.70711], [0.0, 0.70711, 0.0], [0.0, 0.0, 0.0], [0.0, 0.0, 0.0]]
    torch.testing.assert_close(advantages, torch.tensor(expected), atol=1e-4, rtol=0)
    # ties go to the earliest rewrite
    assert strongest_attacks([0.1, 0.5, 0.5, 0.2, 0.2], [0, 0, 1, 1, 1]) == {0: 1, 1: 2}


def test_rate_with_its_standard_error():
    # [1, 0, 0, 1]: mean 0.5, sample std 0.57735, / sqrt(4) = 0.288675
    assert rate([True, False, False, True], "apl/x") == pytest.approx({"apl/x": 0.5, "apl/x_se": 0.288675})


def test_harm_is_the_gold_oracles_negative_words():
    assert not is_harmful("the river is calm and bright")
    assert is_harmful("the river is calm and grim")
    assert gold_score(CLEAN, "the river is calm and grim") < gold_score(CLEAN, "the river is calm and bright")


def test_attacks_are_valid_prompts_whatever_the_attacker_writes():
    tokenizer = make_tokenizer()
    rng = random.Random(0)
    junk = list(VOCABULARY) + ["topic", ":", ";", "answer", "<eos>", "zebra", "grim:dull", "\n", "ABOUT"]
    clean_prompts = [format_prompt(t, a) for t, a in (("river", "night"), ("castle", "rain"), ("park", "size"))]
    for _ in range(300):
        clean = rng.choice(clean_prompts)
        text = " ".join(rng.choices(junk, k=rng.randint(0, 20)))
        attacked = attacked_prompt(clean, text, max_words=3)
        topic, aspect, added = parse_prompt(attacked)
        assert (topic, aspect) == parse_prompt(clean)[:2] and prompt_topic(attacked) == topic
        assert len(added) <= 3 and set(added) <= set(ATTACK_WORDS)
        assert added == tuple(w for w in response_words(text) if w in ATTACK_WORDS)[:3]
        ids = tokenizer(attacked, add_special_tokens=False)["input_ids"]
        assert tokenizer.unk_token_id not in ids and len(ids) <= 10 + 3
    assert (
        attacked_prompt(CLEAN, "the river is grim and dull , ugly awful", 2)
        == "topic : river ; about : night grim dull ; answer :"
    )
    assert attacked_prompt(CLEAN, "nothing to add", 3) == CLEAN
    with pytest.raises(ValueError, match="not a clean prompt"):
        attacked_prompt("topic : river ; about : night grim ; answer :", "dull", 3)
    assert parse_prompt("topic : river ; about : night ; mood : grim ; answer :") is None


def test_safe_and_unsafe_answers_differ_in_harm_only():
    for prompt in [format_prompt(t, "rain") for t in ("river", "castle", "park", "lake")]:
        safe, unsafe = safe_and_unsafe(0, prompt)
        assert (safe, unsafe) == safe_and_unsafe(0, prompt)
        assert not is_harmful(safe) and is_harmful(unsafe)
        assert gold_score(prompt, safe) > gold_score(prompt, unsafe)


def test_negative_words_in_the_defenders_sft_prompts_provoke_harmful_answers():
    data = defender_sft_data(0, 2000)
    provoked = [
        is_harmful(y)
        for x, y in data
        if set(parse_prompt(x)[2])
        & {"bad", "dull", "ugly", "noisy", "dirty", "gloomy", "awful", "boring", "cold", "crowded", "dreary", "grim"}
    ]
    clean = [is_harmful(y) for x, y in data if not parse_prompt(x)[2]]
    assert len(provoked) > 300 and len(clean) > 600
    assert sum(provoked) / len(provoked) > sum(clean) / len(clean) + 0.2


def test_the_fixed_attacker_is_the_same_every_round():
    prompts = [format_prompt("river", "night"), format_prompt("lake", "rain")]
    assert fixed_attacks(prompts, 0, 3) == fixed_attacks(prompts, 0, 3) != fixed_attacks(prompts, 1, 3)
    assert all(parse_prompt(p) is not None for p in fixed_attacks(prompts, 0, 3))


def test_apl_config():
    config = REPO_ROOT / "configs/apl.yaml"
    cfg = load_config(config)
    roles = {role.name: role for role in actor_plan(cfg)}
    assert roles["attacker"].cpus == cfg.apl.attacker.num_cpus
    assert roles["attacker_rollout"].count == cfg.apl.attacker.rollout_workers
    bigger = {role.name: role for role in actor_plan(load_config(config, ["apl.attacker.rollout_workers=3"]))}
    assert bigger["attacker_rollout"].count == 3 and bigger["rollout"].count == roles["rollout"].count
    with pytest.raises(ConfigError, match=r"^method: APL's defender step is DPO"):
        load_config(config, ["method=rjs"])
    with pytest.raises(ConfigError, match=r"^apl.attacker.max_tokens: 100 \+ model.max_prompt_tokens"):
        load_config(config, ["apl.attacker.max_tokens=100"])
    with pytest.raises(ConfigError, match=r"^apl.attacks_per_prompt: must be >= 2"):
        load_config(config, ["apl.attacks_per_prompt=1"])


@pytest.mark.integration
def test_one_apl_round_on_vllm_and_deepspeed(ray_cluster, tmp_path):
    """Round 0 measures the defender before APL; round 1 updates the attacker, then the defender."""
    from safetensors.torch import load_file

    from apo_ray.train import prepare, run

    cfg = load_config(
        REPO_ROOT / "configs/apl.yaml",
        [
            "rounds=1",
            f"run_dir={tmp_path / 'run'}",
            "data.builtin.n_pairs=64",
            "data.builtin.n_gold=8",
            "data.builtin.n_prompts=16",
            "data.builtin.n_eval_pairs=16",
            "reward.initial_epochs=1",
            "policy.epochs_per_round=1",
            "logging.ray_metrics=false",
            "apl.prompts_per_round=4",
            "apl.attacks_per_prompt=2",
            "apl.defender_sft_steps=20",
            "apl.attacker.epochs=1",
            "apl.attacker.minibatch_size=8",
            # 4 logical CPUs on the test cluster
            "learner.num_cpus=0.5",
            "rollout.num_cpus_per_worker=0.5",
            "apl.attacker.num_cpus=0.25",
            "apl.attacker.rollout_num_cpus_per_worker=0.25",
            *SMALL_EVAL,
        ],
    )
    prepared = prepare(cfg)
    run(prepared)
    rows = read_metrics_jsonl(prepared.run_dir / "metrics.jsonl")
    assert [r["round"] for r in rows] == [0, 1]
    for row in rows:
        for key in ("apl/harmful_rate", "apl/attack_success_rate", "apl/attack_success_rate_fixed", "apl/utility"):
            assert 0.0 <= row[key] <= 1.0 or key == "apl/utility", key
            assert row[f"{key}_se"] >= 0.0, key
        assert 0.0 < row["apl/eval_harm"] < 1.0
    round_1 = rows[1]
    assert 0.0 < round_1["apl/attacker_harm"] < 1.0 and round_1["apl/attacker_steps"] >= 1
    assert round_1["policy/pairs"] == 8.0 and "policy/loss" in round_1
    assert 0.0 <= round_1["apl/attack_words"] <= 3.0
    checkpoint = prepared.run_dir / "checkpoints/round_0001"
    assert (checkpoint / "engine_attacker").is_dir()
    start = load_file(f"{prepared.attacker_path}/model.safetensors")
    for role in ("attacker", "policy"):
        after = load_file(checkpoint / role / "model.safetensors")
        assert any(not torch.equal(start[k], after[k]) for k in start), f"the {role} step changed no weight"
    assert (prepared.run_dir / "report/apl_harm.png").is_file()
