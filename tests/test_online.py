"""Online APO (apo_ray.online): prompt cursor, advantages per method, the critic and the PPO step on tiny
models in-process, and whole PPO / GRPO / REINFORCE++ iterations on a local Ray cluster."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import pytest
import ray
import torch
from safetensors.torch import load_file

from apo_ray.actors.critic import CriticLearner
from apo_ray.actors.policy import PolicyLearner
from apo_ray.batching import iteration_prompt_indices
from apo_ray.builtin.models import make_policy_model, make_reward_model, make_tokenizer
from apo_ray.builtin.oracle import format_prompt
from apo_ray.checkpoint import Checkpointer
from apo_ray.config import ConfigError, LearnerConfig, ModelConfig, PolicyConfig, PPOConfig, load_config
from apo_ray.driver import APOGame
from apo_ray.methods import get_method
from apo_ray.modeling import encode_samples, load_tokenizer, text_samples
from apo_ray.ppo import TokenGrids, concat_right_padded
from tests.conftest import SMALL_EVAL

PROMPTS = [format_prompt("river", "night"), format_prompt("castle", "rain")]
RESPONSES = ["the river is calm and bright", "the castle looks grim"]
MODEL = ModelConfig(max_prompt_tokens=16, max_response_tokens=12)
TORCH = LearnerConfig(backend="torch", grad_clip=0.0)


def test_prompt_cursor_uses_every_prompt_once_per_pass_and_is_reproducible():
    first_pass = [k for i in (1, 2, 3) for k in iteration_prompt_indices(12, 4, i, seed=7)]
    assert sorted(first_pass) == list(range(12))
    # Iteration 4 starts the second pass, iteration 5 straddles nothing: 12 is a multiple of 4.
    second_pass = [k for i in (4, 5, 6) for k in iteration_prompt_indices(12, 4, i, seed=7)]
    assert sorted(second_pass) == list(range(12)) and second_pass != first_pass
    assert iteration_prompt_indices(12, 4, 5, seed=7) == iteration_prompt_indices(12, 4, 5, seed=7)
    assert iteration_prompt_indices(12, 4, 1, seed=8) != iteration_prompt_indices(12, 4, 1, seed=7)
    # A slice that crosses the end of a pass takes the rest of that pass, then the start of the next.
    straddling = iteration_prompt_indices(5, 3, 2, seed=0)
    assert straddling[:2] == iteration_prompt_indices(5, 5, 1, seed=0)[3:]
    with pytest.raises(ValueError, match="must be >= 1"):
        iteration_prompt_indices(5, 3, 0, seed=0)


def test_concat_right_padded():
    joined = concat_right_padded([torch.tensor([[1, 2]]), torch.tensor([[3, 4, 5], [6, 7, 8]])])
    assert joined.tolist() == [[1, 2, 0], [3, 4, 5], [6, 7, 8]]


def grids(logps, ref_logps, mask, values=None) -> TokenGrids:
    t = lambda x: None if x is None else torch.tensor(x, dtype=torch.float32)  # noqa: E731
    return TokenGrids(logps=t(logps), ref_logps=t(ref_logps), mask=torch.tensor(mask), values=t(values))


def assert_grid(actual: torch.Tensor, expected: list[list[float]], atol: float) -> None:
    torch.testing.assert_close(actual, torch.tensor(expected), atol=atol, rtol=0)


def test_ppo_advantages_gae_with_kl_in_the_rewards_by_hand():
    # One prompt token (masked), two response tokens, KL 0.5 per token, coefficient 0.1:
    # rewards [-0.05, 1 - 0.05]; values [0.2, 0.4]; gamma = lambda = 1.
    #   t=2: delta = 0.95 - 0.4 = 0.55            -> A = 0.55, R = 0.95
    #   t=1: delta = -0.05 + 0.4 - 0.2 = 0.15     -> A = 0.70, R = 0.90
    g = grids([[0.0, -1.0, -1.0]], [[0.0, -1.5, -1.5]], [[0, 1, 1]], values=[[9.0, 0.2, 0.4]])
    ppo = PPOConfig(gamma=1.0, lam=1.0, kl_estimator="k1", whiten_advantages=False)
    advantages, returns = get_method("ppo").advantages(torch.tensor([1.0]), g, ppo=ppo, kl_coef=0.1)
    assert_grid(advantages, [[0.0, 0.70, 0.55]], atol=1e-6)
    assert_grid(returns, [[0.0, 0.90, 0.95]], atol=1e-6)
    whitened, _ = get_method("ppo").advantages(torch.tensor([1.0]), g, ppo=PPOConfig(gamma=1.0, lam=1.0), kl_coef=0.1)
    assert_grid(whitened, [[0.0, 1.0, -1.0]], atol=1e-4)


def test_reinforce_pp_whitens_returns_over_the_batch():
    # No KL (identical log-probs): returns are the score on every token, +1 and -1; whitening keeps them.
    g = grids([[-1.0, -1.0], [-1.0, -1.0]], [[-1.0, -1.0], [-1.0, -1.0]], [[1, 1], [1, 1]])
    advantages, returns = get_method("reinforce_pp").advantages(
        torch.tensor([3.0, 1.0]), g, ppo=PPOConfig(), kl_coef=0.5
    )
    assert returns is None
    assert_grid(advantages, [[1.0, 1.0], [-1.0, -1.0]], atol=1e-4)


def test_grpo_broadcasts_group_normalised_scores_and_ignores_kl_in_the_rewards():
    g = grids([[-1.0, -1.0]] * 4, [[-3.0, -3.0]] * 4, [[1, 1], [1, 0], [1, 1], [1, 1]])
    advantages, returns = get_method("grpo").advantages(
        torch.tensor([1.0, 3.0, 5.0, 5.0]),
        g,
        ppo=PPOConfig(),
        kl_coef=1.0,
        group_ids=torch.tensor([0, 0, 1, 1]),
    )
    a = 1 / math.sqrt(2)  # (score - mean) / sample std, with mean 2 and std sqrt(2)
    assert returns is None
    assert_grid(advantages, [[-a, -a], [a, 0.0], [0.0, 0.0], [0.0, 0.0]], atol=1e-5)


def test_advantages_refuse_missing_inputs_and_only_online_methods_have_them():
    g = grids([[-1.0]], [[-1.0]], [[1]])
    assert get_method("dpo").advantages is None and get_method("ipo").advantages is None
    with pytest.raises(ValueError, match="critic's values"):
        get_method("ppo").advantages(torch.tensor([1.0]), g, ppo=PPOConfig(), kl_coef=0.1)
    with pytest.raises(ValueError, match="group_ids"):
        get_method("grpo").advantages(torch.tensor([1.0]), g, ppo=PPOConfig(), kl_coef=0.1)


CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def test_ppo_and_apo_ppo_configs_differ_only_in_the_rm_steps():
    plain, apo = (load_config(CONFIGS / name).to_dict() for name in ("ppo.yaml", "apo_ppo.yaml"))
    assert plain.pop("apo") is False and apo.pop("apo") is True
    # The APO RM step's keys are read, and saved, only with apo=true.
    assert apo["reward"].pop("update_every") == 5
    for key in ("apo_coef", "apo_normalization", "epochs_per_round", "reinit_each_round", "apo_inert_share"):
        apo["reward"].pop(key)
    assert plain == apo


def test_gpu_recipe_loads_with_a_critic_that_can_start_from_the_rm():
    cfg = load_config(CONFIGS / "hh_qwen2.5_0.5b_apo_ppo_gpu.yaml")
    assert cfg.method == "ppo" and cfg.apo and cfg.data.task == "files"
    assert cfg.ppo.critic_init == "reward" and cfg.model.reward_path == cfg.model.policy_path


def test_apo_without_rm_steps_is_refused():
    with pytest.raises(ConfigError, match="reward.update_every: 0 never steps the RM"):
        load_config(None, ["method=ppo", "apo=true", "reward.update_every=0"])


@pytest.mark.parametrize(
    "old, new",
    [
        ("ppo.iterations=5", "rounds"),
        ("ppo.rm_update_every=2", "reward.update_every"),
        ("ppo.eval_every=2", "eval_every"),
        ("ppo.checkpoint_every=2", "checkpoint_every"),
    ],
)
def test_keys_of_the_separate_online_loop_name_their_new_place(old, new):
    with pytest.raises(ConfigError, match=f"{old.split('=')[0]}: renamed to {new}"):
        load_config(None, ["method=ppo", old])


# ------------------------------------------------------------------------------ learners, in-process


@pytest.fixture(autouse=True)
def one_torch_thread():
    """The in-process learners' tiny models gain nothing from threads; on a busy 2-core machine two
    threads ran these tests about 15 times slower than one (measured: 18 s vs 1 s)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory) -> tuple[str, str]:
    """An untrained builtin-task policy and RM sharing one word-level tokenizer."""
    root = tmp_path_factory.mktemp("online_models")
    tokenizer = make_tokenizer()
    return str(make_policy_model(root / "policy", tokenizer)), str(make_reward_model(root / "reward", tokenizer))


