"""The one typed run configuration: YAML file + `key.sub=value` overrides, validated before any work.

Every field is declared with its type and, where it has one, its allowed range. Loading walks the YAML
against these declarations, so an unknown key, a wrong type or an out-of-range value fails with the
dotted key in the message (`reward.apo_coef: must be >= 0, got -1.0`) before Ray or any model starts.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal, Optional, Union

import yaml

from apo_ray.data import is_hub_name

POLICY_METHODS = ("rjs", "rrhf", "dpo", "ppo", "grpo", "reinforce_pp")
ONLINE_METHODS = ("ppo", "grpo", "reinforce_pp")


# Keys that moved when offline rounds and PPO iterations became one loop with one step counter.
RENAMED_KEYS = {
    "ppo.iterations": "rounds (a round of an online method is one PPO iteration)",
    "ppo.rm_update_every": "reward.update_every",
    "ppo.eval_every": "eval_every",
    "ppo.checkpoint_every": "checkpoint_every",
}


class ConfigError(ValueError):
    """A configuration problem; the message starts with the dotted key at fault."""


def resolve_dtype(name: str, on_gpu: bool) -> str:
    """The one rule for "auto": float32 on CPU (half precision is slow there, docs/architecture.md: 75 s vs 4.4 s per
    RM step), bfloat16 on GPU. Every role resolves through this, so no engine picks a dtype of its own
    (vLLM's own "auto" turns a float32 checkpoint into bfloat16)."""
    if name == "auto":
        return "bfloat16" if on_gpu else "float32"
    return name


def _range(lo: float | None = None, hi: float | None = None, *, lo_open: bool = False) -> dict:
    return {"range": (lo, hi, lo_open)}


@dataclass
class DataSourceConfig:
    path: str = ""
    format: Literal["jsonl", "hh", "hf"] = "jsonl"
    split: str = "train"
    prompt_key: str = "prompt"
    chosen_key: str = "chosen"
    rejected_key: str = "rejected"
    response_key: str = "response"
    limit: Optional[int] = field(default=None, metadata=_range(1))


@dataclass
class BuiltinTaskConfig:
    """Sizes of the embedded synthetic task (see apo_ray.builtin)."""

    n_pairs: int = field(default=400, metadata=_range(1))
    n_gold: int = field(default=64, metadata=_range(1))
    n_prompts: int = field(default=128, metadata=_range(1))
    n_eval_pairs: int = field(default=200, metadata=_range(1))
    sft_steps: int = field(default=150, metadata=_range(0))
    cache_dir: str = ".cache/apo_ray_builtin"


@dataclass
class DataConfig:
    task: Literal["builtin", "files"] = "builtin"
    builtin: BuiltinTaskConfig = field(default_factory=BuiltinTaskConfig)
    # One preference source split the paper's way; explicit sources below override its parts.
    source: Optional[DataSourceConfig] = None
    pairs: Optional[DataSourceConfig] = None
    gold: Optional[DataSourceConfig] = None
    prompts: Optional[DataSourceConfig] = None
    eval_pairs: Optional[DataSourceConfig] = None
    split_fractions: dict[str, float] = field(
        default_factory=lambda: {"pairs": 0.5, "gold": 0.2, "prompts": 0.2, "eval": 0.1}
    )


@dataclass
class ModelConfig:
    # "builtin" means: the tiny models the embedded task makes locally.
    policy_path: str = "builtin"
    reward_path: str = "builtin"
    # The evaluation RM scores policies but never plays; "gold" uses the task's oracle (builtin only).
    eval_reward: str = "gold"
    # Of every learner, and of the rollout engines unless rollout.dtype says otherwise (Config.learner_dtype).
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    max_prompt_tokens: int = field(default=64, metadata=_range(1))
    max_response_tokens: int = field(default=32, metadata=_range(1))
    trust_remote_code: bool = False
    # Dropout off in the policy, reference and critic (TRL's disable_dropout): with it on, log-probs taken
    # in train mode differ from the eval-mode ones that PPO's ratio and DPO's margin compare them with.
    disable_dropout: bool = True


@dataclass
class RolloutConfig:
    backend: Literal["vllm", "hf"] = "vllm"
    num_workers: int = field(default=1, metadata=_range(1))
    num_cpus_per_worker: float = field(default=1.0, metadata=_range(0.0))
    num_gpus_per_worker: float = field(default=0.0, metadata=_range(0.0))
    temperature: float = field(default=1.0, metadata=_range(0.0))
    top_p: float = field(default=1.0, metadata=_range(0.0, 1.0, lo_open=True))
    weight_sync: Literal["object_store", "disk", "nccl"] = "object_store"
    max_model_len: int = field(default=128, metadata=_range(8))
    # None: the learners' dtype. Set it to sample in another precision than the learners train in; the
    # difference shows in rollout/logprob_diff and PPO's ppo.tis corrects for it.
    dtype: Optional[Literal["float32", "bfloat16", "float16"]] = None
    engine_kwargs: dict[str, Any] = field(default_factory=dict)


@dataclass
class LearnerConfig:
    """How learners train: DeepSpeed (ZeRO) or plain torch, chosen explicitly."""

    backend: Literal["deepspeed", "torch"] = "deepspeed"
    zero_stage: int = field(default=2, metadata=_range(0, 3))
    num_cpus: float = field(default=1.0, metadata=_range(0.0))
    num_gpus: float = field(default=0.0, metadata=_range(0.0))
    grad_clip: float = field(default=1.0, metadata=_range(0.0))
    weight_decay: float = field(default=0.0, metadata=_range(0.0))
    # A learner whose constructor (model load, DeepSpeed start) has not returned by then stops the run, naming
    # it and any torch extension build lock it may wait on, instead of waiting silently.
    startup_timeout_s: float = field(default=600.0, metadata=_range(0.0, lo_open=True))


@dataclass
class RewardConfig:
    """The max player: the RM's APO step."""

    lr: float = field(default=5e-4, metadata=_range(0.0, lo_open=True))
    batch_size: int = field(default=32, metadata=_range(1))
    epochs_per_round: int = field(default=1, metadata=_range(1))
    # With apo=true the RM takes its APO step at the start of rounds 1, 1 + K, 1 + 2K, ... (K = update_every):
    # every round offline, every few PPO iterations online.
    update_every: int = field(default=1, metadata=_range(0))
    initial_epochs: int = field(default=3, metadata=_range(0))
    # None means the authors' code: 0.1 / samples_per_prompt.
    apo_coef: Optional[float] = field(default=None, metadata=_range(0.0))
    pref_coef: float = field(default=1.0, metadata=_range(0.0))
    loss: Literal["bt", "diff"] = "bt"
    # How the two terms are averaged (apo_ray.losses.apo_reward_loss): "per_term", each over its own pairs, or
    # "pooled", both summed and divided by the pairs of both (the authors' code): apo_coef is then per pair.
    apo_normalization: Literal["per_term", "pooled"] = "per_term"
    # False is the paper's "seq" setting: the RM continues from the last round.
    reinit_each_round: bool = False
    max_length: int = field(default=128, metadata=_range(8))


@dataclass
class PolicyConfig:
    """The min player: the policy step."""

    lr: float = field(default=1e-3, metadata=_range(0.0, lo_open=True))
    batch_size: int = field(default=32, metadata=_range(1))
    epochs_per_round: int = field(default=2, metadata=_range(1))
    dpo_beta: float = field(default=0.1, metadata=_range(0.0, lo_open=True))
    dpo_min_margin: float = field(default=0.0, metadata=_range(0.0))
    rrhf_sft_coef: float = field(default=1.0, metadata=_range(0.0))


@dataclass
class PPOConfig:
    """Online policy steps (ppo, grpo, reinforce_pp); each round is one PPO iteration."""

    prompts_per_iteration: int = field(default=32, metadata=_range(1))
    ppo_epochs: int = field(default=2, metadata=_range(1))
    minibatch_size: int = field(default=32, metadata=_range(1))
    clip_eps: float = field(default=0.2, metadata=_range(0.0, lo_open=True))
    value_clip_eps: float = field(default=0.2, metadata=_range(0.0, lo_open=True))
    gamma: float = field(default=1.0, metadata=_range(0.0, 1.0))
    lam: float = field(default=0.95, metadata=_range(0.0, 1.0))
    kl_estimator: Literal["k1", "k3"] = "k1"
    kl_coef: float = field(default=0.05, metadata=_range(0.0))
    adaptive_kl: bool = False
    kl_target: float = field(default=6.0, metadata=_range(0.0, lo_open=True))
    kl_horizon: int = field(default=10000, metadata=_range(1))
    # A hard limit besides the penalty: a minibatch whose estimated KL to the reference has reached
    # kl_hard_limit_at * kl_target steps on that KL alone, pulling the policy back (apo_ray.ppo.kl_limited_loss).
    # Engaging below the target leaves room for the last steps before it engages and for estimation noise:
    # engaged at the target itself, KL peaked 8-10% above it over 25 iterations.
    kl_hard_limit: bool = False
    kl_hard_limit_at: float = field(default=0.8, metadata=_range(0.0, 1.0, lo_open=True))
    # Truncated importance sampling (verl, TRL): each token's policy loss is weighted by
    # min(pi_learner_old / pi_sampler, tis_cap), correcting for the sampler's numerics (bf16 vLLM against
    # fp32 learners); on identical numerics the weight is 1 up to rounding.
    tis: bool = True
    tis_cap: float = field(default=2.0, metadata=_range(1.0))
    critic_init: Literal["reward", "policy"] = "reward"
    critic_lr: float = field(default=1e-3, metadata=_range(0.0, lo_open=True))
    whiten_advantages: bool = True


@dataclass
class LoggingConfig:
    tensorboard: bool = True
    wandb_project: Optional[str] = None
    wandb_mode: Literal["offline", "online", "disabled"] = "offline"
    ray_metrics: bool = True
    report: bool = True


@dataclass
class RayConfig:
    # None: start a local cluster; "auto": join the cluster this job runs on (ray job submit).
    address: Optional[str] = None
    num_cpus: Optional[int] = field(default=None, metadata=_range(1))


@dataclass
class Config:
    method: Literal["rjs", "rrhf", "dpo", "ppo", "grpo", "reinforce_pp"] = "rjs"
    # False is the paper's baseline: the RM is trained once on human pairs and then held fixed.
    apo: bool = True
    # The one step counter: offline a round is Algorithm 1's round, online one PPO iteration.
    rounds: int = field(default=3, metadata=_range(1))
    # Evaluation and checkpoints can cost more than a PPO iteration; the last round always has both.
    eval_every: int = field(default=1, metadata=_range(1))
    checkpoint_every: int = field(default=1, metadata=_range(1))
    samples_per_prompt: int = field(default=4, metadata=_range(1))
    seed: int = field(default=0, metadata=_range(0))
    run_dir: str = "runs/default"
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    learner: LearnerConfig = field(default_factory=LearnerConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    policy: PolicyConfig = field(default_factory=PolicyConfig)
    ppo: PPOConfig = field(default_factory=PPOConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    # How `apo-ray serve <run dir>` deploys this run's policy and RM (ServeConfig, end of this module).
    serve: ServeConfig = field(default_factory=lambda: ServeConfig())

    @property
    def learner_dtype(self) -> str:
        """model.dtype resolved once for every learner (auto: bfloat16 when the learners get GPUs)."""
        return resolve_dtype(self.model.dtype, on_gpu=self.learner.num_gpus > 0)

    @property
    def rollout_dtype(self) -> str:
        """The rollout engines' dtype: rollout.dtype, else the learners' (one dtype unless told otherwise)."""
        return self.rollout.dtype or self.learner_dtype

    @property
    def apo_coef(self) -> float:
        if self.reward.apo_coef is not None:
            return self.reward.apo_coef
        return 0.1 / self.samples_per_prompt

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check `value` against the annotation `tp`; return it converted (int -> float is allowed)."""
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        non_none = [a for a in args if a is not type(None)]
        return _coerce(value, non_none[0], key)
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            raise ConfigError(f"{key}: must be one of {', '.join(map(str, choices))}; got {value!r}")
        return value
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: must be a mapping, got {type(value).__name__}")
        return _build(tp, value, key)
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: must be a mapping, got {type(value).__name__}")
        _, value_type = typing.get_args(tp)
        if value_type is Any:
            return dict(value)
        return {k: _coerce(v, value_type, f"{key}.{k}") for k, v in value.items()}
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: must be true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: must be an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: must be a number, got {value!r}")
        if not math.isfinite(value):
            raise ConfigError(f"{key}: must be finite, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: must be a string, got {value!r}")
        return value
    raise ConfigError(f"{key}: unsupported type {_type_name(tp)}")


def _check_range(value: Any, spec: tuple, key: str) -> None:
    lo, hi, lo_open = spec
    if value is None:
        return
    if lo is not None and (value <= lo if lo_open else value < lo):
        raise ConfigError(f"{key}: must be {'>' if lo_open else '>='} {lo}, got {value}")
    if hi is not None and value > hi:
        raise ConfigError(f"{key}: must be <= {hi}, got {value}")


def _build(cls: type, values: dict, prefix: str) -> Any:
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        name = f"{prefix}.{unknown[0]}" if prefix else unknown[0]
        if name in RENAMED_KEYS:
            raise ConfigError(f"{name}: renamed to {RENAMED_KEYS[name]}")
        close = [k for k in fields if k.startswith(unknown[0][:3])]
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise ConfigError(f"{name}: unknown key{hint}")
    kwargs = {}
    for name, value in values.items():
        key = f"{prefix}.{name}" if prefix else name
        kwargs[name] = _coerce(value, hints[name], key)
        if "range" in fields[name].metadata:
            _check_range(kwargs[name], fields[name].metadata["range"], key)
    return cls(**kwargs)


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for i, part in enumerate(parts[:-1]):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"{'.'.join(parts[: i + 1])}: is not a section; cannot set {dotted}")
        node = child
    node[parts[-1]] = value


def parse_overrides(overrides: list[str]) -> dict:
    """`["reward.lr=1e-4", "apo=false"]` -> nested dict; values are parsed as YAML scalars."""
    tree: dict = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"{item}: override must look like key.sub=value")
        key, raw = item.split("=", 1)
        value = yaml.safe_load(raw) if raw != "" else ""
        # YAML reads 1e-4 as a string; accept the float the user meant.
        if isinstance(value, str):
            try:
                value = float(value) if any(c in value for c in "eE.") else value
            except ValueError:
                pass
        _set_dotted(tree, key.strip(), value)
    return tree


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for k, v in extra.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _cross_checks(cfg: Config) -> None:
    if cfg.method == "dpo" and cfg.samples_per_prompt < 2:
        raise ConfigError("samples_per_prompt: dpo needs at least 2 samples per prompt (best vs worst)")
    if cfg.method == "rrhf" and cfg.samples_per_prompt < 2:
        raise ConfigError("samples_per_prompt: rrhf ranks samples and needs at least 2 per prompt")
    if cfg.method == "grpo" and cfg.samples_per_prompt < 2:
        raise ConfigError("samples_per_prompt: grpo normalises within a group and needs at least 2")
    if cfg.apo and cfg.reward.update_every == 0:
        raise ConfigError("reward.update_every: 0 never steps the RM, which is the fixed-RM baseline; say so with apo=false")
    fractions = cfg.data.split_fractions
    unknown = sorted(set(fractions) - {"pairs", "gold", "prompts", "eval"})
    if unknown:
        raise ConfigError(f"data.split_fractions.{unknown[0]}: unknown split (pairs, gold, prompts, eval)")
    if any(v < 0 for v in fractions.values()) or sum(fractions.values()) > 1.0 + 1e-9:
        raise ConfigError(f"data.split_fractions: must be >= 0 and sum to <= 1, got {fractions}")
    if cfg.data.task == "files" and cfg.data.source is None:
        missing = [k for k in ("pairs", "gold", "prompts", "eval_pairs") if getattr(cfg.data, k) is None]
        if missing:
            raise ConfigError(f"data.{missing[0]}: task 'files' without data.source needs data.{', data.'.join(missing)}")
    if cfg.model.eval_reward == "gold" and cfg.data.task != "builtin":
        raise ConfigError("model.eval_reward: 'gold' is the builtin task's oracle; give an RM path for real data")
    if cfg.data.task == "builtin" and "builtin" not in (cfg.model.policy_path, cfg.model.reward_path):
        raise ConfigError("model.policy_path: the builtin task needs its own tokenizer; use policy_path=builtin")
    for key in ("policy_path", "reward_path", "eval_reward"):
        _check_model_path(getattr(cfg.model, key), f"model.{key}")
    # The rollout workers check these too, but only once Ray and the learners have started.
    model, rollout = cfg.model, cfg.rollout
    if model.max_prompt_tokens + model.max_response_tokens > rollout.max_model_len:
        raise ConfigError(
            f"rollout.max_model_len: {rollout.max_model_len} < model.max_prompt_tokens {model.max_prompt_tokens} "
            f"+ model.max_response_tokens {model.max_response_tokens}"
        )
    if rollout.backend != "vllm" and rollout.engine_kwargs:
        raise ConfigError("rollout.engine_kwargs: only the vllm backend takes engine arguments")
    if rollout.backend != "vllm" and rollout.weight_sync == "nccl":
        raise ConfigError("rollout.weight_sync: 'nccl' needs rollout.backend 'vllm'")
    if rollout.weight_sync == "nccl" and cfg.learner.backend == "deepspeed" and cfg.learner.zero_stage == 3:
        # The broadcast reads the learner's parameters as they are, and ZeRO-3 holds only a shard of each.
        raise ConfigError("rollout.weight_sync: 'nccl' does not gather ZeRO-3 shards yet; use learner.zero_stage "
                          "0-2 with nccl, or weight_sync 'object_store' / 'disk' at stage 3")
    if model.dtype == "float16":
        raise ConfigError(
            "model.dtype: float16 training needs loss scaling, which apo-ray's learners do not do; use bfloat16 "
            "or float32 (rollout.dtype=float16 samples in float16 with learners in another dtype)"
        )
    if cfg.learner.backend == "torch" and cfg.learner_dtype == "bfloat16":
        raise ConfigError(
            "model.dtype: bfloat16 with learner.backend=torch would step bfloat16 weights without fp32 master "
            "weights; use learner.backend=deepspeed (bf16 compute, fp32 master weights) or model.dtype=float32"
        )


def _check_model_path(path: str, key: str) -> None:
    """A local model must be a Hugging Face model directory; anything else must look like a hub name."""
    if path in ("builtin", "gold"):
        return
    local = Path(path).expanduser()
    if local.exists():
        if not (local / "config.json").is_file():
            raise ConfigError(f"{key}: {path} is not a Hugging Face model directory (no config.json)")
    elif path.startswith((".", "/", "~")):
        raise ConfigError(f"{key}: path does not exist: {path}")
    elif not is_hub_name(path):
        raise ConfigError(f"{key}: {path!r} is neither an existing directory nor a hub model name (org/name)")


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Read `path` (YAML), apply `overrides`, validate everything; raise ConfigError naming the key.

    Relative input paths in the file are read from the file's directory, those in `overrides` from the
    working directory (apo_ray.config_paths).
    """
    from apo_ray.config_paths import dotted_keys, resolve_paths

    extra = parse_overrides(overrides or [])
    tree = _merge(_read_yaml(path), extra)
    resolve_paths(tree, Path(path).resolve().parent if path is not None else None, dotted_keys(extra))
    return config_from_dict(tree)


def config_from_dict(tree: dict) -> Config:
    cfg = _build(Config, tree, "")
    _cross_checks(cfg)
    return cfg


# ---------------------------------------------------------------------------------------- offline stages
# `apo-ray sft` and `apo-ray rm` (apo_ray.stages): Ray Train jobs with a config file of their own.


@dataclass
class StageWorkersConfig:
    """Ray Train's ScalingConfig for a stage: one DeepSpeed rank per worker."""

    num_workers: int = field(default=1, metadata=_range(1))
    num_cpus_per_worker: float = field(default=1.0, metadata=_range(0.0))
    num_gpus_per_worker: float = field(default=0.0, metadata=_range(0.0))


@dataclass
class StageConfig:
    """What both stages share: a base model, a training set and an optional held-out set, the optimizer,
    Ray Train's workers, checkpoints and failure handling."""

    STAGE: ClassVar[str] = ""
    # A Hugging Face model directory or hub name; the stage writes its result to <run_dir>/model.
    base_model: str = ""
    # May use {stage}, {seed}, {time}; an existing run directory is never overwritten (resume it instead).
    run_dir: str = "runs/{stage}-{time}"
    seed: int = field(default=0, metadata=_range(0))
    train: DataSourceConfig = field(default_factory=DataSourceConfig)
    eval: Optional[DataSourceConfig] = None
    epochs: int = field(default=1, metadata=_range(1))
    # Examples (sft) or pairs (rm) per optimizer step over all workers together: each worker takes
    # batch_size / num_workers of them, so the step is the same with 1 worker or 4.
    batch_size: int = field(default=16, metadata=_range(1))
    eval_batch_size: int = field(default=32, metadata=_range(1))
    lr: float = field(default=1e-4, metadata=_range(0.0, lo_open=True))
    weight_decay: float = field(default=0.0, metadata=_range(0.0))
    grad_clip: float = field(default=1.0, metadata=_range(0.0))
    zero_stage: int = field(default=2, metadata=_range(0, 3))
    # float32 on CPU, bfloat16 (DeepSpeed bf16, fp32 master weights) on GPU; see resolve_dtype.
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"
    disable_dropout: bool = False
    trust_remote_code: bool = False
    # Optimizer steps between checkpoints (the last step always has one); each holds the HF model, the
    # DeepSpeed state, every rank's RNG and the data cursor, so a restarted run continues exactly.
    checkpoint_every: int = field(default=50, metadata=_range(1))
    keep_checkpoints: int = field(default=2, metadata=_range(1))
    # Ray Train's FailureConfig: how many times a failed worker group is restarted from the last checkpoint.
    max_failures: int = field(default=1, metadata=_range(0))
    workers: StageWorkersConfig = field(default_factory=StageWorkersConfig)
    ray: RayConfig = field(default_factory=RayConfig)

    @property
    def resolved_dtype(self) -> str:
        return resolve_dtype(self.dtype, on_gpu=self.workers.num_gpus_per_worker > 0)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass
class SFTStageConfig(StageConfig):
    """`apo-ray sft`: supervised fine-tuning of a causal LM on (prompt, response) texts (jsonl with
    prompt_key/response_key, or hh: each pair's chosen response)."""

    STAGE: ClassVar[str] = "sft"
    max_prompt_tokens: int = field(default=192, metadata=_range(1))
    max_response_tokens: int = field(default=64, metadata=_range(1))
    # As model.disable_dropout: the game's learners run the policy without dropout.
    disable_dropout: bool = True


@dataclass
class RMStageConfig(StageConfig):
    """`apo-ray rm`: a Bradley-Terry reward model on human preference pairs (jsonl, hh or hf)."""

    STAGE: ClassVar[str] = "rm"
    # Tokens per prompt + response; longer ones are cut from the left (the end of the dialogue survives).
    max_length: int = field(default=256, metadata=_range(8))


def _stage_checks(cfg: StageConfig) -> None:
    if not cfg.base_model:
        raise ConfigError("base_model: required (a Hugging Face model directory or hub name)")
    _check_model_path(cfg.base_model, "base_model")
    if not cfg.train.path:
        raise ConfigError("train.path: required (the training data file or dataset)")
    workers = cfg.workers.num_workers
    if cfg.batch_size % workers:
        raise ConfigError(f"batch_size: {cfg.batch_size} does not split evenly over workers.num_workers={workers}; "
                          f"use a multiple of {workers}")
    if cfg.workers.num_gpus_per_worker == 0 and cfg.dtype == "bfloat16":
        raise ConfigError("dtype: bfloat16 on CPU workers is slow and untested here; use float32 (or auto)")


def _read_yaml(path: str | Path | None) -> dict:
    """The YAML mapping at `path`; empty without one."""
    if path is None:
        return {}
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"--config: no such file: {path}")
    try:
        loaded = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
    if loaded is not None and not isinstance(loaded, dict):
        raise ConfigError(f"{path}: top level must be a mapping")
    return loaded or {}


def read_config_tree(path: str | Path | None, overrides: list[str] | None) -> dict:
    """The YAML mapping at `path` (empty without one) with `key.sub=value` overrides merged in. A stage's
    relative input paths resolve as the game's do (apo_ray.config_paths): from the file's directory if written
    there, from the working directory if given on the command line."""
    from apo_ray.config_paths import dotted_keys, resolve_stage_paths

    extra = parse_overrides(overrides or [])
    tree = _merge(_read_yaml(path), extra)
    resolve_stage_paths(tree, Path(path).resolve().parent if path is not None else None, dotted_keys(extra))
    return tree


def with_overrides(tree: dict, overrides: list[str]) -> dict:
    """`tree` with `key.sub=value` overrides merged in (a new mapping)."""
    return _merge(tree, parse_overrides(overrides))


StageT = typing.TypeVar("StageT", bound=StageConfig)


def load_stage_config(cls: type[StageT], path: str | Path | None = None, overrides: list[str] | None = None) -> StageT:
    """A stage's config from YAML and overrides, validated like the game's (errors name the key)."""
    return stage_config_from_dict(cls, read_config_tree(path, overrides))


def stage_config_from_dict(cls: type[StageT], tree: dict) -> StageT:
    cfg = _build(cls, tree, "")
    _stage_checks(cfg)
    return cfg


# ---------------------------------------------------------------------------------------- serving
# `apo-ray serve` (apo_ray.serve): the `serve` section of a run's config, or of a YAML file of its own.


@dataclass
class ServeDeploymentConfig:
    """One Ray Serve deployment: how many replicas, and each replica's resources."""

    replicas: int = field(default=1, metadata=_range(1))
    num_cpus: float = field(default=1.0, metadata=_range(0.0))
    num_gpus: float = field(default=0.0, metadata=_range(0.0))


@dataclass
class ServeLimitsConfig:
    """The most one request may ask for; a request beyond any of these gets a 4xx naming the field."""

    max_body_bytes: int = field(default=1 << 20, metadata=_range(1))
    # {prompt, response} items of one /score request.
    max_score_items: int = field(default=64, metadata=_range(1))
    # Characters of any one prompt or response string.
    max_text_chars: int = field(default=20_000, metadata=_range(1))
    # /generate: prompt tokens (longer prompts are refused, not cut), new tokens, samples, temperature.
    max_prompt_tokens: int = field(default=256, metadata=_range(1))
    max_tokens: int = field(default=128, metadata=_range(1))
    max_n: int = field(default=4, metadata=_range(1))
    max_temperature: float = field(default=2.0, metadata=_range(0.0))


@dataclass
class ServeConfig:
    # Loopback unless told otherwise; any other host needs a token.
    host: str = "127.0.0.1"
    port: int = field(default=8000, metadata=_range(1, 65535))
    # Clients send `Authorization: Bearer <token>`. The token is read from this environment variable when
    # the app starts, so it never lands in a config file or a run directory; required off loopback.
    token_env: str = "APO_RAY_SERVE_TOKEN"
    ingress: ServeDeploymentConfig = field(default_factory=lambda: ServeDeploymentConfig(num_cpus=0.5))
    reward: ServeDeploymentConfig = field(default_factory=ServeDeploymentConfig)
    policy: ServeDeploymentConfig = field(default_factory=ServeDeploymentConfig)
    # /score requests are scored together (@serve.batch): up to this many requests per forward pass,
    # waiting at most score_batch_wait_s for a batch to fill.
    score_max_batch_size: int = field(default=16, metadata=_range(1))
    score_batch_wait_s: float = field(default=0.01, metadata=_range(0.0))
    # Tokens per prompt + response for the RM, cut from the left; None: what the RM was trained with
    # (the run's reward.max_length or the rm stage's max_length), else 256.
    reward_max_length: Optional[int] = field(default=None, metadata=_range(8))
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"
    # The policy's vLLM engine (ray.serve.llm): context length (None: the policy's max_position_embeddings),
    # and on CPU its KV cache in bytes.
    max_model_len: Optional[int] = field(default=None, metadata=_range(8))
    kv_cache_bytes: int = field(default=1 << 30, metadata=_range(1 << 20))
    engine_kwargs: dict[str, Any] = field(default_factory=dict)
    limits: ServeLimitsConfig = field(default_factory=ServeLimitsConfig)


def check_serve_config(cfg: ServeConfig, key: str = "serve") -> None:
    limits = cfg.limits
    if cfg.max_model_len is not None and limits.max_prompt_tokens + limits.max_tokens > cfg.max_model_len:
        raise ConfigError(f"{key}.max_model_len: {cfg.max_model_len} < {key}.limits.max_prompt_tokens "
                          f"{limits.max_prompt_tokens} + {key}.limits.max_tokens {limits.max_tokens}")
    if not cfg.token_env:
        raise ConfigError(f"{key}.token_env: empty; name the environment variable that holds the token")


def serve_config_from_dict(tree: dict) -> ServeConfig:
    """A ServeConfig from the mapping under a config's `serve` key (errors name `serve.<key>`)."""
    if not isinstance(tree, dict):
        raise ConfigError(f"serve: must be a mapping, got {type(tree).__name__}")
    cfg = _build(ServeConfig, tree, "serve")
    check_serve_config(cfg)
    return cfg
