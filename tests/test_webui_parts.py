"""The host-independent parts of the web-UI integration, with stand-ins for the host's objects (the real hosts
are exercised in tests/host/): tag rewriting for the X/Y/Z axes, the built-in LoRA spelling, block weights on
A1111's loaded networks and on Forge's patch sets, lora-block-weight's preset file."""
from __future__ import annotations

import types

import pytest

from lib_lora import blocks
from lib_lora.errors import BlockWeightError, ConfigError, PromptSyntaxError
from lib_lora.host import webui_axes, webui_lbw
from lib_lora.prompt_syntax import for_webui, parse_tag, set_first_tag
from lib_lora.types import Arch


def test_set_first_tag_spells_out_te_and_unet():
    assert set_first_tag("a <lora:x:0.8> b", te="0") == "a <lora:x:te=0:unet=0.8> b"
    assert set_first_tag("a <lora:x:1:0.5:3> b", unet="0") == "a <lora:x:dyn=3:te=1:unet=0> b"
    assert set_first_tag("<lora:x:1:OUTS> <lora:y:1>", lbw="INS") == "<lora:x:1:lbw=INS> <lora:y:1>"
    assert set_first_tag("<hypernet:h:1> <lora:x:1:w=ALL>", name="z", lbw="INS") == "<hypernet:h:1> <lora:z:1:lbw=INS>"
    assert set_first_tag("plain", name="z", te="0.5") == "plain <lora:z:1:te=0.5>"
    with pytest.raises(PromptSyntaxError, match="no <lora"):
        set_first_tag("plain", te="0.5")
    call = parse_tag(set_first_tag("<lora:x:0.7>", te="0.2")[1:-1].removeprefix("lora:"))
    assert (call.te, call.unet) == (0.2, 0.7)


def test_for_webui_moves_a_positional_preset_to_lbw():
    assert for_webui("<lora:x:1:OUTS:stop=3>, <lora:y:1:0.5> <lyco:z:1:1,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0>") == \
        "<lora:x:1:lbw=OUTS:stop=3>, <lora:y:1:0.5> <lyco:z:1:lbw=1,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0>"


class FakeXyz:
    class AxisOption:
        def __init__(self, label, type, apply, format_value=None, confirm=None, cost=0.0, choices=None,
                     prepare=None):
            self.label, self.type, self.apply, self.format_value = label, type, apply, format_value
            self.choices, self.prepare = choices, prepare

    def __init__(self):
        self.axis_options = [self.AxisOption("Nothing", str, None)]


def test_axes_rewrite_the_prompt_and_wait_for_a_file_axis():
    xyz = FakeXyz()
    assert webui_axes.add_axes(xyz, lambda: ["a", "b"]) == 4
    assert webui_axes.add_axes(xyz, lambda: ["a", "b"]) == 0  # a rebuilt UI adds nothing twice
    te, unet, lbw, file = xyz.axis_options[1:]
    p = types.SimpleNamespace(prompt="cat <lora:a:1>", hr_prompt="")
    te.apply(p, 0.5, [])
    unet.apply(p, 0.25, [])
    assert p.prompt == "cat <lora:a:te=0.5:unet=0.25>" and p.hr_prompt == ""
    p = types.SimpleNamespace(prompt="cat", hr_prompt="")
    lbw.apply(p, "OUTS", [])  # X before Y: no tag yet
    assert p.prompt == "cat" and getattr(p, webui_axes.PENDING) == {"lbw": "OUTS"}
    file.apply(p, "b", [])
    assert p.prompt == "cat <lora:b:1:lbw=OUTS>" and not getattr(p, webui_axes.PENDING)
    assert webui_axes.prepare_block_values('ALL, "1,0,0", INS') == ["ALL", "1,0,0", "INS"]
    assert webui_axes.prepare_block_values("1,0;0,1") == ["1,0", "0,1"]
    assert te.format_value(p, te, 0.5) == "TE 0.5" and file.choices() == ["a", "b"]


def test_lenient_presets_file_reads_lora_block_weights_own_file(tmp_path):
    text = ("NONE:0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0\nMINE:1,0,0,0,0,0,0,0,0,0,0,0,1,1,1,1,1\n"
            "#comment:1\nFLUX:" + ",".join(["1"] * 61) + "\nbroken line\nXL:1,1,1,1,1,1,1,1,1,1,1,1\n")
    path = tmp_path / "lbwpresets.txt"
    path.write_text(text)
    assert set(blocks.load_presets_file(path, lenient=True)) == {"NONE", "MINE", "XL"}
    with pytest.raises(BlockWeightError, match="line 4"):
        blocks.load_presets_file(path)


def _params(*texts):
    return [types.SimpleNamespace(items=t.split(":")) for t in texts]


