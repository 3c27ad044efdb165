"""RewardLearner: the max player. Holds the RM, scores text, takes the APO step.

The math lives in apo_ray.losses; this actor only batches text, runs the model and steps the engine.
"""

from __future__ import annotations

import time

import numpy as np
import torch

from actors.engine import LearnerCheckpoint, TrainEngine
from apo_ray.config import LearnerConfig, RewardConfig
from apo_ray.game import PreferencePair
from apo_ray.losses import apo_reward_loss
from apo_ray.modeling import encode_for_reward, load_reward_model, load_tokenizer
from apo_ray.progress import Progress


class RewardLearner(LearnerCheckpoint):
    def __init__(
        self,
        model_path: str,
        *,
        reward: RewardConfig,
        learner: LearnerConfig,
        dtype: str = "auto",
        seed: int = 0,
        trainable: bool = True,
        trust_remote_code: bool = False,
    ):
        torch.manual_seed(seed)
        self.reward_cfg, self.learner_cfg = reward, learner
        self.dtype, self.trust_remote_code = dtype, trust_remote_code
        self.tokenizer = load_tokenizer(model_path, trust_remote_code)
        self.n_truncated = 0
        self.engine: TrainEngine | None = None
        self._load(model_path, trainable)

    def _load(self, path: str, trainable: bool) -> None:
        model = load_reward_model(path, self.dtype, self.trust_remote_code)
        if not trainable:
            self.model = model.eval()
            return
        self.engine = TrainEngine(
            model,
            backend=self.learner_cfg.backend,
            lr=self.reward_cfg.lr,
            zero_stage=self.learner_cfg.zero_stage,
            grad_clip=self.learner_cfg.grad_clip,
            weight_decay=self.learner_cfg.weight_decay,
            micro_batch_size=self.reward_cfg.batch_size,
        )
        self.model = self.engine.model

    def _forward(self, prompts: list[str], responses: list[str]) -> torch.Tensor:
        batch = encode_for_reward(self.tokenizer, prompts, responses, self.reward_cfg.max_length)
        self.n_truncated += batch.n_truncated
        batch = batch.to(self.model.device)
        return self.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits.squeeze(-1).float()

    @torch.no_grad()
    def score(self, prompts: list[str], responses: list[str], batch_size: int = 64) -> list[float]:
        self.model.eval()
        scores: list[float] = []
        for i in range(0, len(prompts), batch_size):
            scores.extend(self._forward(prompts[i : i + batch_size], responses[i : i + batch_size]).tolist())
        return scores

    def score_pairs(self, pairs: list[PreferencePair]) -> tuple[list[float], list[float]]:
        prompts = [p.prompt for p in pairs]
        chosen = self.score(prompts, [p.chosen for p in pairs])
        rejected = self.score(prompts, [p.rejected for p in pairs])
        return chosen, rejected

    def apo_step(
        self,
        apo_pairs: list[PreferencePair],
        human_pairs: list[PreferencePair],
        *,
        apo_coef: float,
        pref_coef: float,
        epochs: int,
        seed: int,
    ) -> dict[str, float]:
        """Minimise apo_coef * pair_loss(gold > sample) + pref_coef * BT(chosen > rejected), each term averaged
        as reward.apo_normalization says (apo_reward_loss).

        Each minibatch mixes both sets in proportion, so both terms are seen at every step. With no APO
        pairs this is plain RM training on human pairs (the initial RM and the fixed-RM baseline).
        """
        assert self.engine is not None, "this RewardLearner was created with trainable=False"
        started = time.perf_counter()
        total = len(apo_pairs) + len(human_pairs)
        n_steps = max(1, -(-total // self.reward_cfg.batch_size))
        rng = np.random.default_rng(seed)
        self.model.train()
        history: list[dict[str, float]] = []
        progress = Progress("rm_step", total=epochs * n_steps, unit="steps")
        for _ in range(epochs):
            apo_chunks = np.array_split(rng.permutation(len(apo_pairs)), n_steps)
            human_chunks = np.array_split(rng.permutation(len(human_pairs)), n_steps)
            for apo_idx, human_idx in zip(apo_chunks, human_chunks):
                apo = [apo_pairs[i] for i in apo_idx]
                human = [human_pairs[i] for i in human_idx]
                if not apo and not human:
                    continue
                prompts = [p.prompt for p in apo] * 2 + [p.prompt for p in human] * 2
                texts = (
                    [p.chosen for p in apo] + [p.rejected for p in apo]
                    + [p.chosen for p in human] + [p.rejected for p in human]
                )
                r = self._forward(prompts, texts)
                n_apo, n_human = len(apo), len(human)
                r_gold, r_sample = r[:n_apo], r[n_apo : 2 * n_apo]
                r_chosen, r_rejected = r[2 * n_apo : 2 * n_apo + n_human], r[2 * n_apo + n_human :]
                loss, stats = apo_reward_loss(
                    r_gold, r_sample, r_chosen, r_rejected,
                    apo_coef=apo_coef, pref_coef=pref_coef, kind=self.reward_cfg.loss,
                    normalization=self.reward_cfg.apo_normalization,
                )
                self.engine.step(loss)
                history.append(stats)
                progress.update()
        progress.close()
        keys = {k for h in history for k in h}
        out = {k: float(np.mean([h[k] for h in history if k in h])) for k in keys}
        out["rm/steps"] = float(len(history))
        out["timing/rm_step"] = time.perf_counter() - started
        return out

    def reinitialize(self, path: str) -> None:
        """The paper's non-`seq` setting: start this round's RM afresh from `path` (weights and optimizer)."""
        self._load(path, trainable=True)

    def truncation_count(self) -> int:
        return self.n_truncated
