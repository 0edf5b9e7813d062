"""Typed training configuration: frozen sections composing one `TrainConfig`, validated once.

Field names are sd-scripts' option names (`cfg.network.network_dim` is `--network_dim`), so a TOML key or a
`--key value` override finds its field by name alone (`toml_config` builds that table from these classes, and
`coerce.coerce` turns a TOML or command-line value into the field's declared type). Every check (`coerce.check*`)
raises `ConfigError(field, value, reason)` naming the option the user wrote. The data sections (datasets, subsets,
caching) live beside the data pipeline in `train.data.config`; the block-wise section, with its conversion to block
ids, in `train.blockwise`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lib_lora.errors import ConfigError
from lib_lora.train import optimizers, schedulers
from lib_lora.train.algo_args import check_algorithm_args

# Also re-exported for importers of `train.config`: the checks, coercion and block-wise section live beside it.
from lib_lora.train.blockwise import LR_WEIGHT_PRESETS, BlockwiseConfig, LrWeight  # noqa: F401
from lib_lora.train.coerce import check, check_choice, check_fraction, check_positive, coerce, field_types  # noqa: F401

if TYPE_CHECKING:
    from lib_lora.train.data.config import DataConfig

MIXED_PRECISIONS = ("no", "fp16", "bf16")
SAVE_PRECISIONS = ("float", "fp16", "bf16")
SAMPLE_SAMPLERS = ("ddim", "pndm", "lms", "euler", "euler_a", "heun", "dpm_2", "dpm_2_a", "dpmsolver", "dpmsolver++",
                   "dpmsingle", "k_lms", "k_euler", "k_euler_a", "k_dpm_2", "k_dpm_2_a")
# network_module -> algorithm; lycoris.kohya takes its algorithm from network_args `algo`.
NETWORK_MODULES = {"networks.lora": "lora", "networks.dylora": "dylora", "networks.lora_fa": "lora_fa",
                   "networks.loha": "loha", "networks.lokr": "lokr", "lycoris.kohya": None}
LYCORIS_ALGOS = ("lora", "locon", "loha", "lokr", "ia3", "dylora", "full", "diag-oft")
LYCORIS_PRESETS = ("full", "full-lin", "attn-mlp", "attn-only", "unet-transformer-only", "unet-convblock-only")
LOG_WITH = ("tensorboard", "none")


# ---------------------------------------------------------------------------------------------------- model


@dataclass(frozen=True, kw_only=True)
class ModelConfig:
    """Base model: which file, which variant (v2 / v-prediction / SDXL), how prompts are encoded."""

    pretrained_model_name_or_path: Path | None = None
    vae: Path | None = None
    v2: bool = False
    v_parameterization: bool = False
    sdxl: bool = False
    clip_skip: int | None = None
    max_token_length: int | None = None
    no_half_vae: bool = False

    def __post_init__(self) -> None:
        check(self.clip_skip is None or 1 <= self.clip_skip <= 12, "clip_skip", self.clip_skip, "must be 1..12")
        check(self.max_token_length in (None, 75, 150, 225), "max_token_length", self.max_token_length,
              "must be 75, 150 or 225 (sd-scripts' chunks of 75 tokens)")
        check(not (self.sdxl and self.v2), "v2", self.v2, "v2 and sdxl cannot both be set")


# ---------------------------------------------------------------------------------------------------- network


@dataclass(frozen=True, kw_only=True)
class NetworkArgs:
    """`network_args` parsed into typed values (LoRA / LoCon / LyCORIS / DyLoRA options)."""

    conv_dim: int | None = None
    conv_alpha: float | None = None
    algo: str | None = None
    dropout: float | None = None
    rank_dropout: float | None = None
    module_dropout: float | None = None
    dora_wd: bool = False
    wd_on_output: bool = True
    factor: int = -1
    decompose_both: bool = False
    use_tucker: bool = False
    use_scalar: bool = False
    rank_dropout_scale: bool = False
    train_norm: bool = False
    preset: str | None = None
    unit: int | None = None
    block_size: int | None = None  # LyCORIS' name of DyLoRA's unit
    constraint: float = 0.0  # OFT
    rescaled: bool = False  # OFT
    train_on_input: bool = False  # IA3
    bypass_mode: bool = False  # apply the network as a forward-time addition everywhere (False: the engine picks)

    def __post_init__(self) -> None:
        check_positive("conv_dim", self.conv_dim)
        check_positive("conv_alpha", self.conv_alpha, allow_zero=True)
        for name in ("dropout", "rank_dropout", "module_dropout"):
            check_fraction(name, getattr(self, name))
        if self.algo is not None:
            check_choice("algo", self.algo, LYCORIS_ALGOS)
        if self.preset is not None:
            check_choice("preset", self.preset, LYCORIS_PRESETS)
        check(self.factor == -1 or self.factor >= 1, "factor", self.factor, "must be -1 (automatic) or >= 1")
        check_positive("unit", self.unit)
        check_positive("block_size", self.block_size)
        check_positive("constraint", self.constraint, allow_zero=True)


@dataclass(frozen=True, kw_only=True)
class NetworkConfig:
    """What is trained: algorithm, rank/alpha, which parts, dropouts, block-wise settings, LoRA+ ratios."""

    network_module: str = "networks.lora"
    network_dim: int = 4
    network_alpha: float = 1.0
    network_args: NetworkArgs = field(default_factory=NetworkArgs)
    network_args_raw: tuple[tuple[str, str], ...] = ()  # as written, for ss_network_args
    network_dropout: float | None = None
    network_train_unet_only: bool = False
    network_train_text_encoder_only: bool = False
    network_weights: Path | None = None
    dim_from_weights: bool = False
    scale_weight_norms: float | None = None
    loraplus_lr_ratio: float | None = None
    loraplus_unet_lr_ratio: float | None = None
    loraplus_text_encoder_lr_ratio: float | None = None
    blockwise: BlockwiseConfig = field(default_factory=BlockwiseConfig)

    def __post_init__(self) -> None:
        check_choice("network_module", self.network_module, tuple(NETWORK_MODULES))
        check_positive("network_dim", self.network_dim)
        check_positive("network_alpha", self.network_alpha, allow_zero=True)
        check_fraction("network_dropout", self.network_dropout)
        check(not (self.network_train_unet_only and self.network_train_text_encoder_only),
              "network_train_text_encoder_only", True, "cannot be combined with network_train_unet_only")
        check(not self.dim_from_weights or self.network_weights is not None, "dim_from_weights", True,
              "needs network_weights")
        check_positive("scale_weight_norms", self.scale_weight_norms)
        for name in ("loraplus_lr_ratio", "loraplus_unet_lr_ratio", "loraplus_text_encoder_lr_ratio"):
            check_positive(name, getattr(self, name))
        if self.network_module != "lycoris.kohya" and self.network_args.algo is not None:
            raise ConfigError("algo", self.network_args.algo, "is a lycoris.kohya option; set network_module = "
                              "'lycoris.kohya' or drop algo")
        check_algorithm_args(self)

    @property
    def algo(self) -> str:
        """The algorithm trained: lora, locon, loha, lokr, ia3, dylora, lora_fa, full or diag-oft."""
        algo = NETWORK_MODULES[self.network_module] or self.network_args.algo or "lora"
        if algo == "lora" and self.network_args.conv_dim is not None:
            return "locon"
        return algo

    @property
    def alpha(self) -> float:
        """Effective alpha: 0 means alpha = dim (scale 1), as in sd-scripts."""
        return float(self.network_dim) if self.network_alpha == 0 else float(self.network_alpha)

    @property
    def conv_alpha(self) -> float | None:
        """Effective conv alpha (None without conv_dim): unset -> 1.0 (sd-scripts and LyCORIS), 0 -> conv_dim."""
        args = self.network_args
        if args.conv_dim is None:
            return None
        if args.conv_alpha is None:
            return 1.0
        return float(args.conv_dim) if args.conv_alpha == 0 else float(args.conv_alpha)

    @property
    def train_unet(self) -> bool:
        return not self.network_train_text_encoder_only

    @property
    def train_text_encoder(self) -> bool:
        return not self.network_train_unet_only

    def loraplus_ratio(self, *, text_encoder: bool) -> float | None:
        """LoRA+ ratio of the `up` lr to the `down` lr for the U-Net or the text encoder (None = off)."""
        specific = self.loraplus_text_encoder_lr_ratio if text_encoder else self.loraplus_unet_lr_ratio
        return specific if specific is not None else self.loraplus_lr_ratio


# ---------------------------------------------------------------------------------------------------- optimizer


@dataclass(frozen=True, kw_only=True)
class OptimizerConfig:
    """Optimizer, learning rates and lr schedule."""

    optimizer_type: str = "AdamW"
    optimizer_args: tuple[tuple[str, Any], ...] = ()
    learning_rate: float = 1e-4
    unet_lr: float | None = None
    text_encoder_lr: float | tuple[float, ...] | None = None
    max_grad_norm: float = 1.0
    lr_scheduler: str = "constant"
    lr_warmup_steps: int | float = 0
    lr_scheduler_num_cycles: int = 1
    lr_scheduler_power: float = 1.0
    lr_scheduler_min_lr_ratio: float | None = None
    lr_scheduler_type: str | None = None  # a torch.optim.lr_scheduler class, as sd-scripts: replaces lr_scheduler
    lr_scheduler_args: tuple[tuple[str, Any], ...] = ()  # its keyword arguments

    def __post_init__(self) -> None:
        # Store the registry's spelling so that logs and metadata read "AdamW8bit" whatever the user typed.
        object.__setattr__(self, "optimizer_type", optimizers.get_entry(self.optimizer_type).name)
        object.__setattr__(self, "lr_scheduler", schedulers.get_entry(self.lr_scheduler).name)
        check(len({k for k, _ in self.optimizer_args}) == len(self.optimizer_args), "optimizer_args",
              self.optimizer_args, "a key is given twice")
        check_positive("learning_rate", self.learning_rate, allow_zero=True)
        check_positive("unet_lr", self.unet_lr, allow_zero=True)
        te = self.text_encoder_lr if isinstance(self.text_encoder_lr, tuple) else (self.text_encoder_lr,)
        check(1 <= len(te) <= 2, "text_encoder_lr", self.text_encoder_lr, "one value, or two for SDXL's encoders")
        for v in te:
            check_positive("text_encoder_lr", v, allow_zero=True)
        check_positive("max_grad_norm", self.max_grad_norm, allow_zero=True)
        w = self.lr_warmup_steps
        check(w >= 0 and (isinstance(w, int) or w < 1), "lr_warmup_steps", w,
              "a step count (int >= 0) or a ratio of the total steps (float < 1)")
        check(self.lr_scheduler_num_cycles >= 1, "lr_scheduler_num_cycles", self.lr_scheduler_num_cycles,
              "must be >= 1")
        check_positive("lr_scheduler_power", self.lr_scheduler_power)
        check_fraction("lr_scheduler_min_lr_ratio", self.lr_scheduler_min_lr_ratio, inclusive_one=True)
        if self.lr_scheduler_type is not None:
            schedulers.check_torch_scheduler(self.lr_scheduler_type, self.lr_scheduler_args)
        else:
            check(not self.lr_scheduler_args, "lr_scheduler_args", self.lr_scheduler_args,
                  "are arguments of lr_scheduler_type's class; give lr_scheduler_type too")

    @property
    def kwargs(self) -> dict[str, Any]:
        """`optimizer_args` as keyword arguments for the optimizer class."""
        return dict(self.optimizer_args)

    @property
    def effective_unet_lr(self) -> float:
        return self.learning_rate if self.unet_lr is None else self.unet_lr

    def effective_text_encoder_lr(self, index: int = 0) -> float:
        """Lr of text encoder `index` (SDXL has two; a single value applies to both)."""
        te = self.text_encoder_lr
        if te is None:
            return self.learning_rate
        if isinstance(te, tuple):
            return te[min(index, len(te) - 1)]
        return te

    def warmup_steps(self, total_steps: int) -> int:
        """Warmup in steps; a float < 1 is a ratio of the total (sd-scripts truncates to int)."""
        return schedulers.resolve_warmup(self.lr_warmup_steps, total_steps)

    def schedule(self, total_steps: int) -> schedulers.ScheduleSpec:
        """The schedule of this config over `total_steps` optimizer steps."""
        return schedulers.ScheduleSpec(
            name=self.lr_scheduler, total_steps=total_steps, warmup_steps=self.warmup_steps(total_steps),
            num_cycles=self.lr_scheduler_num_cycles, power=self.lr_scheduler_power,
            min_lr_ratio=self.lr_scheduler_min_lr_ratio or 0.0, torch_class=self.lr_scheduler_type,
            torch_args=self.lr_scheduler_args)


# ---------------------------------------------------------------------------------------------------- run / output


@dataclass(frozen=True, kw_only=True)
class RunConfig:
    """How long and how: steps/epochs, batch, accumulation, precision, seed, resume."""

    max_train_steps: int = 1600
    max_train_epochs: int | None = None
    train_batch_size: int = 1
    gradient_accumulation_steps: int = 1
    gradient_checkpointing: bool = False
    mixed_precision: str = "no"
    seed: int | None = None  # None: the trainer draws one and records it
    resume: Path | None = None
    save_state: bool = False
    save_state_on_train_end: bool = False

    def __post_init__(self) -> None:
        check_positive("max_train_steps", self.max_train_steps)
        check_positive("max_train_epochs", self.max_train_epochs)
        check(self.train_batch_size >= 1, "train_batch_size", self.train_batch_size, "must be >= 1")
        check(self.gradient_accumulation_steps >= 1, "gradient_accumulation_steps",
              self.gradient_accumulation_steps, "must be >= 1")
        check_choice("mixed_precision", self.mixed_precision, MIXED_PRECISIONS)
        check(self.seed is None or 0 <= self.seed < 2**63, "seed", self.seed, "must be a non-negative integer")


@dataclass(frozen=True, kw_only=True)
class OutputConfig:
    """Where and when files are written, and the user's metadata."""

    output_dir: Path | None = None
    output_name: str = "last"
    save_model_as: str = "safetensors"
    save_precision: str | None = None
    save_every_n_epochs: int | None = None
    save_every_n_steps: int | None = None
    save_last_n_epochs: int | None = None
    save_last_n_epochs_state: int | None = None
    save_last_n_steps: int | None = None
    save_last_n_steps_state: int | None = None
    no_metadata: bool = False
    training_comment: str | None = None
    metadata_title: str | None = None
    metadata_author: str | None = None
    metadata_description: str | None = None
    metadata_license: str | None = None
    metadata_tags: str | None = None
    metadata_trigger_phrase: str | None = None
    metadata_usage_hint: str | None = None

    def __post_init__(self) -> None:
        check(bool(self.output_name) and not any(c in self.output_name for c in "/\\"), "output_name",
              self.output_name, "must be a non-empty file name without folders")
        check(self.save_model_as == "safetensors", "save_model_as", self.save_model_as,
              "only 'safetensors' is written (pickle formats can carry code; A1111 and diffusers read safetensors)")
        if self.save_precision is not None:
            check_choice("save_precision", self.save_precision, SAVE_PRECISIONS)
        for name in ("save_every_n_epochs", "save_every_n_steps", "save_last_n_epochs", "save_last_n_epochs_state",
                     "save_last_n_steps", "save_last_n_steps_state"):
            check_positive(name, getattr(self, name))