def samples_of(model_dir: str, responses: list[str] = RESPONSES):
    """PROMPTS with `responses` as token samples under the model's tokenizer."""
    return text_samples(
        load_tokenizer(model_dir), PROMPTS, responses, MODEL.max_prompt_tokens, MODEL.max_response_tokens
    )


def test_critic_from_the_rm_values_each_prefix_with_the_rm_score(tiny_models):
    policy_dir, reward_dir = tiny_models
    critic = CriticLearner(reward_dir, tokenizer_path=policy_dir, model=MODEL, ppo=PPOConfig(), learner=TORCH)
    samples = samples_of(policy_dir)
    values, mask = critic.values(samples)
    assert values.shape == mask.shape
    ids = encode_samples(samples[:1], critic.tokenizer.pad_token_id).input_ids
    with torch.no_grad():
        # Column t is the state that emits token t+1: the RM's score of the first t+1 tokens.
        for t in (0, 5, int(mask[0].nonzero()[-1])):
            rm_score = critic.model(input_ids=ids[:, : t + 1]).logits[0, 0].item()
            assert values[0, t].item() == pytest.approx(rm_score, abs=1e-5)


def test_critic_regresses_towards_the_returns(tiny_models):
    policy_dir, _ = tiny_models
    ppo = PPOConfig(ppo_epochs=8, minibatch_size=1, critic_lr=1e-2, value_clip_eps=10.0)
    critic = CriticLearner(policy_dir, tokenizer_path=policy_dir, model=MODEL, ppo=ppo, learner=TORCH)
    samples = samples_of(policy_dir)
    values, mask = critic.values(samples)
    returns = torch.full_like(values, 2.0) * mask
    error = lambda v: ((v - returns).abs() * mask).sum() / mask.sum()  # noqa: E731
    stats = critic.value_step(samples, values, returns, mask, seed=0)
    assert stats["critic/steps"] == 16 and stats["critic/loss"] > 0
    assert error(critic.values(samples)[0]) < 0.5 * error(values)


