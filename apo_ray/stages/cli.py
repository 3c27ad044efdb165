"""`apo-ray sft` and `apo-ray rm`: the offline stages before the game, as Ray Train jobs.

Exit codes as for `apo-ray train`: 0 done; 2 bad input (config key, or data file and line, or run
directory), reported before Ray starts; 3 training diverged; 1 the job failed after its restarts.
"""

from __future__ import annotations

import argparse
import sys

from apo_ray.config import ConfigError, RMStageConfig, SFTStageConfig, StageConfig, load_stage_config
from apo_ray.config_docs import add_help_config
from apo_ray.data import DataError
from apo_ray.logs import add_verbose_flag, configure_logging
from apo_ray.train import RunDirError

STAGES: dict[str, type[StageConfig]] = {"sft": SFTStageConfig, "rm": RMStageConfig}
DESCRIPTIONS = {
    "sft": "supervised fine-tuning of the policy on (prompt, response) texts, as a Ray Train job",
    "rm": "a Bradley-Terry reward model on human preference pairs, as a Ray Train job",
}


def build_parser(stage: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=f"apo-ray {stage}", description=DESCRIPTIONS[stage])
    parser.add_argument("--config", help=f"YAML stage config (e.g. configs/{stage}_*.yaml)")
    parser.add_argument(
        "--resume",
        metavar="RUN_DIR",
        help="continue this stage's run directory from its last checkpoint (overrides may add epochs)",
    )
    add_verbose_flag(parser)
    add_help_config(parser, stage)
    parser.add_argument("overrides", nargs="*", help="key.sub=value overrides, e.g. workers.num_workers=2 lr=1e-4")
    return parser


def main(stage: str, argv: list[str] | None = None) -> int:
    args = build_parser(stage).parse_args(argv)
    configure_logging(args.verbose)
    from apo_ray.deadlines import DeadlinePassed
    from apo_ray.stages.runner import StageFailed, load_for_resume, prepare_stage, run_stage

    cls = STAGES[stage]
    try:
        if args.resume:
            if args.config:
                raise ConfigError("--config: not with --resume (the run directory has its config)")
            cfg = load_for_resume(cls, args.resume, args.overrides)
        else:
            cfg = load_stage_config(cls, args.config, args.overrides)
        prepared = prepare_stage(cfg, resume=bool(args.resume))
    except (ConfigError, DataError, RunDirError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        run_stage(prepared)
    except ConfigError as exc:  # resources the cluster cannot hold, found once Ray is up
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except StageFailed as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 3 if exc.diverged else 1
    except DeadlinePassed as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 6
    return 0
