"""PolicyLearner: the min player. The reference model's log-prob machinery plus an engine and the
offline policy steps (RJS, RRHF, DPO) and the online PPO step; the losses themselves are in apo_ray.losses
and apo_ray.ppo. Every step trains on token samples exactly as the rollout workers drew them."""

from __future__ import annotations

import time
from typing import Callable

import numpy as np
import torch

from actors.engine import LearnerCheckpoint, TrainEngine
from actors.reference import ReferenceModel
from apo_ray.config import LearnerConfig, ModelConfig, PolicyConfig, PPOConfig
from apo_ray.game import TokenSample
from apo_ray.losses import dpo_loss, masked_mean, rrhf_loss, sequence_logprob, sft_loss, token_logprobs
from apo_ray.modeling import encode_samples, minibatches
from apo_ray.weight_sync import NcclWeightSender
from apo_ray.ppo import entropy_from_logits, kl_limited_loss, kl_penalty, ppo_policy_loss
from apo_ray.progress import Progress

LossFn = Callable[[list[int]], tuple[torch.Tensor, dict[str, float]]]


class PolicyLearner(ReferenceModel, LearnerCheckpoint):
    def __init__(
        self,
        model_path: str,
        *,
        model: ModelConfig,
        policy: PolicyConfig,
        learner: LearnerConfig,
        seed: int = 0,
    ):
        torch.manual_seed(seed)
        super().__init__(model_path, model=model)
        self.policy_cfg = policy
        self.engine = TrainEngine(
            self.model,
            backend=learner.backend,
            lr=policy.lr,
            zero_stage=learner.zero_stage,
            grad_clip=learner.grad_clip,
            weight_decay=learner.weight_decay,
            micro_batch_size=policy.batch_size,
        )
        self.model = self.engine.model
        self._nccl_sender: NcclWeightSender | None = None

    def _train(self, groups: list[list[int]], epochs: int, seed: int, loss_fn: LossFn) -> dict[str, float]:
        """Shuffle `groups` (lists of item indices kept together) into minibatches and step on each."""
        started = time.perf_counter()
        rng = np.random.default_rng(seed)
        self.model.train()
        history = []
        progress = Progress("policy_step", unit="steps")
        for _ in range(epochs):
            order = rng.permutation(len(groups))
            batch: list[int] = []
            for g in order:
                batch.extend(groups[g])
                if len(batch) >= self.policy_cfg.batch_size or g == order[-1]:
                    loss, stats = loss_fn(batch)
                    self.engine.step(loss)
                    history.append(stats)
                    progress.update()
                    batch = []
        progress.close()
        self.model.eval()
        keys = {k for h in history for k in h}
        out = {k: float(np.mean([h[k] for h in history if k in h])) for k in keys}
        out["policy/steps"] = float(len(history))
        out["timing/policy_step"] = time.perf_counter() - started
        return out

    def sft_step(self, samples: list[TokenSample], *, epochs: int, seed: int) -> dict[str, float]:
        """RJS's policy step: supervised fine-tuning on the best-of-S samples."""

        def loss_fn(idx: list[int]):
            logps, mask = self._logps([samples[i] for i in idx])
            loss = sft_loss(logps, mask)
            return loss, {"policy/loss": loss.item()}

        return self._train([[i] for i in range(len(samples))], epochs, seed, loss_fn)

    def rrhf_step(
        self, samples: list[TokenSample], rewards: list[float], group_ids: list[int], *, epochs: int, seed: int
    ) -> dict[str, float]:
        groups: dict[int, list[int]] = {}
        for i, g in enumerate(group_ids):
            groups.setdefault(g, []).append(i)

        def loss_fn(idx: list[int]):
            logps, mask = self._logps([samples[i] for i in idx])
            return rrhf_loss(
                logps, mask, torch.tensor([rewards[i] for i in idx]), torch.tensor([group_ids[i] for i in idx]),
                sft_coef=self.policy_cfg.rrhf_sft_coef,
            )

        return self._train(list(groups.values()), epochs, seed, loss_fn)

    def dpo_step(
        self, chosen: list[TokenSample], rejected: list[TokenSample], ref_chosen: list[float],
        ref_rejected: list[float], *, epochs: int, seed: int
    ) -> dict[str, float]:
        def loss_fn(idx: list[int]):
            logps, mask = self._logps([chosen[i] for i in idx] + [rejected[i] for i in idx])
            seq = sequence_logprob(logps, mask, average=False)
            n = len(idx)
            return dpo_loss(
                seq[:n], seq[n:], torch.tensor([ref_chosen[i] for i in idx]), torch.tensor([ref_rejected[i] for i in idx]),
                beta=self.policy_cfg.dpo_beta,
            )

        return self._train([[i] for i in range(len(chosen))], epochs, seed, loss_fn)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.engine.full_state_dict()

    def send_weights_nccl(self, workers: list) -> int:
        """The `nccl` weight sync's learner side: broadcast the weights into the workers' vLLM engines."""
        if self._nccl_sender is None:
            self._nccl_sender = NcclWeightSender(self.model)
        return self._nccl_sender.send(workers)

    # ------------------------------------------------------------------ online (apo_ray.online)

    def ppo_step(
        self,
        samples: list[TokenSample],
        old_logps: torch.Tensor,
        advantages: torch.Tensor,
        mask: torch.Tensor,
        *,
        ppo: PPOConfig,
        seed: int,
        ref_logps: torch.Tensor | None = None,
        kl_loss_coef: float = 0.0,
    ) -> dict[str, float]:
        """PPO's clipped update: ppo.ppo_epochs passes of shuffled minibatches of ppo.minibatch_size rollouts.

        old_logps, advantages, mask are [N, W] grids as `token_logprobs(samples)` lays them out.
        With `ref_logps` and kl_loss_coef > 0 the KL to the reference is a loss term (GRPO's way) rather
        than a penalty inside the rewards. Entropy is measured, not optimised.
        """
        if (kl_loss_coef > 0 or ppo.kl_hard_limit) and ref_logps is None:
            raise ValueError("ppo_step: kl_loss_coef > 0 and ppo.kl_hard_limit need ref_logps")
        device = self.model.device

        def loss_fn(idx: list[int]) -> tuple[torch.Tensor, dict[str, float]]:
            batch = encode_samples([samples[i] for i in idx], self.tokenizer.pad_token_id).to(device)
            logits = self.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
            logps = token_logprobs(logits, batch.input_ids)
            m = batch.response_mask[:, 1:]
            rows = GridRows(idx, logps.shape[1], device)
            if not torch.equal(m, rows.of(mask)):
                raise RuntimeError("ppo_step: the samples' response positions differ from the rollout grid's")
            loss, clipfrac, approx_kl = ppo_policy_loss(logps, rows.of(old_logps), rows.of(advantages), m, ppo.clip_eps)
            stats = {"policy/loss": loss.item(), "policy/clipfrac": clipfrac, "policy/approx_kl": approx_kl}
            if kl_loss_coef > 0:
                kl = masked_mean(kl_penalty(logps, rows.of(ref_logps), ppo.kl_estimator), m)
                loss = loss + kl_loss_coef * kl
                stats["policy/kl_loss"] = kl.item()
            if ppo.kl_hard_limit:
                # Measured on the policy as it is before this minibatch's step: the KL the update has reached.
                loss, stats["policy/kl_during_update"], limited = kl_limited_loss(
                    loss, logps, rows.of(old_logps), rows.of(ref_logps), m, ppo.kl_hard_limit_at * ppo.kl_target)
                stats["policy/kl_limited_fraction"] = float(limited)
            with torch.no_grad():
                stats["policy/entropy"] = entropy_from_logits(logits[:, :-1], m).item()
            return loss, stats

        return train_minibatches(
            self.engine, len(samples), minibatch_size=ppo.minibatch_size, epochs=ppo.ppo_epochs, seed=seed,
            loss_fn=loss_fn, role="policy",
        )


