"""TrainEngine under DeepSpeed at every ZeRO stage: a non-finite gradient is refused before it reaches the
weights (and a run meeting one exits 3), and what the learners save or reload (round checkpoints, the base
RM, engine state) holds the whole model even where ZeRO-3 partitions it. The engines run in this process on
a single-rank gloo group."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from apo_ray.actors.engine import TrainEngine
from apo_ray.config import LearnerConfig, RewardConfig
from apo_ray.game import PreferencePair
from apo_ray.train import main
from tests.conftest import REPO_ROOT, SMALL_EVAL, minilm_tokenizer_dir

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("restored_environment")]

STAGES = [0, 1, 2, 3]


class NaNGradient(torch.autograd.Function):
    """The identity forward, a NaN gradient backward: a finite loss whose gradient is not."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return torch.full_like(grad, float("nan"))


def two_layers() -> torch.nn.Module:
    # 512 x 512 is over ZeRO-3's persistence threshold (1e5 elements): stage 3 really partitions it.
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(512, 512), torch.nn.Linear(512, 1))


def deepspeed_engine(model: torch.nn.Module, stage: int) -> TrainEngine:
    return TrainEngine(
        model, backend="deepspeed", lr=0.01, zero_stage=stage, grad_clip=1.0, weight_decay=0.0, micro_batch_size=2
    )


def assert_partitioned_at_stage_3(model: torch.nn.Module, stage: int) -> None:
    """The premise of a ZeRO-3 test: some weight is not on the rank until gathered."""
    empty = [name for name, p in model.named_parameters() if p.data.numel() == 0]
    assert bool(empty) == (stage == 3), empty