@dataclass(frozen=True, kw_only=True)
class SamplingConfig:
    """Sample images during training (sd-scripts prompt files)."""

    sample_every_n_steps: int | None = None
    sample_every_n_epochs: int | None = None
    sample_prompts: Path | None = None
    sample_prompt_text: str | None = None  # ours: prompts typed directly, one per line (sd-scripts' line syntax)
    sample_sampler: str = "ddim"
    sample_at_first: bool = False

    def __post_init__(self) -> None:
        check_positive("sample_every_n_steps", self.sample_every_n_steps)
        check_positive("sample_every_n_epochs", self.sample_every_n_epochs)
        check_choice("sample_sampler", self.sample_sampler, SAMPLE_SAMPLERS)
        check(self.sample_prompts is None or self.sample_prompt_text is None, "sample_prompt_text",
              self.sample_prompt_text, "give either a prompt file (sample_prompts) or prompt text, not both")
        wants = self.sample_every_n_steps or self.sample_every_n_epochs or self.sample_at_first
        check(not wants or self.has_prompts, "sample_prompts", None,
              "sample_every_n_steps/epochs or sample_at_first is set, but no prompt file is given")

    @property
    def has_prompts(self) -> bool:
        return self.sample_prompts is not None or bool(self.sample_prompt_text)

    @property
    def enabled(self) -> bool:
        return self.has_prompts and bool(self.sample_every_n_steps or self.sample_every_n_epochs or
                                         self.sample_at_first)


