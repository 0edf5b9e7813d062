"""Model configs: the shipped full-size SD1.5 / SD2.x / SDXL configs and the LDM parameter records.

`SDConfig` holds the diffusers/transformers constructor arguments of every component (what
`load_checkpoint` builds and what `save_checkpoint` embeds in the file's metadata). `LdmUNet` and
`LdmVae` hold the same structure in the words of the LDM/SGM yaml configs the web UI reads
(`model_channels`, `channel_mult`, `attention_resolutions`, ...), so a yaml, the tensor shapes of a
file and a diffusers config all meet in one record and convert in one place.
"""
from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from lib_lora.errors import ConfigError
from lib_lora.types import Arch
from lib_lora.unet_layout import UNetLayout

CONFIG_DIR = Path(__file__).with_name("configs")
PREDICTION_TYPES = ("epsilon", "v_prediction")
SHIPPED = {
    (Arch.SD1, "epsilon"): "sd15.json",
    (Arch.SD1, "v_prediction"): "sd15.json",
    (Arch.SD2, "epsilon"): "sd2-512-eps.json",
    (Arch.SD2, "v_prediction"): "sd2-768-v.json",
    (Arch.SDXL, "epsilon"): "sdxl-base.json",
    (Arch.SDXL, "v_prediction"): "sdxl-base.json",
}
# the web UI's ldm/sgm code builds every GroupNorm with 32 groups (GroupNorm32 / Normalize)
LDM_NORM_GROUPS = 32
# text-encoder fields that decide its function (the web UI builds OpenCLIP towers by name: they must match)
TE_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
             "max_position_embeddings", "hidden_act")
# all CLIPTextConfig fields we record (in metadata and in a text encoder's config.json)
TE_CONFIG_FIELDS = (*TE_FIELDS, "projection_dim", "layer_norm_eps", "bos_token_id", "eos_token_id", "pad_token_id")


