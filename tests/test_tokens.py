"""Token-faithful rollouts: the learners train on exactly the ids the rollout workers sampled (special tokens
included, no EOS added to a truncated sample), the sampler's log-probs come with them and are compared with
the learner's, and dropout does not make a PPO ratio differ from 1 before any step."""

from __future__ import annotations

import pytest
import ray
import torch

from apo_ray.actors.policy import PolicyLearner
from apo_ray.actors.rollout import RolloutWorker, finish_reason
from apo_ray.builtin.task import make_sft_data
from apo_ray.config import LearnerConfig, ModelConfig, PolicyConfig, PPOConfig
from apo_ray.game import TokenSample
from apo_ray.modeling import encode_samples, load_tokenizer
from apo_ray.ppo import (
    _last_token_index,
    evenly_spread,
    logprob_mismatch,
    sampler_logprob_grid,
    truncated_importance_weights,
)
from tests.conftest import BPE_SPECIAL_TOKENS

MAX_NEW_TOKENS = 16
PROMPTS = [prompt for prompt, _ in make_sft_data(1, 24)]
MODEL = ModelConfig(max_prompt_tokens=48, max_response_tokens=MAX_NEW_TOKENS)
TORCH = LearnerConfig(backend="torch", grad_clip=0.0)


# ---------------------------------------------------------------------------------------- pure helpers


def test_encode_samples_lays_out_the_ids_as_given_and_tells_padding_by_length():
    pad = 0
    # The second response samples the pad id itself and was cut at the length limit (no EOS).
    samples = [TokenSample((5, 6), (7, 2)), TokenSample((5,), (0, 9, 9))]
    batch = encode_samples(samples, pad)
    assert batch.input_ids.tolist() == [[5, 6, 7, 2], [5, 0, 9, 9]]
    assert batch.attention_mask.tolist() == [[1, 1, 1, 1], [1, 1, 1, 1]]
    assert batch.response_mask.tolist() == [[0, 0, 1, 1], [0, 1, 1, 1]]
    # The terminal reward goes on the last real token: the EOS of the first, the last sampled 9 of the second.
    assert _last_token_index(batch.response_mask[:, 1:]).tolist() == [2, 2]
    with pytest.raises(ValueError, match=r"samples\[0\]: empty response"):
        encode_samples([TokenSample((5,), ())], pad)


def test_the_response_window_gives_the_full_forward_s_logprobs_and_gradients_in_its_grid():
    from transformers import LlamaConfig, LlamaForCausalLM

    from apo_ray.losses import token_logprobs
    from apo_ray.modeling import ResponseWindow, response_forward

    torch.manual_seed(0)
    model = LlamaForCausalLM(
        LlamaConfig(
            hidden_size=16,
            num_attention_heads=2,
            num_key_value_heads=1,
            intermediate_size=32,
            num_hidden_layers=2,
            vocab_size=40,
            attn_implementation="eager",
        )
    )
    # Prompts of 5, 1 and 0 tokens (nothing predicts the third row's first token), responses of 2, 4 and 3;
    # the second samples the pad id 0 itself.
    samples = [TokenSample((3, 4, 5, 6, 7), (8, 9)), TokenSample((3,), (0, 11, 12, 13)), TokenSample((), (14, 15, 16))]
    batch = encode_samples(samples, pad_token_id=0)
    full = token_logprobs(model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits, batch.input_ids)
    full_mask = batch.response_mask[:, 1:]
    window = ResponseWindow.of(samples, pad_token_id=0)
    assert window.keep == 4 + 1  # a P=5, R=4 window keeps columns P-1 .. P+R-1
    forward = response_forward(model, samples, pad_token_id=0)
    assert torch.equal(forward.mask, full_mask)
    assert forward.logps.shape == full.shape
    assert torch.allclose(forward.logps, full * full_mask, atol=1e-5)
    assert int(forward.logits_mask.sum()) == int(full_mask.sum()) == 2 + 4 + 2
    (full * full_mask).sum().backward()
    want = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    forward.logps.sum().backward()
    for got, expected in zip((p.grad for p in model.parameters()), want):
        assert torch.allclose(got, expected, atol=1e-5)
    with pytest.raises(ValueError, match=r"samples\[1\]: empty response"):
        ResponseWindow.of([TokenSample((3,), (4,)), TokenSample((3,), ())], pad_token_id=0)