def test_critic_refuses_a_model_with_another_tokenizer(tiny_models, tiny_lm_dir):
    policy_dir, _ = tiny_models
    with pytest.raises(ValueError, match="ppo.critic_init: the model at .* has another tokenizer"):
        CriticLearner(tiny_lm_dir, tokenizer_path=policy_dir, model=MODEL, ppo=PPOConfig(), learner=TORCH)


def test_ppo_step_raises_the_advantaged_response_and_lowers_the_other(tiny_models):
    policy_dir, _ = tiny_models
    policy = PolicyLearner(policy_dir, model=MODEL, policy=PolicyConfig(lr=3e-3), learner=TORCH)
    samples = samples_of(policy_dir)
    before = policy.sequence_logprobs(samples)
    old_logps, mask = policy.token_logprobs(samples)
    advantages = torch.tensor([[1.0], [-1.0]]) * mask
    ppo = PPOConfig(ppo_epochs=4, minibatch_size=1, clip_eps=0.2)
    stats = policy.ppo_step(samples, old_logps, advantages, mask, ppo=ppo, seed=0)
    after = policy.sequence_logprobs(samples)
    assert after[0] > before[0] and after[1] < before[1]
    assert stats["policy/steps"] == 8 and 0 < stats["policy/clipfrac"] <= 1 and stats["policy/entropy"] > 0
    with pytest.raises(RuntimeError, match="response positions differ"):
        policy.ppo_step(samples[::-1], old_logps, advantages, mask, ppo=ppo, seed=0)