@dataclass(frozen=True, kw_only=True)
class LossConfig:
    """Loss weighting and noise options."""

    prior_loss_weight: float = 1.0
    min_snr_gamma: float | None = None
    scale_v_pred_loss_like_noise_pred: bool = False
    v_pred_like_loss: float | None = None
    debiased_estimation_loss: bool = False
    noise_offset: float | None = None
    noise_offset_random_strength: bool = False
    adaptive_noise_scale: float | None = None
    multires_noise_iterations: int | None = None
    multires_noise_discount: float = 0.3
    masked_loss: bool = False
    min_timestep: int | None = None
    max_timestep: int | None = None

    def __post_init__(self) -> None:
        check_positive("prior_loss_weight", self.prior_loss_weight, allow_zero=True)
        check_positive("min_snr_gamma", self.min_snr_gamma)
        check_positive("v_pred_like_loss", self.v_pred_like_loss, allow_zero=True)
        check_positive("noise_offset", self.noise_offset, allow_zero=True)
        check(self.adaptive_noise_scale is None or bool(self.noise_offset), "adaptive_noise_scale",
              self.adaptive_noise_scale, "needs noise_offset (it scales the offset by each latent's mean)")
        check_positive("multires_noise_iterations", self.multires_noise_iterations)
        check_fraction("multires_noise_discount", self.multires_noise_discount, inclusive_one=True)
        lo, hi = self.min_timestep or 0, 1000 if self.max_timestep is None else self.max_timestep
        check(0 <= lo < hi <= 1000, "min_timestep", (self.min_timestep, self.max_timestep),
              "need 0 <= min_timestep < max_timestep <= 1000")


