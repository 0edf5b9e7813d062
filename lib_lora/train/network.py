"""The network being trained: which targets get which module (algorithm, rank, alpha, lr), the modules
themselves, their optimizer parameter groups, attaching them to the model, and the tensors we save.

Target selection follows sd-scripts (`networks.lora`: U-Net transformer layers + text-encoder attention/MLP;
with `conv_dim` also ResNet and sampler layers, 3x3 convs at conv_dim) and LyCORIS presets (`lycoris.kohya`; with
`train_norm`, also the normalization layers inside the blocks the preset targets). Block-wise dims and lr weights use
the block ids of `blocks.py`.
"""
from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from lib_lora import blocks
from lib_lora.errors import ConfigError, ShapeMismatchError
from lib_lora.keys import ModelTargets, Target
from lib_lora.networks import ALGORITHMS, LoadedNetwork, NetworkModule, load_network
from lib_lora.networks.lora import DeltaGroup, delta_groups, shared_deltas
from lib_lora.patching import Application, WeightPatcher
from lib_lora.train.blockwise import dims_by_block, lr_weights_by_block
from lib_lora.train.config import NetworkConfig, OptimizerConfig
from lib_lora.types import Arch, Component

TE_ROLES = ("te_attn", "te_mlp")
# LyCORIS presets -> (U-Net roles, text-encoder roles, linear layers only)
LYCORIS_PRESET_ROLES = {
    "full": (("attn", "resnet", "sampler", "top"), TE_ROLES, False),
    "full-lin": (("attn", "resnet", "sampler", "top"), TE_ROLES, True),
    "attn-mlp": (("attn", "top"), TE_ROLES, True),
    "attn-only": (("attn",), ("te_attn",), False),
    "unet-transformer-only": (("attn",), (), False),
    "unet-convblock-only": (("resnet", "sampler"), (), False),
}
# LyCORIS train_norm: the normalization layers inside the modules a preset targets (Transformer2DModel -> attn_norm,
# ResnetBlock2D -> resnet_norm), whatever the algorithm and even in linear-only presets. Its text-encoder targets
# (CLIPAttention, CLIPMLP) and attn-only's attention modules hold none, and conv_norm_out is no target of any preset.
LYCORIS_PRESET_NORM_ROLES = {
    "full": ("attn_norm", "resnet_norm"),
    "full-lin": ("attn_norm", "resnet_norm"),
    "attn-mlp": ("attn_norm",),
    "attn-only": (),
    "unet-transformer-only": ("attn_norm",),
    "unet-convblock-only": ("resnet_norm",),
}
# what the trained algorithm names build: (registered algorithm, DyLoRA, LoRA-FA)
BUILDS = {"lora": ("lora", False, False), "locon": ("lora", False, False), "dylora": ("lora", True, False),
          "lora_fa": ("lora", False, True), "loha": ("loha", False, False), "lokr": ("lokr", False, False),
          "ia3": ("ia3", False, False), "full": ("full", False, False), "diag-oft": ("diag-oft", False, False)}
# weights up to this many elements (out x in·kh·kw) get their ΔW in one batched product per shape while training:
# at that size a layer's LoRA costs more in per-operation overhead than in arithmetic
SHARED_DELTA_MAX_ELEMENTS = 1 << 16
ATTENTION_PROJECTIONS = (".to_q", ".to_k", ".to_v", ".to_out.0", ".q_proj", ".k_proj", ".v_proj", ".out_proj")


@dataclass(frozen=True)
class ModulePlan:
    """One module to train: its target, rank/alpha (0 for a normalization layer's module), block id and lr
    multiplier."""

    target: Target
    rank: int
    alpha: float
    block: str
    lr_weight: float


def _selected_roles(cfg: NetworkConfig) -> tuple[tuple[str, ...], tuple[str, ...], bool]:
    if cfg.network_module == "lycoris.kohya":
        unet, te, linear_only = LYCORIS_PRESET_ROLES[cfg.network_args.preset or "full"]
    else:
        # sd-scripts: conv_dim or conv_block_dims adds the ResNet and sampler layers
        convs = cfg.network_args.conv_dim is not None or cfg.blockwise.conv_block_dims is not None
        unet = ("attn", "resnet", "sampler") if convs else ("attn",)
        te, linear_only = TE_ROLES, False
    if not cfg.train_unet:
        unet = ()
    if not cfg.train_text_encoder:
        te = ()
    return unet, te, linear_only