def test_grpo_kl_loss_pulls_the_policy_back_to_the_reference(tiny_models):
    policy_dir, _ = tiny_models
    policy = PolicyLearner(policy_dir, model=MODEL, policy=PolicyConfig(lr=3e-3), learner=TORCH)
    samples = samples_of(policy_dir)
    old_logps, mask = policy.token_logprobs(samples)
    # Zero advantages: only the KL term acts, towards a reference that likes these responses more.
    ref_logps = old_logps + 0.5 * mask
    ppo = PPOConfig(ppo_epochs=4, minibatch_size=2, kl_estimator="k3")
    stats = policy.ppo_step(
        samples, old_logps, torch.zeros_like(old_logps), mask, ppo=ppo, seed=0, ref_logps=ref_logps, kl_loss_coef=1.0
    )
    new_logps, _ = policy.token_logprobs(samples)
    assert ((new_logps - old_logps) * mask).sum() > 0 and stats["policy/kl_loss"] > 0


# ------------------------------------------------------------------------------ whole iterations on Ray

SMALL_RUN = [
    "samples_per_prompt=2",
    "rollout.backend=vllm",
    "learner.backend=deepspeed",
    # 3 learners at 0.5 CPU, the reference and one rollout worker fit the fixture's 4 logical CPUs.
    "learner.num_cpus=0.5",
    "data.builtin.n_pairs=48",
    "data.builtin.n_gold=6",
    "data.builtin.n_prompts=16",
    "data.builtin.n_eval_pairs=16",
    "reward.initial_epochs=1",
    "reward.batch_size=16",
    "rounds=2",
    "ppo.prompts_per_iteration=6",
    "ppo.minibatch_size=6",
    "ppo.ppo_epochs=1",
    "eval_every=2",
    "checkpoint_every=1",
    *SMALL_EVAL,
]


@pytest.fixture(scope="module")
def online_actors(ray_cluster, tmp_path_factory):
    """One set of actors for every game below, since starting actors is most of their time: a vLLM
    rollout worker, DeepSpeed learners and (method ppo) a critic, on a shrunken builtin task."""
    from apo_ray.cluster import shutdown_actors, start_actors
    from apo_ray.train import prepare

    cfg = load_config(None, [*SMALL_RUN, "method=ppo", f"run_dir={tmp_path_factory.mktemp('online') / 'run'}"])
    prepared = prepare(cfg)
    actors = start_actors(cfg, prepared.policy_path, prepared.reward_path)
    yield prepared, actors
    shutdown_actors(actors)


def play(
    online_actors,
    run_dir: Path,
    *overrides: str,
    without_critic: bool = False,
    first_round: int = 0,
    log=lambda line: None,
    watch=lambda game: None,
) -> list[dict]:
    """Run an online game (from iteration `first_round`) on the shared actors; return its metrics rows.
    `log` gets the game's log lines; `watch(game)` runs before the game starts."""
    from apo_ray.metrics import MetricsLogger, read_metrics_jsonl

    prepared, actors = online_actors
    if without_critic:
        actors = dataclasses.replace(actors, critic=None)
    cfg = load_config(None, [*SMALL_RUN, f"run_dir={run_dir}", *overrides])
    with MetricsLogger(run_dir, tensorboard=False, ray_metrics=False) as logger:
        game = APOGame(cfg, prepared.data, actors, logger, Checkpointer(run_dir), prepared.oracle, log=log)
        game.version = actors.pool.version  # the workers' weights version, as on a resumed run
        watch(game)
        game.run(first_round)
    return read_metrics_jsonl(run_dir / "metrics.jsonl")


def checksums(pool) -> list[float]:
    return ray.get([worker.weights_checksum.remote() for worker in pool.workers])