@dataclass(frozen=True, kw_only=True)
class ValidationConfig:
    """Held-out loss: when to evaluate (the split itself is a dataset option, `validation_split`)."""

    validate_every_n_steps: int | None = None
    validate_every_n_epochs: int | None = None
    max_validation_steps: int | None = None
    validation_data_dir: Path | None = None  # ours: a separate folder (kohya layout or plain images)

    def __post_init__(self) -> None:
        for name in ("validate_every_n_steps", "validate_every_n_epochs", "max_validation_steps"):
            check_positive(name, getattr(self, name))


@dataclass(frozen=True, kw_only=True)
class GuardConfig:
    """Divergence guard (ours): roll back to the last good snapshot on NaN/inf or a sustained loss spike."""

    divergence_guard: bool = True
    guard_spike_factor: float = 3.0  # a step is a spike when loss > factor x smoothed baseline
    guard_window: int = 50  # steps in the smoothed baseline
    guard_patience: int = 10  # consecutive spike steps that count as divergence
    guard_max_rollbacks: int = 3  # then stop with a report, keeping the last good file
    guard_lr_decay: float = 0.5  # lr multiplier applied after each rollback
    guard_snapshot_every_n_steps: int = 25

    def __post_init__(self) -> None:
        check(self.guard_spike_factor > 1.0, "guard_spike_factor", self.guard_spike_factor, "must be > 1")
        for name in ("guard_window", "guard_patience", "guard_snapshot_every_n_steps"):
            check(getattr(self, name) >= 1, name, getattr(self, name), "must be >= 1")
        check_positive("guard_max_rollbacks", self.guard_max_rollbacks, allow_zero=True)
        check(0.0 < self.guard_lr_decay <= 1.0, "guard_lr_decay", self.guard_lr_decay, "must be in (0, 1]")


