"""Learner groups (apo_ray/learner_group.py): a learner as 2 DeepSpeed ranks, Ray actors in one placement group
meeting over gloo, takes the step one rank takes on the same global batch, at ZeRO-2 and ZeRO-3; both ranks hold
the same weights after it (they give the same log-probs, bit for bit); what the group saves for a round
checkpoint loads in HF, and the weight sync's buckets are rank 0's weights; a rank that dies is named.
The one-rank reference runs in this process, on the same PolicyLearner class."""

from __future__ import annotations

import pytest
import torch

from apo_ray.actors.policy import PolicyLearner
from apo_ray.checkpoint import check_same_ranks
from apo_ray.config import ConfigError, LearnerConfig, ModelConfig, PolicyConfig
from apo_ray.game import TokenSample
from apo_ray.train import rank_lost_message

# Responses of 1 to 5 tokens: the ranks' shares of a minibatch hold unequal numbers of tokens. With 4 per
# minibatch each epoch is a step of 4 samples (2 per rank) and a step of 1 (rank 1's share empty).
SAMPLES = [TokenSample((101, 2023 + i, 2003), tuple(3000 + 10 * i + j for j in range(i + 1))) for i in range(5)]
EPOCHS = 2

# The one-rank reference engine runs in this process.
pytestmark = pytest.mark.usefixtures("restored_environment")


def policy_kwargs(path: str, stage: int) -> dict:
    return dict(
        model_path=path,
        model=ModelConfig(),
        policy=PolicyConfig(batch_size=4, lr=1e-3),
        learner=LearnerConfig(backend="deepspeed", zero_stage=stage),
        seed=0,
    )


def two_ranks(path: str, stage: int):
    from apo_ray.actor_group import wait_until_ready
    from apo_ray.learner_group import LearnerGroup

    group = LearnerGroup(
        PolicyLearner,
        2,
        role="policy",
        name_prefix=f"policy-test-zero{stage}",
        kwargs=policy_kwargs(path, stage),
        num_cpus_per_rank=1,
        env={"DS_ACCELERATOR": "cpu"},
    )
    wait_until_ready([group.group], 600)
    return group


def assert_same_step(
    got: dict[str, torch.Tensor], want: dict[str, torch.Tensor], initial: dict[str, torch.Tensor]
) -> None:
    """`got` took the steps that took `initial` to `want`, to 1% of the distance the weights moved. Not closer: Adam
    turns gradients at rounding level (the key bias's is zero in exact arithmetic, softmax ignores a shift of every
    key) into steps of up to lr, whose sign the order of the ranks' float sums decides."""
    assert sorted(got) == sorted(want)
    moved = max((want[name] - initial[name]).abs().max().item() for name in want)
    for name in want:
        assert (got[name] - want[name]).abs().max().item() <= 0.01 * moved, name