def assert_flops_of_a_ppo_iteration(logged: list[dict]) -> None:
    """Round 0 logs each process's matmul ceiling; every iteration logs each phase's FLOPs and its share of the
    ceiling, and the phases' counts agree with one another: the log-prob phase runs the policy, the reference
    (the same shape) and the critic over the samples once, and each of ppo_epochs training passes runs the
    policy's and the critic's forward over them once more, at 3x its FLOPs."""
    epochs = load_config(None, ["method=ppo", *SMALL_RUN]).ppo.ppo_epochs
    assert all(
        logged[0][f"ceiling/{role}"] > 0 for role in ("machine", "rollout", "policy", "reference", "reward", "critic")
    )
    phases = ("generate", "score", "logprobs", "policy_step", "critic_step", "rm_step")
    for row in logged[1:]:
        assert all(row[f"flops/{phase}"] > 0 for phase in phases)
        assert all(0 < row[f"efficiency/{phase}"] < 2 for phase in phases)
        assert row["flops/round"] == pytest.approx(sum(row[f"flops/{phase}"] for phase in phases))
        policy_forward = row["flops/policy_step"] / (3 * epochs)
        critic_forward = row["flops/critic_step"] / (3 * epochs)
        assert row["flops/logprobs"] == pytest.approx(2 * policy_forward + critic_forward, rel=1e-9)


@pytest.mark.integration
def test_apo_ppo_steps_the_rm_between_ppo_iterations_and_syncs_the_workers(online_actors, tmp_path):
    pool = online_actors[1].pool
    initial_checksums = checksums(pool)
    settings = ("method=ppo", "apo=true", "reward.update_every=1", "ppo.adaptive_kl=true", "ppo.kl_horizon=10")
    logged = play(online_actors, tmp_path, *settings)
    assert pool.versions() == [2]
    assert all(a != b for a, b in zip(checksums(pool), initial_checksums))

    checkpoints = tmp_path / "checkpoints"
    fitted = load_file(checkpoints / "base_reward" / "model.safetensors")
    final = load_file(checkpoints / "round_0002" / "reward" / "model.safetensors")
    assert any(not torch.equal(fitted[name], final[name]) for name in fitted)
    for r in (1, 2):
        assert (checkpoints / f"round_{r:04d}" / "critic" / "model.safetensors").is_file()
        assert "kl_coef" in json.loads((checkpoints / f"round_{r:04d}" / "state.json").read_text())

    assert [row["step"] for row in logged] == [0, 1, 2] and [row["round"] for row in logged] == [0, 1, 2]
    for row in logged[1:]:
        for key in (
            "policy/kl",
            "policy/clipfrac",
            "policy/entropy",
            "policy/reward_mean",
            "policy/loss",
            "critic/loss",
            "critic/values",
            "rollout/policy_version_lag",
            "rm/loss_apo",
            "timing/policy_step",
            "rollout/logprob_diff",
            "policy/tis_weight_mean",
            "rollout/truncated_fraction",
        ):
            assert key in row, key
        assert row["rollout/policy_version_lag"] == 0  # the loop is synchronous: every sample is on-policy
        # fp32 vLLM against fp32 learners: the importance weights are 1 up to rounding.
        assert row["rollout/logprob_diff"] < 1e-4 and row["policy/tis_weight_mean"] == pytest.approx(1.0, abs=1e-3)
    assert "eval/gold_score" in logged[2] and "eval/gold_score" not in logged[1]
    assert_flops_of_a_ppo_iteration(logged)

    # Resumed after iteration 2 for a third: the learners' states and the adapted KL coefficient come back.
    saved = Checkpointer(tmp_path).restore(2, online_actors[1])
    assert saved["kl_coef"] != logged[2]["policy/kl_coef"]  # it moved after iteration 2
    resumed = play(online_actors, tmp_path, *settings, "rounds=3", first_round=3)
    assert [row["step"] for row in resumed] == [0, 1, 2, 3]
    assert resumed[3]["policy/kl_coef"] == pytest.approx(saved["kl_coef"])


@pytest.mark.integration
@pytest.mark.parametrize("method", ["grpo", "reinforce_pp"])
def test_critic_free_methods_run_without_a_critic_actor(online_actors, tmp_path, method):
    pool = online_actors[1].pool
    before = checksums(pool)
    logged = play(
        online_actors, tmp_path, f"method={method}", "apo=false", "rounds=1", "eval_every=1", without_critic=True
    )
    assert all(a != b for a, b in zip(checksums(pool), before))
    assert not (tmp_path / "checkpoints" / "round_0001" / "critic").exists()
    last = logged[-1]
    assert last["step"] == 1 and "policy/clipfrac" in last and "eval/gold_score" in last
    assert "critic/loss" not in last and "rm/loss_apo" not in last
    assert ("policy/kl_loss" in last) == (method == "grpo")