class GridRows:
    """Rows `idx` of batch-wide [N, W] token grids, cut to a minibatch's own width `width`.

    Rows are right-padded, so a minibatch encoded on its own has the same tokens in its first columns.
    """

    def __init__(self, idx: list[int], width: int, device: torch.device):
        self.idx, self.width, self.device = idx, width, device

    def of(self, grid: torch.Tensor) -> torch.Tensor:
        return grid[self.idx, : self.width].to(self.device)


def train_minibatches(
    engine: TrainEngine, n_items: int, *, minibatch_size: int, epochs: int, seed: int, loss_fn: LossFn, role: str,
) -> dict[str, float]:
    """`epochs` passes over range(n_items) in freshly shuffled minibatches, one engine step each.

    Returns the mean of the stats `loss_fn` reports, `{role}/steps` and `timing/{role}_step`.
    """
    started = time.perf_counter()
    generator = torch.Generator().manual_seed(seed)
    engine.model.train()
    history: list[dict[str, float]] = []
    try:
        for _ in range(epochs):
            for idx in minibatches(n_items, minibatch_size, generator):
                loss, stats = loss_fn(idx)
                engine.step(loss)
                history.append(stats)
    finally:
        engine.model.eval()
    out = {k: float(np.mean([h[k] for h in history if k in h])) for k in {k for h in history for k in h}}
    out[f"{role}/steps"] = float(len(history))
    out[f"timing/{role}_step"] = time.perf_counter() - started
    return out
