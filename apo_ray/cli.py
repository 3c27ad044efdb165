"""`apo-ray` command: `train` (the game; `--dry-run` checks a config and prints its placement plan), `report`
(plots of a run directory)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from apo_ray.logs import configure_logging


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    commands = ("train", "report")
    if not argv or argv[0] not in commands:
        print(f"usage: apo-ray {{{','.join(commands)}}} ...   (apo-ray train --help; apo-ray train --config X --dry-run)",
              file=sys.stderr)
        return 2
    command, rest = argv[0], argv[1:]
    if command == "train":
        from apo_ray.train import main as train_main

        return train_main(rest)
    parser = argparse.ArgumentParser(prog="apo-ray report", description="plots and a summary of a run directory")
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="show apo-ray's debug lines and every library's own log lines")
    args = parser.parse_args(rest)
    configure_logging(args.verbose)
    if not (args.run_dir / "metrics.jsonl").is_file():
        print(f"error: {args.run_dir}: no metrics.jsonl (not a run directory?)", file=sys.stderr)
        return 2
    from apo_ray.report import write_report

    print(write_report(args.run_dir))
    return 0


if __name__ == "__main__":
    sys.exit(main())
