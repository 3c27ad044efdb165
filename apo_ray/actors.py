"""apo_ray.actors, read from a checkout: the repository keeps the Ray actor classes in its top-level actors/
folder, which an install places at apo_ray/actors (pyproject.toml's package-dir). Where this package is
imported from the source tree instead (the repository root on sys.path, or a Ray job's working_dir), this
module stands in for that package and points its submodule search at the folder. An installed apo_ray has
the actors/ package beside this file, and Python's import takes the package over the module."""

from pathlib import Path

__path__ = [str(Path(__file__).resolve().parent.parent / "actors")]
