"""TrainEngine under DeepSpeed at every ZeRO stage: a non-finite gradient is refused before it reaches the
weights. The engines run in this process on a single-rank gloo group."""

from __future__ import annotations

import os

import pytest
import torch

from actors.engine import TrainEngine

pytestmark = pytest.mark.integration

STAGES = [0, 1, 2, 3]


@pytest.fixture(scope="module", autouse=True)
def _restore_environment():
    # TrainEngine sets the rendezvous variables (RANK, MASTER_PORT, ...) for DeepSpeed in its process.
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)


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
    return TrainEngine(model, backend="deepspeed", lr=0.01, zero_stage=stage, grad_clip=1.0, weight_decay=0.0,
                       micro_batch_size=2)


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
    with pytest.raises(FloatingPointError, match=r"^gradient norm is (nan|inf) at training step 1 of this learner; "
                                                 r"the step was stopped before it changed the weights$"):
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
