"""Generation with the LoRAs a prompt names: the engine behind the Generate tab and `python -m lib_lora generate`.

The prompt's `<lora:...>` tags are parsed and resolved (names through the LoRA library, `lbw=` per the model's
architecture) before the model is touched, so bad input fails with nothing changed. The LoRAs are merged with
`WeightPatcher` and the model is restored exactly afterwards, whatever happens (error, cancellation).

`start=`/`stop=` switch a LoRA's U-Net part: it is on for the denoising steps i (counted from 0) with
start <= i < stop; values in (0, 1) are fractions of the steps. Prompts are encoded once, before the first
step, so the text-encoder part always conditions the whole image, as in the web UI's lora-block-weight.
Switching re-merges only the weights of the LoRA that switched.

The infotext keeps the prompt as typed (tags included) and adds `Lora hashes`, as the web UI does.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace

from lib_lora import blocks, keys
from lib_lora.blocks import BlockWeights
from lib_lora.errors import ArchMismatchError, ConfigError, ShapeMismatchError
from lib_lora.keys import ModelTargets
from lib_lora.lora_library import LoraEntry, LoraLibrary
from lib_lora.networks import LoadedNetwork
from lib_lora.patching import Application, ApplyReport, WeightPatcher
from lib_lora.prompt_syntax import LoraCall, parse_prompt, step_window
from lib_lora.sd.model import SDModel
from lib_lora.sd.pipeline import GenerationParams, GenerationResult, format_infotext, generate
from lib_lora.types import Arch, Component


def model_targets(model: SDModel) -> ModelTargets:
    """Every LoRA target of an `SDModel` (diffusers U-Net, transformers CLIP text encoders), by kohya name."""
    comps = [Component.TE1, Component.TE2] if model.arch is Arch.SDXL else [Component.TE]
    parts = [keys.unet_targets(model.unet, model.arch, "diffusers")]
    parts += [keys.clip_text_targets(te, c) for te, c in zip(model.text_encoders, comps)]
    return ModelTargets.merge(model.arch, parts)


@dataclass(frozen=True)
class PlannedLora:
    """One prompt tag, resolved: the file, its network, block weights, and the U-Net step window."""

    call: LoraCall
    entry: LoraEntry
    network: LoadedNetwork
    blocks: BlockWeights | None
    start: int  # first step with the U-Net part on
    stop: int | None  # first step with it off again (None: to the end)

    def unet_on(self, step: int) -> bool:
        return self.start <= step and (self.stop is None or step < self.stop)

    def application(self, step: int) -> Application:
        unet = self.call.unet if self.unet_on(step) else 0.0
        return Application(self.network, te=self.call.te, unet=unet, blocks=self.blocks)


@dataclass(frozen=True)
class LoraPlan:
    """A prompt with its LoRA tags removed (what the text encoder sees) and the LoRAs it names."""

    prompt: str
    loras: tuple[PlannedLora, ...]

    def applications(self, step: int) -> list[Application]:
        # Always one application per LoRA, at strength 0 while off, so the stack's order never shifts and the
        # patcher re-merges only what the switching LoRA touches.
        return [lora.application(step) for lora in self.loras]

    def hashes_infotext(self, library: LoraLibrary) -> str | None:
        """`name: abcdef012345, ...` for the `Lora hashes` field (names as typed, without ':' and ',')."""
        items = []
        for lora in self.loras:
            label = lora.call.name.replace(":", "").replace(",", "")
            items.append(f"{label}: {library.short_hash(lora.entry)}")
        return ", ".join(dict.fromkeys(items)) or None


def _check_arch(entry: LoraEntry, call: LoraCall, arch: Arch) -> None:
    if entry.error:
        raise ConfigError("lora", call.name, f"{entry.path} cannot be used: {entry.error}")
    file_xl = entry.arch is Arch.SDXL
    mismatch = file_xl != (arch is Arch.SDXL)
    # SD1 vs SD2 only when the metadata says so: key names alone cannot tell them apart.
    mismatch = mismatch or (entry.arch_declared and entry.arch is not arch)
    if mismatch:
        raise ArchMismatchError(
            f"{call.tag}: {entry.path} is a LoRA for {entry.arch.label} ({entry.arch_reason}); "
            f"the loaded model is {arch.label}"
        )


def plan_loras(prompt: str, arch: Arch, library: LoraLibrary, steps: int,
               user_presets: Mapping[str, str] | None = None) -> LoraPlan:
    """Parse and resolve every LoRA tag of `prompt` for a model of `arch`; nothing is applied.

    Raises:
        PromptSyntaxError: a malformed tag. LoraNotFoundError: an unknown name (listing close names).
        ArchMismatchError: a LoRA for another architecture. BlockWeightError: a bad `lbw=`.
        ConfigError: `dyn=` (not supported), a start/stop window that is empty. FileFormatError: unreadable file.
    """
    parsed = parse_prompt(prompt)
    planned = []
    for call in parsed.loras:
        if call.dyn is not None:
            raise ConfigError("dyn", call.dyn, f"{call.tag}: DyLoRA dimension selection (dyn=) is not supported")
        entry = library.find(call.name)
        _check_arch(entry, call, arch)
        weights = blocks.resolve(call.lbw, arch, user_presets, x=call.x) if call.lbw else None
        start, stop = step_window(call, steps)
        planned.append(PlannedLora(call, entry, library.load(entry, arch), weights, start, stop))
    return LoraPlan(parsed.text, tuple(planned))


class StepSwitcher:
    """The pipeline's `on_step` hook: before each step, make the patcher carry the LoRAs on at that step."""

    def __init__(self, patcher: WeightPatcher, plan: LoraPlan):
        self.patcher, self.plan = patcher, plan
        self.switches = 0  # applies after the first (tests and benchmarks read it)
        self._state: tuple[bool, ...] | None = None

    def apply_at(self, step: int) -> ApplyReport | None:
        state = tuple(lora.unet_on(step) for lora in self.plan.loras)
        if state == self._state:
            return None
        if self._state is not None:
            self.switches += 1
        self._state = state
        return self.patcher.apply(self.plan.applications(step))

    def __call__(self, step: int, total: int) -> None:
        self.apply_at(step)


