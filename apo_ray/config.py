"""The one typed run configuration: YAML file + `key.sub=value` overrides, validated before any work.

The sections are pydantic v2 models (strict types, declared ranges, unknown keys forbidden). Pydantic rather
than OmegaConf structured configs: its errors carry the failing key's location, type and bounds as data, so
they become one line naming the dotted key and what is allowed (`reward.apo_coef: must be >= 0, got -1.0`);
OmegaConf's are exceptions with text to parse, and it cannot express ranges or strict booleans. Loading fails
on the first bad key before Ray or any model starts. A key that the chosen method never reads (`ppo.*` for
RJS, `policy.dpo_beta` for PPO) is refused by name; one that a switch turns off (`reward.update_every` with
apo=false) is named in a warning and left out of the saved config (`keys_the_run_ignores`).
"""

from __future__ import annotations

import logging
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal, Optional

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from apo_ray.data import is_hub_name

log = logging.getLogger(__name__)

POLICY_METHODS = ("rjs", "rrhf", "dpo", "ppo", "grpo", "reinforce_pp")
ONLINE_METHODS = ("ppo", "grpo", "reinforce_pp")
# policy.lr when the config leaves it out. The offline methods' were chosen on the quality benchmark's tuning
# seeds (benchmarks/results/quality/tuning/): at 1e-3 DPO and RRHF lost gold from round 1, fixed RM or APO.
# The online methods' is their configs' (configs/ppo.yaml, grpo.yaml).
POLICY_LR = {"rjs": 1e-3, "rrhf": 1e-5, "dpo": 1e-4, "ppo": 3e-4, "grpo": 3e-4, "reinforce_pp": 3e-4}


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


class Section(BaseModel):
    """A config section: strict types (no "1" for 1, no 1 for true; an int is a valid float), finite numbers,
    no unknown keys."""

    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False, validate_default=False)


class DataSourceConfig(Section):
    path: str = ""
    format: Literal["jsonl", "hh", "hf"] = "jsonl"
    split: str = "train"
    prompt_key: str = "prompt"
    chosen_key: str = "chosen"
    rejected_key: str = "rejected"
    response_key: str = "response"
    # Records (lines, rows) passed over before the first one read, then at most `limit`: two sources on one
    # file with skip = the other's limit split it, e.g. a holdout for tuning from the end of a training set.
    skip: int = Field(0, ge=0)
    limit: Optional[int] = Field(None, ge=1)
    # A hub dataset's subdirectory (`format: hh` or `hf` with a hub name): Anthropic/hh-rlhf keeps each subset in
    # one, e.g. harmless-base.
    data_dir: Optional[str] = None


class BuiltinTaskConfig(Section):
    """Sizes of the embedded synthetic task (see apo_ray.builtin)."""

    n_pairs: int = Field(400, ge=1)
    n_gold: int = Field(64, ge=1)
    n_prompts: int = Field(128, ge=1)
    n_eval_pairs: int = Field(200, ge=1)
    # The initial policy's SFT (apo_ray.builtin.models.sft_initial_policy): it learns to name its prompt's topic
    # after 200-300 steps, so 500; 4,096 behaviour examples, so that it learns the copy rather than the examples.
    n_sft: int = Field(4096, ge=1)
    sft_steps: int = Field(500, ge=0)
    cache_dir: str = ".cache/apo_ray_builtin"


class DataConfig(Section):
    task: Literal["builtin", "files"] = "builtin"
    builtin: BuiltinTaskConfig = Field(default_factory=BuiltinTaskConfig)
    # One preference source split the paper's way; explicit sources below override its parts.
    source: Optional[DataSourceConfig] = None
    pairs: Optional[DataSourceConfig] = None
    gold: Optional[DataSourceConfig] = None
    prompts: Optional[DataSourceConfig] = None
    eval_pairs: Optional[DataSourceConfig] = None
    split_fractions: dict[str, float] = Field(
        default_factory=lambda: {"pairs": 0.5, "gold": 0.2, "prompts": 0.2, "eval": 0.1}
    )
    chat_template: str = Field("auto", min_length=1, description=(
        "How the policy reads prompts (apo_ray/chat.py). 'auto': through the policy tokenizer's chat template "
        "if it has one (an HH dialogue as its user and assistant turns, other text as one user turn, with the "
        "generation prompt; written responses end with the template's end-of-turn token), else as raw text. "
        "'none': raw text. Otherwise a Jinja template file, read from the config file's directory. Reward "
        "models read the conversation in the data's own form either way."))


class ModelConfig(Section):
    # "builtin" means: the tiny models the embedded task makes locally.
    policy_path: str = "builtin"
    reward_path: str = "builtin"
    # The evaluation RM scores policies but never plays; "gold" uses the task's oracle (builtin only).
    eval_reward: str = "gold"
    # Of every learner, and of the rollout engines unless rollout.dtype says otherwise (Config.learner_dtype).
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    max_prompt_tokens: int = Field(64, ge=1)
    max_response_tokens: int = Field(32, ge=1)
    trust_remote_code: bool = False
    # Dropout off in the policy, reference and critic (TRL's disable_dropout): with it on, log-probs taken
    # in train mode differ from the eval-mode ones that PPO's ratio and DPO's margin compare them with.
    disable_dropout: bool = True