def sampler_logprob_gap(rollouts, policy_dir: str) -> float:
    """Mean per-token |sampler - policy| log-prob of the rollouts' tokens under the policy saved at `policy_dir`
    (the real PolicyLearner, in-process)."""
    from apo_ray.ppo import logprob_mismatch

    learner = PolicyLearner(policy_dir, model=MODEL, policy=PolicyConfig(), learner=TORCH)
    logps, mask = learner.token_logprobs([x.tokens for x in rollouts])
    return logprob_mismatch(APOGame.sampler_grid(rollouts, logps.shape[1]), logps, mask)["rollout/logprob_diff"]


@pytest.mark.integration
def test_async_grpo_samples_one_version_behind_while_the_pool_grows_and_shrinks(online_actors, tmp_path):
    """ppo.async_rollouts: round r trains on samples made with the weights of round r-2 (lag 1 from round 2);
    every rollout carries the version whose checkpoint reproduces its sampler log-probs. Meanwhile
    rollout.schedule grows the pool to 2 workers for round 2, and an `apo-ray resize` request made as round 2
    starts shrinks it back for round 3; every prompt is answered once throughout."""
    from apo_ray.pool_size import REQUEST_FILE, write_resize_request

    pool = online_actors[1].pool
    pool.sync_from(online_actors[1].policy, 0)  # the game starts from version 0
    lines, taken = [], {}

    def log(line: str) -> None:
        lines.append(line)
        if line == "[round 2/3] generate":
            write_resize_request(tmp_path, 1)

    def watch(game) -> None:
        take = game.sampler.take

        def recording_take(r, stats):
            taken[r] = (take(r, stats), game.policy_step.prompts(r))
            return taken[r][0]

        game.sampler.take = recording_take

    rows = play(
        online_actors,
        tmp_path,
        "method=grpo",
        "apo=true",
        "rounds=3",
        "ppo.async_rollouts=true",
        "rollout.schedule={2: 2}",
        without_critic=True,
        log=log,
        watch=watch,
    )
    assert [row.get("rollout/policy_version_lag") for row in rows] == [None, 0, 1, 1]
    assert [row["rollout/num_workers"] for row in rows] == [1, 1, 2, 1]
    # Asynchronous: round r's samples are asked for during round r-1, and the pool is sized for them then.
    assert lines.index("  rollout pool: 1 -> 2 workers for round 2's samples (rollout.schedule)") < lines.index(
        "[round 1/3] rm_step"
    )
    assert lines.index("  rollout pool: 2 -> 1 workers for round 3's samples (apo-ray resize request)") < lines.index(
        "[round 2/3] rm_step"
    )
    assert not (tmp_path / REQUEST_FILE).exists() and pool.num_workers == 1

    prepared, samples_per_prompt = online_actors[0], 2
    gold_prompts = [g.prompt for g in prepared.data.gold]
    checkpoints = tmp_path / "checkpoints"
    for r, sampled_by in [(1, 0), (2, 0), (3, 1)]:
        samples, policy_prompts = taken[r]
        assert [x.prompt for x in samples.policy] == [p for p in policy_prompts for _ in range(samples_per_prompt)]
        assert [x.prompt for x in samples.gold] == [p for p in gold_prompts for _ in range(samples_per_prompt)]
        everything = samples.policy + samples.gold
        assert {x.policy_version for x in everything} == {sampled_by}
        assert {x.worker for x in everything} == ({0, 1} if r == 2 else {0})
        # The version a rollout names is the one that sampled it: that round's policy checkpoint gives its
        # sampler log-probs back (fp32 both sides), the next round's does not.
        own = sampler_logprob_gap(everything, str(checkpoints / f"round_{sampled_by:04d}" / "policy"))
        later = sampler_logprob_gap(everything, str(checkpoints / f"round_{sampled_by + 1:04d}" / "policy"))
        assert own < 1e-4 < later, (r, own, later)