@dataclass(frozen=True)
class SDConfig:
    """Constructor arguments of all components of one model, plus what the components do not record."""

    arch: Arch
    unet: Mapping[str, Any]
    vae: Mapping[str, Any]
    text_encoders: tuple[Mapping[str, Any], ...]
    prediction_type: str = "epsilon"
    resolution: int = 512
    vae_scale_factor: float = 0.18215

    def __post_init__(self):
        if self.prediction_type not in PREDICTION_TYPES:
            raise ConfigError("prediction_type", self.prediction_type, f"must be one of {PREDICTION_TYPES}")
        want = 2 if self.arch is Arch.SDXL else 1
        if len(self.text_encoders) != want:
            raise ConfigError("text_encoders", len(self.text_encoders), f"{self.arch.label} has {want}")

    def to_json(self) -> str:
        data = asdict(self)
        data["arch"] = self.arch.value
        return json.dumps(data, sort_keys=True)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], source: str) -> SDConfig:
        """Build from parsed JSON; `source` names where it came from in errors."""
        try:
            return cls(
                arch=Arch(data["arch"]),
                unet=dict(data["unet"]),
                vae=dict(data["vae"]),
                text_encoders=tuple(dict(te) for te in data["text_encoders"]),
                prediction_type=str(data.get("prediction_type", "epsilon")),
                resolution=int(data.get("resolution", 512)),
                vae_scale_factor=float(data.get("vae_scale_factor", 0.18215)),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ConfigError(source, type(exc).__name__, f"not a valid model config: {exc}") from None

    def with_(self, **changes: Any) -> SDConfig:
        return replace(self, **changes)


def shipped_config(arch: Arch, prediction_type: str = "epsilon") -> SDConfig:
    """The full-size config of `arch` (SD2: 512-eps or 768-v by prediction type)."""
    name = SHIPPED[(arch, prediction_type)]
    cfg = SDConfig.from_dict(json.loads((CONFIG_DIR / name).read_text()), str(CONFIG_DIR / name))
    return cfg if cfg.prediction_type == prediction_type else cfg.with_(prediction_type=prediction_type)


@dataclass(frozen=True)
class LdmUNet:
    """A U-Net in the LDM/SGM `UNetModel` vocabulary. Heads: `num_heads` or `num_head_channels` (-1: unset)."""

    in_channels: int
    out_channels: int
    model_channels: int
    channel_mult: tuple[int, ...]
    num_res_blocks: int
    attention_levels: tuple[bool, ...]
    depths: tuple[int, ...]
    depth_middle: int
    context_dim: int
    use_linear: bool
    num_heads: int = -1
    num_head_channels: int = -1
    adm_in_channels: int | None = None

    @property
    def channels(self) -> list[int]:
        return [self.model_channels * m for m in self.channel_mult]

    @property
    def layout(self) -> UNetLayout:
        return UNetLayout(self.num_res_blocks, tuple(self.attention_levels), tuple(reversed(self.attention_levels)))

    def heads_per_level(self) -> list[int]:
        """Attention heads at each level (what diffusers calls `attention_head_dim`)."""
        if self.num_head_channels > 0:
            out = []
            for level, ch in enumerate(self.channels):
                if self.attention_levels[level] and ch % self.num_head_channels:
                    raise ConfigError("num_head_channels", self.num_head_channels,
                                      f"does not divide the {ch} channels of level {level}")
                out.append(max(1, ch // self.num_head_channels))
            return out
        if self.num_heads > 0:
            return [self.num_heads] * len(self.channel_mult)
        raise ConfigError("num_heads", self.num_heads, "neither num_heads nor num_head_channels is known")

    def to_diffusers(self, base: Mapping[str, Any], addition_time_embed_dim: int | None = None) -> dict[str, Any]:
        """`UNet2DConditionModel` arguments: this structure over `base` (norm groups, sample size, ...)."""
        depths = [d if attn else 1 for d, attn in zip(self.depths, self.attention_levels)]
        # diffusers gives the middle block the depth of the last level
        if self.attention_levels[-1] and depths[-1] != self.depth_middle:
            raise ConfigError("transformer_depth_middle", self.depth_middle,
                              f"differs from the last level's depth {depths[-1]}; diffusers cannot build this U-Net")
        depths[-1] = self.depth_middle
        heads = self.heads_per_level()
        cfg = dict(base)
        cfg.update(
            in_channels=self.in_channels, out_channels=self.out_channels, layers_per_block=self.num_res_blocks,
            block_out_channels=self.channels, cross_attention_dim=self.context_dim,
            down_block_types=["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in self.attention_levels],
            up_block_types=["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(self.attention_levels)],
            transformer_layers_per_block=depths[0] if len(set(depths)) == 1 else depths,
            attention_head_dim=heads[0] if len(set(heads)) == 1 else heads, use_linear_projection=self.use_linear,
        )
        cfg.pop("num_attention_heads", None)
        if self.adm_in_channels is not None:
            cfg.update(addition_embed_type="text_time", projection_class_embeddings_input_dim=self.adm_in_channels,
                       addition_time_embed_dim=addition_time_embed_dim or base.get("addition_time_embed_dim"))
        else:
            for key in ("addition_embed_type", "projection_class_embeddings_input_dim", "addition_time_embed_dim"):
                cfg.pop(key, None)
        return cfg

    def yaml_params(self) -> dict[str, Any]:
        """The `unet_config`/`network_config` params that differ between models."""
        out: dict[str, Any] = dict(
            in_channels=self.in_channels, out_channels=self.out_channels, model_channels=self.model_channels,
            attention_resolutions=[2**i for i, a in enumerate(self.attention_levels) if a][::-1],
            num_res_blocks=self.num_res_blocks, channel_mult=list(self.channel_mult),
            transformer_depth=self.depths[0] if len(set(self.depths)) == 1 else list(self.depths),
            context_dim=self.context_dim,
        )
        if self.depth_middle != self.depths[-1]:
            out["transformer_depth_middle"] = self.depth_middle
        out["num_heads" if self.num_heads > 0 else "num_head_channels"] = max(self.num_heads, self.num_head_channels)
        if self.use_linear:
            out["use_linear_in_transformer"] = True
        if self.adm_in_channels is not None:
            out["adm_in_channels"] = self.adm_in_channels
        return out

    def with_(self, **changes: Any) -> LdmUNet:
        return replace(self, **changes)


def unet_from_yaml(params: Mapping[str, Any], source: str) -> LdmUNet:
    """Read `unet_config.params` (LDM) or `network_config.params` (SGM)."""
    try:
        mult = tuple(int(m) for m in params["channel_mult"])
        resolutions = {int(r) for r in params.get("attention_resolutions", [])}
        depth = params.get("transformer_depth", 1)
        depths = tuple(int(d) for d in depth) if isinstance(depth, list) else (int(depth),) * len(mult)
        context = params.get("context_dim")
        return LdmUNet(
            in_channels=int(params["in_channels"]), out_channels=int(params["out_channels"]),
            model_channels=int(params["model_channels"]), channel_mult=mult,
            num_res_blocks=int(params["num_res_blocks"]),
            attention_levels=tuple(2**i in resolutions for i in range(len(mult))), depths=depths,
            depth_middle=int(params.get("transformer_depth_middle") or depths[-1]),
            context_dim=int(context[0] if isinstance(context, list) else context),
            use_linear=bool(params.get("use_linear_in_transformer", False)),
            num_heads=int(params.get("num_heads", -1)), num_head_channels=int(params.get("num_head_channels", -1)),
            adm_in_channels=int(params["adm_in_channels"]) if params.get("num_classes") == "sequential" else None,
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise ConfigError(f"{source}: unet params", type(exc).__name__,
                          f"cannot read the U-Net config: {exc}") from None


def unet_from_diffusers(cfg: Mapping[str, Any]) -> tuple[LdmUNet, list[str]]:
    """The LDM form of a diffusers U-Net config, and why the web UI's code could not build it (empty if it can)."""
    channels = list(cfg["block_out_channels"])
    problems = []
    mc = channels[0]
    if any(c % mc for c in channels):
        problems.append(f"block_out_channels {channels} are not multiples of the first")
    attn = tuple("CrossAttn" in t for t in cfg["down_block_types"])
    if tuple("CrossAttn" in t for t in reversed(cfg["up_block_types"])) != attn:
        problems.append("up blocks do not mirror the down blocks")
    tlpb = cfg.get("transformer_layers_per_block", 1)
    depths = tuple([tlpb] * len(channels) if isinstance(tlpb, int) else tlpb)
    raw_heads = cfg.get("num_attention_heads") or cfg["attention_head_dim"]
    heads = [raw_heads] * len(channels) if isinstance(raw_heads, int) else list(raw_heads)
    used = [i for i, a in enumerate(attn) if a] + [len(channels) - 1]  # the middle block uses the last level's
    num_heads = num_head_channels = -1
    if len({heads[i] for i in used}) == 1:
        num_heads = heads[used[0]]
    elif len({channels[i] // heads[i] for i in used}) == 1 and all(channels[i] % heads[i] == 0 for i in used):
        num_head_channels = channels[used[0]] // heads[used[0]]
    else:
        problems.append(f"attention heads {heads} over channels {channels} have neither a constant count "
                        "nor a constant width (LDM's num_heads / num_head_channels)")
    if cfg.get("norm_num_groups", 32) != LDM_NORM_GROUPS:
        problems.append(f"the U-Net uses {cfg.get('norm_num_groups')} norm groups; the web UI's code always uses 32")
    if any(isinstance(d, (list, tuple)) for d in depths) or cfg.get("reverse_transformer_layers_per_block"):
        problems.append("per-block transformer depths in up blocks are not expressible in LDM")
        depths = tuple(1 for _ in channels)
    unet = LdmUNet(
        in_channels=cfg["in_channels"], out_channels=cfg["out_channels"], model_channels=mc,
        channel_mult=tuple(c // mc for c in channels), num_res_blocks=cfg["layers_per_block"],
        attention_levels=attn, depths=tuple(int(d) for d in depths), depth_middle=int(depths[-1]),
        context_dim=cfg["cross_attention_dim"],
        use_linear=bool(cfg.get("use_linear_projection", False)), num_heads=num_heads,
        num_head_channels=num_head_channels,
        adm_in_channels=cfg.get("projection_class_embeddings_input_dim") if cfg.get("addition_embed_type") else None,
    )
    return unet, problems


@dataclass(frozen=True)
class LdmVae:
    """The first-stage autoencoder in the LDM `ddconfig` vocabulary (norm groups are always 32 there)."""

    ch: int
    ch_mult: tuple[int, ...]
    num_res_blocks: int
    z_channels: int
    embed_dim: int
    in_channels: int = 3
    out_ch: int = 3
    attn_resolutions: tuple[int, ...] = field(default_factory=tuple)

    @property
    def downscale(self) -> int:
        return 2 ** (len(self.ch_mult) - 1)

    def to_diffusers(self, base: Mapping[str, Any]) -> dict[str, Any]:
        if self.attn_resolutions:
            raise ConfigError("attn_resolutions", list(self.attn_resolutions),
                              "diffusers' VAE has no per-level attention")
        if self.z_channels != self.embed_dim:
            raise ConfigError("embed_dim", self.embed_dim, f"differs from z_channels {self.z_channels}; "
                              "diffusers' AutoencoderKL needs them equal")
        cfg = dict(base)
        cfg.update(in_channels=self.in_channels, out_channels=self.out_ch, latent_channels=self.embed_dim,
                   block_out_channels=[self.ch * m for m in self.ch_mult], layers_per_block=self.num_res_blocks,
                   down_block_types=["DownEncoderBlock2D"] * len(self.ch_mult),
                   up_block_types=["UpDecoderBlock2D"] * len(self.ch_mult))
        return cfg

    def yaml_params(self) -> dict[str, Any]:
        return dict(z_channels=self.z_channels, in_channels=self.in_channels, out_ch=self.out_ch, ch=self.ch,
                    ch_mult=list(self.ch_mult), num_res_blocks=self.num_res_blocks)


def vae_from_yaml(params: Mapping[str, Any], source: str) -> LdmVae:
    """Read `first_stage_config.params` (with its `ddconfig`)."""
    try:
        dd = params["ddconfig"]
        return LdmVae(ch=int(dd["ch"]), ch_mult=tuple(int(m) for m in dd["ch_mult"]),
                      num_res_blocks=int(dd["num_res_blocks"]), z_channels=int(dd["z_channels"]),
                      embed_dim=int(params["embed_dim"]), in_channels=int(dd.get("in_channels", 3)),
                      out_ch=int(dd.get("out_ch", 3)), attn_resolutions=tuple(dd.get("attn_resolutions") or ()))
    except (KeyError, TypeError, ValueError) as exc:
        raise ConfigError(f"{source}: first_stage_config", type(exc).__name__,
                          f"cannot read the VAE config: {exc}") from None


def vae_from_diffusers(cfg: Mapping[str, Any]) -> tuple[LdmVae, list[str]]:
    channels = list(cfg["block_out_channels"])
    problems = []
    if any(c % channels[0] for c in channels):
        problems.append(f"VAE block_out_channels {channels} are not multiples of the first")
    if cfg.get("norm_num_groups", 32) != LDM_NORM_GROUPS:
        problems.append(f"the VAE uses {cfg.get('norm_num_groups')} norm groups; the web UI's code always uses 32")
    vae = LdmVae(ch=channels[0], ch_mult=tuple(c // channels[0] for c in channels),
                 num_res_blocks=cfg["layers_per_block"], z_channels=cfg["latent_channels"],
                 embed_dim=cfg["latent_channels"], in_channels=cfg["in_channels"], out_ch=cfg["out_channels"])
    return vae, problems