class RolloutConfig(Section):
    backend: Literal["vllm", "hf"] = "vllm"
    num_workers: int = Field(1, ge=1)
    # {round: workers}: from that round on, that many workers sample (apo_ray/pool_size.py); a request made while
    # the run goes (`apo-ray resize RUN_DIR N`) holds until the schedule's next entry. The placement plan
    # reserves room for the most workers it names.
    schedule: dict[Annotated[int, Field(ge=1)], Annotated[int, Field(ge=1)]] = Field(default_factory=dict)
    num_cpus_per_worker: float = Field(1.0, ge=0.0)
    num_gpus_per_worker: float = Field(0.0, ge=0.0)
    temperature: float = Field(1.0, ge=0.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    weight_sync: Literal["object_store", "disk", "nccl"] = "object_store"
    # The object_store and nccl syncs move weights in flat buffers of this many MiB rather than one transfer per
    # tensor (apo_ray/named_tensors.py pack_buckets; vLLM's packed NCCL broadcast): larger buckets mean fewer
    # transfers, smaller ones less memory beside the learner's weights while it packs (or two in flight on GPU).
    sync_bucket_mb: int = Field(256, ge=1)
    max_model_len: int = Field(128, ge=8)
    # None: the learners' dtype. Set it to sample in another precision than the learners train in; the
    # difference shows in rollout/logprob_diff and PPO's ppo.tis corrects for it.
    dtype: Optional[Literal["float32", "bfloat16", "float16"]] = None
    engine_kwargs: dict[str, Any] = Field(default_factory=dict)

    @property
    def peak_workers(self) -> int:
        """The most workers num_workers and the schedule ask for at once."""
        return max([self.num_workers, *self.schedule.values()])


class LearnerConfig(Section):
    """How learners train: DeepSpeed (ZeRO) or plain torch, chosen explicitly."""

    backend: Literal["deepspeed", "torch"] = "deepspeed"
    zero_stage: int = Field(2, ge=0, le=3)
    num_cpus: float = Field(1.0, ge=0.0)
    num_gpus: float = Field(0.0, ge=0.0)
    grad_clip: float = Field(1.0, ge=0.0)
    weight_decay: float = Field(0.0, ge=0.0)
    # A learner whose constructor (model load, DeepSpeed start) has not returned by then stops the run, naming
    # it and any torch extension build lock it may wait on, instead of waiting silently.
    startup_timeout_s: float = Field(600.0, gt=0.0)
    # DeepSpeed data-parallel ranks of each trained learner (policy, reward, critic), each rank in a bundle of
    # learner.num_cpus / learner.num_gpus, one placement group per role: ZeRO shards over them, and each rank
    # trains on its slice of every minibatch, so a step is the step one rank takes on the whole minibatch.
    # The frozen reference and evaluation RM, AAPA's discriminator and APL's attacker stay one process each.
    num_ranks: int = Field(1, ge=1)
    # Per-role overrides of num_ranks (None: num_ranks): an RM or critic smaller than the policy needs fewer.
    policy_ranks: Optional[int] = Field(None, ge=1)
    reward_ranks: Optional[int] = Field(None, ge=1)
    critic_ranks: Optional[int] = Field(None, ge=1)

    def ranks(self, role: str) -> int:
        """Ranks of the trained learner `role` (policy, reward, critic)."""
        override = getattr(self, f"{role}_ranks")
        return self.num_ranks if override is None else override


class RewardConfig(Section):
    """The max player: the RM's APO step."""

    lr: float = Field(5e-4, gt=0.0)
    batch_size: int = Field(32, ge=1)
    epochs_per_round: int = Field(1, ge=1)
    # With apo=true the RM takes its APO step at the start of rounds 1, 1 + K, 1 + 2K, ... (K = update_every):
    # every round offline, every few PPO iterations online.
    update_every: int = Field(1, ge=0)
    initial_epochs: int = Field(3, ge=0)
    # Chosen on the tuning seeds (benchmarks/results/quality/tuning/): at the authors' 0.1 / samples_per_prompt
    # (None) the APO term was under 5% of the RM loss in 8 of 10 seeds and did not play. None still means theirs.
    apo_coef: Optional[float] = Field(1.0, ge=0.0)
    pref_coef: float = Field(1.0, ge=0.0)
    loss: Literal["bt", "diff"] = "bt"
    # How the two terms are averaged (apo_ray.losses.apo_reward_loss): "per_term", each over its own pairs, or
    # "pooled", both summed and divided by the pairs of both (the authors' code): apo_coef is then per pair.
    apo_normalization: Literal["per_term", "pooled"] = "per_term"
    # False is the paper's "seq" setting: the RM continues from the last round.
    reinit_each_round: bool = False
    max_length: int = Field(128, ge=8)
    # The run warns that the APO term is inert when its share of the RM loss stays below this at every RM step
    # (apo_ray.apo_activity): measured on main, 1.6-2.4% at the authors' apo_coef, where it did not play.
    apo_inert_share: float = Field(0.05, ge=0.0, le=1.0)


class PolicyConfig(Section):
    """The min player's optimizer, and the offline policy steps (rjs, rrhf, dpo); online methods read only lr
    (their batches are ppo.*)."""

    # Left out of a run's config: the method's (POLICY_LR), set when the Config is validated.
    lr: float = Field(1e-3, gt=0.0)
    batch_size: int = Field(32, ge=1)
    epochs_per_round: int = Field(2, ge=1)
    dpo_beta: float = Field(0.1, gt=0.0)
    dpo_min_margin: float = Field(0.0, ge=0.0)
    rrhf_sft_coef: float = Field(1.0, ge=0.0)


class PPOConfig(Section):
    """Online policy steps (ppo, grpo, reinforce_pp); each round is one PPO iteration."""

    prompts_per_iteration: int = Field(32, ge=1)
    ppo_epochs: int = Field(2, ge=1)
    minibatch_size: int = Field(32, ge=1)
    clip_eps: float = Field(0.2, gt=0.0)
    value_clip_eps: float = Field(0.2, gt=0.0)
    gamma: float = Field(1.0, ge=0.0, le=1.0)
    lam: float = Field(0.95, ge=0.0, le=1.0)
    kl_estimator: Literal["k1", "k3"] = "k1"
    kl_coef: float = Field(0.05, ge=0.0)
    adaptive_kl: bool = False
    kl_target: float = Field(6.0, gt=0.0)
    kl_horizon: int = Field(10000, ge=1)
    # A hard limit besides the penalty: a minibatch whose estimated KL to the reference has reached
    # kl_hard_limit_at * kl_target steps on that KL alone, pulling the policy back (apo_ray.ppo.kl_limited_loss).
    # Engaging below the target leaves room for the last steps before it engages and for estimation noise:
    # engaged at the target itself, KL peaked 8-10% above it over 25 iterations.
    kl_hard_limit: bool = False
    kl_hard_limit_at: float = Field(0.8, gt=0.0, le=1.0)
    # Truncated importance sampling (verl, TRL): each token's policy loss is weighted by
    # min(pi_learner_old / pi_sampler, tis_cap), correcting for the sampler's numerics (bf16 vLLM against
    # fp32 learners); on identical numerics the weight is 1 up to rounding.
    tis: bool = True
    tis_cap: float = Field(2.0, ge=1.0)
    # One-step off-policy rollouts (as in NeMo-RL, verl): the pool samples iteration k+1 with weights k-1 while
    # the learners train on iteration k, so sampling and training overlap; rollout/policy_version_lag is 1 from
    # the second iteration on, and ppo.tis corrects with the sampler's log-probs (it must stay on).
    async_rollouts: bool = False
    critic_init: Literal["reward", "policy"] = "reward"
    critic_lr: float = Field(1e-3, gt=0.0)
    whiten_advantages: bool = True


class EvalConfig(Section):
    """The held-out evaluation (APOGame.evaluate): the policy's samples on held-out prompts, judged by the gold
    oracle or the evaluation RM. Its standard errors shrink as 1/sqrt(prompts * samples_per_prompt): 64 x 2
    samples gave about 0.1 on the gold score, too wide to see a round's effect; the default judges 2,048."""

    # The first this many distinct prompts of the held-out pairs (all of them, with a warning, when fewer).
    prompts: int = Field(64, ge=1)
    # At least 2: the standard errors are taken within prompts, and RM accuracy on the policy's own
    # distribution is taken over the within-prompt pairs.
    samples_per_prompt: int = Field(32, ge=2)
    # Round r's evaluation runs during round r+1, on the CPUs its RM and policy steps leave idle, with the
    # same figures (apo_ray/held_out_evaluation.py). Costs one more copy of the RM's weights in memory. It
    # evaluates in place, saying why, for the last round, with ppo.async_rollouts and with ZeRO-3.
    overlap: bool = True


class LoggingConfig(Section):
    tensorboard: bool = True
    wandb_project: Optional[str] = None
    wandb_mode: Literal["offline", "online", "disabled"] = "offline"
    ray_metrics: bool = True
    report: bool = True


class RayConfig(Section):
    # None: start a local cluster of its own (beside any `ray start` one); "auto": join the cluster of this
    # machine or job (ray job submit sets RAY_ADDRESS).
    address: Optional[str] = None
    num_cpus: Optional[int] = Field(None, ge=1)


# ---------------------------------------------------------------------------------------- serving
# `apo-ray serve` (apo_ray.serve): the `serve` section of a run's config, or of a YAML file of its own.


class ServeDeploymentConfig(Section):
    """One Ray Serve deployment: how many replicas, and each replica's resources."""

    replicas: int = Field(1, ge=1)
    num_cpus: float = Field(1.0, ge=0.0)
    num_gpus: float = Field(0.0, ge=0.0)


class ServeLimitsConfig(Section):
    """The most one request may ask for; a request beyond any of these gets a 4xx naming the field."""

    max_body_bytes: int = Field(1 << 20, ge=1)
    # {prompt, response} items of one /score request.
    max_score_items: int = Field(64, ge=1)
    # Characters of any one prompt or response string.
    max_text_chars: int = Field(20_000, ge=1)
    # /generate: prompt tokens (longer prompts are refused, not cut), new tokens, samples, temperature.
    max_prompt_tokens: int = Field(256, ge=1)
    max_tokens: int = Field(128, ge=1)
    max_n: int = Field(4, ge=1)
    max_temperature: float = Field(2.0, ge=0.0)


class ServeConfig(Section):
    # Loopback unless told otherwise; any other host needs a token.
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)
    # Clients send `Authorization: Bearer <token>`. The token is read from this environment variable when
    # the app starts, so it never lands in a config file or a run directory; required off loopback.
    token_env: str = "APO_RAY_SERVE_TOKEN"
    ingress: ServeDeploymentConfig = Field(default_factory=lambda: ServeDeploymentConfig(num_cpus=0.5))
    reward: ServeDeploymentConfig = Field(default_factory=ServeDeploymentConfig)
    policy: ServeDeploymentConfig = Field(default_factory=ServeDeploymentConfig)
    # /score requests are scored together (@serve.batch): up to this many requests per forward pass,
    # waiting at most score_batch_wait_s for a batch to fill.
    score_max_batch_size: int = Field(16, ge=1)
    score_batch_wait_s: float = Field(0.01, ge=0.0)
    # Tokens per prompt + response for the RM, cut from the left; None: what the RM was trained with
    # (the run's reward.max_length or the rm stage's max_length), else 256.
    reward_max_length: Optional[int] = Field(None, ge=8)
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"
    # The policy's vLLM engine (ray.serve.llm): context length (None: the policy's max_position_embeddings),
    # and on CPU its KV cache in bytes.
    max_model_len: Optional[int] = Field(None, ge=8)
    kv_cache_bytes: int = Field(1 << 30, ge=1 << 20)
    engine_kwargs: dict[str, Any] = Field(default_factory=dict)
    limits: ServeLimitsConfig = Field(default_factory=ServeLimitsConfig)

    @model_validator(mode="after")
    def _limits_fit_the_engine(self) -> ServeConfig:
        limits = self.limits
        if self.max_model_len is not None and limits.max_prompt_tokens + limits.max_tokens > self.max_model_len:
            raise ConfigError(f"serve.max_model_len: {self.max_model_len} < serve.limits.max_prompt_tokens "
                              f"{limits.max_prompt_tokens} + serve.limits.max_tokens {limits.max_tokens}")
        if not self.token_env:
            raise ConfigError("serve.token_env: empty; name the environment variable that holds the token")
        return self


