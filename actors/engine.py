"""The training engine every learner holds: DeepSpeed ZeRO, or plain torch when the user picks it.

Both expose the same three verbs (`step(loss)`, `save_state`, `load_state`) so the learners do not care
which one runs. DeepSpeed on CPU needs `DS_ACCELERATOR=cpu` and a gloo process group (docs/architecture.md).

A learner of several ranks is one such engine per process, all meeting at one `Rendezvous` (torch.distributed's
env:// rendezvous: rank 0's address and port). Nothing here imports Ray: the driver's LearnerGroup
(apo_ray/learner_group.py) starts the ranks as actors, and a script can start them as plain processes.

DeepSpeed JIT-builds C++ ops under a lock file that a build killed mid-way leaves behind, and a later build
of that op waits on it forever, silently (apo_ray.build_locks). The learners build none: the one op DeepSpeed
builds on CPU, its shared-memory comm op, is switched off, and stale locks are removed, or named, before
DeepSpeed starts.
"""

from __future__ import annotations

import math
import os
import socket
import tempfile
import time
from collections.abc import Callable, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import torch

from apo_ray import build_locks
from apo_ray.batching import is_empty_share, rank_share
from apo_ray.config import LearnerConfig
from apo_ray.fault_injection import stall_if_injected
from apo_ray.flops import TRAINING_FACTOR, FlopCounter, ModelShape, matmul_ceiling
from apo_ray.lora import adapter_state_dict, is_adapted, merged_state_dict, with_adapter
from apo_ray.losses import combine_share_stats, combine_stats
from apo_ray.progress import Progress

Batch = TypeVar("Batch")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass(frozen=True)
class Rendezvous:
    """Where one rank of a learner meets the others: its rank, their number, and rank 0's address and port
    (None: a lone rank, which needs neither)."""

    rank: int = 0
    world_size: int = 1
    master_addr: str | None = None
    master_port: int | None = None

    def __post_init__(self) -> None:
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank: must be in [0, {self.world_size}), got {self.rank}")
        if self.world_size > 1 and (self.master_addr is None or self.master_port is None):
            raise ValueError(f"rank {self.rank} of {self.world_size}: several ranks need rank 0's address and port")


def _refused(what: str, value: object, step: int) -> FloatingPointError:
    return FloatingPointError(
        f"{what} is {value} at training step {step} of this learner; the step was stopped before it changed the weights"
    )


def _gradient_norm(grads: list[torch.Tensor | None]) -> torch.Tensor:
    norms = [torch.linalg.vector_norm(g.detach().float()) for g in grads if g is not None]
    return torch.linalg.vector_norm(torch.stack(norms)) if norms else torch.zeros(())


