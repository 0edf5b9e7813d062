"""The AUTOMATIC1111 web UI (1.10) adapter: with `a1111_train.py` and `forge.py`, the only modules that import the
web UI (`modules.*`).

`scripts/lora_studio.py` calls `register()`, which wires LoRA Studio into the running web UI:
- per-block weights and U-Net step windows on the built-in LoRA (`<lora:name:1:lbw=OUTS:stop=10>`), recorded in
  the infotext (`webui_lbw`);
- axes in the host's own X/Y/Z plot script (`webui_axes`);
- a "LoRA Studio" section in Settings; API routes under /lora-studio/v1 (`webui_api`);
- the tabs of `lib_lora.ui` mounted with `on_ui_tabs`, over `A1111Host` (the `Host` protocol on `shared.sd_model`);
- training on the loaded model (`a1111_train`, mixed into the adapter).

Nothing runs at import time of this module; `register()` runs at the import of the extension's script, which is
when the web UI expects callbacks to be registered.
"""
from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from modules import script_callbacks, scripts, shared

from lib_lora import blocks
from lib_lora.errors import LibLoraError, PromptSyntaxError
from lib_lora.host import webui_lbw
from lib_lora.host.a1111_train import A1111Training, builtin_networks
from lib_lora.host.webui_axes import PENDING
from lib_lora.host.webui_lbw import A1111Hook, BlockRequest
from lib_lora.types import Arch

SECTION = ("lora_studio", "LoRA Studio")
LBW_PRESETS = Path("sd-webui-lora-block-weight") / "scripts" / "lbwpresets.txt"


def model_arch(sd_model: Any) -> Arch:
    if getattr(sd_model, "is_sdxl", False):
        return Arch.SDXL
    return Arch.SD2 if getattr(sd_model, "is_sd2", False) else Arch.SD1


