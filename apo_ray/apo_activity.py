"""Whether the APO term of the RM's loss is playing: the rule behind the run's "APO term inert" warning.

Measured on main (issue 11): at the default apo_coef the gold-vs-sample term was 1.6-2.4% of the RM loss and
its loss did not fall over 5 rounds, and the RM behaved as a fixed one; at apo_coef=1.0 the same runs gained
gold score. Either sign alone is enough to say the game is not being played.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

SHARE, LOSS = "rm/apo_share", "rm/loss_apo"
# Two RM steps before the share can be said to *stay* low; three before the loss can be said not to fall.
MIN_STEPS_FOR_SHARE, MIN_STEPS_FOR_LOSS = 2, 3


def inert_apo_reason(
    rm_steps: Sequence[Mapping[str, float]], min_share: float, restarts_each_round: bool = False
) -> str | None:
    """Why the APO term looks inert over the APO RM steps so far (each a row with rm/apo_share and
    rm/loss_apo, in round order), or None while it does not.

    Inert when its share of the RM loss was below `min_share` at every one of at least 2 RM steps (the RM's
    gradient is the human term's), or when over at least 3 RM steps its loss never fell below the first
    step's (the RM does not learn to tell the golden answers from the policy's samples). The second rule
    needs an RM that carries over from round to round: one that `restarts_each_round`
    (reward.reinit_each_round) meets each round's samples fresh from the human-pair RM, so its APO loss
    rises with every round the policy moves away from round 0, whether or not it learns within the round.
    """
    steps = [row for row in rm_steps if row.get(LOSS) is not None]
    shares = [row[SHARE] for row in steps if row.get(SHARE) is not None]
    if len(shares) >= MIN_STEPS_FOR_SHARE and max(shares) < min_share:
        return (
            f"{SHARE} stayed below reward.apo_inert_share={min_share:g} at all {len(shares)} RM steps "
            f"(at most {max(shares):.3f}); raise reward.apo_coef or use reward.apo_normalization=pooled"
        )
    losses = [row[LOSS] for row in steps]
    if not restarts_each_round and len(losses) >= MIN_STEPS_FOR_LOSS and min(losses[1:]) >= losses[0]:
        return (
            f"{LOSS} did not fall below its first RM step's {losses[0]:.3f} in {len(losses) - 1} more "
            f"(last {losses[-1]:.3f}); raise reward.apo_coef or reward.epochs_per_round"
        )
    return None
