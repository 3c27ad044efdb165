"""`apo-ray rm`: a Bradley-Terry reward model fitted on human preference pairs, the RM the game starts from.

The data is loaded and checked in the driver (apo_ray.data: file and line on every error) before Ray
starts; each Ray Train worker then runs `RewardModelTask` on its share of every batch.
"""

from __future__ import annotations

import numpy as np
import torch

from apo_ray.config import RMStageConfig
from apo_ray.data import load_pairs
from apo_ray.evaluation import expected_calibration_error, preference_accuracy
from apo_ray.game import PreferencePair
from apo_ray.losses import bradley_terry_loss
from apo_ray.modeling import encode_for_reward, load_reward_model, load_tokenizer
from apo_ray.stages.task import StageData, items_with_truncation


def truncation_stats(tokenizer, pairs: list[PreferencePair], max_length: int) -> dict[str, int]:
    """How many pairs have a side longer than max_length tokens (those are cut from the left, not dropped)."""
    lengths = {
        side: [len(ids) for ids in tokenizer([p.prompt + getattr(p, side) for p in pairs])["input_ids"]]
        for side in ("chosen", "rejected")
    }
    over = {side: [n > max_length for n in values] for side, values in lengths.items()}
    every = lengths["chosen"] + lengths["rejected"]
    return {
        "pairs": len(pairs),
        "pairs_truncated": sum(c or r for c, r in zip(over["chosen"], over["rejected"])),
        "sequences_truncated": sum(over["chosen"]) + sum(over["rejected"]),
        "median_tokens": int(np.median(every)),
        "max_tokens": max(every),
    }


def load_rm_data(cfg: RMStageConfig) -> StageData:
    tokenizer = load_tokenizer(cfg.base_model, cfg.trust_remote_code)
    return items_with_truncation(cfg, load_pairs, lambda pairs: truncation_stats(tokenizer, pairs, cfg.max_length))


class RewardModelTask:
    unit = "pairs"

    def __init__(self, cfg: RMStageConfig):
        self.cfg = cfg
        self.tokenizer = load_tokenizer(cfg.base_model, cfg.trust_remote_code)

    def load_model(self) -> torch.nn.Module:
        cfg = self.cfg
        return load_reward_model(
            cfg.base_model, cfg.resolved_dtype, cfg.trust_remote_code, cfg.disable_dropout, pooling=cfg.pooling
        )

    def _scores(self, model: torch.nn.Module, pairs: list[PreferencePair]) -> tuple[torch.Tensor, torch.Tensor]:
        """r(chosen), r(rejected) in one forward pass (the driver counted the truncated ones)."""
        prompts = [p.prompt for p in pairs] * 2
        batch = encode_for_reward(
            self.tokenizer, prompts, [p.chosen for p in pairs] + [p.rejected for p in pairs], self.cfg.max_length
        )
        device = next(model.parameters()).device
        scores = (
            model(input_ids=batch.input_ids.to(device), attention_mask=batch.attention_mask.to(device))
            .logits.squeeze(-1)
            .float()
        )
        return scores[: len(pairs)], scores[len(pairs) :]

    def loss(self, model: torch.nn.Module, pairs: list[PreferencePair]) -> tuple[torch.Tensor, dict[str, float]]:
        chosen, rejected = self._scores(model, pairs)
        loss = bradley_terry_loss(chosen, rejected)
        return loss, {
            "rm/loss": loss.item(),
            "rm/acc_train": preference_accuracy(chosen, rejected),
            "rm/margin_train": (chosen - rejected).mean().item(),
        }

    @torch.no_grad()
    def eval_records(self, model: torch.nn.Module, pairs: list[PreferencePair]) -> list[tuple[float, float]]:
        out: list[tuple[float, float]] = []
        size = max(1, self.cfg.eval_batch_size // 2)
        for start in range(0, len(pairs), size):
            chosen, rejected = self._scores(model, pairs[start : start + size])
            out += list(zip(chosen.tolist(), rejected.tolist()))
        return out

    @staticmethod
    def eval_metrics(records: list[tuple[float, float]]) -> dict[str, float]:
        chosen, rejected = (np.array(side) for side in zip(*records))
        return {
            "rm/acc": preference_accuracy(chosen, rejected),
            "rm/ece": expected_calibration_error(chosen, rejected),
            "rm/margin": float(np.mean(chosen - rejected)),
            "rm/eval_pairs": float(len(records)),
        }
