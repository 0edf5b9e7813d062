"""The trainable model over another model's inference-mode weights (what Forge loads), without Forge: aliases
share the weights' memory, autograd runs through them, a LoRA trains, and the weights are unchanged after."""
from __future__ import annotations

import torch

from lib_lora.host.forge_train import alias
from lib_lora.sd.checkpoint import model_from_tensors
from lib_lora.sd.checkpoint_save import METADATA_KEY, config_of, ldm_state_dict
from lib_lora.sd.embedded import load_embedded


def _inference_weights() -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The embedded tiny model's weights by checkpoint names, made under inference mode as Forge's loader does."""
    model = load_embedded("cpu", torch.float32)
    config = config_of(model)
    with torch.inference_mode():
        tensors = {k: v.clone() for k, v in ldm_state_dict(model, config, dtype=None).items()}
    return tensors, {METADATA_KEY: config.to_json()}


def test_alias_shares_memory_and_takes_gradients():
    with torch.inference_mode():
        weight = torch.randn(4, 3)
    shared = alias(weight)
    assert weight.is_inference() and not shared.is_inference()
    assert shared.data_ptr() == weight.data_ptr() and torch.equal(shared, weight)
    x = torch.randn(2, 3, requires_grad=True)
    torch.nn.functional.linear(x, shared).sum().backward()  # an inference tensor here: "cannot be saved"
    assert x.grad is not None


def test_model_over_aliases_runs_backward_and_leaves_the_weights():
    from lib_lora.train.families import family_for

    weights, metadata = _inference_weights()
    before = {k: v.clone() for k, v in weights.items()}
    model = model_from_tensors({k: alias(v) for k, v in weights.items()}, "inference-weights",
                               metadata=metadata).model
    pointers = {v.data_ptr() for v in weights.values()}
    params = [*model.unet.parameters(), *model.vae.parameters(), *model.text_encoders[0].parameters()]
    assert [n for n, p in enumerate(params) if p.data_ptr() not in pointers] == []  # no copy
    family = family_for(model)
    try:
        cond = family.encode_prompts(["a red circle"])
        noisy = torch.randn(1, 4, 8, 8, requires_grad=True)
        family.predict(noisy, torch.tensor([500]), cond).pow(2).mean().backward()  # saves the weights
        assert noisy.grad is not None and noisy.grad.abs().sum() > 0
    finally:
        family.close()
    assert all(torch.equal(weights[k], before[k]) for k in weights)