# ---------------------------------------------------------------------------------------- sibling games
# AAPA and APL (README "AAPA" and "APL"): games on the same actors, off unless `enabled`.


class AAPAConfig(Section):
    """AAPA (apo_ray/aapa.py, apo_ray/anchoring.py): a discriminator fitted once on the gold set's expert answers
    vs SFT-policy samples, then frozen; its anchoring reward is added to every policy step's reward."""

    enabled: bool = False
    # The discriminator's initial weights: "reward" is the RM architecture as the run builds it (model.reward_path,
    # before round 0 fits it; on the builtin task its untrained tiny RM), else an HF sequence-classifier path.
    discriminator_path: str = "reward"
    # The anchor's weight against the RM score (apo_ray.aapa.anchored_rewards).
    coef: float = Field(0.5, ge=0.0)
    # log_prob: log D (GAIL's form, <= 0); logit: log D - log(1 - D) (AIRL's form).
    reward: Literal["log_prob", "logit"] = "log_prob"
    # The staged configuration: rounds 1..anchor_only_rounds optimise the anchor alone, later ones RM + anchor.
    anchor_only_rounds: int = Field(0, ge=0)
    # The offline fit: the gold answers vs samples_per_prompt SFT samples per gold prompt, in minibatches
    # holding both in proportion, for this many epochs.
    epochs: int = Field(3, ge=1)
    lr: float = Field(1e-3, gt=0.0)
    batch_size: int = Field(32, ge=1)
    max_length: int = Field(128, ge=8)
    # This share of the gold prompts (their answers and samples) is left out of the fit, to measure the
    # frozen discriminator on (aapa/disc_acc_heldout); 0 fits on all of them and measures nothing.
    held_out_fraction: float = Field(0.2, ge=0.0, lt=1.0)