def _is_attention_projection(t: Target) -> bool:
    return t.path.endswith(ATTENTION_PROJECTIONS) or t.rows is not None


def plan_modules(cfg: NetworkConfig, targets: ModelTargets) -> list[ModulePlan]:
    """Decide every module of the network (deterministic, in model order).

    Raises:
        ConfigError: options that do not fit the algorithm, or a selection that trains nothing.
    """
    arch = targets.arch
    algo = cfg.algo
    if algo not in BUILDS:
        raise ConfigError("algo", algo, f"cannot train it; known: {', '.join(BUILDS)}")
    args = cfg.network_args
    if BUILDS[algo][0] not in ("lora", "ia3") and (args.dropout or args.rank_dropout or cfg.network_dropout):
        raise ConfigError("network_dropout", args.dropout or args.rank_dropout or cfg.network_dropout,
                          f"neuron/rank dropout is implemented for LoRA-type networks, not {algo}")
    unet_roles, te_roles, linear_only = _selected_roles(cfg)
    lr_weights = lr_weights_by_block(cfg.blockwise, arch) or {}
    dims = dims_by_block(cfg, arch) or {}
    conv_dims = dims_by_block(cfg, arch, conv=True) or {}
    plans = []
    for t in targets.targets.values():
        is_te = t.component is not Component.UNET
        if t.role not in (te_roles if is_te else unet_roles):
            continue
        if cfg.network_module == "lycoris.kohya" and args.preset == "attn-only" and not _is_attention_projection(t):
            continue
        if linear_only and not isinstance(t.module, nn.Linear) and t.rows is None:
            continue
        block = blocks.block_of(t.name, arch)
        is_kxk = any(k > 1 for k in t.kernel_size)
        if is_kxk:
            if block in conv_dims:
                rank, alpha = conv_dims[block].dim, conv_dims[block].alpha
            elif args.conv_dim is not None:
                rank, alpha = args.conv_dim, cfg.conv_alpha
            elif cfg.network_module == "lycoris.kohya":
                # LyCORIS: conv_dim / conv_alpha default to network_dim / network_alpha, so its presets that
                # include ResNet layers train their k x k convolutions without a conv_dim
                rank, alpha = cfg.network_dim, cfg.alpha
            else:
                continue
        else:
            rank, alpha = cfg.network_dim, cfg.alpha
            if block in dims and not is_te:
                rank, alpha = dims[block].dim, dims[block].alpha
        weight = 1.0 if is_te else lr_weights.get(block, 1.0)
        if rank == 0 or weight == 0.0:
            continue  # sd-scripts: a block with lr weight 0 (or dim 0) gets no module
        plans.append(ModulePlan(t, int(rank), float(alpha), block, weight))
    if args.train_norm:
        plans += _norm_plans(cfg, targets, lr_weights)
    if not plans:
        raise ConfigError("network_module", cfg.network_module, "this selection trains no module of the model "
                          "(check network_train_*_only, preset, conv_dim and block-wise settings)")
    return plans


def _norm_plans(cfg: NetworkConfig, targets: ModelTargets, lr_weights: Mapping[str, float]) -> list[ModulePlan]:
    """LyCORIS train_norm: a NormModule for each normalization layer of the blocks the preset trains.

    Raises:
        ConfigError: when that selection holds no normalization layer (train_norm would change nothing).
    """
    preset = cfg.network_args.preset or "full"
    roles = LYCORIS_PRESET_NORM_ROLES[preset] if cfg.train_unet else ()
    plans = []
    for t in targets.select(roles, [Component.UNET]):
        block = blocks.block_of(t.name, targets.arch)
        weight = lr_weights.get(block, 1.0)
        if weight != 0.0:
            plans.append(ModulePlan(t, 0, 0.0, block, weight))
    if not plans:  # presets without norms are refused with the config (`algo_args`); here block lr weights of 0
        raise ConfigError("network_args.train_norm", True, f"no normalization layer of preset {preset} is trained "
                                                           "(their blocks have lr weight 0); set train_norm = False")
    return plans