class TrainEngine:
    def __init__(
        self,
        model: torch.nn.Module,
        *,
        backend: str,
        lr: float,
        zero_stage: int,
        grad_clip: float,
        weight_decay: float,
        micro_batch_size: int,
        rank: int = 0,
        world_size: int = 1,
        master_port: int | None = None,
        master_addr: str | None = None,
    ):
        if world_size > 1 and backend != "deepspeed":
            raise ValueError(f"backend: {backend!r} trains one rank; {world_size} ranks need 'deepspeed'")
        self.backend = backend
        self.rank, self.world_size = rank, world_size
        self.zero_stage = zero_stage if backend == "deepspeed" else 0
        # Kept to re-apply after loading a checkpoint: a resumed run may lower a learning rate that diverged.
        self.lr = lr
        self.steps = 0
        # The learners' engines count their model's forwards (build_engine); a bare module has no FLOP count.
        self.flops: FlopCounter | None = None
        if backend == "deepspeed":
            self.module, self.optimizer = self._init_deepspeed(
                model, lr, zero_stage, grad_clip, weight_decay, micro_batch_size, master_addr, master_port
            )
        else:
            self.module = model
            self.optimizer = torch.optim.AdamW(trainable(model), lr=lr, weight_decay=weight_decay)
            self.grad_clip = grad_clip
        self._ds_engine = self.module if backend == "deepspeed" else None

    def _init_deepspeed(
        self, model, lr, zero_stage, grad_clip, weight_decay, micro_batch_size, master_addr, master_port
    ):
        if not torch.cuda.is_available():
            os.environ.setdefault("DS_ACCELERATOR", "cpu")
        os.environ.update(
            MASTER_ADDR=master_addr or os.environ.get("MASTER_ADDR", "127.0.0.1"),
            MASTER_PORT=str(master_port or free_port()),
            RANK=str(self.rank),
            LOCAL_RANK=os.environ.get("LOCAL_RANK", "0"),
            WORLD_SIZE=str(self.world_size),
        )
        import deepspeed
        from deepspeed.accelerator import get_accelerator

        build_locks.clear_stale()
        # DeepSpeed's TorchBackend JIT-builds the CPU shared-memory comm op on every process-group start, but
        # only `inference_all_reduce` (tensor-parallel inference) uses it, and that falls back to
        # torch.distributed when the op is absent: no learner needs it, whatever its world size.
        shm_comm = get_accelerator().create_op_builder("ShareMemCommBuilder")
        if shm_comm is not None:
            deepspeed.ops.__compatible_ops__[shm_comm.NAME] = False
        if not torch.distributed.is_initialized():
            rendezvous = {}
            if self.world_size == 1:
                # A lone rank meets nobody: a file store needs no port. A port picked as free can be taken by
                # another run on the node before the TCP store binds it (EADDRINUSE with two runs on one machine).
                store = Path(tempfile.mkdtemp(prefix="apo-ray-dist-")) / "store"
                rendezvous = {"init_method": f"file://{store}", "rank": 0, "world_size": 1}
            deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo", **rendezvous)
        config = {
            "train_micro_batch_size_per_gpu": micro_batch_size,
            "gradient_accumulation_steps": 1,
            "zero_optimization": {"stage": zero_stage},
            "optimizer": {
                "type": "AdamW",
                # torch_adam: DeepSpeed's fused CPU Adam needs a JIT build; torch's is exact and fast enough.
                "params": {"lr": lr, "weight_decay": weight_decay, "torch_adam": True},
            },
            "gradient_clipping": grad_clip,
            "bf16": {"enabled": next(model.parameters()).dtype == torch.bfloat16},
            "steps_per_print": 10**9,
        }
        engine, optimizer, _, _ = deepspeed.initialize(model=model, config=config, model_parameters=trainable(model))
        return engine, optimizer

    @property
    def model(self) -> torch.nn.Module:
        """The bare HF model (unwrapped), for saving and exporting weights."""
        return self._ds_engine.module if self._ds_engine is not None else self.module

    def step(self, loss: torch.Tensor) -> float | None:
        """One optimizer step; returns the gradient's norm before clipping (None where DeepSpeed keeps none).
        FloatingPointError, with the weights untouched, if the loss or gradient is not finite.

        With several ranks, DeepSpeed averages their gradients, and every rank refuses the step if any rank's
        loss is not finite (one rank refusing alone would leave the others waiting in the gradient reduction).
        """
        stall_if_injected("step", self.rank)
        self.steps += 1
        if not torch.isfinite(loss):
            self._all_ranks_finite(False)
            raise _refused("loss", loss.item(), self.steps)
        if not self._all_ranks_finite(True):
            raise _refused("loss of another rank", "not finite", self.steps)
        if self._ds_engine is not None:
            return self._deepspeed_step(loss)
        loss.backward()
        # The norm is taken even without clipping: a finite loss can still have infinite gradients.
        norm = torch.nn.utils.clip_grad_norm_(
            self.module.parameters(), self.grad_clip if self.grad_clip > 0 else math.inf
        )
        if not torch.isfinite(norm):
            self.optimizer.zero_grad(set_to_none=True)
            raise _refused("gradient norm", norm.item(), self.steps)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return norm.item()

    def _deepspeed_step(self, loss: torch.Tensor) -> float | None:
        engine = self._ds_engine
        engine.backward(loss)
        norm = None
        if engine.zero_optimization_stage() == 0:
            # Without ZeRO, DeepSpeed hands any gradient, NaN included, to the optimizer: check it first.
            from deepspeed.utils import safe_get_full_grad

            norm = _gradient_norm([safe_get_full_grad(p) for p in engine.module.parameters()])
            if not torch.isfinite(norm):
                engine.zero_grad()
                raise _refused("gradient norm", norm.item(), self.steps)
        engine.step()
        # ZeRO 1-3 check the gradient themselves: a non-finite one is dropped and the optimizer skipped, which
        # would otherwise pass unnoticed as `engine.skipped_steps`.
        if not engine.was_step_applied():
            norm = engine.get_global_grad_norm()
            raise _refused("gradient norm", "not finite" if norm is None else norm, self.steps)
        if norm is None:
            norm = engine.get_global_grad_norm()
        return None if norm is None else float(norm)

    def _all_ranks_finite(self, finite: bool) -> bool:
        if self.world_size == 1:
            return finite
        flag = torch.tensor([float(finite)], device=self._ds_engine.device)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MIN)
        return bool(flag.item())

    def set_lr(self, lr: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    @contextmanager
    def _whole_parameters(self):
        """ZeRO-3's shards gathered for the block (a collective: every rank enters it)."""
        if self._ds_engine is not None and self._ds_engine.zero_optimization_stage() == 3:
            import deepspeed

            with deepspeed.zero.GatheredParameters(list(self.model.parameters()), modifier_rank=None):
                yield
        else:
            yield

    def full_state_dict(self, adapter: bool = False) -> dict[str, torch.Tensor]:
        """HF-named CPU copies of the whole model (ZeRO-3 shards are gathered first). Tied weights stay one
        tensor under both names, so that `save_pretrained` stores them once, as it does for the bare model.
        A LoRA model's are its merged weights under the base model's names (apo_ray.lora), what the rollout
        workers load; with `adapter`, the adapter's alone in PEFT's names."""
        model = self.model
        with self._whole_parameters():
            if adapter:
                return _copy_state_dict(adapter_state_dict(model))
            return _copy_state_dict(merged_state_dict(model) if is_adapted(model) else model.state_dict())

    def rank0_state_dict(self, adapter: bool = False) -> dict[str, torch.Tensor] | None:
        """`full_state_dict` on rank 0, which hands the weights on (checkpoints, weight sync); the other ranks
        join ZeRO-3's gather, a collective, and return None rather than another copy of the whole model."""
        if self.rank == 0 or self.zero_stage == 3:
            state = self.full_state_dict(adapter)
            return state if self.rank == 0 else None
        return None

    def save_state(self, directory: Path) -> None:
        """Optimizer and weights, so a resumed run continues exactly (not only from the HF weights)."""
        directory.mkdir(parents=True, exist_ok=True)
        if self._ds_engine is not None:
            self._ds_engine.save_checkpoint(str(directory), tag="engine")
        elif self.rank == 0:
            torch.save(
                {"model": self.module.state_dict(), "optimizer": self.optimizer.state_dict()}, directory / "engine.pt"
            )

    def load_state(self, directory: Path) -> None:
        """Weights and optimizer state from `save_state`; the learning rate stays the configured one."""
        if self._ds_engine is not None:
            self._ds_engine.load_checkpoint(str(directory), tag="engine")
        else:
            state = torch.load(directory / "engine.pt", map_location="cpu", weights_only=True)
            self.module.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
        self.set_lr(self.lr)


def _copy_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    copies: dict[tuple, torch.Tensor] = {}
    out = {}
    for name, tensor in state.items():
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape), tensor.stride())
        # Empty tensors all sit at address 0 without sharing anything.
        if key not in copies or tensor.numel() == 0:
            copies[key] = tensor.detach().cpu().clone()
        out[name] = copies[key]
    return out