class APLAttackerConfig(Section):
    """APL's attacker: a causal LM (the defender's SFT policy to start) on a learner and rollout workers of its
    own, sized apart from the defender's."""

    lr: float = Field(3e-4, gt=0.0)
    # Its policy-gradient step (GRPO advantages over each prompt's rewrites, PPO's clipped ratio).
    epochs: int = Field(2, ge=1)
    minibatch_size: int = Field(32, ge=1)
    clip_eps: float = Field(0.2, gt=0.0)
    temperature: float = Field(1.0, gt=0.0)
    # Tokens it may write per rewrite; only its first apl.max_attack_words adjectives are kept.
    max_tokens: int = Field(12, ge=1)
    num_cpus: float = Field(1.0, ge=0.0)
    num_gpus: float = Field(0.0, ge=0.0)
    rollout_workers: int = Field(1, ge=1)
    rollout_num_cpus_per_worker: float = Field(1.0, ge=0.0)
    rollout_num_gpus_per_worker: float = Field(0.0, ge=0.0)


class APLConfig(Section):
    """APL (apo_ray/apl.py, apo_ray/apl_step.py): each round the attacker rewrites prompts to raise the
    defender's (the policy's) own preference for an unsafe answer, then the defender takes a DPO step on safe vs
    unsafe answers to the attacked and clean prompts. Builtin task only (its oracle defines harm)."""

    enabled: bool = False
    # Policy prompts attacked per round, and rewrites per prompt (the attacker's GRPO group).
    prompts_per_round: int = Field(32, ge=1)
    attacks_per_prompt: int = Field(4, ge=2)
    # Words an attack may add to a prompt's `about` slot (apo_ray.builtin.harm.attacked_prompt).
    max_attack_words: int = Field(3, ge=1)
    # The harmfulness metric's inverse temperature (apo_ray.apl.harmfulness).
    harm_beta: float = Field(1.0, gt=0.0)
    # SFT steps of the builtin defender, which learns from data where negative words in a prompt provoke
    # negative answers (apo_ray.builtin.harm), so that there are attacks to find.
    defender_sft_steps: int = Field(300, ge=1)
    attacker: APLAttackerConfig = Field(default_factory=APLAttackerConfig)


# ---------------------------------------------------------------------------------------- the game