class A1111Adapter(A1111Training):
    """LoRA Studio inside A1111: one instance per web-UI process (made by `register`)."""

    host_name = "a1111"

    def __init__(self) -> None:
        self._hook: A1111Hook | None = None
        self._steps = 0
        self._module_paths: tuple[int, dict[int, str]] = (0, {})
        self._host = None
        self._training = None

    # ------------------------------------------------------------------------------------ registration

    def register(self) -> type:
        """Register the web UI callbacks; returns the always-visible Script class for the script module."""
        script_callbacks.on_ui_settings(self.on_ui_settings)
        script_callbacks.on_before_ui(self.on_before_ui)
        script_callbacks.on_cfg_denoiser(self.on_cfg_denoiser)
        script_callbacks.on_app_started(self.on_app_started)
        script_callbacks.on_ui_tabs(self.on_ui_tabs)
        return make_script_class(self)

    # ------------------------------------------------------------------------------------ settings

    def on_ui_settings(self) -> None:
        import gradio as gr

        from lib_lora.sd.samplers import SAMPLERS

        def option(key: str, info: Any) -> None:
            info.section = SECTION
            shared.opts.add_option(key, info)

        option("lora_studio_output_dir", shared.OptionInfo(
            "", "Folder for trained LoRA files (empty: the web UI's LoRA folder, --lora-dir)"))
        option("lora_studio_presets_file", shared.OptionInfo(
            "", "Block-weight presets file, lora-block-weight's format NAME:w1,w2,... (empty: that extension's "
                "lbwpresets.txt when it is installed)"))
        option("lora_studio_sample_steps", shared.OptionInfo(
            20, "Sample images during training: steps", gr.Slider, {"minimum": 1, "maximum": 150, "step": 1}))
        option("lora_studio_sample_cfg", shared.OptionInfo(
            7.0, "Sample images during training: CFG scale", gr.Slider, {"minimum": 1, "maximum": 30, "step": 0.5}))
        option("lora_studio_sample_sampler", shared.OptionInfo(
            "Euler a", "Sample images during training: sampler", gr.Dropdown, {"choices": list(SAMPLERS)}))

    def setting(self, key: str, default: Any = None) -> Any:
        return shared.opts.data.get(key, default)

    def output_dir(self) -> Path:
        return Path(self.setting("lora_studio_output_dir") or self.lora_dir())

    def lora_dir(self) -> Path:
        return Path(shared.cmd_opts.lora_dir)

    def presets_file(self) -> Path | None:
        configured = self.setting("lora_studio_presets_file")
        if configured:
            return Path(configured)
        from modules import paths_internal

        found = Path(paths_internal.extensions_dir) / LBW_PRESETS
        return found if found.is_file() else None

    def user_presets(self) -> dict[str, str]:
        """Presets from the presets file (lora-block-weight's own file is read as that extension reads it)."""
        path = self.presets_file()
        if path is None:
            return {}
        if not path.is_file():
            raise LibLoraError(f"{path}: block-weight presets file not found (Settings > LoRA Studio)")
        return blocks.load_presets_file(path, lenient=True)

    # ------------------------------------------------------------------------------------ the loaded model

    def sd_model(self) -> Any:
        return shared.sd_model

    def arch(self) -> Arch:
        return model_arch(self.sd_model())

    def _unet_block(self, module: Any) -> str:
        """Block id of a torch module of the loaded U-Net (paths cached per model object)."""
        model = self.sd_model()
        if self._module_paths[0] != id(model):
            unet = model.model.diffusion_model
            self._module_paths = (id(model), {id(m): name for name, m in unet.named_modules()})
        path = self._module_paths[1].get(id(module))
        if path is None:
            raise LibLoraError(f"a LoRA module targets {type(module).__name__}, which is not in the loaded U-Net")
        return blocks.block_of_compvis(path, self.arch())

    # ------------------------------------------------------------------------------------ the LoRA hook

    def before_process(self, p: Any) -> None:
        """No generation while a training run holds the model (it would draw with the half-trained network and race
        the optimizer): the job stops at once with the reason."""
        reason = self.generation_refused()
        if not reason:
            return
        print(f"LoRA Studio: {reason}", file=sys.stderr)
        p.comment(reason)
        p.extra_generation_params["LoRA Studio error"] = reason
        p.lora_studio_refused = True
        # `stopping_generation`, not `interrupt()`: the web UI's Interrupt button sets `interrupted`, which is how
        # the user stops the training run itself.
        shared.state.stopping_generation = True

    def generation_refused(self) -> str:
        """Why this thread may not generate now ("" when it may): a training run holds the model."""
        return self._training.blocks_generation() if self._training is not None else ""

    def process(self, p: Any) -> None:
        """Before the batches: prompts in the built-in LoRA's spelling (a positional preset becomes `lbw=`), and
        every tag checked, so a bad one stops the job before anything is drawn."""
        from lib_lora.prompt_syntax import for_webui

        if getattr(p, "lora_studio_refused", False):
            return
        p.all_prompts = [for_webui(text) for text in p.all_prompts]
        if getattr(p, "all_hr_prompts", None):
            p.all_hr_prompts = [for_webui(text) for text in p.all_hr_prompts]
        try:
            self.check_prompts([*dict.fromkeys(p.all_prompts)], int(p.steps))
            pending = getattr(p, PENDING, None)
            if pending:
                raise PromptSyntaxError(f"an X/Y/Z axis set {', '.join(pending)} but the prompt has no "
                                        "<lora:...> tag: add one, or plot a LoRA file axis too")
        except LibLoraError as exc:
            self.fail(p, exc)

    def check_prompts(self, prompts: list[str], steps: int) -> None:
        from lib_lora.prompt_syntax import parse_prompt, step_window

        presets = self.user_presets()
        for text in prompts:
            for call in parse_prompt(text).loras:
                if call.lbw:
                    blocks.resolve(call.lbw, self.arch(), presets, x=call.x)
                step_window(call, steps)

    def after_activate(self, p: Any, extra_network_data: Mapping[str, list]) -> None:
        """After the built-in LoRA loaded the prompt's networks: scale the ones that ask for it."""
        params = [item for kind, items in extra_network_data.items() if kind in ("lora", "lyco") for item in items]
        self._steps = int(p.steps)
        try:
            requests = webui_lbw.parse_requests(params, self.arch(), self.user_presets(), self._steps)
            self.apply_requests(p, requests)
        except LibLoraError as exc:
            self.fail(p, exc)
            return
        text = webui_lbw.infotext(requests, self.arch())
        if text:
            p.extra_generation_params[webui_lbw.INFOTEXT_KEY] = text
        else:
            p.extra_generation_params.pop(webui_lbw.INFOTEXT_KEY, None)

    def apply_requests(self, p: Any, requests: list[BlockRequest]) -> None:
        hook = A1111Hook(self.arch(), self._unet_block)
        hook.apply(builtin_networks().loaded_networks, requests)
        self._hook = hook if hook.active else None

    def on_cfg_denoiser(self, params: Any) -> None:
        if self._hook is None:
            return
        self._hook.at_step(self.sampling_step(params))

    def sampling_step(self, params: Any) -> int:
        """The sampling step (0-based) of a denoiser call; second-order samplers call it twice per step."""
        denoiser = getattr(params, "denoiser", None)
        step = int(getattr(denoiser, "step", params.sampling_step))
        total = int(getattr(denoiser, "total_steps", 0) or 0)
        if self._steps and total > self._steps:
            return step * self._steps // total
        return step

    def postprocess(self, p: Any) -> None:
        self._hook = None

    def fail(self, p: Any, exc: Exception) -> None:
        """A tag we cannot honour: stop the job with the reason (console, the job's comments and the API's
        `extra_generation_params`) rather than draw the LoRA without its weights."""
        message = f"LoRA Studio: {exc}"
        print(message, file=sys.stderr)
        p.comment(message)
        p.extra_generation_params["LoRA Studio error"] = str(exc)
        shared.state.interrupt()

    # ------------------------------------------------------------------------------------ X/Y/Z plot

    def xyz_module(self) -> Any | None:
        return next((d.module for d in scripts.scripts_data if d.script_class.__module__ == "xyz_grid.py"), None)

    def on_before_ui(self) -> None:
        from lib_lora.host.webui_axes import add_axes

        xyz = self.xyz_module()
        if xyz is not None:
            add_axes(xyz, lambda: sorted(builtin_networks().available_networks))

    def xyz_axis_labels(self, is_img2img: bool = False) -> list[str]:
        """Axis labels in the order the X/Y/Z plot script's `x_type`/`y_type`/`z_type` index them."""
        runner = scripts.scripts_img2img if is_img2img else scripts.scripts_txt2img
        script = next((s for s in runner.scripts if s.title() == "X/Y/Z plot"), None)
        options = getattr(script, "current_axis_options", None) or []
        return [o.label for o in options]

    # ------------------------------------------------------------------------------------ API, tabs

    def on_app_started(self, demo: Any, app: Any) -> None:
        from lib_lora.host.webui_api import add_routes

        add_routes(app, self)

    def host(self):
        """The `Host` the UI tabs talk to."""
        if self._host is None:
            from lib_lora.host.webui_host import WebUIHost

            self._host = WebUIHost(self)
        return self._host

    def on_ui_tabs(self) -> list:
        from lib_lora.host.webui_tabs import build_tabs

        return build_tabs(self.host())

    # ------------------------------------------------------------------------------------ Host protocol side

    def model_info(self):
        from lib_lora.host.base import ModelInfo

        model = self.sd_model()
        info = getattr(model, "sd_checkpoint_info", None)
        if model is None or info is None:
            return None
        arch = self.arch()
        metadata = getattr(info, "metadata", None) or {}
        size = str(metadata.get("modelspec.resolution", "")).partition("x")[0]
        resolution = int(size) if size.isdigit() else {Arch.SDXL: 1024}.get(arch, 512)
        param = next(model.model.diffusion_model.parameters())
        return ModelInfo(arch=arch, name=info.model_name, short_hash=getattr(info, "shorthash", "") or "",
                         source=info.filename, resolution=resolution, device=str(param.device),
                         dtype=str(param.dtype).removeprefix("torch."))

    def txt2img(self, params, save: bool = True):
        """Generate through the web UI's processing, with its always-on scripts (our block hook among them)."""
        from modules import call_queue, processing

        from lib_lora.host.base import HostResult

        runner = scripts.scripts_txt2img
        info = self.model_info()
        size = info.resolution if info is not None else 512
        width, height = params.width or size, params.height or size
        with call_queue.queue_lock:
            shared.state.begin(job="lora_studio_txt2img")
            try:
                p = processing.StableDiffusionProcessingTxt2Img(
                    sd_model=shared.sd_model, prompt=params.prompt, negative_prompt=params.negative_prompt,
                    sampler_name=params.sampler, steps=params.steps, cfg_scale=params.cfg_scale, seed=params.seed,
                    width=width, height=height, batch_size=params.batch_size,
                    outpath_samples=shared.opts.outdir_txt2img_samples, outpath_grids=shared.opts.outdir_txt2img_grids,
                    do_not_save_grid=True)
                p.do_not_save_samples = not save
                p.scripts = runner
                p.script_args = tuple(self.default_script_args(runner))
                processed = processing.process_images(p)
            finally:
                shared.state.end()
        return HostResult(list(processed.images), list(processed.infotexts), list(processed.all_seeds))

    def default_script_args(self, runner: Any) -> list:
        """Every script's UI defaults, the way the web UI's API fills the arguments it was not given."""
        import gradio as gr

        args: list = [None] * max([1, *(s.args_to for s in runner.scripts)])
        args[0] = 0  # no selectable script
        with gr.Blocks():
            for script in runner.scripts:
                controls = script.ui(script.is_img2img) or []
                args[script.args_from:script.args_to] = [c.value for c in controls]
        return args

    def interrupt(self) -> None:
        shared.state.interrupt()

    def interrupted(self) -> bool:
        return bool(shared.state.interrupted)

    def outputs_dir(self) -> Path:
        return Path(shared.opts.outdir_txt2img_samples or shared.opts.outdir_samples or "outputs")

    def samplers(self) -> list[str]:
        from modules import sd_samplers

        return [s.name for s in sd_samplers.all_samplers]

    def checkpoints(self) -> list[str]:
        from modules import sd_models

        return [info.filename for info in sd_models.checkpoints_list.values()]

    def settings_dir(self) -> Path:
        from modules import paths_internal

        return Path(paths_internal.data_path) / "lora-studio"

    def refresh_loras(self) -> None:
        """Rescan the LoRA folder for the web UI's list (its Lora tab, /sdapi/v1/loras) and for our tabs; under the
        web UI's queue lock, since a generation reads that list while it runs."""
        from modules import call_queue

        with call_queue.queue_lock:
            builtin_networks().list_available_networks()
        self.host().lora_library().refresh()

    def status(self) -> dict:
        model = self.sd_model()
        info = getattr(model, "sd_checkpoint_info", None)
        return {"host": self.host_name, "pid": os.getpid(), "arch": self.arch().value if model is not None else None,
                "checkpoint": getattr(info, "name", None), "lora_dir": str(self.lora_dir()),
                "output_dir": str(self.output_dir())}


def make_script_class(adapter: A1111Adapter) -> type:
    """The always-visible Script through which the web UI calls the LoRA hook for every generation."""

    class LoraStudioScript(scripts.Script):
        def title(self) -> str:
            return "LoRA Studio"

        def show(self, is_img2img: bool) -> Any:
            return scripts.AlwaysVisible

        def ui(self, is_img2img: bool) -> list:
            return []

        def before_process(self, p: Any, *args: Any) -> None:
            adapter.before_process(p)

        def process(self, p: Any, *args: Any) -> None:
            adapter.process(p)

        def after_extra_networks_activate(self, p: Any, *args: Any, **kwargs: Any) -> None:
            adapter.after_activate(p, kwargs.get("extra_network_data") or {})

        def postprocess(self, p: Any, processed: Any, *args: Any) -> None:
            adapter.postprocess(p)

    return LoraStudioScript


def register() -> type:
    return A1111Adapter().register()