@pytest.mark.integration
@pytest.mark.parametrize("stage", [2, 3])
def test_two_ranks_take_the_step_one_rank_takes_on_the_whole_batch(stage, ray_cluster, tiny_lm_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    from apo_ray.learner_group import RankDied, find_dead_rank

    initial = AutoModelForCausalLM.from_pretrained(tiny_lm_dir).state_dict()
    one = PolicyLearner(**policy_kwargs(tiny_lm_dir, stage))
    # ZeRO-3 really partitions this model (its 30k x 128 embedding is over the persistence threshold).
    assert any(p.data.numel() == 0 for p in one.model.parameters()) == (stage == 3)
    want_stats = one.sft_step(SAMPLES, epochs=EPOCHS, seed=0)
    want = one.engine.full_state_dict()
    assert max((want[n] - initial[n]).abs().max().item() for n in want) > 1e-3  # 4 Adam steps of lr 1e-3

    group = two_ranks(tiny_lm_dir, stage)
    try:
        stats = group.call("sft_step", SAMPLES, epochs=EPOCHS, seed=0)
        # Each rank reads the samples through the weights it holds (at ZeRO-2 its own full copy): the same on both.
        logps0, logps1 = group.call_all("sequence_logprobs", SAMPLES)
        assert logps0 == logps1
        assert logps0 == pytest.approx(one.sequence_logprobs(SAMPLES), rel=1e-5)
        # Rank 0 hands the weights on; the other ranks take part in ZeRO-3's gather and return nothing.
        rank0, rank1 = group.call_all("state_dict")
        assert rank1 is None
        assert_same_step(rank0, want, initial)
        # So do the object-store sync's buckets: rank 0's, once every rank has finished its part of the gather.
        import ray

        from apo_ray.named_tensors import unpack_bucket
        from apo_ray.sync_backends.object_store import ObjectStoreSync

        buckets = ObjectStoreSync(bucket_bytes=1 << 20).publish_from(group, 1)
        assert len(buckets) > 1
        unpacked = dict(pair for bucket in ray.get(buckets) for pair in unpack_bucket(bucket))
        assert sorted(unpacked) == sorted(rank0) and all(torch.equal(unpacked[n], rank0[n]) for n in rank0)
        # The gradient norm is the whole batch's: it would be off by a wrong weighting of the ranks' shares, or by a
        # factor of two, which Adam's normalised steps hide from the weights.
        assert stats["policy/grad_norm"] == pytest.approx(want_stats["policy/grad_norm"], rel=1e-6)
        assert stats["policy/steps"] == want_stats["policy/steps"] == 2 * EPOCHS

        # What a round checkpoint holds of the learner: HF weights (rank 0 writes, after ZeRO-3's gather) and
        # every rank's engine state.
        group.call("save", str(tmp_path / "policy"))
        group.call("save_state", str(tmp_path / "engine_policy"))
        saved = AutoModelForCausalLM.from_pretrained(tmp_path / "policy").state_dict()
        assert sorted(saved) == sorted(rank0) and all(torch.equal(saved[n], rank0[n]) for n in rank0)
        shards = sorted(p.name for p in (tmp_path / "engine_policy" / "engine").glob("*optim_states.pt"))
        assert len(shards) == 2, shards

        if stage == 2:
            # A rank that dies mid-run stops the next call, naming it, rather than leaving rank 0 in a collective.
            ray.kill(group.ranks[1])
            with pytest.raises(
                RankDied,
                match=r"^policy-test-zero2-1, rank 1 of the 2-rank policy learner, "
                r"died during sft_step: ",
            ):
                group.call("sft_step", SAMPLES, epochs=1, seed=1)
            # The weight sync's generator calls too (rank 0, stuck in the step's collective, is not waited for).
            with pytest.raises(
                RankDied,
                match=r"^policy-test-zero2-1, rank 1 of the 2-rank policy learner, "
                r"died during stream_weights: ",
            ):
                ObjectStoreSync(bucket_bytes=1 << 20).publish_from(group, 2)
            dead = find_dead_rank([group])
            assert dead is not None and (dead.name, dead.rank) == ("policy-test-zero2-1", 1)
    finally:
        group.kill()


def test_a_lost_rank_names_the_last_intact_round_to_resume_from(tmp_path):
    error = RuntimeError("policy-learner-ab12cd-1, rank 1 of the 2-rank policy learner, died during sft_step: gone")
    assert rank_lost_message(tmp_path, 4, error) == (
        f"{error}. The checkpoint of round 4 is intact: continue with `apo-ray train --resume {tmp_path}`"
    )
    assert rank_lost_message(tmp_path, None, error).endswith("No round was checkpointed yet: start the run again")


def test_a_resume_on_other_ranks_is_refused_naming_the_key():
    check_same_ranks({"learner_ranks": {"policy": 2, "reward": 1}}, {"policy": 2, "reward": 1}, 3)
    # Checkpoints written before learner groups hold one rank of each.
    check_same_ranks({}, {"policy": 1, "reward": 1}, 3)
    with pytest.raises(
        ConfigError,
        match=r"^learner\.reward_ranks: round 3 was checkpointed with 1 reward rank\(s\) "
        r"and this run asks for 2",
    ):
        check_same_ranks({"learner_ranks": {"policy": 2, "reward": 1}}, {"policy": 2, "reward": 2}, 3)