class TrainableNetwork(nn.Module):
    """The trained modules by kohya name, attachable to a model in hooked (bypass) mode."""

    def __init__(self, cfg: NetworkConfig, targets: ModelTargets, *, seed: int = 0,
                 initial: LoadedNetwork | None = None):
        super().__init__()
        self.cfg = cfg
        self.arch: Arch = targets.arch
        self.plans = {p.target.name: p for p in plan_modules(cfg, targets)}
        if cfg.network_args.bypass_mode:
            _check_bypass_possible(self.plans.values())
        self.targets = targets
        built = {name: self._build(plan, _module_generator(seed, name), initial) for name, plan in self.plans.items()}
        self.nets = nn.ModuleDict(built)
        self._patcher: WeightPatcher | None = None
        self._delta_groups: list[DeltaGroup] | None = None

    # ------------------------------------------------------------------------------------ build

    def _build(self, plan: ModulePlan, g: torch.Generator, initial: LoadedNetwork | None) -> NetworkModule:
        if plan.target.is_norm:
            return self._build_norm(plan, initial)
        algo, dynamic, frozen_down = BUILDS[self.cfg.algo]
        cls = ALGORITHMS[algo]
        t = plan.target
        if initial is not None and self.cfg.dim_from_weights and t.name in initial.modules:
            rank = initial.modules[t.name].rank or plan.rank
        else:
            rank = plan.rank
        args = self.cfg.network_args
        module = cls.create(t.name, t.shape, rank, plan.alpha, generator=g, **_create_options(algo, args))
        if args.dora_wd:
            w0 = t.param.detach()
            w0 = w0 if t.rows is None else w0[t.rows[0] : t.rows[1]]
            module.dora_scale = nn.Parameter(dora_norms(w0, on_output=args.wd_on_output))
        if initial is not None and t.name in initial.modules:
            _copy_weights(module, initial.modules[t.name])
        module.module_dropout = args.module_dropout or 0.0
        module.bypass_only = args.bypass_mode
        if algo == "lora":
            module.dropout = self.cfg.network_dropout or args.dropout or 0.0
            module.rank_dropout = args.rank_dropout or 0.0
            if self.cfg.network_module == "lycoris.kohya":  # LyCORIS keeps the kept ranks as they are, or rescales
                module.rank_dropout_rescale = "mean" if args.rank_dropout_scale else "none"  # by their share
            # DyLoRA's unit: sd-scripts `unit` (default 1), LyCORIS `block_size` (default 4)
            lycoris_unit = 4 if self.cfg.network_module == "lycoris.kohya" else 1
            module.dylora_unit = (args.unit or args.block_size or lycoris_unit) if dynamic else 0
            if frozen_down:  # LoRA-FA (Zhang et al. 2023): the down projection stays at its random init
                module.lora_down.weight.requires_grad_(False)
        return module

    def _build_norm(self, plan: ModulePlan, initial: LoadedNetwork | None) -> NetworkModule:
        """LyCORIS' NormModule: zero changes of the layer's weight and bias; module dropout and bypass_mode apply
        (rank dropout does not: `algo_args.network_notes` says so)."""
        t = plan.target
        module = ALGORITHMS["norm"].create(t.name, t.shape, bias=getattr(t.module, "bias", None) is not None)
        if initial is not None and t.name in initial.modules:
            _copy_weights(module, initial.modules[t.name])
        module.module_dropout = self.cfg.network_args.module_dropout or 0.0
        module.bypass_only = self.cfg.network_args.bypass_mode
        return module

    def load_weights(self, network: LoadedNetwork) -> list[str]:
        """Copy a file's tensors into the matching modules; returns names of our modules the file lacks."""
        for name, module in self.nets.items():
            if name in network.modules:
                _copy_weights(module, network.modules[name])
        return sorted(set(self.nets) - set(network.modules))

    # ----------------------------------------------------------------------------------- attach

    def as_loaded(self) -> LoadedNetwork:
        return LoadedNetwork("training", None, self.arch, "training", dict(self.nets.items()),
                             {"modelspec.architecture": "sdxl" if self.arch is Arch.SDXL else ""})

    def attach(self, multiplier: float = 1.0) -> WeightPatcher:
        """Hook every module into its layer (weights untouched); call `detach()` to remove the hooks."""
        if self._patcher is None:
            self._patcher = WeightPatcher(self.targets, mode="hooked")
        self._patcher.apply([Application(self.as_loaded(), te=multiplier, unet=multiplier)])
        return self._patcher

    def detach(self) -> None:
        if self._patcher is not None:
            self._patcher.restore()

    @contextmanager
    def share_deltas(self) -> Iterator[None]:
        """One training forward + backward pass with the ΔW of small plain LoRA modules computed per shape in one
        batched product (`lora.shared_deltas`). Keep the block open through `backward()`: gradient checkpointing
        reruns the forward there. No-op outside training with gradients (sampling and validation)."""
        if not (self.training and torch.is_grad_enabled()):
            yield
            return
        if self._delta_groups is None:
            self._delta_groups = delta_groups(self.nets.values(), SHARED_DELTA_MAX_ELEMENTS)
        with shared_deltas(self._delta_groups):
            yield

    # ------------------------------------------------------------------------------- optimizer

    def param_groups(self, opt: OptimizerConfig) -> list[dict]:
        """Parameter groups: per text encoder / U-Net, per block lr weight, LoRA+ `up` ratio."""
        groups: dict[tuple[str, float], dict] = {}
        te_index = {Component.TE: 0, Component.TE1: 0, Component.TE2: 1}
        for name, module in self.nets.items():
            plan = self.plans[name]
            comp = plan.target.component
            is_te = comp is not Component.UNET
            base_lr = opt.effective_text_encoder_lr(te_index[comp]) if is_te else opt.effective_unet_lr
            ratio = self.cfg.loraplus_ratio(text_encoder=is_te) or 1.0
            for pname, param in module.named_parameters():
                if not param.requires_grad:
                    continue
                is_up = pname.startswith("lora_up")
                lr = base_lr * plan.lr_weight * (ratio if is_up else 1.0)
                label = f"{comp.value}{'_up' if is_up and ratio != 1.0 else ''}"
                if plan.lr_weight != 1.0:
                    label += f"_x{plan.lr_weight:g}"
                group = groups.setdefault((label, lr), {"params": [], "lr": lr, "name": label})
                group["params"].append(param)
        return [g for g in groups.values() if g["lr"] > 0]

    # ---------------------------------------------------------------------------------- output

    def file_tensors(self, dtype: torch.dtype | None = None) -> dict[str, Tensor]:
        """kohya-format tensors (`name.suffix`), cast to the save precision (alpha too, as sd-scripts does)."""
        out = {}
        for name, module in self.nets.items():
            for suffix, tensor in module.file_tensors().items():
                value = tensor.detach().to("cpu")
                if dtype is not None and value.is_floating_point():
                    value = value.to(dtype)
                out[f"{name}.{suffix}"] = value.contiguous()
        return out

    def ranks(self) -> tuple[int, float]:
        """(dim, alpha) for `ss_network_dim`/`ss_network_alpha`: the configured network_dim and alpha, as sd-scripts
        writes them (conv layers, block-wise dims and OFT's block layout derive their own from these); with
        dim_from_weights, the most common rank of the modules."""
        if self.cfg.dim_from_weights:
            counts = Counter(m.rank for m in self.nets.values() if m.rank)
            if counts:
                return counts.most_common(1)[0][0], self.cfg.alpha
        return self.cfg.network_dim, self.cfg.alpha

    @torch.no_grad()
    def apply_max_norm(self, max_norm: float) -> MaxNormReport:
        """sd-scripts' scale_weight_norms: shrink any module whose ||ΔW|| exceeds max_norm (LoRA, LoHa, LoKr; OFT:
        the norm of its blocks, as LyCORIS does; IA3 and full have none, and config notes say so)."""
        scaled, norms = 0, []
        for module in self.nets.values():
            if not module.has_max_norm:
                continue
            norm = module.max_norm_value()
            desired = torch.clamp(norm, max=max_norm)
            ratio = float(desired / norm.clamp(min=max_norm / 2))
            if ratio < 1.0:
                module.scale_change_(ratio)
                scaled += 1
            norms.append(float(norm) * min(ratio, 1.0))
        mean = sum(norms) / len(norms) if norms else 0.0
        return MaxNormReport(scaled, mean, max(norms, default=0.0))