def trainable(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    """The parameters the optimizer steps and keeps state for: under LoRA the adapter's alone."""
    return [p for p in model.parameters() if p.requires_grad]


def build_engine(
    model: torch.nn.Module,
    learner: LearnerConfig,
    *,
    lr: float,
    micro_batch_size: int,
    rendezvous: Rendezvous | None = None,
    role: str,
) -> TrainEngine:
    """The engine of one rank of the learner `role`, as `learner.*` configures it: the one place learners build
    engines, and the one where a learner of learner.lora.roles gets its adapter (the engine's `model` is then the
    peft model). `micro_batch_size` is the whole minibatch's; DeepSpeed is told each rank's part of it."""
    rendezvous = rendezvous or Rendezvous()
    if learner.gradient_checkpointing:
        # Non-reentrant: the reentrant form needs inputs that require grad and loses them under ZeRO-3's hooks.
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    # Counted on the HF model's backbone, which the peft model calls in turn.
    counter = FlopCounter(model)
    if learner.lora.applies_to(role):
        model = with_adapter(model, learner.lora)
    engine = TrainEngine(
        model,
        backend=learner.backend,
        lr=lr,
        zero_stage=learner.zero_stage,
        grad_clip=learner.grad_clip,
        weight_decay=learner.weight_decay,
        micro_batch_size=-(-micro_batch_size // rendezvous.world_size),
        rank=rendezvous.rank,
        world_size=rendezvous.world_size,
        master_port=rendezvous.master_port,
        master_addr=rendezvous.master_addr,
    )
    engine.flops = counter
    return engine


def train_steps(
    engine: TrainEngine,
    plan: Sequence[Batch],
    loss_fn: Callable[[Batch, Batch], tuple[torch.Tensor, dict[str, float]]],
    *,
    role: str,
    step_stats: Callable[[dict[str, float]], dict[str, float]] = lambda stats: stats,
) -> dict[str, float]:
    """The one training loop of every learner: one engine step per minibatch of `plan` (apo_ray.batching),
    the model in train mode meanwhile. Returns the mean of what `loss_fn` reports (over steps and ranks),
    `{role}/steps` and `timing/{role}_step`.

    Every rank walks the whole plan; `loss_fn(share, minibatch)` gets this rank's share of each minibatch
    (`rank_share`; all of it on one rank) and returns the share's part of the minibatch's loss: its loss
    scaled by its fraction of what that loss averages over, so that the parts add up to the loss one rank
    would take on the whole minibatch. A rank whose share is empty still runs a forward and backward (on
    rank 0's share, weighted 0): ZeRO's collectives need every rank in every step. `step_stats` turns a step's
    stats, combined over its ranks (apo_ray.losses.combine_share_stats: parts added, the rest averaged), into
    the step's before the mean over steps.

    With a FLOP counter on the engine, `flops/{role}_step` is the model FLOPs of the steps (3x their forwards'),
    added over the ranks' shares: an empty share's stand-in forward is no work of the minibatch's.
    """
    started = time.perf_counter()
    # This rank's stats of each step; None where its share was empty.
    history: list[dict[str, float] | None] = []
    counter = engine.flops
    flops = 0
    engine.model.train()
    progress = Progress(f"{role}_step", total=len(plan), unit="steps") if engine.rank == 0 else nullcontext()
    try:
        with progress:
            for batch in plan:
                share = rank_share(batch, engine.rank, engine.world_size)
                empty = is_empty_share(share)
                forwards_before = counter.training if counter is not None else 0
                loss, stats = loss_fn(rank_share(batch, 0, engine.world_size) if empty else share, batch)
                if counter is not None and not empty:
                    flops += TRAINING_FACTOR * (counter.training - forwards_before)
                # DeepSpeed averages the ranks' gradients; the parts are to be added.
                grad_norm = engine.step(loss * (0.0 if empty else engine.world_size))
                if grad_norm is not None:
                    stats = {**stats, f"{role}/grad_norm": grad_norm}
                history.append(None if empty else stats)
                if engine.rank == 0:
                    progress.update()
    finally:
        engine.model.eval()
    ranks = [(history, flops)]
    if engine.world_size > 1:
        ranks = [None] * engine.world_size
        torch.distributed.all_gather_object(ranks, (history, flops))
    # Each step's stats combined over the ranks that had a share of it, then averaged over the steps.
    steps = [step_stats(combine_share_stats([h[i] for h, _ in ranks if h[i] is not None])) for i in range(len(plan))]
    counted = {f"flops/{role}_step": float(sum(f for _, f in ranks))} if counter is not None else {}
    return {
        **combine_stats(steps),
        f"{role}/steps": float(len(plan)),
        **counted,
        f"timing/{role}_step": time.perf_counter() - started,
    }


class CountsFlops:
    """What the driver asks a learner about its arithmetic (apo_ray/round_flops.py). Mixed into learners that
    hold `flop_counter`."""

    flop_counter: FlopCounter

    def forward_flops(self) -> int:
        """The FLOPs of the forward-only passes (log-probs, scores, values) since the last call."""
        return self.flop_counter.take_inference()

    def model_shape(self) -> ModelShape:
        return self.flop_counter.shape

    def threads(self) -> int:
        """The threads this process computes on (learner.threads, else Ray's from its CPUs)."""
        return torch.get_num_threads()

    def matmul_ceiling(self) -> float:
        """The float32 matmul rate of this process's threads (FLOP/s), against which its phases are measured;
        measured at the first call, while the learner is idle."""
        if getattr(self, "_matmul_ceiling", None) is None:
            self._matmul_ceiling = matmul_ceiling()
        return self._matmul_ceiling


class LearnerCheckpoint:
    """What the checkpointer calls on every learner: HF weights with the tokenizer (loadable by
    `from_pretrained`) and the engine's optimizer state. Mixed into learners that hold `model`,
    `tokenizer` and `engine`."""

    model: torch.nn.Module
    tokenizer: object
    engine: TrainEngine | None

    def save(self, directory: str) -> None:
        """The whole model as a plain HF directory (the `disk` weight sync's too): a LoRA learner's merged weights
        under the base model's names."""
        # The bare model's own state dict would hold ZeRO-3's empty partitions: save the gathered weights.
        state = self.engine.rank0_state_dict() if self.engine is not None else None
        if self.engine is None or self.engine.rank == 0:
            # A peft model would save its adapter alone; its base model writes the HF config with the weights.
            model = self.model.get_base_model() if is_adapted(self.model) else self.model
            model.save_pretrained(directory, state_dict=state)
            self.tokenizer.save_pretrained(directory)

    def save_checkpoint(self, directory: str, merge_lora: bool = False) -> None:
        """What a round checkpoint holds of the learner: `save`'s HF directory, or a LoRA learner's adapter in
        PEFT's format (adapter_model.safetensors, adapter_config.json) with, on `merge_lora`
        (checkpoint.merge_lora), its merged model in `directory`/merged."""
        if self.engine is None or not is_adapted(self.model):
            self.save(directory)
            return
        adapter = self.engine.rank0_state_dict(adapter=True)
        if self.engine.rank == 0:
            # peft's save_pretrained takes the adapter's saved names as they are (ZeRO-3's were gathered).
            self.model.save_pretrained(directory, state_dict=adapter)
            self.tokenizer.save_pretrained(directory)
        if merge_lora:
            self.save(str(Path(directory) / "merged"))

    def save_state(self, directory: str) -> None:
        self._trainable_engine().save_state(Path(directory))

    def load_state(self, directory: str) -> None:
        self._trainable_engine().load_state(Path(directory))

    def _trainable_engine(self) -> TrainEngine:
        if self.engine is None:
            raise RuntimeError(f"this {type(self).__name__} was created with trainable=False: it has no engine state")
        return self.engine
