"""The game's seed streams: one per use, so that e.g. changing S does not change the evaluation samples,
and a resumed run draws what an uninterrupted one would."""

from __future__ import annotations

from enum import IntEnum


class SeedStream(IntEnum):
    # 0 was the gold prompts' samples, which now come from the round's one call (apo_ray/round_samples.py).
    POLICY = 1  # the round's samples: its policy prompts, then the gold prompts when its RM step is due
    EVAL = 2  # evaluation samples: the same every round, so rounds compare like with like
    RM = 3  # the RM step's minibatch order
    POLICY_STEP = 4  # the policy step's minibatch order
    DISCRIMINATOR = 5  # AAPA: the SFT samples its discriminator is fitted on, and the fit's minibatch order
    ATTACK = 6  # APL: the attacker's rewrites of the round's prompts
    ATTACK_STEP = 7  # APL: the attacker's minibatch order, and the safe / unsafe answers of a round


def round_seed(seed: int, round_index: int, stream: int) -> int:
    return (seed * 1_000_003 + round_index * 7_919 + stream * 104_729) % (2**31 - 1)