@dataclass(frozen=True)
class MaxNormReport:
    keys_scaled: int
    mean_norm: float
    max_norm: float


def _check_bypass_possible(plans) -> None:
    """bypass_mode adds each module's change to its layer's output; a weight its parent reads directly (OpenCLIP
    attention's fused q/k/v `in_proj_weight` and its `out_proj`, in the web UI's SD2/SDXL text encoders) has no
    forward of its own to add to."""
    fused = [p.target.name for p in plans if p.target.hook == "param" or p.target.rows is not None]
    if fused:
        raise ConfigError("network_args.bypass_mode", True,
                          f"{len(fused)} targets (first {fused[0]}) are weights the model reads directly (fused "
                          "attention projections), which have no output to add to; set bypass_mode = False "
                          "(the results are the same) or train the U-Net only")


def _create_options(algo: str, args) -> dict:
    """The algorithm-specific options of `create` (see `algo_args.ALGO_ARGS` for what each means)."""
    if algo == "lokr":
        return {"factor": args.factor, "use_tucker": args.use_tucker, "decompose_both": args.decompose_both}
    if algo in ("lora", "loha"):
        return {"use_tucker": args.use_tucker}
    if algo == "ia3":
        return {"on_input": args.train_on_input}
    if algo == "diag-oft":
        return {"constraint": args.constraint, "rescaled": args.rescaled}
    return {}


