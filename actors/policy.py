"""PolicyLearner: the min player. The reference model's log-prob machinery plus an engine and the
offline policy steps (RJS, RRHF, DPO); the losses themselves are in apo_ray.losses."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from actors.engine import TrainEngine
from actors.reference import ReferenceModel
from apo_ray.config import LearnerConfig, ModelConfig, PolicyConfig
from apo_ray.game import PreferencePair
from apo_ray.losses import dpo_loss, rrhf_loss, sequence_logprob, sft_loss
from apo_ray.modeling import encode_for_lm, response_token_logprobs

LossFn = Callable[[list[int]], tuple[torch.Tensor, dict[str, float]]]


class PolicyLearner(ReferenceModel):
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

    def _logps(self, prompts: list[str], responses: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        batch = encode_for_lm(
            self.tokenizer, prompts, responses, self.model_cfg.max_prompt_tokens, self.model_cfg.max_response_tokens
        ).to(self.model.device)
        return response_token_logprobs(self.model, batch)

    def _train(self, groups: list[list[int]], epochs: int, seed: int, loss_fn: LossFn) -> dict[str, float]:
        """Shuffle `groups` (lists of item indices kept together) into minibatches and step on each."""
        started = time.perf_counter()
        rng = np.random.default_rng(seed)
        self.model.train()
        history = []
        for _ in range(epochs):
            order = rng.permutation(len(groups))
            batch: list[int] = []
            for g in order:
                batch.extend(groups[g])
                if len(batch) >= self.policy_cfg.batch_size or g == order[-1]:
                    loss, stats = loss_fn(batch)
                    self.engine.step(loss)
                    history.append(stats)
                    batch = []
        self.model.eval()
        keys = {k for h in history for k in h}
        out = {k: float(np.mean([h[k] for h in history if k in h])) for k in keys}
        out["policy/steps"] = float(len(history))
        out["timing/policy_step"] = time.perf_counter() - started
        return out

    def sft_step(self, prompts: list[str], responses: list[str], *, epochs: int, seed: int) -> dict[str, float]:
        """RJS's policy step: supervised fine-tuning on the best-of-S responses."""

        def loss_fn(idx: list[int]):
            logps, mask = self._logps([prompts[i] for i in idx], [responses[i] for i in idx])
            loss = sft_loss(logps, mask)
            return loss, {"policy/loss": loss.item()}

        return self._train([[i] for i in range(len(prompts))], epochs, seed, loss_fn)

    def rrhf_step(
        self, prompts: list[str], responses: list[str], rewards: list[float], group_ids: list[int], *, epochs: int, seed: int
    ) -> dict[str, float]:
        groups: dict[int, list[int]] = {}
        for i, g in enumerate(group_ids):
            groups.setdefault(g, []).append(i)

        def loss_fn(idx: list[int]):
            logps, mask = self._logps([prompts[i] for i in idx], [responses[i] for i in idx])
            return rrhf_loss(
                logps, mask, torch.tensor([rewards[i] for i in idx]), torch.tensor([group_ids[i] for i in idx]),
                sft_coef=self.policy_cfg.rrhf_sft_coef,
            )

        return self._train(list(groups.values()), epochs, seed, loss_fn)

    def dpo_step(
        self, pairs: list[PreferencePair], ref_chosen: list[float], ref_rejected: list[float], *, epochs: int, seed: int
    ) -> dict[str, float]:
        def loss_fn(idx: list[int]):
            prompts = [pairs[i].prompt for i in idx]
            logps, mask = self._logps(prompts * 2, [pairs[i].chosen for i in idx] + [pairs[i].rejected for i in idx])
            seq = sequence_logprob(logps, mask, average=False)
            n = len(idx)
            return dpo_loss(
                seq[:n], seq[n:], torch.tensor([ref_chosen[i] for i in idx]), torch.tensor([ref_rejected[i] for i in idx]),
                beta=self.policy_cfg.dpo_beta,
            )

        return self._train([[i] for i in range(len(pairs))], epochs, seed, loss_fn)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.engine.full_state_dict()

    def save(self, directory: str) -> None:
        self.model.save_pretrained(directory)
        self.tokenizer.save_pretrained(directory)

    def save_state(self, directory: str) -> None:
        self.engine.save_state(Path(directory))

    def load_state(self, directory: str) -> None:
        self.engine.load_state(Path(directory))
