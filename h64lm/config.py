"""The run's typed configuration: one `RunConfig` from composition to every line that reads it.

Defaults live in these dataclasses (and in `H64LMConfig`, `DataConfig`); a YAML option under `conf/`
holds only what makes that option different. `RunConfig` is the schema of the primary config
(`conf/config.yaml` lists `base_config` first), so Hydra rejects a typo such as
`model.hiden_size=1` while composing, and `build_run_config` turns the composed `DictConfig` into
`RunConfig` with `OmegaConf.to_object` (every `__post_init__` runs: each field's range, then the
rules between fields) after rejecting keys that `+group.key=...` slipped past the schema.
`python run.py --cfg job` prints the composed config.

Where each group is consumed: docs/configuration.md, "Where is key X consumed?" (a generated table).
"""

from __future__ import annotations

import dataclasses
import difflib
import typing
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, List, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

from h64lm.data.config import PREFERENCE_SOURCES, SFT_SOURCES, DataConfig
from h64lm.model.config import H64LMConfig, check_positions
from h64lm.validation import ConfigError, bounded, check, check_patterns, validate_fields

__all__ = [
    "TrainConfig",
    "OptimConfig",
    "HardwareConfig",
    "LoggerConfig",
    "ExportConfig",
    "GenConfig",
    "EvalConfig",
    "StageConfig",
    "STAGES",
    "PREFERENCE_STAGES",
    "DPO_LOSSES",
    "RL_ALGORITHMS",
    "RL_PROMPT_SOURCES",
    "RunConfig",
    "ConfigError",
    "register_configs",
    "default_run_dir",
    "build_run_config",
    "compose",
    "CONF_DIR",
    "run_config_from_yaml",
    "run_config_yaml",
    "MODES",
    "PlanConfig",
    "PipelineStage",
    "PipelineConfig",
    "schema_keys",
    "is_schema_key",
    "did_you_mean",
]

MODES = ("train", "eval", "generate", "chat", "export", "plan", "pipeline")
CONF_DIR = Path(__file__).resolve().parents[1] / "conf"