class Config(Section):
    method: Literal["rjs", "rrhf", "dpo", "ppo", "grpo", "reinforce_pp"] = "rjs"
    # False is the paper's baseline: the RM is trained once on human pairs and then held fixed.
    apo: bool = True
    # The one step counter: offline a round is Algorithm 1's round, online one PPO iteration.
    rounds: int = Field(3, ge=1)
    # Evaluation and checkpoints can cost more than a PPO iteration; the last round always has both.
    eval_every: int = Field(1, ge=1)
    checkpoint_every: int = Field(1, ge=1)
    samples_per_prompt: int = Field(4, ge=1)
    seed: int = Field(0, ge=0)
    run_dir: str = "runs/default"
    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    rollout: RolloutConfig = Field(default_factory=RolloutConfig)
    learner: LearnerConfig = Field(default_factory=LearnerConfig)
    reward: RewardConfig = Field(default_factory=RewardConfig)
    policy: PolicyConfig = Field(default_factory=PolicyConfig)
    ppo: PPOConfig = Field(default_factory=PPOConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    logging: LoggingConfig = Field(default_factory=LoggingConfig)
    ray: RayConfig = Field(default_factory=RayConfig)
    # How `apo-ray serve <run dir>` deploys this run's policy and RM.
    serve: ServeConfig = Field(default_factory=ServeConfig)
    # The sibling games; each off unless enabled (issue 14).
    aapa: AAPAConfig = Field(default_factory=AAPAConfig)
    apl: APLConfig = Field(default_factory=APLConfig)

    @property
    def online(self) -> bool:
        return self.method in ONLINE_METHODS

    @property
    def learner_dtype(self) -> str:
        """model.dtype resolved once for every learner (auto: bfloat16 when the learners get GPUs)."""
        return resolve_dtype(self.model.dtype, on_gpu=self.learner.num_gpus > 0)

    @property
    def rollout_dtype(self) -> str:
        """The rollout engines' dtype: rollout.dtype, else the learners' (one dtype unless told otherwise)."""
        return self.rollout.dtype or self.learner_dtype

    @property
    def trained_ranks(self) -> dict[str, int]:
        """{learner: ranks} of every learner this run trains (the critic only for ppo)."""
        roles = ("policy", "reward", "critic") if self.method == "ppo" else ("policy", "reward")
        return {role: self.learner.ranks(role) for role in roles}

    @property
    def apo_coef(self) -> float:
        if self.reward.apo_coef is not None:
            return self.reward.apo_coef
        return 0.1 / self.samples_per_prompt

    def to_dict(self) -> dict:
        """The settings this run reads, as config.yaml saves them: every key but those the method ignores,
        so that the saved file loads back as it was given."""
        tree = self.model_dump()
        for key in keys_the_run_ignores(self):
            *sections, leaf = key.split(".")
            node = tree
            for section in sections:
                node = node[section]
            node.pop(leaf, None)
        return tree

    @model_validator(mode="after")
    def _method_defaults(self) -> Config:
        if "lr" not in self.policy.model_fields_set:
            self.policy.lr = POLICY_LR[self.method]
        return self

    @model_validator(mode="after")
    def _cross_checks(self) -> Config:
        _cross_checks(self)
        return self


@dataclass(frozen=True)
class ConditionalKeys:
    """Keys read only under a condition. `by_method`: the method decides (ppo.* for RJS), and giving them is
    refused; otherwise a switch does (apo=false, ppo.adaptive_kl=false), and they are saved from the run's
    config and named in a warning, so that one file serves an arm and its baseline."""

    keys: tuple[str, ...]
    reader: str
    reads: typing.Callable[[Config], bool]
    by_method: bool


_CONDITIONAL_KEYS = [
    ConditionalKeys(tuple(f"ppo.{k}" for k in PPOConfig.model_fields), "the online methods (ppo, grpo, reinforce_pp)",
                    lambda c: c.online, by_method=True),
    ConditionalKeys(("policy.batch_size", "policy.epochs_per_round"), "the offline methods (rjs, rrhf, dpo; online "
                    "batches are ppo.minibatch_size and ppo.ppo_epochs)", lambda c: not c.online, by_method=True),
    ConditionalKeys(("policy.dpo_beta", "policy.dpo_min_margin"), "method dpo", lambda c: c.method == "dpo",
                    by_method=True),
    ConditionalKeys(("policy.rrhf_sft_coef",), "method rrhf", lambda c: c.method == "rrhf", by_method=True),
    ConditionalKeys(("ppo.lam", "ppo.whiten_advantages", "ppo.critic_init", "ppo.critic_lr", "ppo.value_clip_eps"),
                    "method ppo (its critic and GAE)", lambda c: c.method == "ppo", by_method=True),
    ConditionalKeys(("learner.critic_ranks",), "method ppo (its critic)", lambda c: c.method == "ppo", by_method=True),
    ConditionalKeys(("ppo.gamma",), "methods ppo and reinforce_pp", lambda c: c.method in ("ppo", "reinforce_pp"),
                    by_method=True),
    ConditionalKeys(("ppo.kl_horizon",), "ppo.adaptive_kl=true", lambda c: c.ppo.adaptive_kl, by_method=False),
    ConditionalKeys(("ppo.kl_hard_limit_at",), "ppo.kl_hard_limit=true", lambda c: c.ppo.kl_hard_limit,
                    by_method=False),
    ConditionalKeys(("ppo.kl_target",), "ppo.adaptive_kl=true or ppo.kl_hard_limit=true",
                    lambda c: c.ppo.adaptive_kl or c.ppo.kl_hard_limit, by_method=False),
    ConditionalKeys(("rollout.sync_bucket_mb",), "rollout.weight_sync object_store or nccl (disk writes a checkpoint)",
                    lambda c: c.rollout.weight_sync in ("object_store", "nccl"), by_method=False),
    ConditionalKeys(tuple(f"aapa.{k}" for k in AAPAConfig.model_fields if k != "enabled"), "aapa.enabled=true",
                    lambda c: c.aapa.enabled, by_method=False),
    ConditionalKeys(tuple(f"apl.{k}" for k in APLConfig.model_fields if k != "enabled"), "apl.enabled=true",
                    lambda c: c.apl.enabled, by_method=False),
    ConditionalKeys(("reward.update_every", "reward.apo_coef", "reward.apo_normalization", "reward.epochs_per_round",
                     "reward.reinit_each_round", "reward.apo_inert_share"),
                    "the APO RM step (apo=true; with apo=false the RM is fitted once)",
                    lambda c: c.apo, by_method=False),
]


def keys_the_run_ignores(cfg: Config, *, by_method: bool | None = None) -> dict[str, str]:
    """{dotted key: who reads it} for every key that `cfg` never reads: those its method ignores
    (by_method=True), those its switches turn off (False), or both (None)."""
    ignored: dict[str, str] = {}
    for group in _CONDITIONAL_KEYS:
        if not group.reads(cfg) and by_method in (None, group.by_method):
            ignored.update({k: group.reader for k in group.keys if k not in ignored})
    return ignored


def _given(tree: dict, key: str) -> bool:
    node: Any = tree
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return False
        node = node[part]
    return True


def _check_ignored_keys(cfg: Config, tree: dict, file_keys_are_switched: bool = False) -> None:
    """Refuse a given key that the method never reads; warn of those a switch turns off.

    `file_keys_are_switched`: `method=` came from the command line, over a file written for another method; the
    file's keys for that method are then switched off, not mistakes (one recipe serves every method), while a key
    given on the command line beside it is still refused."""
    run = f"method={cfg.method}, apo={str(cfg.apo).lower()}"
    off = []
    for key, reader in keys_the_run_ignores(cfg, by_method=True).items():
        if _given(tree, key) and file_keys_are_switched:
            off.append(key)
        elif _given(tree, key):
            raise ConfigError(f"{key}: read only by {reader}; this run ({run}) ignores it, so remove it")
    off += [key for key in keys_the_run_ignores(cfg, by_method=False) if _given(tree, key)]
    if off:
        log.warning("this run (%s, ppo.adaptive_kl=%s, ppo.kl_hard_limit=%s) does not read %s", run,
                    str(cfg.ppo.adaptive_kl).lower(), str(cfg.ppo.kl_hard_limit).lower(), ", ".join(off))


def _cross_checks(cfg: Config) -> None:
    if cfg.method == "dpo" and cfg.samples_per_prompt < 2:
        raise ConfigError("samples_per_prompt: dpo needs at least 2 samples per prompt (best vs worst)")
    if cfg.method == "rrhf" and cfg.samples_per_prompt < 2:
        raise ConfigError("samples_per_prompt: rrhf ranks samples and needs at least 2 per prompt")
    if cfg.method == "grpo" and cfg.samples_per_prompt < 2:
        raise ConfigError("samples_per_prompt: grpo normalises within a group and needs at least 2")
    late = sorted(r for r in cfg.rollout.schedule if r > cfg.rounds)
    if late:
        raise ConfigError(f"rollout.schedule.{late[0]}: round {late[0]} is past the last round (rounds={cfg.rounds})")
    if cfg.online and cfg.ppo.async_rollouts and not cfg.ppo.tis:
        raise ConfigError("ppo.async_rollouts: samples come from weights one version behind the learner; they need "
                          "ppo.tis=true (truncated importance sampling against the sampler's log-probs)")
    if cfg.apo and cfg.reward.update_every == 0:
        raise ConfigError("reward.update_every: 0 never steps the RM, which is the fixed-RM baseline; say so with apo=false")
    _check_sibling_games(cfg)
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
    # The check RolloutWorkerSpec runs too, here before Ray or any worker starts.
    model, rollout = cfg.model, cfg.rollout
    check_rollout_settings(rollout.backend, model.max_prompt_tokens, model.max_response_tokens, rollout.max_model_len,
                           rollout.engine_kwargs)
    if rollout.backend == "vllm" and rollout.num_gpus_per_worker == 0:
        from apo_ray.vllm_cpu import check_cpu_engine_kwargs  # it raises this module's ConfigError

        check_cpu_engine_kwargs(rollout.engine_kwargs, rollout.max_model_len)
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
    sharded = [role for role, ranks in cfg.trained_ranks.items() if ranks > 1]
    if sharded and cfg.learner.backend != "deepspeed":
        key = "learner.num_ranks" if cfg.learner.num_ranks > 1 else f"learner.{sharded[0]}_ranks"
        raise ConfigError(f"{key}: several ranks need learner.backend deepspeed (it averages their gradients); "
                          "the torch backend trains one rank")
    if cfg.online and cfg.ppo.kl_hard_limit and cfg.learner.ranks("policy") > 1:
        # The limit switches a minibatch's loss on its estimated KL; each rank would estimate it on its slice.
        raise ConfigError("ppo.kl_hard_limit: decided per minibatch, so it needs the whole minibatch on one rank; "
                          "use learner.policy_ranks=1 with it")
    if cfg.learner.backend == "torch" and cfg.learner_dtype == "bfloat16":
        raise ConfigError(
            "model.dtype: bfloat16 with learner.backend=torch would step bfloat16 weights without fp32 master "
            "weights; use learner.backend=deepspeed (bf16 compute, fp32 master weights) or model.dtype=float32"
        )


ROLLOUT_BACKENDS = ("vllm", "hf")


def check_rollout_settings(backend: str, max_prompt_tokens: int, max_new_tokens: int, max_model_len: int,
                           engine_kwargs: dict | None) -> None:
    """The rollout settings' one check: the config runs it before Ray starts, and a RolloutWorkerSpec built
    without a config (tests, benchmarks) runs it too."""
    if backend not in ROLLOUT_BACKENDS:
        raise ConfigError(f"rollout.backend: must be one of {', '.join(ROLLOUT_BACKENDS)}; got {backend!r}")
    if max_prompt_tokens + max_new_tokens > max_model_len:
        raise ConfigError(
            f"rollout.max_model_len: {max_model_len} < model.max_prompt_tokens {max_prompt_tokens} + "
            f"model.max_response_tokens {max_new_tokens}"
        )
    if engine_kwargs and backend != "vllm":
        raise ConfigError("rollout.engine_kwargs: only the vllm backend takes engine arguments")
def _check_sibling_games(cfg: Config) -> None:
    if cfg.aapa.enabled and cfg.apl.enabled:
        raise ConfigError("apl.enabled: AAPA and APL are separate games; enable one of aapa.enabled, apl.enabled")
    if cfg.aapa.enabled and cfg.aapa.discriminator_path != "reward":
        _check_model_path(cfg.aapa.discriminator_path, "aapa.discriminator_path")
    if cfg.apl.enabled:
        if cfg.method != "dpo":
            raise ConfigError(f"method: APL's defender step is DPO on safe vs unsafe answers; set method=dpo, got "
                              f"{cfg.method!r}")
        if cfg.data.task != "builtin":
            raise ConfigError("apl.enabled: needs data.task=builtin, whose gold oracle defines harm")
        if cfg.apl.attacker.max_tokens + cfg.model.max_prompt_tokens > cfg.rollout.max_model_len:
            raise ConfigError(f"apl.attacker.max_tokens: {cfg.apl.attacker.max_tokens} + model.max_prompt_tokens "
                              f"{cfg.model.max_prompt_tokens} > rollout.max_model_len {cfg.rollout.max_model_len}")


def _check_model_path(path: str, key: str) -> None:
    """A local model must be a Hugging Face model directory or a GGUF file (maybe in a package, `pkg:`); anything
    else must look like a hub name."""
    if path in ("builtin", "gold"):
        return
    # Imported here: both modules raise this module's ConfigError.
    from apo_ray.gguf import check_gguf
    from apo_ray.model_sources import local_path

    local = local_path(path, key)
    if local.is_file():
        check_gguf(local, key)
    elif local.exists():
        if not (local / "config.json").is_file():
            raise ConfigError(f"{key}: {path} is not a Hugging Face model directory (no config.json)")
    elif path.startswith((".", "/", "~")):
        raise ConfigError(f"{key}: path does not exist: {path}")
    elif not is_hub_name(path):
        raise ConfigError(f"{key}: {path!r} is neither an existing directory or GGUF file nor a hub model name "
                          "(org/name)")



def _field_choices(section: type[BaseModel], name: str) -> list[str]:
    """The names of `section`'s fields that look like `name`, for a "did you mean" hint."""
    return [k for k in section.model_fields if k.startswith(name[:3])]


def _section_at(root: type[BaseModel], loc: tuple) -> type[BaseModel] | None:
    """The model class reached by following field names `loc` from `root`, or None past a plain field."""
    section: Any = root
    for part in loc:
        fields = getattr(section, "model_fields", None)
        if fields is None or part not in fields:
            return None
        annotation = fields[part].annotation
        candidates = [annotation, *typing.get_args(annotation)]
        section = next((c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)), None)
    return section