def test_requests_and_infotext():
    requests = webui_lbw.parse_requests(_params("a:1:lbw=OUTS:stop=0.5", "b:0.5", "c:1:lbw=1,0,0,0,0,0,0,0,0,0,0,0,"
                                                "0,0,0,0,1"), Arch.SD1, {}, 20)
    assert [r.hooked for r in requests] == [True, False, True]
    assert (requests[0].start, requests[0].stop) == (0, 10) and requests[0].unet_on(9) and not requests[0].unet_on(10)
    text = webui_lbw.infotext(requests, Arch.SD1)
    assert text == ("a: OUTS (lbw=1,0,0,0,0,0,0,0,0,0,0,0,1,1,1,1,1:steps=0-10); "
                    "c: lbw=1,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,1")
    with pytest.raises(BlockWeightError):
        webui_lbw.parse_requests(_params("a:1:lbw=NOPE"), Arch.SD1, {}, 20)
    with pytest.raises(ConfigError):
        webui_lbw.parse_requests(_params("a:1:start=10:stop=5"), Arch.SD1, {}, 20)


class Module:
    """A1111's NetworkModule as far as the hook uses it."""

    def __init__(self, net, sd_key, sd_module):
        self.network, self.sd_key, self.sd_module = net, sd_key, sd_module

    def multiplier(self):
        return self.network.te_multiplier if "transformer" in self.sd_key[:20] else self.network.unet_multiplier


def test_a1111_hook_scales_copies_and_switches_windows():
    net = types.SimpleNamespace(name="a", mentioned_name="a", te_multiplier=0.5, unet_multiplier=0.8)
    unet_in, unet_out = object(), object()
    net.modules = {"te": Module(net, "transformer_text_model_encoder_layers_0_mlp_fc1", object()),
                   "in": Module(net, "diffusion_model_input_blocks_4_1_proj_in", unet_in),
                   "out": Module(net, "diffusion_model_output_blocks_9_1_proj_in", unet_out)}
    paths = {id(unet_in): "input_blocks.4.1.proj_in", id(unet_out): "output_blocks.9.1.proj_in"}
    hook = webui_lbw.A1111Hook(Arch.SD1, lambda m: blocks.block_of_compvis(paths[id(m)], Arch.SD1))
    loaded = [net]
    hook.apply(loaded, webui_lbw.parse_requests(_params("a:1:lbw=OUTS:start=2"), Arch.SD1, {}, 20))
    scaled = loaded[0]
    assert scaled is not net and scaled.name.startswith("a@lbw[") and net.modules["in"].network is net
    assert scaled.modules["te"].multiplier() == 0.5  # BASE 1
    assert scaled.modules["in"].multiplier() == 0.0 and scaled.unet_multiplier == 0.0  # before start=2
    hook.at_step(2)
    assert scaled.modules["in"].multiplier() == 0.0 and scaled.modules["out"].multiplier() == 0.8
    assert net.unet_multiplier == 0.8 and net.modules["out"].multiplier() == 0.8  # the cached original unchanged


def test_forge_patches_scaled_per_block_under_new_identifiers():
    key_in = "diffusion_model.input_blocks.4.1.proj_in.weight"
    key_out = "diffusion_model.output_blocks.9.1.proj_in.weight"  # OUT09: on in OUTS
    patches = {("/l/a.safetensors", 0.8, 1.0, False): {key_in: [[0.8, "p1", 1.0, None, None]],
                                                       key_out: [[0.8, "p2", 1.0, None, None]]},
               ("/l/b.safetensors", 1.0, 1.0, False): {key_in: [[1.0, "p3", 1.0, None, None]]}}
    request = webui_lbw.parse_requests(_params("a:1:lbw=OUTS:stop=5"), Arch.SD1, {}, 20)[0]
    on = webui_lbw.scale_patches(patches, {"/l/a.safetensors": request}, Arch.SD1, unet=True, step=0)
    off = webui_lbw.scale_patches(patches, {"/l/a.safetensors": request}, Arch.SD1, unet=True, step=5)
    (id_on, scaled), (id_b, same) = on.items()
    assert id_on[0].startswith("/l/a.safetensors@lbw[") and id_on[1:] == (0.8, 1.0, False)
    assert scaled[key_in][0][0] == 0.0 and scaled[key_out][0][0] == 0.8 and scaled[key_out][0][1] == "p2"
    assert same == patches[id_b] and id_b == ("/l/b.safetensors", 1.0, 1.0, False)
    id_off = next(iter(off))
    assert id_off != id_on and next(iter(off.values()))[key_out][0][0] == 0.0
    te = webui_lbw.scale_patches({("/l/a.safetensors", 1, 1, False): {"clip_l.x": [[0.5, "q", 1, None, None]]}},
                                 {"/l/a.safetensors": request}, Arch.SD1, unet=False, step=9)
    assert next(iter(te.values()))["clip_l.x"][0][0] == 0.5  # BASE 1, no window on the text encoder