@dataclass(frozen=True, kw_only=True)
class LoggingConfig:
    """TensorBoard logging."""

    logging_dir: Path | None = None
    log_prefix: str | None = None
    log_with: str = "tensorboard"
    log_tracker_name: str | None = None

    def __post_init__(self) -> None:
        check_choice("log_with", self.log_with, LOG_WITH)


# ---------------------------------------------------------------------------------------------------- all


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """The whole training configuration; build it with `toml_config.load_config` or `toml_config.build_config`."""

    data: DataConfig
    model: ModelConfig = field(default_factory=ModelConfig)
    network: NetworkConfig = field(default_factory=NetworkConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    run: RunConfig = field(default_factory=RunConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    validation: ValidationConfig = field(default_factory=ValidationConfig)
    guard: GuardConfig = field(default_factory=GuardConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    notes: tuple[str, ...] = ()  # options accepted without effect, ignored ones, advice: shown at start
    source: Path | None = None  # the run TOML, when there was one

    def __post_init__(self) -> None:
        if self.data.caches_text_encoder_outputs:
            # The cache holds encodings of the frozen encoder; a trained encoder would make them stale.
            check(self.network.network_train_unet_only, "cache_text_encoder_outputs", True,
                  "needs network_train_unet_only = true (a text encoder being trained changes its outputs)")
        self.data.check_masks(self.loss.masked_loss)
        entry = optimizers.get_entry(self.optimizer.optimizer_type)
        if entry.schedule_free:
            check(self.optimizer.lr_scheduler == "constant", "lr_scheduler", self.optimizer.lr_scheduler,
                  f"{entry.name} schedules itself; use lr_scheduler = 'constant' (warmup: optimizer_args "
                  "warmup_steps=N)")
        if self.optimizer.lr_scheduler == "adafactor":
            check(entry.name == "Adafactor", "lr_scheduler", "adafactor", "needs optimizer_type = 'Adafactor'")

    def ss_metadata(self) -> dict[str, str]:
        """sd-scripts' training-parameter `ss_*` values of this config (strings, as sd-scripts writes them)."""
        from lib_lora.train.metadata import training_metadata

        return training_metadata(self)

    def total_steps(self, batches_per_epoch: int, num_processes: int = 1) -> int:
        """Optimizer steps of the run: max_train_epochs wins over max_train_steps, as in sd-scripts."""
        if self.run.max_train_epochs is None:
            return self.run.max_train_steps
        per_epoch = math.ceil(batches_per_epoch / num_processes / self.run.gradient_accumulation_steps)
        return self.run.max_train_epochs * per_epoch