def _error_message(root: type[BaseModel], error: dict, prefix: str) -> str:
    """One pydantic error as `dotted.key: what is wrong` in apo-ray's words."""
    loc = tuple(str(p) for p in error["loc"])
    key = ".".join((prefix,) * bool(prefix) + loc) if loc else prefix
    if loc[-1:] == ("[key]",):  # a mapping's key is at fault, not its value
        key = f"{'.'.join((prefix,) * bool(prefix) + loc[:-2])} (key {loc[-2]})"
    kind, ctx, value = error["type"], error.get("ctx") or {}, error.get("input")
    if kind == "value_error" and isinstance(ctx.get("error"), ConfigError):
        return str(ctx["error"])
    if kind == "extra_forbidden":
        if key in RENAMED_KEYS:
            return f"{key}: renamed to {RENAMED_KEYS[key]}"
        section = _section_at(root, loc[:-1])
        close = _field_choices(section, loc[-1]) if section is not None else []
        return f"{key}: unknown key" + (f" (did you mean {', '.join(close)}?)" if close else "")
    if kind == "literal_error":
        allowed = ctx["expected"].replace("'", "").replace(" or ", ", ")
        return f"{key}: must be one of {allowed}; got {value!r}"
    bounds = {"greater_than_equal": (">=", "ge"), "greater_than": (">", "gt"), "less_than_equal": ("<=", "le"),
              "less_than": ("<", "lt")}
    if kind in bounds:
        sign, name = bounds[kind]
        # A float field reads an integer as a float; say so in the value shown.
        shown = float(value) if isinstance(ctx[name], float) and type(value) is int else value
        return f"{key}: must be {sign} {ctx[name]}, got {shown}"
    words = {"int_type": "an integer", "int_from_float": "an integer", "bool_type": "true or false",
             "float_type": "a number", "string_type": "a string", "finite_number": "finite"}
    if kind in words:
        return f"{key}: must be {words[kind]}, got {value!r}"
    if kind in ("model_type", "dict_type", "model_attributes_type"):
        return f"{key}: must be a mapping, got {type(value).__name__}"
    return f"{key}: {error['msg']}"


