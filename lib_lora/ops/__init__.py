"""LoRA tools: merge into a checkpoint, merge LoRAs, resize, extract, convert (sd-scripts' results, less time and
memory). Pure functions over files and state dicts; CUDA when present (`device="auto"`), CPU otherwise.

Every operation is one call: a frozen request dataclass in (validated when built: `ConfigError(field, value,
reason)`), an optional `progress(done, total, message)` callback and `should_stop()` cancel callback, a result
record out. Outputs are written atomically with updated metadata (`ss_*`, `modelspec.*`, what made them in
`lora_studio.operation`, recomputed `sshs_model_hash`); on any error or cancel (`OperationCancelled`) no output
file exists and an existing one is untouched; inputs are only read.

    from lib_lora import ops

    ops.merge_into_model(ops.MergeModelRequest("model.safetensors",
        (ops.LoraInput("a.safetensors", 0.8), ops.LoraInput.parse("b.safetensors:1:lbw=OUTALL")),
        "merged.safetensors", dtype="fp16"))                                     -> MergeModelResult
    ops.merge_loras(ops.MergeLorasRequest((ops.LoraInput("a.safetensors", 0.7), ops.LoraInput("b.safetensors", 0.5)),
        "ab.safetensors", mode="svd", rule=ops.RankRule(32)))                    -> MergeResult
    ops.resize(ops.ResizeRequest("in.safetensors", "out.safetensors", ops.RankRule(32, method="sv_fro",
        param=0.9)))                                                             -> ResizeResult
    ops.extract(ops.ExtractRequest("base.safetensors", "tuned.safetensors", "out.safetensors", dim=64,
        conv_dim=32))                                                            -> ExtractResult
    ops.convert(ops.ConvertRequest("in.safetensors", "out.safetensors", to="diffusers", dtype="fp16"))
                                                                                 -> ConvertResult

Requests:
- `LoraInput(path, te=1.0, unet=None, lbw=None)`: a LoRA with A1111's strengths and lora-block-weight's `lbw`
  (preset name or list); `LoraInput.parse("path:te:unet:lbw=...")` reads the prompt syntax.
- `RankRule(rank, conv_rank=None, method="fixed"|"sv_ratio"|"sv_fro"|"sv_cumulative", param=None)`: sd-scripts'
  resize rules; with a dynamic method `rank` is the cap (None: no cap).
- `MergeModelRequest(model, loras, output, dtype=None, device="auto", force=False)`.
- `MergeLorasRequest(inputs, output, mode="exact"|"svd", rule=None, clamp_quantile=0.99, dtype, device, force)`.
- `ResizeRequest(input, output, rule, dtype=None, device, force)`.
- `ExtractRequest(base, tuned, output, dim=4, conv_dim=None, method="fixed", param=None, clamp_quantile=0.99,
  min_diff=0.01, svd="auto"|"full"|"lowrank", dtype="fp16", device, force)`.
- `ConvertRequest(input, output, to="kohya"|"diffusers"|"lora", rule=None, model=None, dtype=None,
  strip_metadata=False, set_metadata=(), drop_metadata=(), svd="auto", device, force)`.

Results: `output` (path), `seconds`, and per operation: `modules` ({kohya name: ModuleRank(old_rank, rank, alpha,
sum_kept, fro_kept, max_ratio)} — the rank chosen and the Frobenius fraction of ΔW kept), `info` (the output's
`lib_lora.info.NetworkInfo`, as the `info` command shows it), `notes`; merge into a model: `arch`, `applied`
({LoRA: modules merged}), `unmatched` ({LoRA: its modules the model lacks}); extract: `text_encoder_skipped`,
`svd_used`. `ResizeResult.report()` prints sd-scripts' verbose lines.

Errors (all `lib_lora.errors.LibLoraError`): `ConfigError` (request, output path: same as an input, exists without
`force`), `FileFormatError`, `ArchMismatchError` (SDXL with SD1/SD2), `KeyMapError` (a LoRA for another model),
`ShapeMismatchError`, `NonFiniteError` (NaN/inf in an input or a merged weight out of range),
`OperationCancelled`.
"""
from lib_lora.ops.common import OperationCancelled, Progress, ShouldStop
from lib_lora.ops.convert import ConvertRequest, ConvertResult, convert
from lib_lora.ops.extract import ExtractRequest, ExtractResult, extract
from lib_lora.ops.inputs import LoraInput
from lib_lora.ops.linalg import RankRule
from lib_lora.ops.merge_loras import MergeLorasRequest, MergeResult, merge_loras
from lib_lora.ops.merge_model import MergeModelRequest, MergeModelResult, merge_into_model
from lib_lora.ops.resize import ModuleRank, ResizeRequest, ResizeResult, resize

__all__ = [
    "ConvertRequest", "ConvertResult", "ExtractRequest", "ExtractResult", "LoraInput", "MergeLorasRequest",
    "MergeModelRequest", "MergeModelResult", "MergeResult", "ModuleRank", "OperationCancelled", "Progress",
    "RankRule", "ResizeRequest", "ResizeResult", "ShouldStop", "convert", "extract", "merge_into_model",
    "merge_loras", "resize",
]
