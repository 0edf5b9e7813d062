"""The <lora:...> prompt syntax."""
from __future__ import annotations

import pytest

from lib_lora.errors import PromptSyntaxError
from lib_lora.prompt_syntax import LoraCall, parse_prompt, parse_tag, resolve_step


def test_positional_forms():
    assert parse_tag("style") == LoraCall("style", 1.0, 1.0, tag="<lora:style>")
    c = parse_tag("style:0.8")
    assert (c.te, c.unet) == (0.8, 0.8)
    c = parse_tag("style:1:0.5")
    assert (c.te, c.unet, c.lbw) == (1.0, 0.5, None)
    c = parse_tag("style:1:0.5:8")
    assert c.dyn == 8


def test_named_and_lbw_forms():
    c = parse_tag("style:1:lbw=OUTS:stop=10")
    assert (c.te, c.unet, c.lbw, c.stop) == (1.0, 1.0, "OUTS", 10.0)
    c = parse_tag("style:0.7:INS")
    assert (c.te, c.unet, c.lbw) == (0.7, 0.7, "INS")
    c = parse_tag("style:1:1,0,0,0,0,0,0,0,1,1,1,1,1,1,1,1,1")
    assert c.lbw.count(",") == 16
    c = parse_tag("style:te=0.3:unet=0.9:step=2-12:x=0.5")
    assert (c.te, c.unet, c.start, c.stop, c.x) == (0.3, 0.9, 2.0, 12.0, 0.5)
    c = parse_tag("style:te=0.4")
    assert c.unet == 0.4  # unet defaults to te, as in the web UI


def test_prompt_splitting():
    p = parse_prompt("a red circle, <lora:shapes:0.8:lbw=ALL>, on blue <lyco:other:1>")
    assert p.text == "a red circle, on blue"
    assert [c.name for c in p.loras] == ["shapes", "other"]


@pytest.mark.parametrize("bad,match", [
    ("<lora::1>", "missing LoRA name"),
    ("<lora:x:abc>", "must be a number"),
    ("<lora:x:1:0.5:lbw=ALL:foo=1>", "unknown option 'foo'"),
    ("<lora:x:1:lbwe=ATTN>", "lbwe"),
    ("<lora:x:1:dyn=1.5>", "whole number"),
    ("<lora:x:1:step=5>", "step=A-B"),
    ("<hypernet:x:1>", "not supported"),
    ("a <lora:x:1", "unclosed"),
])
def test_malformed_tags_say_what_is_wrong(bad, match):
    with pytest.raises(PromptSyntaxError, match=match):
        parse_prompt(bad)


def test_resolve_step():
    assert resolve_step(0.5, 20) == 10
    assert resolve_step(7, 20) == 7
    assert resolve_step(None, 20) is None
