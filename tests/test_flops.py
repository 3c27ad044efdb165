"""FLOP counts of each phase (apo_ray.flops) against hand counts, and against torch's own count of the matmuls
that real tiny HF models run."""

from __future__ import annotations

from unittest import mock

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode
from transformers import BertConfig, BertModel, LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification

from apo_ray.flops import (
    TRAINING_FACTOR,
    FlopCounter,
    ModelShape,
    efficiency,
    generation_flops,
    machine_threads,
    matmul_ceiling,
    phase_efficiencies,
)

# hidden 8, 2 query heads of 4 and 1 key-value head, gated MLP of 16, 2 layers, 32 tokens.
TINY = dict(
    hidden_size=8,
    num_attention_heads=2,
    num_key_value_heads=1,
    head_dim=4,
    intermediate_size=16,
    num_hidden_layers=2,
    vocab_size=32,
    attn_implementation="eager",
)
# One layer: q 8x8 + k 8x4 + v 8x4 + o 8x8 + gate, up, down 3 x 8x16 = 64 + 32 + 32 + 64 + 384.
LAYER = 576
HEAD = 8 * 32


def tiny_llama_config(**overrides) -> LlamaConfig:
    return LlamaConfig(**{**TINY, **overrides})


def test_shape_of_a_tiny_llama_is_its_hand_count():
    shape = ModelShape.from_config(tiny_llama_config(), "lm")
    assert (shape.layer_params, shape.head_params, shape.causal) == (LAYER, HEAD, True)
    assert ModelShape.from_config(tiny_llama_config(num_labels=1), "classifier").head_params == 8


def test_forward_generation_and_training_flops_by_hand():
    shape = ModelShape.from_config(tiny_llama_config(), "lm")
    # 3 tokens: 2 FLOPs per weight per token, and causal attention over 1 + 2 + 3 keys, 4 x width 8 each, 2 layers.
    forward_3 = 2 * 2 * LAYER * 3 + 2 * HEAD * 3 + 4 * 2 * 8 * (1 + 2 + 3)
    assert shape.forward_flops(3) == forward_3 == 8832
    # A 2-token prompt and 2 sampled tokens: the prefill and one fed-back token (3 positions through the layers,
    # attending to 1, 2, 3 keys), the head at the last prompt token and at the fed-back one.
    assert shape.generation_flops(2, 2) == 2 * 2 * LAYER * 3 + 2 * HEAD * 2 + 4 * 2 * 8 * 6
    assert generation_flops(shape, [2, 2], [2, 1]) == shape.generation_flops(2, 2) + shape.forward_flops(2, 1)
    assert TRAINING_FACTOR * forward_3 == 26496


def test_a_smollm2_token_costs_about_a_quarter_gflop():
    # SmolLM2-135M's config: 30 layers of 576, 9 heads of 64 over 3 key-value heads, MLP 1536, vocabulary 49152.
    shape = ModelShape.from_config(
        LlamaConfig(
            hidden_size=576,
            num_attention_heads=9,
            num_key_value_heads=3,
            head_dim=64,
            intermediate_size=1536,
            num_hidden_layers=30,
            vocab_size=49152,
        ),
        "lm",
    )
    per_token = shape.forward_flops(1)
    assert per_token == 2 * (30 * 3_538_944 + 576 * 49152) + 4 * 30 * 576
    assert 0.26e9 < per_token < 0.28e9


def test_a_config_of_another_layout_is_refused_by_field():
    from transformers import GPT2Config

    with pytest.raises(ValueError, match="gpt2 config has no integer 'intermediate_size'"):
        ModelShape.from_config(GPT2Config(n_embd=8, n_head=2, n_layer=2), "lm")


def torch_count(model: torch.nn.Module, **inputs) -> int:
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(**inputs)
    return counter.get_total_flops()


def test_the_llama_count_equals_torch_s_matmul_count():
    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_llama_config()).eval()
    length = 5
    ids = torch.randint(0, 32, (1, length))
    # Eager attention multiplies every (query, key) pair and masks the later half afterwards: torch counts the
    # pairs a causal model never uses on top of ours.
    unused_pairs = length * length - length * (length + 1) // 2
    expected = ModelShape.of_model(model).forward_flops(length) + 4 * 2 * 8 * unused_pairs
    assert torch_count(model, input_ids=ids) == expected


def test_the_encoder_count_equals_torch_s_matmul_count():
    config = BertConfig(
        hidden_size=8,
        num_attention_heads=2,
        intermediate_size=16,
        num_hidden_layers=2,
        vocab_size=32,
        num_labels=1,
        attn_implementation="eager",
    )
    encoder = BertModel(config, add_pooling_layer=False).eval()
    shape = ModelShape.from_config(config, "classifier")
    assert (shape.causal, shape.mlp_matrices) == (False, 2)
    ids = torch.randint(0, 32, (1, 6))
    # The backbone alone: the count without its 1-output head.
    assert torch_count(encoder, input_ids=ids) == shape.forward_flops(6) - 2 * shape.head_params * 6