def _apply_checked(switcher: StepSwitcher, step: int) -> None:
    try:
        switcher.apply_at(step)
    except ShapeMismatchError as exc:
        # SD1 and SD2 LoRAs share key names; a width that does not fit is the usual sign of the other one.
        raise ArchMismatchError(f"{exc} (is this LoRA made for another model architecture or size?)") from exc


def generate_with_loras(
    model: SDModel,
    params: GenerationParams,
    library: LoraLibrary,
    *,
    patcher: WeightPatcher | None = None,
    user_presets: Mapping[str, str] | None = None,
    progress: Callable[[int, int], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
    keep_applied: bool = False,
) -> GenerationResult:
    """Generate `params` (prompt in the web UI's syntax) with the LoRAs it names; the model is restored after.

    Args:
        patcher: a merge-mode patcher over `model_targets(model)`, reused across calls (built if None).
        user_presets: `lbw=` presets besides the built-in ones (`NAME: w1,w2,...`).
        keep_applied: leave the LoRAs merged after the call; the caller restores (`patcher.restore()`) when its
            series of calls ends. The next call then re-merges only the weights whose strengths differ (X/Y plots).
            On an error the model is restored all the same.

    Raises:
        LibLoraError subclasses for bad input (see `plan_loras`, `GenerationParams.validate`) and
        GenerationCancelled; in every case the model's weights are as they were before the call.
    """
    params.validate()
    plan = plan_loras(params.prompt, model.arch, library, params.steps, user_presets)
    extra = {"Lora hashes": plan.hashes_infotext(library)} if plan.loras else None
    if not plan.loras:
        if patcher is not None and patcher.active:
            patcher.restore()  # a series' previous call left LoRAs merged
        return generate(model, params, progress=progress, should_stop=should_stop)
    patcher = patcher or WeightPatcher(model_targets(model))
    switcher = StepSwitcher(patcher, plan)
    ok = False
    try:
        _apply_checked(switcher, 0)
        result = generate(model, replace(params, prompt=plan.prompt), progress=progress, should_stop=should_stop,
                          on_step=switcher, extra_infotext=extra)
        ok = True
    finally:
        if not (ok and keep_applied):
            patcher.restore()
    # The infotext keeps the prompt as typed, tags included, so "PNG Info" -> txt2img re-applies the LoRAs.
    size = params.resolved_size(model)
    shown = replace(params, width=size[0], height=size[1])
    result.infotexts = [format_infotext(shown, seed, model, extra) for seed in result.seeds]
    return result