ModelT = typing.TypeVar("ModelT", bound=BaseModel)


def validate_section(cls: type[ModelT], tree: Any, prefix: str = "") -> ModelT:
    """`tree` validated as `cls`; a ConfigError naming the first bad key (under `prefix`) otherwise."""
    if not isinstance(tree, dict):
        raise ConfigError(f"{prefix or 'config'}: must be a mapping, got {type(tree).__name__}")
    try:
        return cls.model_validate(tree)
    except ValidationError as exc:
        raise ConfigError(_error_message(cls, exc.errors()[0], prefix)) from None


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


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Read `path` (YAML), apply `overrides`, validate everything; raise ConfigError naming the key.

    Relative input paths in the file are read from the file's directory, those in `overrides` from the
    working directory (apo_ray.config_paths).
    """
    from apo_ray.config_paths import dotted_keys, resolve_paths

    extra = parse_overrides(overrides or [])
    from_file = _read_yaml(path)
    tree = _merge(from_file, extra)
    resolve_paths(tree, Path(path).resolve().parent if path is not None else None, dotted_keys(extra))
    cfg = validate_section(Config, tree)
    switched = "method" in extra and extra["method"] != from_file.get("method")
    # The file's keys under the overridden method; keys given on the command line are checked as usual.
    _check_ignored_keys(cfg, from_file if switched else tree, file_keys_are_switched=switched)
    if switched:
        _check_ignored_keys(cfg, extra)
    return cfg


def config_from_dict(tree: dict) -> Config:
    """The run config of a mapping as a YAML file holds it: validated, and refusing keys the run ignores."""
    cfg = validate_section(Config, tree)
    _check_ignored_keys(cfg, tree)
    return cfg


# ---------------------------------------------------------------------------------------- offline stages
# `apo-ray sft` and `apo-ray rm` (apo_ray.stages): Ray Train jobs with a config file of their own.


class StageWorkersConfig(Section):
    """Ray Train's ScalingConfig for a stage: one DeepSpeed rank per worker."""

    num_workers: int = Field(1, ge=1)
    num_cpus_per_worker: float = Field(1.0, ge=0.0)
    num_gpus_per_worker: float = Field(0.0, ge=0.0)


