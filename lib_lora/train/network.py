"""The network being trained: which targets get which module (algorithm, rank, alpha, lr), the modules
themselves, their optimizer parameter groups, attaching them to the model, and the tensors we save.

Target selection follows sd-scripts (`networks.lora`: U-Net transformer layers + text-encoder attention/MLP;
with `conv_dim` also ResNet and sampler layers, 3x3 convs at conv_dim) and LyCORIS presets (`lycoris.kohya`).
Block-wise dims and lr weights use the block ids of `blocks.py`.
"""
from __future__ import annotations

import collections
import hashlib
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
# what the trained algorithm names build: (registered algorithm, DyLoRA, LoRA-FA)
BUILDS = {"lora": ("lora", False, False), "locon": ("lora", False, False), "dylora": ("lora", True, False),
          "lora_fa": ("lora", False, True), "loha": ("loha", False, False), "lokr": ("lokr", False, False),
          "ia3": ("ia3", False, False), "full": ("full", False, False)}
# weights up to this many elements (out x in·kh·kw) get their ΔW in one batched product per shape while training:
# at that size a layer's LoRA costs more in per-operation overhead than in arithmetic
SHARED_DELTA_MAX_ELEMENTS = 1 << 16
ATTENTION_PROJECTIONS = (".to_q", ".to_k", ".to_v", ".to_out.0", ".q_proj", ".k_proj", ".v_proj", ".out_proj")


@dataclass(frozen=True)
class ModulePlan:
    """One module to train: its target, rank/alpha, block id and lr multiplier."""

    target: Target
    rank: int
    alpha: float
    block: str
    lr_weight: float


def _selected_roles(cfg: NetworkConfig) -> tuple[tuple[str, ...], tuple[str, ...], bool]:
    if cfg.network_module == "lycoris.kohya":
        unet, te, linear_only = LYCORIS_PRESET_ROLES[cfg.network_args.preset or "full"]
    else:
        unet = ("attn", "resnet", "sampler") if cfg.network_args.conv_dim is not None else ("attn",)
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
    if BUILDS[algo][0] != "lora" and (args.dropout or args.rank_dropout or cfg.network_dropout):
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
            if args.conv_dim is None:
                continue
            rank, alpha = args.conv_dim, cfg.conv_alpha
            if block in conv_dims:
                rank, alpha = conv_dims[block].dim, conv_dims[block].alpha
        else:
            rank, alpha = cfg.network_dim, cfg.alpha
            if block in dims and not is_te:
                rank, alpha = dims[block].dim, dims[block].alpha
        weight = 1.0 if is_te else lr_weights.get(block, 1.0)
        if rank == 0 or weight == 0.0:
            continue  # sd-scripts: a block with lr weight 0 (or dim 0) gets no module
        plans.append(ModulePlan(t, int(rank), float(alpha), block, weight))
    if not plans:
        raise ConfigError("network_module", cfg.network_module, "this selection trains no module of the model "
                          "(check network_train_*_only, preset, conv_dim and block-wise settings)")
    return plans


class TrainableNetwork(nn.Module):
    """The trained modules by kohya name, attachable to a model in hooked (bypass) mode."""

    def __init__(self, cfg: NetworkConfig, targets: ModelTargets, *, seed: int = 0,
                 initial: LoadedNetwork | None = None):
        super().__init__()
        self.cfg = cfg
        self.arch: Arch = targets.arch
        self.plans = {p.target.name: p for p in plan_modules(cfg, targets)}
        self.targets = targets
        built = {name: self._build(plan, _module_generator(seed, name), initial) for name, plan in self.plans.items()}
        self.nets = nn.ModuleDict(built)
        self._patcher: WeightPatcher | None = None
        self._delta_groups: list[DeltaGroup] | None = None

    # ------------------------------------------------------------------------------------ build

    def _build(self, plan: ModulePlan, g: torch.Generator, initial: LoadedNetwork | None) -> NetworkModule:
        algo, dynamic, frozen_down = BUILDS[self.cfg.algo]
        cls = ALGORITHMS[algo]
        t = plan.target
        if initial is not None and self.cfg.dim_from_weights and t.name in initial.modules:
            rank = initial.modules[t.name].rank or plan.rank
        else:
            rank = plan.rank
        kwargs = {"generator": g}
        args = self.cfg.network_args
        if algo == "lora" and args.dora_wd:
            w0 = t.param.detach()
            kwargs["dora_weight"] = w0 if t.rows is None else w0[t.rows[0] : t.rows[1]]
        if algo == "lokr":
            kwargs.update(factor=args.factor, decompose_both=args.decompose_both, use_tucker=args.use_tucker)
        module = cls.create(t.name, t.shape, rank, plan.alpha, **kwargs)
        if initial is not None and t.name in initial.modules:
            _copy_weights(module, initial.modules[t.name])
        module.module_dropout = args.module_dropout or 0.0
        if algo == "lora":
            module.dropout = self.cfg.network_dropout or args.dropout or 0.0
            module.rank_dropout = args.rank_dropout or 0.0
            module.dylora_unit = (args.unit or 1) if dynamic else 0
            if frozen_down:  # LoRA-FA (Zhang et al. 2023): the down projection stays at its random init
                module.lora_down.weight.requires_grad_(False)
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
        """(most common rank, its most common alpha) over the modules."""
        counts = collections.Counter((getattr(self.nets[name], "rank", None) or p.rank, p.alpha)
                                     for name, p in self.plans.items())
        return counts.most_common(1)[0][0]

    @torch.no_grad()
    def apply_max_norm(self, max_norm: float) -> MaxNormReport:
        """sd-scripts' scale_weight_norms: shrink any module whose ||ΔW|| exceeds max_norm, by scaling each of
        the tensors ΔW is a product of (LoRA/LoCon up, down, mid; LoHa and LoKr factors, as LyCORIS does).
        Modules whose ΔW is no such product (IA3, DoRA) are left alone; `max_norm_skipped` names them."""
        scaled, norms = 0, []
        for name, module in self.nets.items():
            factors = module.product_factors()
            if factors is None:
                continue
            norm = module.delta(torch.zeros(self.plans[name].target.shape, device=factors[0].device)).norm()
            desired = torch.clamp(norm, max=max_norm)
            ratio = float(desired / norm.clamp(min=max_norm / 2))
            if ratio < 1.0:
                root = ratio ** (1.0 / len(factors))
                for factor in factors:
                    factor.mul_(root)
                scaled += 1
            norms.append(float(norm) * min(ratio, 1.0))
        mean = sum(norms) / len(norms) if norms else 0.0
        return MaxNormReport(scaled, mean, max(norms, default=0.0))

    def max_norm_skipped(self) -> list[str]:
        """Algorithms present whose modules scale_weight_norms cannot scale."""
        return sorted({type(m).__name__.removesuffix("Module") for m in self.nets.values()
                       if m.product_factors() is None})


@dataclass(frozen=True)
class MaxNormReport:
    keys_scaled: int
    mean_norm: float
    max_norm: float


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
    """Module counts by component (for the start-of-run report)."""
    counts: dict[str, int] = {}
    for plan in network.plans.values():
        key = plan.target.component.value
        counts[key] = counts.get(key, 0) + 1
    return counts