def test_finish_reason_is_stop_only_on_a_final_eos():
    assert finish_reason([4, 2], frozenset({2})) == "stop"
    assert finish_reason([4, 4], frozenset({2})) == "length"


def test_sampler_logprob_grid_puts_each_token_in_the_column_that_predicts_it():
    grid = sampler_logprob_grid([2, 1], [[-0.5, -1.5], [-2.0]], width=4)
    # Prompt of 2 tokens: response token 0 is predicted at column 1; a 1-token prompt: at column 0.
    assert grid.tolist() == [[0.0, -0.5, -1.5, 0.0], [-2.0, 0.0, 0.0, 0.0]]
    with pytest.raises(ValueError, match="row 0"):
        sampler_logprob_grid([4], [[-1.0, -1.0]], width=4)


def test_logprob_mismatch_mean_and_max_over_real_tokens():
    sampler = torch.tensor([[-1.0, -2.0, 9.0], [-1.0, 0.0, 0.0]])
    learner = torch.tensor([[-1.5, -2.0, 0.0], [-0.75, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    stats = logprob_mismatch(sampler, learner, mask)
    assert stats["rollout/logprob_diff"] == pytest.approx((0.5 + 0.0 + 0.25) / 3)
    assert stats["rollout/logprob_diff_max"] == pytest.approx(0.5)


@pytest.mark.parametrize(
    "n, at_most, expected",
    [
        (10, 4, [0, 2, 5, 7]),  # spread over the round: first, then every n/at_most-th
        (3, 4, [0, 1, 2]),  # fewer than asked: all of them
        (5, None, [0, 1, 2, 3, 4]),
    ],
)
def test_the_logprob_check_reads_rows_spread_over_the_round(n, at_most, expected):
    assert evenly_spread(list(range(n)), at_most) == expected


def test_truncated_importance_weights_by_hand():
    learner = torch.log(torch.tensor([[0.5, 0.9, 0.2]]))
    sampler = torch.log(torch.tensor([[0.25, 0.9, 0.4]]))
    weights, stats = truncated_importance_weights(learner, sampler, torch.tensor([[1, 1, 0]]), cap=1.5)
    # Ratios 2.0 (capped at 1.5), 1.0, and padding 0.
    assert weights[0].tolist() == pytest.approx([1.5, 1.0, 0.0])
    assert stats == pytest.approx({"policy/tis_weight_mean": 1.25, "policy/tis_clipped_fraction": 0.5})


# ---------------------------------------------------------------------------------------- real engines


@pytest.fixture(scope="module")
def sampled(ray_cluster, bpe_lm_dir):
    """Rollouts of the BPE model from a vLLM worker in float32, the HF fallback in float32 and vLLM in
    bfloat16, all on the same weights, seeded."""
    settings = {
        "max_new_tokens": MAX_NEW_TOKENS,
        "max_prompt_tokens": MODEL.max_prompt_tokens,
        "max_model_len": 128,
        "temperature": 1.0,
    }
    arms = {"vllm": ("vllm", "float32"), "hf": ("hf", "float32"), "vllm_bf16": ("vllm", "bfloat16")}
    out = {}
    for name, (backend, dtype) in arms.items():
        worker = ray.remote(RolloutWorker).options(num_cpus=1).remote(bpe_lm_dir, backend, dtype=dtype, **settings)
        out[name] = ray.get(worker.generate.remote(PROMPTS, list(range(len(PROMPTS))), 4, 3))
        ray.kill(worker)
    return out


@pytest.fixture(scope="module")
def learner(bpe_lm_dir):
    return PolicyLearner(bpe_lm_dir, model=MODEL, policy=PolicyConfig(), learner=TORCH)


def learner_mismatch(learner, rollouts) -> dict[str, float]:
    logps, mask = learner.token_logprobs([r.tokens for r in rollouts])
    sampler = sampler_logprob_grid(
        [len(r.prompt_token_ids) for r in rollouts], [list(r.sampler_logprobs) for r in rollouts], logps.shape[1]
    )
    return logprob_mismatch(sampler, logps, mask)


@pytest.mark.integration
@pytest.mark.parametrize("engine", ["vllm", "hf"])
def test_learner_batches_equal_the_sampled_ids(sampled, learner, bpe_lm_dir, engine):
    rollouts = sampled[engine]
    tokenizer = load_tokenizer(bpe_lm_dir)
    eos = tokenizer.eos_token_id
    reasons = {r.finish_reason for r in rollouts}
    assert reasons == {"stop", "length"}, "the fixture must give both stopped and truncated samples"
    specials = set(range(len(BPE_SPECIAL_TOKENS))) - {eos}
    assert any(set(r.response_token_ids[:-1]) & specials for r in rollouts), "no special token was sampled"
    # What main did: re-encode the decoded text and add EOS. Most samples come back as other ids.
    reencoded = [tuple(tokenizer(r.response, add_special_tokens=False)["input_ids"]) + (eos,) for r in rollouts]
    assert sum(ids != r.response_token_ids for ids, r in zip(reencoded, rollouts)) > len(rollouts) // 2

    batch = encode_samples([r.tokens for r in rollouts], tokenizer.pad_token_id)
    for row, r in enumerate(rollouts):
        prompt_ids = tokenizer(r.prompt, add_special_tokens=False)["input_ids"][-MODEL.max_prompt_tokens :]
        assert r.prompt_token_ids == tuple(prompt_ids)
        n = len(r.prompt_token_ids) + len(r.response_token_ids)
        assert tuple(batch.input_ids[row, :n].tolist()) == r.prompt_token_ids + r.response_token_ids
        assert batch.response_mask[row].sum().item() == len(r.response_token_ids) == len(r.sampler_logprobs)
        assert (r.response_token_ids[-1] == eos) == (r.finish_reason == "stop")
        assert len(r.response_token_ids) <= MAX_NEW_TOKENS
    # The learner's log-probs of those ids match the sampler's: both read the same tokens at the same places.
    stats = learner_mismatch(learner, rollouts)
    assert stats["rollout/logprob_diff"] < 1e-4 and stats["rollout/logprob_diff_max"] < 1e-3, stats


@pytest.mark.integration
def test_a_bfloat16_engine_shows_in_logprob_diff(sampled, learner):
    fp32 = learner_mismatch(learner, sampled["vllm"])
    bf16 = learner_mismatch(learner, sampled["vllm_bf16"])
    assert bf16["rollout/logprob_diff"] > 1e-3 and bf16["rollout/logprob_diff"] > 50 * fp32["rollout/logprob_diff"]


# ---------------------------------------------------------------------------------------- dropout


@pytest.mark.integration
@pytest.mark.parametrize("disable_dropout", [True, False])
def test_ppo_ratio_is_exactly_one_before_the_first_step(sampled, bpe_lm_dir, disable_dropout):
    """The model was saved with attention dropout 0.1; by default the learners turn it off."""

    rollouts = sampled["vllm"][:16]
    model = MODEL.model_copy(update={"disable_dropout": disable_dropout})
    policy = PolicyLearner(bpe_lm_dir, model=model, policy=PolicyConfig(lr=1e-3), learner=TORCH)
    samples = [r.tokens for r in rollouts]
    old_logps, mask = policy.token_logprobs(samples)
    advantages = torch.randn(old_logps.shape, generator=torch.Generator().manual_seed(0)) * mask
    # One minibatch of everything: the stats are those of the step's own forward, before it moves anything.
    stats = policy.ppo_step(
        samples, old_logps, advantages, mask, ppo=PPOConfig(ppo_epochs=1, minibatch_size=16), seed=0
    )
    if disable_dropout:
        assert stats["policy/approx_kl"] == 0.0 and stats["policy/clipfrac"] == 0.0
    else:
        assert stats["policy/approx_kl"] > 1e-4
