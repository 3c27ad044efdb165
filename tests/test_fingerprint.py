"""The weight fingerprint a rollout worker reports after a sync, checked against the learner's: sums that survive
what an engine does to a checkpoint's tensors (fusing, transposing, a cast), and name the tensor that differs."""

from __future__ import annotations

import json

import pytest
import torch

from apo_ray.fault_injection import ENV, corrupt_if_injected, stall_if_injected
from apo_ray.fingerprint import CHUNK, TensorStats, checkpoint_names, fingerprint, first_difference

QWEN2_PACKED = {"qkv_proj": ["q_proj", "k_proj", "v_proj"], "gate_up_proj": ["gate_proj", "up_proj"]}
ATTN = "model.layers.0.self_attn"


def learner_weights() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    shapes = {
        f"{ATTN}.q_proj.weight": (8, 6),
        f"{ATTN}.k_proj.weight": (4, 6),
        f"{ATTN}.v_proj.weight": (4, 6),
        f"{ATTN}.q_proj.bias": (8,),
        "model.norm.weight": (6,),
    }
    return {name: torch.randn(shape, generator=generator) * 0.02 for name, shape in shapes.items()}


def engine_view(weights: dict[str, torch.Tensor]) -> list[tuple[str, torch.Tensor]]:
    """What a vLLM engine holds: q, k, v fused into one parameter and stored transposed (a CPU GEMM's layout)."""
    qkv = torch.cat([weights[f"{ATTN}.{p}_proj.weight"] for p in "qkv"]).T.contiguous()
    return [
        (f"{ATTN}.qkv_proj.weight", qkv),
        (f"{ATTN}.q_proj.bias", weights[f"{ATTN}.q_proj.bias"]),
        ("model.norm.weight", weights["model.norm.weight"]),
    ]


def reported(engine: list[tuple[str, torch.Tensor]]):
    return [(name, checkpoint_names(name, QWEN2_PACKED), TensorStats.of(tensor)) for name, tensor in engine]


def test_checkpoint_names_unfuse_packed_modules():
    assert checkpoint_names(f"{ATTN}.qkv_proj.weight", QWEN2_PACKED) == tuple(f"{ATTN}.{p}_proj.weight" for p in "qkv")
    assert checkpoint_names("model.layers.3.mlp.gate_up_proj.bias", QWEN2_PACKED) == (
        "model.layers.3.mlp.gate_proj.bias",
        "model.layers.3.mlp.up_proj.bias",
    )
    assert checkpoint_names("model.norm.weight", QWEN2_PACKED) == ("model.norm.weight",)


def test_stats_are_the_hand_computed_sums():
    stats = TensorStats.of(torch.tensor([[1.0, -2.0], [0.5, 3.0]]))
    assert (stats.total, stats.squares, stats.count) == (2.5, 14.25, 4)
    assert TensorStats.of(torch.tensor([1.0])) + TensorStats.of(torch.tensor([2.0, 3.0])) == TensorStats(6.0, 14.0, 3)


def test_stats_of_a_tensor_of_several_chunks_are_the_whole_tensors_sums():
    """A tensor is summed a chunk at a time in float64, never copied whole to float64: its stats are still the
    exact sums (here of values float64 sums exactly) and equal, to float64 rounding, to a whole-tensor float64 sum."""
    halves = torch.full((2 * CHUNK + 3,), 0.5, dtype=torch.bfloat16)
    halves[-1] = -1.5
    stats = TensorStats.of(halves.reshape(-1, 1))
    assert (stats.total, stats.squares, stats.count) == (
        0.5 * (2 * CHUNK + 2) - 1.5,
        0.25 * (2 * CHUNK + 2) + 2.25,
        2 * CHUNK + 3,
    )
    values = torch.randn(3 * CHUNK + 17, generator=torch.Generator().manual_seed(1))
    whole = values.double()
    stats = TensorStats.of(values)
    assert stats.total == pytest.approx(whole.sum().item(), rel=1e-12, abs=1e-9)
    assert stats.squares == pytest.approx(whole.square().sum().item(), rel=1e-12)


def test_a_fused_transposed_engine_matches_its_learner():
    weights = learner_weights()
    assert first_difference(fingerprint(weights.items()), reported(engine_view(weights))) is None


@pytest.mark.parametrize("change", ["add", "negate", "scale"])
def test_one_changed_element_names_the_engine_tensor_and_its_parts(change):
    weights = learner_weights()
    engine = engine_view(weights)
    qkv = engine[0][1]
    # k_proj's first element, in the fused, transposed layout.
    qkv[0, 8] = {"add": qkv[0, 8] + 1.0, "negate": -qkv[0, 8], "scale": qkv[0, 8] * 3}[change]
    difference = first_difference(fingerprint(weights.items()), reported(engine))
    assert difference is not None and difference.startswith(f"{ATTN}.qkv_proj.weight: ")
    assert f"the learner's {ATTN}.q_proj.weight+{ATTN}.k_proj.weight+{ATTN}.v_proj.weight" in difference


def test_the_learner_fingerprints_weights_as_the_engine_stores_them():
    weights = learner_weights()
    in_bf16 = {name: tensor.to(torch.bfloat16) for name, tensor in weights.items()}
    engine = reported(engine_view(in_bf16))
    assert first_difference(fingerprint(weights.items(), torch.bfloat16), engine) is None
    assert first_difference(fingerprint(weights.items()), engine) is not None


def test_a_tensor_the_learner_lacks_is_named():
    weights = learner_weights()
    del weights["model.norm.weight"]
    assert first_difference(fingerprint(weights.items()), reported(engine_view(learner_weights()))) == (
        "model.norm.weight: the learner has no tensor 'model.norm.weight'"
    )


def test_injected_faults_fire_on_their_worker_and_phase_once(tmp_path, monkeypatch):
    once = tmp_path / "fired"
    monkeypatch.setenv(
        ENV, json.dumps([{"kind": "corrupt", "phase": "sync", "worker": 1, "tensor": "b", "once": str(once)}])
    )
    pairs = [("a", torch.zeros(2)), ("b", torch.zeros(2))]
    assert [t.tolist() for _, t in corrupt_if_injected("sync", 0, pairs)] == [[0, 0], [0, 0]]
    assert [t.tolist() for _, t in corrupt_if_injected("sync", 1, pairs)] == [[0, 0], [1, 1]]
    assert once.exists() and pairs[1][1].tolist() == [0, 0]
    assert [t.tolist() for _, t in corrupt_if_injected("sync", 1, pairs)] == [[0, 0], [0, 0]]
    monkeypatch.setenv(ENV, json.dumps([{"kind": "hang", "phase": "sync"}]))
    with pytest.raises(ValueError, match="unknown fault kind 'hang'"):
        stall_if_injected("sync", 0)