def assert_same_tensors(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert sorted(got) == sorted(want)
    for name, tensor in want.items():
        assert tensor.numel() > 0, f"{name} is empty"
        assert torch.equal(got[name], tensor), name


@pytest.mark.parametrize("stage", STAGES)
def test_a_nan_gradient_of_a_finite_loss_is_refused_and_the_weights_stay(stage):
    engine = deepspeed_engine(two_layers(), stage)
    assert_partitioned_at_stage_3(engine.model, stage)
    before = engine.full_state_dict()
    x = torch.ones(2, 512)
    loss = NaNGradient.apply(engine.module(x)).sum()
    assert torch.isfinite(loss)
    with pytest.raises(
        FloatingPointError,
        match=r"^gradient norm is (nan|inf) at training step 1 of this learner; "
        r"the step was stopped before it changed the weights$",
    ):
        engine.step(loss)
    assert_same_tensors(engine.full_state_dict(), before)

    # Nothing of the refused gradient stays behind (gradients, Adam moments): the next step is the step a fresh
    # engine takes.
    engine.step(engine.module(x).sum())
    fresh = deepspeed_engine(two_layers(), stage)
    fresh.step(fresh.module(x).sum())
    assert engine.steps == 2
    assert_same_tensors(engine.full_state_dict(), fresh.full_state_dict())
    assert not torch.equal(engine.full_state_dict()["0.weight"], before["0.weight"])


def test_a_nan_gradient_under_deepspeed_exits_3_and_keeps_the_checkpoint(ray_cluster, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    run_dir = tmp_path / "run"
    # policy.lr=1e30: the first policy step of round 1 sends the weights to ~1e30; on the second the loss is still
    # finite (RMSNorm rescales the huge activations) but its gradient is not.
    code = main(
        [
            "--config",
            str(REPO_ROOT / "configs/default.yaml"),
            f"run_dir={run_dir}",
            "rounds=1",
            "policy.epochs_per_round=2",
            "policy.lr=1e30",
            "rollout.backend=hf",
            "learner.backend=deepspeed",
            "samples_per_prompt=2",
            "logging.tensorboard=false",
            "logging.report=false",
            "data.builtin.n_pairs=64",
            "data.builtin.n_gold=16",
            "data.builtin.n_prompts=16",
            "data.builtin.n_eval_pairs=32",
            "reward.initial_epochs=1",
            *SMALL_EVAL,
        ]
    )
    err = capsys.readouterr().err
    assert code == 3, err
    assert (
        "error: training diverged in PolicyLearner.sample_step after round 0: gradient norm is inf at training "
        "step 2 of this learner; the step was stopped before it changed the weights. The checkpoint of round 0 is "
        "intact: fix the config (e.g. a lower learning rate) and continue with "
        f"`apo-ray train --resume {run_dir} ...`"
    ) in err, err
    assert (run_dir / "checkpoints/LATEST").read_text() == "0"
    policy = AutoModelForCausalLM.from_pretrained(run_dir / "checkpoints/round_0000/policy")
    assert all(torch.isfinite(p).all() and p.abs().max() < 1e3 for p in policy.parameters())


HUMAN_PAIRS = [
    PreferencePair("Is the river calm? ", "Yes, the river is calm and bright.", "No."),
    PreferencePair("Tell me about the night. ", "The night is quiet and clear.", "Night bad bad bad."),
]


@pytest.mark.parametrize("stage", STAGES)
def test_set_lr_sets_the_size_of_the_next_adam_step(stage):
    # Adam's first step moves every weight with a non-zero gradient by lr * g / (|g| + eps): by lr itself, less
    # a little where |g| is within a few thousand eps of 0. The engine was built with lr 1e-2.
    engine = deepspeed_engine(two_layers(), stage)
    before = engine.full_state_dict()
    engine.set_lr(1e-3)
    engine.step(engine.module(torch.ones(2, 512)).sum())
    moved = (engine.full_state_dict()["0.weight"] - before["0.weight"]).abs()
    assert moved.max().item() == pytest.approx(1e-3, rel=1e-3)
    assert moved.min().item() == pytest.approx(1e-3, rel=1e-2)


def reward_learner(path: str | Path, stage: int):
    from apo_ray.actors.reward import RewardLearner

    return RewardLearner(
        str(path),
        reward=RewardConfig(batch_size=4, lr=1e-3),
        learner=LearnerConfig(backend="deepspeed", zero_stage=stage),
    )


@pytest.mark.parametrize("stage", STAGES)
def test_checkpoints_hold_the_trained_minilm_at_every_stage(stage, tmp_path):
    from transformers import AutoModelForSequenceClassification

    learner = reward_learner(minilm_tokenizer_dir(), stage)
    assert_partitioned_at_stage_3(learner.model, stage)
    learner.apo_step([], HUMAN_PAIRS, apo_coef=0.0, pref_coef=1.0, epochs=1, seed=0)
    trained = learner.engine.full_state_dict()

    # A round checkpoint, the base RM and `disk` weight sync are all written by `save`.
    learner.save(str(tmp_path / "reward"))
    saved = AutoModelForSequenceClassification.from_pretrained(tmp_path / "reward", num_labels=1).state_dict()
    assert_same_tensors(saved, trained)

    # reward.reinit_each_round restarts from the saved base RM.
    learner.save_state(str(tmp_path / "engine_reward"))
    learner.apo_step([], HUMAN_PAIRS, apo_coef=0.0, pref_coef=1.0, epochs=1, seed=1)
    learner.reinitialize(str(tmp_path / "reward"))
    assert_same_tensors(learner.engine.full_state_dict(), trained)

    # --resume loads the engine state into a learner started from the original model.
    resumed = reward_learner(minilm_tokenizer_dir(), stage)
    resumed.load_state(str(tmp_path / "engine_reward"))
    assert_same_tensors(resumed.engine.full_state_dict(), trained)


def test_the_critic_starts_from_the_rm_saved_at_zero_3(tiny_lm_dir, tmp_path):
    from apo_ray.actors.critic import CriticLearner
    from apo_ray.config import ModelConfig, PPOConfig

    rm = reward_learner(tiny_lm_dir, 3)
    assert_partitioned_at_stage_3(rm.model, 3)
    rm.apo_step([], HUMAN_PAIRS, apo_coef=0.0, pref_coef=1.0, epochs=1, seed=0)
    rm.save(str(tmp_path / "base_reward"))
    critic = CriticLearner(
        str(tmp_path / "base_reward"),
        tokenizer_path=tiny_lm_dir,
        model=ModelConfig(),
        ppo=PPOConfig(),
        learner=LearnerConfig(backend="deepspeed", zero_stage=3),
    )
    assert_same_tensors(critic.engine.full_state_dict(), rm.engine.full_state_dict())
