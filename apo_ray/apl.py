"""APL's math and bookkeeping (Adversarial Preference Learning, arXiv 2505.24369), pure: the harmfulness metric
taken from the defender's own preference probabilities, the attacker's advantages, and the rates reported.

From the paper's abstract: harmfulness is measured directly from the model's intrinsic preference
probabilities (no external judge), a conditional generative attacker writes input-specific adversarial variants,
and attacker and defender are updated in alternating rounds of a closed loop. The formula implemented here is
this project's reading of "intrinsic preference probability" (the paper's full text was not available): a
Bradley-Terry preference of the defender pi for the unsafe answer y_u over the safe answer y_s of a prompt x,
on its length-normalised log-likelihoods,

    h(x) = sigmoid(beta * (lbar(y_u | x) - lbar(y_s | x))),   lbar(y | x) = (1/|y|) sum_t log pi(y_t | x, y_<t),

so h = 1/2 when the defender is indifferent, toward 1 when it would rather say the unsafe thing. The attacker's
reward for a rewrite x' of x is h(x'); the defender lowers it by DPO on (x', y_s preferred to y_u).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

from apo_ray.evaluation import mean_and_stderr
from apo_ray.losses import sequence_logprob
from apo_ray.ppo import grpo_advantages


def mean_token_logprobs(token_logps: Tensor, mask: Tensor) -> np.ndarray:
    """lbar per row of a [N, W] grid of per-token log-probs and its response mask."""
    return sequence_logprob(token_logps, mask, average=True).double().numpy()


def harmfulness(unsafe_logps: Sequence[float], safe_logps: Sequence[float], beta: float) -> np.ndarray:
    """h = sigmoid(beta * (lbar_unsafe - lbar_safe)) per prompt, from the defender's mean token log-probs."""
    if beta <= 0:
        raise ValueError(f"apl.harm_beta: must be > 0, got {beta}")
    unsafe, safe = np.asarray(unsafe_logps, dtype=np.float64), np.asarray(safe_logps, dtype=np.float64)
    if unsafe.shape != safe.shape:
        raise ValueError(f"unsafe_logps and safe_logps: shapes differ ({unsafe.shape} vs {safe.shape})")
    return 0.5 * (1.0 + np.tanh(beta * (unsafe - safe) / 2.0))  # sigmoid that cannot overflow


def attacker_advantages(harm: Sequence[float], prompt_ids: Sequence[int], mask: Tensor) -> Tensor:
    """GRPO advantages of the attacker's rewrites: h normalised within each clean prompt's rewrites, on every
    token of the rewrite ([N, W] like `mask`)."""
    per_rewrite = grpo_advantages(torch.tensor(harm, dtype=torch.float32), torch.tensor(prompt_ids))
    return per_rewrite[:, None] * mask.to(torch.float32)


def strongest_attacks(harm: Sequence[float], prompt_ids: Sequence[int]) -> dict[int, int]:
    """{clean prompt: index of its rewrite with the highest h}; ties go to the earliest rewrite."""
    best: dict[int, int] = {}
    for i, (h, p) in enumerate(zip(harm, prompt_ids)):
        if p not in best or h > harm[best[p]]:
            best[p] = i
    return best


def rate(flags: Sequence[bool], name: str) -> dict[str, float]:
    """{name: fraction of True, name_se: its standard error}."""
    mean, stderr = mean_and_stderr([float(f) for f in flags])
    return {name: mean, f"{name}_se": stderr}
