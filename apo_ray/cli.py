"""`apo-ray` command: `train` (the game; `--dry-run` checks a config and prints its placement plan), `report`
(plots of a run directory), `compare` (several runs side by side: one plot, one table), `resize` (ask a running
game for another number of rollout workers), `sft` and `rm` (the stages before the game, apo_ray.stages), `serve`
(the trained policy and RM over HTTP, apo_ray.serve), `export` (a LoRA policy merged into a plain model,
apo_ray.export)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from apo_ray.logs import configure_logging


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    commands = ("train", "report", "compare", "resize", "sft", "rm", "serve", "export")
    if not argv or argv[0] not in commands:
        print(
            f"usage: apo-ray {{{','.join(commands)}}} ...   (apo-ray train --help; apo-ray train --config X --dry-run)",
            file=sys.stderr,
        )
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
    if command == "export":
        from apo_ray.export import main as export_main

        return export_main(rest)
    if command == "resize":
        return resize_main(rest)
    return report_main(command, rest)


def report_main(command: str, rest: list[str]) -> int:
    """`apo-ray report RUN_DIR` (its plots and report.md; with several, as compare) and `apo-ray compare RUN_DIR
    ...` (one plot and one table of the runs side by side in --out)."""
    parser = argparse.ArgumentParser(
        prog=f"apo-ray {command}",
        description="plots and a summary of a run directory"
        if command == "report"
        else "several runs side by side (e.g. APO next to its fixed-RM baseline): comparison.png (gold +- SE, "
        "RM score, RM accuracy on policy pairs, KL per round) and comparison.md (a table) in --out",
    )
    parser.add_argument("run_dirs", type=Path, nargs="+", metavar="RUN_DIR")
    parser.add_argument(
        "--out", type=Path, help="where the comparison goes (default: comparison/ in the working directory)"
    )
    parser.add_argument("--labels", nargs="+", help="one name per run directory (default: the directories' names)")
    parser.add_argument(
        "-v", "--verbose", action="store_true", help="show apo-ray's debug lines and every library's own log lines"
    )
    args = parser.parse_args(rest)
    configure_logging(args.verbose)
    for run_dir in args.run_dirs:
        if not (run_dir / "metrics.jsonl").is_file():
            print(f"error: {run_dir}: no metrics.jsonl (not a run directory?)", file=sys.stderr)
            return 2
    if args.labels is not None and len(args.labels) != len(args.run_dirs):
        print(f"error: --labels: {len(args.labels)} labels for {len(args.run_dirs)} run directories", file=sys.stderr)
        return 2
    from apo_ray.report import compare_runs, write_report

    if command == "report" and len(args.run_dirs) == 1:
        print(write_report(args.run_dirs[0]))
    else:
        print(compare_runs(args.run_dirs, args.out or Path("comparison"), args.labels))
    return 0


def resize_main(argv: list[str]) -> int:
    from apo_ray.pool_size import ResizeRequestError, write_resize_request
    from apo_ray.train import CONFIG_FILE

    parser = argparse.ArgumentParser(
        prog="apo-ray resize",
        description="ask the game running in RUN_DIR for N rollout workers: it takes the request before its next "
        "sampling call, checks that the cluster holds N, logs the new size (rollout/num_workers) and "
        "keeps it until rollout.schedule's next entry",
    )
    parser.add_argument("run_dir", type=Path, metavar="RUN_DIR")
    parser.add_argument("num_workers", type=int, metavar="N")
    args = parser.parse_args(argv)
    if not (args.run_dir / CONFIG_FILE).is_file():
        print(f"error: {args.run_dir}: not a run directory (no {CONFIG_FILE})", file=sys.stderr)
        return 2
    try:
        path = write_resize_request(args.run_dir, args.num_workers)
    except ResizeRequestError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"asked for {args.num_workers} rollout workers ({path}); the run takes it before its next sampling call")
    return 0


if __name__ == "__main__":
    sys.exit(main())