def dora_norms(w0: Tensor, *, on_output: bool = True) -> Tensor:
    """DoRA's initial magnitudes: the norms of W0's output rows ([out, 1, ...]) or input columns ([1, in, ...]), so
    training starts at W0 (LyCORIS `wd_on_output`)."""
    w = w0.detach().to(torch.float32)
    if on_output:
        return w.reshape(w.shape[0], -1).norm(dim=1).reshape(w.shape[0], *([1] * (w.dim() - 1)))
    return w.transpose(0, 1).reshape(w.shape[1], -1).norm(dim=1).reshape(1, w.shape[1], *([1] * (w.dim() - 2)))


def _module_generator(seed: int, name: str) -> torch.Generator:
    """Each module's initialisation depends on (seed, its name) only, not on the order a model lists its modules:
    the web UI's LDM U-Net and the diffusers U-Net then start from the same network."""
    digest = hashlib.sha256(f"{seed}/{name}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))


def _copy_weights(module: NetworkModule, source: NetworkModule) -> None:
    ours, theirs = module.state_dict(), source.state_dict()
    for key, value in theirs.items():
        if key not in ours:
            continue
        if ours[key].shape != value.shape:
            raise ShapeMismatchError(source.source or "network_weights", f"{module.lora_name}.{key}",
                                     tuple(ours[key].shape), tuple(value.shape), "network_weights does not fit")
        ours[key].copy_(value.to(ours[key].dtype))
    if source.alpha is not None:
        module.alpha = source.alpha.clone()


def load_initial_weights(path, arch: Arch) -> LoadedNetwork:
    """`network_weights`: a LoRA file to start from (kohya/LyCORIS format)."""
    return load_network(path, arch=arch)


def summarize(network: TrainableNetwork) -> Mapping[str, int]:
    """Module counts by component, normalization layers (train_norm) apart (for the start-of-run report)."""
    counts: dict[str, int] = {}
    for plan in network.plans.values():
        key = "norm" if plan.target.is_norm else plan.target.component.value
        counts[key] = counts.get(key, 0) + 1
    return counts