def test_the_counter_counts_real_tokens_and_keeps_training_apart():
    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_llama_config())
    counter = FlopCounter(model)
    shape = counter.shape
    ids = torch.randint(0, 32, (2, 5))
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask)
    model(input_ids=ids[:1, :3]).logits.sum().backward()
    assert counter.training == shape.forward_flops(3)
    assert counter.take_inference() == shape.forward_flops(3) + shape.forward_flops(5)
    assert counter.take_inference() == 0


def test_the_lm_head_is_counted_on_the_real_tokens_of_the_columns_it_keeps():
    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_llama_config())
    counter = FlopCounter(model)
    shape = counter.shape
    ids = torch.randint(0, 32, (2, 6))
    # Left-padded: 4 and 6 real tokens; the head runs on the last 3 columns, all of them real in both rows.
    mask = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]])
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask, logits_to_keep=3)
        # Right-padded, every column kept: the 2 padded columns of the first row are not work.
        model(input_ids=ids, attention_mask=mask.flip(1))
    body = shape.forward_flops(4, head_positions=0) + shape.forward_flops(6, head_positions=0)
    assert counter.take_inference() == 2 * body + 2 * HEAD * (6 + 4 + 6)


def test_the_critic_s_per_token_values_are_counted_through_its_backbone():
    torch.manual_seed(0)
    critic = LlamaForSequenceClassification(tiny_llama_config(num_labels=1, pad_token_id=0))
    counter = FlopCounter(critic)
    with torch.no_grad():
        hidden = critic.base_model(input_ids=torch.randint(1, 32, (1, 4))).last_hidden_state
        critic.score(hidden)
    assert counter.shape.head_outputs == 1
    assert counter.take_inference() == counter.shape.forward_flops(4)


def test_efficiency_and_the_ceiling():
    assert efficiency(3e9, 2.0, 1e10) == pytest.approx(0.15)
    with pytest.raises(ValueError, match="seconds and ceiling"):
        efficiency(1.0, 0.0, 1.0)
    assert matmul_ceiling(size=64, repeats=1) > 0


def test_the_ceiling_runs_on_the_threads_asked_for_and_restores_the_process_s():
    # A `ray job submit` driver runs with OMP_NUM_THREADS=1; the machine's ceiling must not be measured on that.
    seen = []
    original = torch.Tensor.__matmul__

    def spy(a, b):
        seen.append(torch.get_num_threads())
        return original(a, b)

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with mock.patch.object(torch.Tensor, "__matmul__", spy):
            matmul_ceiling(size=8, repeats=2, threads=3)
        assert seen == [3, 3, 3]
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(previous)
    assert machine_threads() >= 1


def test_phase_efficiencies_divide_by_each_phase_s_own_ceiling():
    stats = {
        "flops/generate": 6e9,
        "timing/generate": 2.0,
        "flops/policy_step": 9e9,
        "timing/policy_step": 3.0,
        "flops/score": 1e9,
        "timing/score": 0.0,
        "timing/round": 10.0,
        "timing/sync": 1.0,
    }
    out = phase_efficiencies(stats, {"generate": 1e10, "policy_step": 2e10, "score": 1e10}, round_ceiling=4e10)
    assert out == {
        "efficiency/generate": pytest.approx(0.3),
        "efficiency/policy_step": pytest.approx(0.15),
        "flops/round": 16e9,
        "efficiency/round": pytest.approx(0.04),
    }
    # A phase with no ceiling gets no share of its own but counts in the round's; a row without phases has none.
    assert phase_efficiencies({"flops/critic_step": 2.0, "timing/critic_step": 1.0, "timing/round": 4.0}, {}, 1.0) == {
        "flops/round": 2.0,
        "efficiency/round": 0.5,
    }
    assert phase_efficiencies({"timing/round": 1.0}, {}, 1.0) == {}


def test_a_training_step_is_three_forwards_of_its_real_tokens():
    from apo_ray.actors.engine import build_engine, train_steps
    from apo_ray.config import LearnerConfig

    torch.manual_seed(0)
    engine = build_engine(
        LlamaForCausalLM(tiny_llama_config()),
        LearnerConfig(backend="torch"),
        lr=1e-3,
        micro_batch_size=2,
        role="policy",
    )
    # Two minibatches of right-padded rows: 3 + 5 real tokens, then 4.
    plan = [[(3, 5), (5, 5)], [(4, 4)]]

    def loss_fn(share, minibatch):
        width = max(length for length, _ in share)
        mask = torch.tensor([[1] * length + [0] * (width - length) for length, _ in share])
        logits = engine.module(input_ids=torch.randint(0, 32, mask.shape), attention_mask=mask).logits
        with torch.no_grad():  # a forward-only pass inside a step is no training work
            engine.module(input_ids=torch.randint(0, 32, (1, 7)))
        return logits.mean(), {"loss": 0.0}

    stats = train_steps(engine, plan, loss_fn, role="policy")
    shape = engine.flops.shape
    assert stats["flops/policy_step"] == TRAINING_FACTOR * sum(shape.forward_flops(n) for n in (3, 5, 4))
    assert engine.flops.take_inference() == 2 * shape.forward_flops(7)
