"""The policy methods (the min player's step), declared once each: one module per method in this package, each
calling `register_method` with its declaration. Importing this package imports every module in it, so a new
method is one new file (docs/extending.md, "Adding a method").

Read from the registry:
- apo_ray.config: the `method` key's choices and description, policy.lr's default, the samples_per_prompt
  check, which keys each method reads (another method's key is refused by name) and the sections of the methods
  that have one (`ipo.tau`);
- actors/policy.py: the offline loss of each learner step; apo_ray/offline.py: what each offline method trains on
  (its selection); apo_ray/online.py: each online method's advantages and where its KL goes;
- the placement and the actors' start-up: the learners a method trains beside the policy and the RM (ppo's critic).

Pure: no Ray and no actors (tests/test_layers.py), so the learners can read their losses from here.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel

Family = Literal["offline", "online"]
FAMILIES: tuple[Family, ...] = ("offline", "online")
# What an offline method's learner step trains on, hence its loss's arguments and what the loss is a mean over
# (a rank's share of a minibatch is weighed by its part of that):
#   "samples": the selected samples;  loss(token_logps, mask, **settings); a mean over response tokens (RJS).
#   "groups":  (sample, score) per sample, grouped by prompt;  loss(token_logps, mask, rewards, group_ids,
#              **settings); a mean over the prompts' groups (RRHF).
#   "pairs":   chosen/rejected pairs (apo_ray.game.RolloutPair), with the reference's sequence log-probs;
#              loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, **settings) on sequence log-probs
#              [B]; a mean over pairs (DPO, IPO).
Batch = Literal["samples", "groups", "pairs"]
BATCHES: tuple[Batch, ...] = ("samples", "groups", "pairs")
# Every loss returns (scalar loss tensor, {stat: float}).
Loss = Callable[..., tuple[Any, dict[str, float]]]


def no_settings(cfg: Any) -> dict[str, Any]:
    return {}


@dataclass(frozen=True)
class Method:
    """One method's declaration. `cfg` below is the run's apo_ray.config.Config."""

    name: str
    family: Family
    about: str  # a few words for the `method` key's description
    lr: float  # policy.lr when the config leaves it out
    min_samples_per_prompt: int = 1
    why_min_samples: str = ""  # the end of the refusal of fewer: "dpo needs at least 2 samples per prompt <...>"
    # Learners it trains besides the policy and the RM; the reference and the evaluation RM every run has.
    roles: tuple[str, ...] = ()
    # Keys of the shared sections read by this method and not by every method of its family.
    keys: tuple[str, ...] = ()
    # Its own section, if it has settings of its own, at the top-level key of its name (`ipo.tau`).
    section: type[BaseModel] | None = None
    # Offline: what the learner step trains on, its loss (pure, on the learner), the loss's keyword arguments
    # read from cfg (on the driver), and select(rollouts, scores, cfg) (on the driver): the round's training
    # examples in the form `batch` names.
    batch: Batch | None = None
    loss: Loss | None = None
    settings: Callable[[Any], dict[str, Any]] = no_settings
    select: Callable[..., list] | None = None
    # Online: advantages(scores, grids, *, ppo, kl_coef, group_ids) -> (per-token advantages [N, W], the critic's
    # targets or None), pure; and whether the KL to the reference is a loss term (GRPO) rather than a penalty in
    # the rewards.
    advantages: Callable[..., tuple[Any, Any]] | None = None
    kl_in_loss: bool = False

    def __post_init__(self):
        if self.family not in FAMILIES:
            raise ValueError(f"method {self.name}: family must be one of {', '.join(FAMILIES)}, got {self.family!r}")
        needs = ("batch", "loss", "select") if self.family == "offline" else ("advantages",)
        missing = [field for field in needs if getattr(self, field) is None]
        if missing:
            raise ValueError(f"method {self.name}: an {self.family} method declares {', '.join(missing)}")
        if self.batch is not None and self.batch not in BATCHES:
            raise ValueError(f"method {self.name}: batch must be one of {', '.join(BATCHES)}, got {self.batch!r}")
        if self.min_samples_per_prompt > 1 and not self.why_min_samples:
            raise ValueError(f"method {self.name}: say why it needs {self.min_samples_per_prompt} samples per prompt")

    def section_keys(self) -> tuple[str, ...]:
        return tuple(f"{self.name}.{key}" for key in self.section.model_fields) if self.section else ()


_REGISTRY: dict[str, Method] = {}


def register_method(method: Method) -> Method:
    """Add a method to the registry; a name may be registered once."""
    if method.name in _REGISTRY:
        raise ValueError(f"method {method.name}: registered twice")
    _REGISTRY[method.name] = method
    return method


def methods(family: Family | None = None) -> list[Method]:
    """The registered methods, offline before online, by name within a family (the order of the docs' lists)."""
    chosen = [m for m in _REGISTRY.values() if family in (None, m.family)]
    return sorted(chosen, key=lambda m: (FAMILIES.index(m.family), m.name))


def method_names(family: Family | None = None) -> tuple[str, ...]:
    return tuple(m.name for m in methods(family))


def get_method(name: str) -> Method:
    if name not in _REGISTRY:
        raise ValueError(f"method: must be one of {', '.join(method_names())}; got {name!r}")
    return _REGISTRY[name]


def _import_every_method() -> None:
    for module in sorted(info.name for info in pkgutil.iter_modules(__path__)):
        importlib.import_module(f"{__name__}.{module}")


_import_every_method()
