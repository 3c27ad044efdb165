"""`apo-ray` command: `train` (the game), `report` (plots of a run directory), `sft` and `rm` (the stages
before the game, apo_ray.stages), `serve` (the trained policy and RM over HTTP, apo_ray.serve)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    commands = ("train", "report", "sft", "rm", "serve")
    if not argv or argv[0] not in commands:
        print(f"usage: apo-ray {{{','.join(commands)}}} ...   (apo-ray train --help)", file=sys.stderr)
        return 2
    command, rest = argv[0], argv[1:]
    if command == "train":
        from apo_ray.train import main as train_main

        return train_main(rest)
    if command in ("sft", "rm"):
        from apo_ray.stages.cli import main as stage_main

        return stage_main(command, rest)
    if command == "serve":
        from apo_ray.serve.cli import main as serve_main

        return serve_main(rest)
    parser = argparse.ArgumentParser(prog="apo-ray report", description="plots and a summary of a run directory")
    parser.add_argument("run_dir", type=Path)
    args = parser.parse_args(rest)
    if not (args.run_dir / "metrics.jsonl").is_file():
        print(f"error: {args.run_dir}: no metrics.jsonl (not a run directory?)", file=sys.stderr)
        return 2
    from apo_ray.report import write_report

    print(write_report(args.run_dir))
    return 0


if __name__ == "__main__":
    sys.exit(main())
