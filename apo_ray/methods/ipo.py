"""IPO (Azar et al. 2023, "A General Theoretical Paradigm to Understand Learning from Human Preferences"): on the
pairs DPO trains on (each prompt's best vs worst sample by RM score), regress the log-ratio margin

    h = log(pi(y_w) / ref(y_w)) - log(pi(y_l) / ref(y_l))

onto 1 / (2 tau): loss = (h - 1 / (2 tau))^2, averaged over pairs. DPO's logistic loss keeps pushing h up while the
preference is deterministic; IPO's square stops at the target, so tau alone sets how far the policy moves from the
reference. The log-probabilities are sums over response tokens, as in the paper and as DPO's here (TRL's "ipo"
averages them over tokens instead).
"""

from __future__ import annotations

from pydantic import Field

from apo_ray.config_section import Section
from apo_ray.game import best_and_worst
from apo_ray.losses import pair_stats
from apo_ray.methods import Method, register_method


class IPOConfig(Section):
    """Method ipo's settings."""

    tau: float = Field(
        0.1,
        gt=0.0,
        description=(
            "IPO's tau: the loss pulls each pair's log-ratio margin to 1 / (2 tau), so a smaller tau lets the policy "
            "move further from the reference."
        ),
    )


def loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, *, tau: float):
    """IPO on sequence log-probs [B]; returns (loss, stats), the log-ratios standing for the rewards in the stats."""
    chosen = policy_chosen_logps - ref_chosen_logps
    rejected = policy_rejected_logps - ref_rejected_logps
    margin = chosen - rejected
    value = ((margin - 1.0 / (2.0 * tau)) ** 2).mean()
    return value, pair_stats(value, chosen, rejected)


def select(rollouts, scores, cfg):
    # Tied best and worst give no pair (a margin of 0 is not a preference).
    return best_and_worst(rollouts, scores)


register_method(
    Method(
        "ipo",
        "offline",
        about="best vs worst by RM score, squared loss to a margin of 1/(2 ipo.tau)",
        # DPO's: the same pairs, and Adam's steps do not scale with the loss's gradient (IPO's is far larger at the
        # start). Not tuned: IPO has not run on the quality benchmark.
        lr=1e-4,
        min_samples_per_prompt=2,
        why_min_samples="it pairs the best with the worst",
        section=IPOConfig,
        batch="pairs",
        loss=loss,
        select=select,
        settings=lambda cfg: {"tau": cfg.ipo.tau},
    )
)