@dataclass
class TrainConfig:
    config_group: ClassVar[str] = "train"

    max_steps: int = bounded(300, ge=1)
    batch_size: int = bounded(8, ge=1)  # per-process micro-batch, in sequences
    grad_accum: int = bounded(1, ge=1)  # micro-batches per optimizer step
    # Sequences per optimizer step over all processes; grad_accum is derived from it
    # (`micro_batches_per_step`), so it must divide evenly.
    global_batch_size: Optional[int] = bounded(None, ge=1, null="batch_size x grad_accum x processes")
    eval_every: int = bounded(50, ge=1)  # steps between validations (and the last step)
    save_every: int = bounded(100, ge=1)  # steps between checkpoints (and the last step)
    keep_last: int = bounded(2, ge=1)  # step checkpoints kept besides best/
    log_every: int = bounded(1, ge=1)  # steps between metrics.jsonl / W&B records
    seed: int = bounded(1234, ge=0)  # weights, data order, sampling
    resume: Optional[str] = None  # null | auto | a checkpoint file | a run directory
    # fsdp / ep > 1: stage the sharded checkpoint in host memory and write it in the background
    async_save: bool = False
    max_bad_steps: int = bounded(5, ge=1)  # consecutive non-finite steps before the run stops
    val_batch_size: Optional[int] = bounded(None, ge=1, null="train.batch_size")
    extra_eval_seq_lens: List[int] = field(default_factory=list)  # also validate at these lengths
    sample_prompts: List[str] = field(
        default_factory=lambda: ["The history of", "In 1998, the", "The city is known for"])
    sample_tokens: int = bounded(32, ge=0)  # tokens sampled per prompt at each evaluation; 0: none
    # Initial weights from another run: a run directory or checkpoint of the same model (continued
    # pretraining), of a dense model when this one is MoE (sparse upcycling), or hf:DIR (a Hugging
    # Face Mixtral/Llama/Mistral or exported H64LM folder). Ignored when resuming.
    init_from: Optional[str] = None
    init_noise_std: float = bounded(0.0, ge=0)  # upcycling: N(0, std^2) noise on each expert copy
    # Local downstream tasks (h64lm/eval/local_tasks.py) every N steps, logged as downstream/<task>/acc.
    downstream_every: Optional[int] = bounded(None, ge=1, null="never during training")
    downstream_limit: int = bounded(50, ge=1)  # examples per task at each in-loop evaluation
    # Regular expressions searched in parameter names (h64lm/train/freeze.py): `freeze` keeps the
    # matches at their starting values ([router]); a non-empty `trainable` trains only its matches
    # ([experts]). Frozen parameters are in no optimizer group.
    freeze: List[str] = field(default_factory=list)
    trainable: List[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        validate_fields(self)
        check_patterns(self.freeze, "train.freeze")
        check_patterns(self.trainable, "train.trainable")
        check(all(isinstance(n, int) and n >= 1 for n in self.extra_eval_seq_lens),
              f"train.extra_eval_seq_lens={self.extra_eval_seq_lens} must hold lengths >= 1")

    def micro_batches_per_step(self, world_size: int) -> int:
        """grad_accum, or what `global_batch_size` implies at this world size."""
        if self.global_batch_size is None:
            return self.grad_accum
        per_micro_step = self.batch_size * world_size
        check(self.global_batch_size % per_micro_step == 0,
              f"train.global_batch_size={self.global_batch_size} is not a multiple of "
              f"train.batch_size={self.batch_size} x {world_size} process(es) = {per_micro_step}; "
              "change train.global_batch_size or train.batch_size")
        accum = self.global_batch_size // per_micro_step
        check(self.grad_accum in (1, accum),
              f"train.grad_accum={self.grad_accum} contradicts train.global_batch_size="
              f"{self.global_batch_size} ({accum} micro-steps); leave train.grad_accum=1")
        return accum


SCHEDULES = ("cosine", "linear", "constant", "wsd")
OPTIMIZERS = ("adamw", "muon")
MUON_LR_ADJUSTMENTS = ("original", "match_rms_adamw")


@dataclass
class OptimConfig:
    config_group: ClassVar[str] = "optim"

    lr: float = bounded(3e-3, gt=0)  # peak learning rate
    min_lr_ratio: float = bounded(0.1, ge=0, le=1)  # final lr = lr * min_lr_ratio
    weight_decay: float = bounded(0.1, ge=0)  # matrices only: not norms, biases or embeddings
    beta1: float = bounded(0.9, ge=0, lt=1)
    beta2: float = bounded(0.95, ge=0, lt=1)
    eps: float = bounded(1e-8, gt=0)
    grad_clip: float = bounded(1.0, ge=0)  # max global grad norm; 0 disables clipping
    warmup_steps: int = bounded(30, ge=0)
    schedule: str = bounded("cosine", choices=SCHEDULES)
    decay_fraction: float = bounded(0.2, gt=0, le=1)  # wsd: share of the schedule spent decaying
    # The steps the schedule spans. Set it to a finished run's old train.max_steps when extending
    # that run, to keep training at the decayed learning rate instead of stretching the schedule.
    schedule_steps: Optional[int] = bounded(None, ge=1, null="train.max_steps")
    # muon (default, see docs/results.md): Muon on the hidden matrices (h64lm/optim/muon.py),
    # AdamW with the keys above on embeddings, LM head, norms and routers; the same schedule scales
    # both peak lrs. adamw: AdamW on everything.
    name: str = bounded("muon", choices=OPTIMIZERS)
    muon_lr: float = bounded(0.02, gt=0)  # peak lr of the Muon matrices
    muon_momentum: float = bounded(0.95, ge=0, lt=1)
    muon_nesterov: bool = True
    muon_ns_steps: int = bounded(5, ge=1, le=99)  # Newton-Schulz iterations
    muon_weight_decay: float = bounded(0.01, ge=0)  # decoupled: W <- (1 - lr * wd) W
    # update scale per [out, in] matrix: sqrt(max(1, out/in)) (Keller Jordan) or 0.2 sqrt(max(out, in))
    # (Moonlight, AdamW-sized updates: then muon_lr ~ an AdamW lr)
    muon_adjust_lr: str = bounded("original", choices=MUON_LR_ADJUSTMENTS)
    # orthogonalise W_q, W_k, W_v (and W_gate, W_up) separately rather than their fused stack
    muon_split_fused: bool = True
    # Newton-Schulz precision: bf16 as torch.optim.Muon; auto = bf16 on GPU, fp32 on CPU (~4x faster there)
    muon_ns_dtype: str = bounded("auto", choices=("auto", "bf16", "fp32"))

    def __post_init__(self) -> None:
        validate_fields(self)


@dataclass
class HardwareConfig:
    config_group: ClassVar[str] = "hardware"

    device: str = bounded("auto", choices=("auto", "cpu", "cuda"))  # auto: cuda if available
    precision: str = bounded("auto", choices=("auto", "fp32", "bf16", "fp16"))  # auto: bf16 on GPU
    compile: bool = False  # torch.compile the model (applied from outside the model code)
    distributed: bool = False  # require a torchrun launch (hardware=ddp)
    backend: Optional[str] = bounded(None, choices=("nccl", "gloo"), null="nccl on cuda, gloo on cpu")
    timeout_s: int = bounded(300, ge=1)  # collective timeout: a dead peer ends the job
    num_threads: Optional[int] = bounded(None, ge=1, null="torch's default")  # cpu intra-op threads
    # cpu: malloc keeps freed memory for the next step instead of mapping large tensors afresh
    # (h64lm/cpu_malloc.py: ~16% off the 249M step); the process then holds its peak memory
    keep_freed_memory: bool = True
    peak_tflops: Optional[float] = bounded(None, gt=0, null="a table for GPUs, measured on cpu")
    # Several processes only (h64lm/parallel): ddp replicates the weights, fsdp shards weights,
    # gradients and optimizer state (FSDP2); ep splits each MoE layer's experts over ep ranks.
    strategy: str = bounded("ddp", choices=("ddp", "fsdp"))
    ep: int = bounded(1, ge=1)  # must divide the world size and model.num_experts
    reshard_after_forward: bool = True  # fsdp: free gathered weights after forward (less memory)

    def __post_init__(self) -> None:
        validate_fields(self)
        check(not (self.strategy == "fsdp" and self.precision == "fp16"),
              "hardware.precision=fp16 is not supported with hardware.strategy=fsdp; use bf16")


@dataclass
class PlanConfig:
    """`mode=plan`: the GPUs to plan the composed model/data/train config for (h64lm/plan)."""

    config_group: ClassVar[str] = "plan"

    gpus: int = bounded(8, ge=1)
    gpus_per_node: int = bounded(8, ge=1)  # for the launch command: torchrun per node
    gpu_mem_gb: float = bounded(80.0, gt=0)  # H100 SXM
    peak_tflops: float = bounded(989.0, gt=0)  # dense bf16 peak per GPU (H100 SXM)
    mfu: float = bounded(0.4, gt=0, le=1)  # fraction of peak the job reaches
    headroom: float = bounded(0.1, ge=0, lt=1)  # memory kept free: CUDA context, NCCL, fragmentation
    # training tokens to plan the time and GPU-hours of (e.g. 2e10); null: train.max_steps steps
    tokens: Optional[float] = bounded(None, gt=0, null="train.max_steps x tokens per step")

    def __post_init__(self) -> None:
        validate_fields(self)


@dataclass
class LoggerConfig:
    config_group: ClassVar[str] = "logger"

    name: str = bounded("wandb", choices=("wandb", "none"))
    mode: str = bounded("auto", choices=("auto", "offline", "online", "disabled"))  # auto: online with a key
    project: str = "h64lm"
    entity: Optional[str] = None
    group: Optional[str] = None  # W&B group; null: experiment_name, else the sweep directory's name
    tags: List[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        validate_fields(self)


@dataclass
class GenConfig:
    config_group: ClassVar[str] = "gen"

    max_new_tokens: int = bounded(64, ge=1)
    temperature: float = bounded(0.8, ge=0)  # 0 = greedy
    top_k: Optional[int] = bounded(50, ge=1, null="no top-k filter")
    top_p: Optional[float] = bounded(0.95, gt=0, le=1, null="no nucleus filter")
    repetition_penalty: float = bounded(1.1, gt=0)  # 1 = off
    num_samples: int = bounded(1, ge=1)
    seed: int = bounded(0, ge=0)

    def __post_init__(self) -> None:
        validate_fields(self)


@dataclass
class EvalConfig:
    config_group: ClassVar[str] = "eval"

    # lm-evaluation-harness tasks for mode=eval: the local ones (built from the data's validation
    # text, offline) and/or standard ones (hellaswag, arc_easy, piqa, lambada_openai: need the hub).
    tasks: List[str] = field(default_factory=list)
    limit: Optional[int] = bounded(None, ge=1, null="every example")  # examples per task
    num_fewshot: Optional[int] = bounded(None, ge=0, null="the task's default")
    local_examples: int = bounded(200, ge=1)  # examples written per local task

    def __post_init__(self) -> None:
        validate_fields(self)


STAGES = ("pretrain", "sft", "reward", "dpo", "rl")
PREFERENCE_STAGES = ("reward", "dpo")  # trained on preference pairs (h64lm/train/preference_stage.py)
DPO_LOSSES = ("sigmoid", "ipo")  # h64lm.objectives.preference.DPO_LOSSES (a higher layer; a test keeps them equal)
# rl
RL_ALGORITHMS = ("grpo", "ppo")
RL_PROMPT_SOURCES = SFT_SOURCES  # conversations whose last turn ends with a `#### answer` line
# h64lm/objectives/policy.py's ADVANTAGE_SCALES and AGGREGATIONS (the config layer sits below it)
RL_ADVANTAGE_SCALES = ("std", "none")
RL_AGGREGATIONS = ("sequence", "token")


@dataclass
class StageConfig:
    """What the trainer trains for (h64lm/train/stage.py): `stage=pretrain` (next-token loss on
    windows of a text corpus), `stage=sft` (the loss on the assistant turns of packed
    conversations, usually starting from `train.init_from`), `stage=reward` (a Bradley-Terry reward
    model on preference pairs), `stage=dpo` (DPO / IPO against the frozen starting policy) or
    `stage=rl` (GRPO / PPO on sampled answers with verifiable rewards or a reward model)."""

    config_group: ClassVar[str] = "stage"

    name: str = bounded("pretrain", choices=STAGES)
    # sft on data=arithmetic: held-out test problems answered greedily at each evaluation and by
    # mode=eval, logged as sft/exact_match; 0: none
    eval_examples: int = bounded(64, ge=0)
    eval_max_new_tokens: int = bounded(48, ge=1)  # the longest answer generated per problem
    # reward / dpo
    beta: float = bounded(0.1, gt=0)  # dpo: the KL strength; the implicit reward is beta log(pi / ref)
    loss_type: str = bounded("sigmoid", choices=DPO_LOSSES)  # dpo: sigmoid (DPO) or ipo
    label_smoothing: float = bounded(0.0, ge=0, lt=0.5)  # dpo sigmoid: the share of flipped preferences
    # dpo: the reference log-probs of every train / validation pair computed once at the start
    # (RUN/reference_logps.safetensors) instead of a frozen reference model run at every step
    precompute_reference: bool = False
    # dpo: RPO / "DPO + NLL" (Pang et al. 2024; TRL's rpo_alpha): + rpo_alpha x the NLL of the chosen
    # answers per token (the step's mean over their tokens), logged as nll_loss; 0 = plain DPO
    rpo_alpha: float = bounded(0.0, ge=0)

    # rl (h64lm/train/rl_stage.py): G sampled completions per prompt, rewarded and trained on;
    # eval_examples / eval_max_new_tokens also size its validation (greedy answers to val problems)
    algorithm: str = bounded("grpo", choices=RL_ALGORITHMS)
    group_size: int = bounded(8, ge=1)  # G completions per prompt (one prefill, rows repeated)
    temperature: float = bounded(1.0, gt=0)  # sampling temperature of the rollouts
    top_k: int = bounded(0, ge=0)  # rollouts sample among the k most likely tokens; 0 = off
    top_p: float = bounded(1.0, gt=0, le=1)  # rollouts sample from the nucleus of mass p; 1.0 = off
    max_new_tokens: int = bounded(48, ge=1)  # the longest sampled completion
    clip_eps: float = bounded(0.2, gt=0, lt=1)  # PPO/GRPO ratio clip (and PPO's value clip)
    kl_coef: float = bounded(0.04, ge=0)  # beta: GRPO's k3 KL loss term, PPO's per-token KL penalty
    advantage_scale: str = bounded("std", choices=RL_ADVANTAGE_SCALES)  # GRPO: std (Shao et al.) or none (Dr. GRPO)
    aggregation: str = bounded("sequence", choices=RL_AGGREGATIONS)  # per-token -> one: rows' means or all tokens
    reward_exact_match: float = bounded(1.0, ge=0)  # weight of the `#### N` exact-match reward
    reward_format: float = bounded(0.1, ge=0)  # weight of the `#### <answer>` format reward
    reward_model: Optional[str] = None  # a reward-model run (score head) instead of the verifiable rewards
    gamma: float = bounded(1.0, ge=0, le=1)  # PPO: GAE discount
    lam: float = bounded(0.95, ge=0, le=1)  # PPO: GAE lambda
    vf_coef: float = bounded(0.1, ge=0)  # PPO: weight of the clipped value loss
    # PPO: advantages whitened (zero mean, unit std over the step's completion tokens, all micro-
    # batches and ranks); null = on for ppo. GRPO's group normalisation is its own: true is refused
    whiten_advantages: Optional[bool] = bounded(None, null="on for stage.algorithm=ppo")

    def __post_init__(self) -> None:
        validate_fields(self)
        check(not self.rpo_alpha or self.name == "dpo",
              f"stage.rpo_alpha={self.rpo_alpha} is a DPO option (the chosen answers' NLL added to stage=dpo's loss); "
              f"stage={self.name} has no use for it: remove it or set it to 0")
        if self.name == "rl" and self.algorithm == "grpo":
            check(not self.whiten_advantages,
                  "stage.whiten_advantages=true with stage.algorithm=grpo: GRPO's advantages are already normalised "
                  "within each prompt's group (stage.advantage_scale); whitening is PPO's, leave it null")
            check(self.group_size >= 2 or self.advantage_scale == "none",
                  f"stage.group_size={self.group_size} with stage.advantage_scale={self.advantage_scale}: "
                  "a group's standard deviation needs G >= 2 completions per prompt; raise stage.group_size")
            check(self.group_size >= 2, f"stage.group_size={self.group_size}: GRPO's advantage is a reward "
                  "minus its group's mean, 0 for a group of one; raise stage.group_size (>= 2)")


@dataclass
class ExportConfig:
    config_group: ClassVar[str] = "export"

    # mode=export into a non-empty folder that is not an earlier export (no h64lm_export.json):
    # refused unless true, then its contents are replaced (an earlier export is always replaced)
    overwrite: bool = False


@dataclass
class RunConfig:
    config_group: ClassVar[str] = ""  # top-level keys: mode, checkpoint, prompt

    mode: str = bounded("train", choices=MODES)
    checkpoint: Optional[str] = None  # eval/generate/export: a checkpoint file or a run directory
    out: Optional[str] = None  # export: the Hugging Face folder to write (null: RUN/exports/<time>/hf)
    # generate: the prompt ("" = from BOS; null: train.sample_prompts); chat: the first user turn
    prompt: Optional[str] = None
    experiment_name: Optional[str] = None  # set by experiment presets; the W&B group
    # set by presets: the arm (its overrides) the sweep report compares against
    experiment_reference: Optional[str] = None
    model: H64LMConfig = field(default_factory=H64LMConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    hardware: HardwareConfig = field(default_factory=HardwareConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    gen: GenConfig = field(default_factory=GenConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    plan: PlanConfig = field(default_factory=PlanConfig)
    stage: StageConfig = field(default_factory=StageConfig)
    pipeline: PipelineConfig = field(default_factory=lambda: PipelineConfig())  # defined below

    def __post_init__(self) -> None:
        validate_fields(self)
        ep = self.hardware.ep
        check(self.model.num_experts % ep == 0,
              f"hardware.ep={ep} must divide model.num_experts={self.model.num_experts}; change hardware.ep")
        if self.mode == "plan":
            return
        if self.mode == "pipeline":  # each stage's own config is composed and checked at start
            check(bool(self.pipeline.stages), "mode=pipeline needs pipeline.stages; "
                  "experiment=pipeline sets pretrain -> sft -> ...")
            return
        if self.mode == "train":
            check_positions(self.model, self.data.seq_len, "data.seq_len")
            for n in self.train.extra_eval_seq_lens:
                check_positions(self.model, n, "train.extra_eval_seq_lens")
            self._check_stage()
            for message in self._meaningless_settings():
                warnings.warn(message, stacklevel=2)
        else:
            check(self.checkpoint is not None,
                  f"mode={self.mode} needs checkpoint=PATH (a checkpoint file or a run directory)")

    def _check_stage(self) -> None:
        """Each stage reads its own kind of data: text windows or conversations."""
        data, t = self.data.name, self.train
        if self.stage.name in PREFERENCE_STAGES:
            self._check_preference_stage()
            return
        if self.stage.name == "rl":
            self._check_rl()
            return
        if self.stage.name == "pretrain":
            check(data not in SFT_SOURCES,
                  f"data={data} holds conversations for fine-tuning; add stage=sft, or pretrain on text "
                  "(data=wiki_excerpt | data=text data.path=...)")
            return
        check(data in SFT_SOURCES,
              f"stage=sft needs a data source of conversations (data={' | data='.join(SFT_SOURCES)}), "
              f"not data={data}; set data=arithmetic or data=chat data.path=...")
        check(not t.extra_eval_seq_lens,
              "train.extra_eval_seq_lens applies to pretraining windows; stage=sft validates on the "
              "held-out conversations: leave it empty")
        check(t.downstream_every is None,
              "train.downstream_every reads pretraining text; with stage=sft leave it unset "
              "(stage.eval_examples measures the fine-tuned task)")

    def _check_preference_stage(self) -> None:
        """reward / dpo read preference pairs; the reward model needs its scalar head."""
        s, data = self.stage, self.data.name
        check(data in PREFERENCE_SOURCES,
              f"stage={s.name} trains on preference pairs (data={' | data='.join(PREFERENCE_SOURCES)}), not "
              f"data={data}; set data=preference_arithmetic or data.name=preference data.path=...")
        check(s.name != "reward" or self.model.score_head,
              "stage=reward trains the scalar head: set model.score_head=true (conf/stage/reward.yaml does)")
        check(s.name != "dpo" or not s.label_smoothing or s.loss_type == "sigmoid",
              f"stage.label_smoothing={s.label_smoothing} applies to stage.loss_type=sigmoid only; set it to 0")
        check(not self.train.extra_eval_seq_lens and self.train.downstream_every is None,
              f"train.extra_eval_seq_lens and train.downstream_every read pretraining text; with stage={s.name} "
              "leave them unset (validation is on the held-out pairs)")

    def _check_rl(self) -> None:
        """stage=rl samples answers to prompts with reference answers and rewards them."""
        s = self.stage
        check(self.data.name in RL_PROMPT_SOURCES,
              f"stage=rl needs prompts with reference answers (data={' | data='.join(RL_PROMPT_SOURCES)}), "
              f"not data={self.data.name}; set data=arithmetic or data=chat data.path=<GSM8K-style file>")
        check(s.algorithm != "ppo" or self.model.score_head,
              "stage.algorithm=ppo needs a value head: set model.score_head=true")
        # a head outside the loss gets no gradient, which DDP refuses at the next step
        check(s.algorithm != "grpo" or not self.model.score_head,
              "stage.algorithm=grpo trains no value head: set model.score_head=false (stage.algorithm=ppo uses it)")
        check(not self.train.extra_eval_seq_lens and self.train.downstream_every is None,
              "stage=rl validates by answering held-out problems: leave train.extra_eval_seq_lens empty and "
              "train.downstream_every unset")

    def _meaningless_settings(self) -> list[str]:
        """Settings that are valid but make a training run mean little: one line each at start-up."""
        m, t, o = self.model, self.train, self.optim
        found = []
        if m.sliding_window is not None and m.sliding_window >= self.data.seq_len:
            found.append(f"model.sliding_window={m.sliding_window} >= data.seq_len={self.data.seq_len}: the window "
                         "masks nothing during training (the original H64LM's 2048 vs 1024 mistake)")
        if o.warmup_steps >= t.max_steps:
            found.append(f"optim.warmup_steps={o.warmup_steps} >= train.max_steps={t.max_steps}: the learning rate "
                         "never reaches optim.lr and never decays")
        if t.eval_every > t.max_steps:
            found.append(f"train.eval_every={t.eval_every} > train.max_steps={t.max_steps}: validation runs only "
                         "once, at the last step")
        return found


# Keys of a stage's command line that `mode=pipeline` sets itself (h64lm/train/pipeline.py).
PIPELINE_SET_KEYS = ("stage", "mode", "train.init_from", "train.resume", "hydra.run.dir", "experiment")


@dataclass
class PipelineStage:
    """One stage of `mode=pipeline`: `python run.py stage=<name> <overrides>`."""

    name: str = "pretrain"  # one of STAGES; unique within the pipeline (its folder stages/<k>_<name>)
    overrides: List[str] = field(default_factory=list)  # key=value or group=option, as on the command line


@dataclass
class PipelineConfig:
    """`mode=pipeline` (h64lm/train/pipeline.py): the stages run in order, each as its own
    `python run.py` in RUN/stages/<k>_<name>/, each but the first initialised from the one before
    (`train.init_from`); RUN/pipeline.md tabulates them."""

    config_group: ClassVar[str] = "pipeline"

    stages: List[PipelineStage] = field(default_factory=list)
    until: Optional[str] = bounded(None, null="every stage")  # the name of the last stage to run
    # `python run.py mode=eval checkpoint=<stage>` of every stage's final weights with these
    # overrides (data=arithmetic: held-out exact match for every stage, pretraining included); []: none
    eval_overrides: List[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        validate_fields(self)
        names = [s.name for s in self.stages]
        for i, stage in enumerate(self.stages):
            key = f"pipeline.stages[{i}]"
            guess = difflib.get_close_matches(stage.name, STAGES, n=1)
            check(stage.name in STAGES, f"{key}.name={stage.name} is not a stage; "
                  f"{f'did you mean {guess[0]}? ' if guess else ''}choose one of {', '.join(STAGES)}")
            check(stage.name not in names[:i], f"{key}.name={stage.name} names two stages (also "
                  f"pipeline.stages[{names.index(stage.name)}]); a pipeline runs each stage once")
            for o in stage.overrides:
                k = o.lstrip("+~").partition("=")[0].strip()
                check("=" in o, f"{key}.overrides: {o!r} is not key=value")
                # the first stage may start from given weights; each later one starts from the one before
                own = PIPELINE_SET_KEYS if i else tuple(x for x in PIPELINE_SET_KEYS if x != "train.init_from")
                check(k not in own and not k.startswith("hydra"),
                      f"{key}.overrides: {k} is set by the pipeline itself (stage=<name>, each stage "
                      f"initialised from the one before, its folder under RUN/stages/); remove {o!r}")
        check(self.until is None or self.until in names,
              f"pipeline.until={self.until} is none of the stages ({', '.join(names)}); name one or leave it null")


def default_run_dir(mode: str, checkpoint: str | None, stamp: str) -> str:
    """Where a launch writes: a new `outputs/<stamp>` to train; to evaluate or generate, a folder
    inside the run that trained the checkpoint, where its results are found later; a plan under
    outputs/plans/."""
    if mode == "plan":
        return f"outputs/plans/{stamp}"
    if mode == "train" or not checkpoint:
        return f"outputs/{stamp}"
    path = Path(checkpoint)
    run_dir = path if path.is_dir() else path.parent.parent if path.parent.name == "checkpoints" else path.parent
    kind = {"eval": "evals", "generate": "generations", "chat": "chats", "export": "exports"}[mode]
    return str(run_dir / kind / stamp.replace("/", "_"))


def register_configs() -> None:
    """`base_config` is the schema of conf/config.yaml; every group is typed through it."""
    ConfigStore.instance().store(name="base_config", node=RunConfig)
    OmegaConf.register_new_resolver("h64lm_run_dir", default_run_dir, replace=True)


_GROUPS = {"model": H64LMConfig, "data": DataConfig, "optim": OptimConfig, "hardware": HardwareConfig,
           "logger": LoggerConfig, "train": TrainConfig, "gen": GenConfig, "eval": EvalConfig,
           "plan": PlanConfig, "stage": StageConfig, "pipeline": PipelineConfig}


def build_run_config(cfg: DictConfig) -> RunConfig:
    """The composed config as a validated `RunConfig`, or one `ConfigError` naming the key."""
    unknown = [k for k in cfg if k not in {f.name for f in dataclasses.fields(RunConfig)}]
    for group, cls in _GROUPS.items():
        if group in cfg:
            valid = {f.name for f in dataclasses.fields(cls)}
            unknown += [f"{group}.{k}" for k in cfg[group] if k not in valid]
    if unknown:
        group = unknown[0].split(".")[0]
        valid = sorted(f.name for f in dataclasses.fields(_GROUPS.get(group, RunConfig)))
        guess = did_you_mean(unknown[0])
        raise ConfigError(f"unknown key(s) {', '.join(unknown)}{f'; did you mean {guess}?' if guess else ''}; "
                          f"valid keys of {group if group in _GROUPS else 'the run'}: {', '.join(valid)}")
    try:
        return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(RunConfig), cfg))
    except ConfigError:
        raise
    except Exception as e:  # OmegaConf's type errors: one line with the key it names
        raise ConfigError(str(e).splitlines()[0] + f" ({type(e).__name__})") from e


def schema_keys(schema: type = RunConfig, prefix: str = "") -> list[str]:
    """Every dotted key of the schema (`model.hidden_size`, ...), group names included."""
    keys = []
    hints = typing.get_type_hints(schema)
    for f in dataclasses.fields(schema):
        keys.append(prefix + f.name)
        if dataclasses.is_dataclass(hints[f.name]):
            keys += schema_keys(hints[f.name], f"{prefix}{f.name}.")
    return keys


def is_schema_key(key: str, schema: type = RunConfig) -> bool:
    """True when `key` names a field of the schema, or lies inside a field that is not a schema
    (a list or a mapping)."""
    head, _, rest = key.partition(".")
    hints = typing.get_type_hints(schema)
    if head not in {f.name for f in dataclasses.fields(schema)}:
        return False
    return not rest or not dataclasses.is_dataclass(hints[head]) or is_schema_key(rest, hints[head])


def did_you_mean(key: str, extra: tuple = ()) -> Optional[str]:
    """The schema key (or one of `extra`) closest to a mistyped `key` (difflib), or None when none is close."""
    key = key.lstrip("+~")
    group = key.split(".")[0]
    # within the group the user named: model.hiden_size -> model.hidden_size
    candidates = [k for k in schema_keys() if k.split(".")[0] == group and "." in k] if "." in key else []
    matches = difflib.get_close_matches(key, candidates or schema_keys() + list(extra), n=1, cutoff=0.75)
    return matches[0] if matches else None


def compose(overrides: list[str], return_hydra_config: bool = False) -> DictConfig:
    """conf/config.yaml composed with `overrides`, as `python run.py OVERRIDES` would (for
    notebooks, tests and programs under experiments/)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    register_configs()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return hydra_compose("config", overrides=overrides, return_hydra_config=return_hydra_config)


def run_config_from_yaml(text: str) -> RunConfig:
    """A RunConfig saved in a checkpoint (`OmegaConf.to_yaml`), validated again. Its start-up
    warnings were the training run's: reading it (to evaluate, export, sample or resume) repeats none."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return build_run_config(OmegaConf.create(text))


def run_config_yaml(run: RunConfig) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(run))
