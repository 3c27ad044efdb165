"""The base of every config section, apart from apo_ray.config so that the method modules (apo_ray/methods/),
which apo_ray.config reads, can declare sections of their own."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class Section(BaseModel):
    """A config section: strict types (no "1" for 1, no 1 for true; an int is a valid float), finite numbers,
    no unknown keys."""

    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False, validate_default=False)