# apo_ray.stages.lr_schedule's curves.
LRSchedule = Literal["constant", "linear", "cosine"]
# What an RM's score reads (apo_ray.modeling.load_reward_model): the HF sequence classifier's own summary, or
# the mean of the encoder's token states (apo_ray.mean_pooling).
RMPooling = Literal["native", "mean"]


class StageConfig(Section):
    """What both stages share: a base model, a training set and an optional held-out set, the optimizer,
    Ray Train's workers, checkpoints and failure handling."""

    STAGE: ClassVar[str] = ""
    # A Hugging Face model directory or hub name; the stage writes its result to <run_dir>/model.
    base_model: str = ""
    # May use {stage}, {seed}, {time}; an existing run directory is never overwritten (resume it instead).
    run_dir: str = "runs/{stage}-{time}"
    seed: int = Field(0, ge=0)
    train: DataSourceConfig = Field(default_factory=DataSourceConfig)
    eval: Optional[DataSourceConfig] = None
    epochs: int = Field(1, ge=1)
    # Examples (sft) or pairs (rm) per optimizer step over all workers together: each worker takes
    # batch_size / num_workers of them, so the step is the same with 1 worker or 4.
    batch_size: int = Field(16, ge=1)
    eval_batch_size: int = Field(32, ge=1)
    # Evaluate on `eval` after every epoch, not only after the last (HF's eval_strategy="epoch"): how many
    # epochs to train can then be read off one run (summary.json's eval_by_epoch).
    eval_every_epoch: bool = False
    lr: float = Field(1e-4, gt=0.0)
    # The lr of each step (apo_ray.stages.lr_schedule): a linear warm-up over warmup_ratio of the run's steps,
    # then lr constant or decaying to 0 over the rest. The run's steps are the epochs' (a --resume that adds
    # epochs stretches the decay from there on).
    lr_scheduler_type: LRSchedule = "constant"
    warmup_ratio: float = Field(0.0, ge=0.0, lt=1.0)
    weight_decay: float = Field(0.0, ge=0.0)
    grad_clip: float = Field(1.0, ge=0.0)
    zero_stage: int = Field(2, ge=0, le=3)
    # float32 on CPU, bfloat16 (DeepSpeed bf16, fp32 master weights) on GPU; see resolve_dtype.
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"
    disable_dropout: bool = False
    trust_remote_code: bool = False
    # Optimizer steps between checkpoints (the last step always has one); each holds the HF model, the
    # DeepSpeed state, every rank's RNG and the data cursor, so a restarted run continues exactly.
    checkpoint_every: int = Field(50, ge=1)
    keep_checkpoints: int = Field(2, ge=1)
    # Ray Train's FailureConfig: how many times a failed worker group is restarted from the last checkpoint.
    max_failures: int = Field(1, ge=0)
    workers: StageWorkersConfig = Field(default_factory=StageWorkersConfig)
    ray: RayConfig = Field(default_factory=RayConfig)

    @property
    def resolved_dtype(self) -> str:
        return resolve_dtype(self.dtype, on_gpu=self.workers.num_gpus_per_worker > 0)

    @model_validator(mode="after")
    def _stage_checks(self) -> StageConfig:
        if not self.base_model:
            raise ConfigError("base_model: required (a Hugging Face model directory or hub name)")
        _check_model_path(self.base_model, "base_model")
        if not self.train.path:
            raise ConfigError("train.path: required (the training data file or dataset)")
        workers = self.workers.num_workers
        if self.batch_size % workers:
            raise ConfigError(f"batch_size: {self.batch_size} does not split evenly over workers.num_workers="
                              f"{workers}; use a multiple of {workers}")
        if self.workers.num_gpus_per_worker == 0 and self.dtype == "bfloat16":
            raise ConfigError("dtype: bfloat16 on CPU workers is slow and untested here; use float32 (or auto)")
        return self


class SFTStageConfig(StageConfig):
    """`apo-ray sft`: supervised fine-tuning of a causal LM on (prompt, response) texts (jsonl with
    prompt_key/response_key, or hh: each pair's chosen response)."""

    STAGE: ClassVar[str] = "sft"
    max_prompt_tokens: int = Field(192, ge=1)
    max_response_tokens: int = Field(64, ge=1)
    chat_template: str = Field("auto", min_length=1, description=(
        "As the game's data.chat_template: 'auto' (the base model tokenizer's template, if any), 'none' (raw "
        "text) or a Jinja template file. The model written keeps the template, so the game renders its "
        "prompts the same way."))
    # As model.disable_dropout: the game's learners run the policy without dropout.
    disable_dropout: bool = True


class RMStageConfig(StageConfig):
    """`apo-ray rm`: a Bradley-Terry reward model on human preference pairs (jsonl, hh or hf)."""

    STAGE: ClassVar[str] = "rm"
    # Tokens per prompt + response; longer ones are cut from the left (the end of the dialogue survives).
    max_length: int = Field(256, ge=8)
    # "native": the HF sequence classifier's own head ([CLS] pooler for BERT, the last token for a decoder);
    # "mean": a linear score on the mean token state, the pooling sentence-transformers encoders were trained
    # with. The RM written keeps it (config.json's apo_ray_pooling), so the game and `apo-ray serve` score alike.
    pooling: RMPooling = "native"


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
    return validate_section(cls, read_config_tree(path, overrides))


def serve_config_from_dict(tree: Any) -> ServeConfig:
    """A ServeConfig from the mapping under a config's `serve` key (errors name `serve.<key>`)."""
    return validate_section(ServeConfig, tree, "serve")
