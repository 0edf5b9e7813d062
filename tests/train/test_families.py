"""Model families on tiny SD1 / SD2 (v) / SDXL models: prompt and image encoding, predictions, LoRA gradients in
hooked mode, gradient checkpointing, and the web UI (LDM) path computing exactly what the diffusers path does."""
from __future__ import annotations

import pytest
import torch

from lib_lora.errors import ConfigError
from lib_lora.keys import ModelTargets
from lib_lora.networks import LoadedNetwork
from lib_lora.networks.lora import LoRAModule, delta_groups, shared_deltas
from lib_lora.patching import Application, WeightPatcher
from lib_lora.sd.checkpoint import load_tokenizers
from lib_lora.train import losses
from lib_lora.train.data.records import Batch, BatchPlan
from lib_lora.train.families import Conditioning, ModelFamily, clip_root, family_for
from lib_lora.train.families.conditioning import merge_chunks, sdxl_time_ids, tokenize
from lib_lora.train.families.diffusers_family import DiffusersFamily
from lib_lora.train.families.ldm_family import LdmFamily
from lib_lora.types import Arch, Component
from tests.helpers import checksum
from tests.train import ldm_standin

TRAIN_ROLES = ("attn", "resnet", "sampler", "te_attn", "te_mlp")
CAPTIONS = ["a photo of sks dog, masterpiece", "a red circle on a blue background " * 12]
PAIRS = {"sd1": ldm_standin.sd1_pair, "sd2": ldm_standin.sd2_pair, "sdxl": ldm_standin.sdxl_pair}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny convolutions on a shared 2-core machine run ~100x slower with 2 intra-op threads (spinning
    threads contend with other processes); one thread keeps this module fast."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def pairs(one_thread):
    """(diffusers SDModel, web UI stand-in) per architecture, built once per module, and the families."""
    built = {}
    for name, build in PAIRS.items():
        model, standin = build()
        tokenizers = None if name == "sd1" else load_tokenizers(Arch(name))
        built[name] = (DiffusersFamily(model), LdmFamily(standin, tokenizers=tokenizers), model, standin)
    yield built
    for diff, ldm, _, _ in built.values():
        diff.close()
        ldm.close()


def _images(n: int = 2, size: int = 128, seed: int = 0) -> torch.Tensor:
    # 128 px -> 16x16 latents, the tiny U-Nets' native size. At 64 px the deepest level is 1x1, where GroupNorm
    # normalises 2 values per group: the loss is then so ill-conditioned that float rounding changes gradients
    # by ~10%, and two correct implementations cannot be compared.
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def _batch(captions: list[str], images: torch.Tensor) -> Batch:
    n, h, w = images.shape[0], images.shape[2], images.shape[3]
    return Batch(plan=BatchPlan(epoch=1, index=0, dataset_index=0, bucket_reso=(w, h), items=tuple(range(n))),
                 captions=list(captions), loss_weights=torch.ones(n), is_reg=(False,) * n, flipped=(False,) * n,
                 paths=tuple(f"{i}.png" for i in range(n)),
                 original_sizes_hw=torch.tensor([[h * 2, w * 3]] * n), crop_top_lefts=torch.tensor([[4, 8]] * n),
                 target_sizes_hw=torch.tensor([[h, w]] * n), images=images)


def make_network(targets: ModelTargets, arch: Arch, *, up_scale: float = 0.0, seed: int = 0,
                 roles=TRAIN_ROLES, rank: int = 4) -> LoadedNetwork:
    """A trainable LoRA on every target of `roles`, created in name order (so two families get equal modules)."""
    g = torch.Generator().manual_seed(seed)
    modules = {}
    for t in sorted(targets.select(roles), key=lambda t: t.name):
        m = LoRAModule.create(t.name, t.shape, rank, alpha=rank / 2, generator=g)
        if up_scale:
            with torch.no_grad():
                m.lora_up.weight.copy_(torch.randn(m.lora_up.weight.shape, generator=g) * up_scale)
        modules[t.name] = m
    return LoadedNetwork("train", None, arch, "training", modules)


def loss_and_grads(family: ModelFamily, net: LoadedNetwork, images: torch.Tensor, *, max_token_length=None,
                   clip_skip=None, checkpointing: bool = False, min_snr_gamma=5.0, captions=CAPTIONS,
                   dedupe: bool = True, shared: bool = False):
    """One training step's loss and the LoRA gradients, with fixed VAE sample, noise and timesteps; `shared`: the
    ΔW of same-shaped modules computed together, as the training loop does."""
    patcher = WeightPatcher(family.targets(), "hooked")
    patcher.apply([Application(net)])
    groups = delta_groups(net.modules.values(), 1 << 20) if shared else []
    assert groups or not shared
    try:
        family.set_gradient_checkpointing(checkpointing)
        for m in net.modules.values():
            m.zero_grad(set_to_none=True)
        with shared_deltas(groups):
            batch = _batch(captions, images)
            latents = family.encode_images(images, generator=torch.Generator().manual_seed(0))
            cond = family.conditioning_for(batch, clip_skip=clip_skip, max_token_length=max_token_length,
                                           with_grad=True, dedupe=dedupe)
            g = torch.Generator().manual_seed(1)
            noise = losses.make_noise(latents, offset=0.05, multires_iterations=3, generator=g)
            t = losses.sample_timesteps(latents.shape[0], generator=g)
            noisy = losses.add_noise(latents, noise, t, family.alphas_cumprod)
            pred = family.predict(noisy, t, cond)
            target = losses.target_for(family.prediction_type, latents, noise, t, family.alphas_cumprod)
            loss, _ = losses.diffusion_loss(pred, target, t, family.alphas_cumprod,
                                            prediction_type=family.prediction_type, loss_weights=batch.loss_weights,
                                            min_snr_gamma=min_snr_gamma)
            loss.backward()
        grads = {name: (m.lora_down.weight.grad, m.lora_up.weight.grad) for name, m in net.modules.items()}
    finally:
        family.set_gradient_checkpointing(False)
        patcher.restore()
    assert all(m.shared_delta is None for m in net.modules.values())
    return loss.detach(), grads


def _assert_same_grads(got: dict, expected: dict, rel: float = 1e-3) -> None:
    """Same gradients: the error of each module is small against the largest gradient of the network (the
    two U-Nets differ in float rounding, which is large relative to modules whose gradients are ~0)."""
    assert got.keys() == expected.keys()
    scale = max(g.abs().max().item() for pair in expected.values() for g in pair if g is not None)
    for name, pair in expected.items():
        for g, e in zip(got[name], pair):
            assert (g is None) == (e is None), name
            if e is not None:
                torch.testing.assert_close(g, e, rtol=rel, atol=rel * scale, msg=name)


# ------------------------------------------------------------------------------------------ tokenisation


def test_tokenize_chunks_as_sd_scripts():
    clip, openclip = load_tokenizers(Arch.SDXL)
    long = "word " * 300  # truncated to 225 tokens
    for tok in (clip, openclip):
        ids = tokenize(tok, ["a photo", long], 225)
        assert ids.shape == (2, 3, 77)
        assert (ids[:, :, 0] == tok.bos_token_id).all()
        assert (ids[1, :, -1] == tok.eos_token_id).all()  # every chunk of the long caption ends in EOS
        flat = tok([long], padding="max_length", max_length=227, truncation=True, return_tensors="pt").input_ids[0]
        torch.testing.assert_close(ids[1, :, 1:76].reshape(-1), flat[1:226])
    plain = tokenize(clip, ["a photo"], None)
    assert plain.shape == (1, 1, 77)
    torch.testing.assert_close(tokenize(clip, ["a photo"], 225)[0, 0], plain[0, 0])  # EOS pads: chunk 0 is plain
    partial = tokenize(openclip, ["word " * 100], 225)[0]  # chunk 0 is full of words, chunk 1 holds the rest
    assert partial[0, -1] == openclip.eos_token_id  # a chunk cut inside the words gets EOS as its last token
    assert partial[1, 26] == openclip.eos_token_id and partial[1, -1] == openclip.pad_token_id
    empty = tokenize(openclip, ["a photo"], 225)[0]
    # OpenCLIP pads with `!` (0): a chunk with no words becomes [BOS, EOS, pad...], as sd-scripts makes it
    assert empty[1, 1] == openclip.eos_token_id and empty[1, 2] == openclip.pad_token_id == 0
    with pytest.raises(ConfigError, match="max_token_length"):
        tokenize(clip, ["x"], 100)


def test_merge_chunks_keeps_bos_content_and_last():
    states = torch.arange(2 * 3 * 77, dtype=torch.float32).reshape(6, 77, 1)  # value = global position
    merged = merge_chunks(states, 3)
    assert merged.shape == (2, 227, 1)
    first = merged[0, :, 0].long().tolist()
    assert first[0] == 0 and first[1:76] == list(range(1, 76)) and first[76:151] == list(range(78, 153))
    assert first[151:226] == list(range(155, 230)) and first[226] == 230
    assert merge_chunks(states, 1) is states


# ------------------------------------------------------------------------------------------ diffusers family


@pytest.mark.parametrize("arch", ["sd1", "sd2", "sdxl"])
def test_encode_prompts_shapes(pairs, arch):
    family = pairs[arch][0]
    width = {"sd1": 64, "sd2": 64, "sdxl": 96}[arch]
    for mtl, length in [(None, 77), (150, 152), (225, 227)]:
        cond = family.encode_prompts(CAPTIONS, max_token_length=mtl)
        assert cond.context.shape == (2, length, width)
        assert not cond.context.requires_grad
        assert (cond.pooled is not None) == (arch == "sdxl")
        if arch == "sdxl":
            assert cond.pooled.shape == (2, 32)
    if arch == "sd1":  # EOS padding: a short caption's first 76 states do not depend on the chunking
        plain, long = family.encode_prompts(CAPTIONS[:1]), family.encode_prompts(CAPTIONS[:1], max_token_length=225)
        torch.testing.assert_close(long.context[:, :76], plain.context[:, :76])


def test_clip_skip_conventions(pairs):
    sd1 = pairs["sd1"][0]
    te, tok = sd1.model.text_encoders[0], sd1.tokenizers[0]
    ids = tokenize(tok, CAPTIONS, None)[:, 0]
    with torch.no_grad():
        hidden = te(ids, output_hidden_states=True).hidden_states
        expected = clip_root(te).final_layer_norm(hidden[-2])
        torch.testing.assert_close(sd1.encode_prompts(CAPTIONS, clip_skip=2).context, expected)
        torch.testing.assert_close(sd1.encode_prompts(CAPTIONS, clip_skip=1).context, te(ids).last_hidden_state)
    with pytest.raises(ConfigError, match="clip_skip"):
        sd1.encode_prompts(CAPTIONS, clip_skip=13)
    sdxl = pairs["sdxl"][0]  # SDXL: penultimate of both encoders whatever clip_skip says (sd-scripts)
    torch.testing.assert_close(sdxl.encode_prompts(CAPTIONS, clip_skip=2).context,
                               sdxl.encode_prompts(CAPTIONS).context)


def test_sdxl_context_and_pooled_conventions(pairs):
    family = pairs["sdxl"][0]
    (te1, te2), (tok1, tok2) = family.model.text_encoders, family.tokenizers
    cond = family.encode_prompts(CAPTIONS)
    with torch.no_grad():
        out1 = te1(tokenize(tok1, CAPTIONS, None)[:, 0], output_hidden_states=True)
        out2 = te2(tokenize(tok2, CAPTIONS, None)[:, 0], output_hidden_states=True)
    torch.testing.assert_close(cond.context, torch.cat([out1.hidden_states[-2], out2.hidden_states[-2]], dim=-1))
    torch.testing.assert_close(cond.pooled, out2.text_embeds)


@pytest.mark.parametrize("arch", ["sd1", "sdxl"])
def test_encode_images_scaling_and_sampling(pairs, arch):
    family, model = pairs[arch][0], pairs[arch][2]
    images = _images()
    mean = family.encode_images(images, sample=False)
    assert mean.shape == (2, 4, 16, 16) and mean.dtype == torch.float32
    with torch.no_grad():
        torch.testing.assert_close(mean, model.vae.encode(images).latent_dist.mean * model.vae_scale_factor)
    a = family.encode_images(images, generator=torch.Generator().manual_seed(3))
    b = family.encode_images(images, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b) and not torch.equal(a, mean)


def test_conditioning_for_batch_builds_sdxl_time_ids_and_uses_cache(pairs):
    family = pairs["sdxl"][0]
    batch = _batch(CAPTIONS, _images())
    cond = family.conditioning_for(batch)
    assert cond.extra["time_ids"].tolist() == [[256.0, 384.0, 4.0, 8.0, 128.0, 128.0]] * 2
    torch.testing.assert_close(cond.context, family.encode_prompts(CAPTIONS).context)
    cached = Conditioning(torch.zeros(2, 77, 96), torch.ones(2, 32))
    batch.text_encoder_outputs = cached.as_dict()
    from_cache = family.conditioning_for(batch)
    assert torch.equal(from_cache.context, cached.context) and torch.equal(from_cache.pooled, cached.pooled)
    assert family.predict(torch.randn(2, 4, 8, 8), torch.tensor([1, 999]), cond).shape == (2, 4, 8, 8)
    with pytest.raises(ValueError, match="time_ids"):
        family.predict(torch.randn(2, 4, 8, 8), torch.tensor([1, 999]), Conditioning(cond.context, cond.pooled))
    assert sdxl_time_ids(batch.original_sizes_hw, batch.crop_top_lefts, batch.target_sizes_hw).shape == (2, 6)


@pytest.mark.parametrize("arch", ["sd1", "sd2", "sdxl"])
def test_lora_gets_gradients_and_training_lowers_the_loss(pairs, arch):
    family, model = pairs[arch][0], pairs[arch][2]
    assert isinstance(family, ModelFamily)
    assert family.prediction_type == ("v_prediction" if arch == "sd2" else "epsilon")
    assert not any(p.requires_grad for m in model.modules() for p in m.parameters())
    before = checksum(*model.modules())
    net = make_network(family.targets(), family.arch, seed=1)
    comps = {Component.TE1, Component.TE2} if arch == "sdxl" else {Component.TE}
    assert {n.split("_")[1] for n in net.modules} == {"unet", *(c.value for c in comps)}
    params = [p for m in net.modules.values() for p in m.parameters()]
    opt = torch.optim.AdamW(params, lr=3e-3)
    images = _images(seed=4)
    first, grads = loss_and_grads(family, net, images)
    missing = {name for name, (_, up) in grads.items() if up is None or not up.abs().sum() > 0}
    # every LoRA (U-Net and text encoders) receives a gradient, except on SDXL's last CLIP-L layer, after the
    # penultimate states SDXL reads (sd-scripts creates those modules too; they stay zero)
    assert missing == {n for n in net.modules if arch == "sdxl" and "te1_text_model_encoder_layers_11_" in n}
    history = [first.item()]
    for _ in range(6):
        opt.step()
        loss, _ = loss_and_grads(family, net, images)
        history.append(loss.item())
    assert history[-1] < 0.9 * history[0], history
    assert checksum(*model.modules()) == before  # hooked: base weights untouched


@pytest.mark.parametrize("arch", ["sd1", "sdxl"])
def test_repeated_captions_are_encoded_once_with_the_same_loss_and_grads(pairs, arch, monkeypatch):
    family = pairs[arch][0]
    net = make_network(family.targets(), family.arch, up_scale=0.02, seed=3)
    captions = [CAPTIONS[0], CAPTIONS[1], CAPTIONS[0]]
    encoded: list[list[str]] = []
    encode = family.encode_prompts
    monkeypatch.setattr(family, "encode_prompts", lambda c, **kw: encoded.append(list(c)) or encode(c, **kw))
    each_loss, each = loss_and_grads(family, net, _images(3), captions=captions, dedupe=False)
    once_loss, once = loss_and_grads(family, net, _images(3), captions=captions)
    assert encoded == [captions, CAPTIONS]
    torch.testing.assert_close(once_loss, each_loss, rtol=1e-5, atol=1e-7)
    _assert_same_grads(once, each, rel=1e-5)


@pytest.mark.parametrize("arch", ["sd1", "sdxl"])
def test_deltas_computed_per_shape_group_give_the_same_loss_and_grads(pairs, arch, monkeypatch):
    """The training loop computes the ΔW of same-shaped small modules in one batched product (and 1x1 convs as a
    matrix product on the CPU): same loss and gradients as module by module, also under gradient checkpointing
    (which reruns the forward inside backward), on the diffusers and the web UI (LDM) U-Net."""
    rebuilt = LoRAModule.rebuilt_forward
    used: list[str] = []

    def spy(self, x, module, layer, multiplier):
        out = rebuilt(self, x, module, layer, multiplier)
        if out is not None and self.shared_delta is not None:
            used.append(("pointwise " if layer.pointwise else "") + self.lora_name)
        return out

    monkeypatch.setattr(LoRAModule, "rebuilt_forward", spy)
    for family in pairs[arch][:2]:
        # rank 16 on 32-64 wide layers: rebuilding the weight is the cheaper path, so the shared ΔW are used
        net = make_network(family.targets(), family.arch, up_scale=0.02, seed=4, rank=16)
        each_loss, each = loss_and_grads(family, net, _images())
        assert not used
        for checkpointing in (False, True):
            shared_loss, shared = loss_and_grads(family, net, _images(), shared=True, checkpointing=checkpointing)
            torch.testing.assert_close(shared_loss, each_loss, rtol=1e-5, atol=1e-7)
            _assert_same_grads(shared, each, rel=1e-4)
            assert len({n for n in used if "_te" in n}) > 10 and len({n for n in used if "_unet_" in n}) > 10
            assert arch == "sdxl" or any(n.startswith("pointwise") for n in used)  # SD1's 1x1 proj_in/out
            used.clear()


def test_gradient_checkpointing_gives_the_same_loss_and_grads(pairs):
    for family in (pairs["sd1"][0], pairs["sd1"][1]):
        net = make_network(family.targets(), family.arch, up_scale=0.02, seed=2)
        off_loss, off = loss_and_grads(family, net, _images())
        on_loss, on = loss_and_grads(family, net, _images(), checkpointing=True)
        torch.testing.assert_close(on_loss, off_loss, rtol=1e-5, atol=1e-7)
        for name in off:
            torch.testing.assert_close(on[name][0], off[name][0], rtol=1e-4, atol=1e-7)
            torch.testing.assert_close(on[name][1], off[name][1], rtol=1e-4, atol=1e-7)
        assert not family._checkpointed.active


def test_identity_is_stable_and_tracks_weights(pairs):
    family = pairs["sd1"][0]
    vae_id, text_id = family.identity("vae"), family.identity("text")
    assert vae_id == family.identity("vae") and vae_id != text_id and vae_id.startswith("sd1:epsilon:")
    assert family.text_identity(2, 225) != family.text_identity(None, 225)
    other = DiffusersFamily(ldm_standin._diffusers_model(Arch.SD1, seed=5))
    assert other.identity("vae") != vae_id
    with pytest.raises(ValueError, match="identity part"):
        family.identity("unet")


# ------------------------------------------------------------------------------------------ LDM (web UI) family


def test_ldm_sd1_trains_exactly_what_diffusers_trains(pairs):
    diff, ldm, _, standin = pairs["sd1"]
    assert ldm.arch is Arch.SD1 and ldm.prediction_type == "epsilon"
    dt, lt = diff.targets(), ldm.targets()
    assert set(dt.targets) == set(lt.targets)
    assert all(dt[n].shape == lt[n].shape for n in dt.targets)
    for mtl, skip in [(None, None), (225, 2)]:
        torch.testing.assert_close(ldm.encode_prompts(CAPTIONS, max_token_length=mtl, clip_skip=skip).context,
                                   diff.encode_prompts(CAPTIONS, max_token_length=mtl, clip_skip=skip).context)
    images = _images()
    gen = [torch.Generator().manual_seed(7) for _ in range(2)]
    latents = diff.encode_images(images, generator=gen[0])
    torch.testing.assert_close(ldm.encode_images(images, generator=gen[1]), latents)
    cond = diff.encode_prompts(CAPTIONS, max_token_length=150)
    t = torch.tensor([20, 850])
    torch.testing.assert_close(ldm.predict(latents, t, cond), diff.predict(latents, t, cond), atol=1e-4, rtol=1e-4)
    # the whole training step, with a LoRA that already changes the model (up != 0)
    d_loss, d_grads = loss_and_grads(diff, make_network(dt, Arch.SD1, up_scale=0.02, seed=3), images,
                                     max_token_length=150, clip_skip=2)
    l_loss, l_grads = loss_and_grads(ldm, make_network(lt, Arch.SD1, up_scale=0.02, seed=3), images,
                                     max_token_length=150, clip_skip=2)
    torch.testing.assert_close(l_loss, d_loss, rtol=1e-4, atol=1e-6)
    _assert_same_grads(l_grads, d_grads)
    # Forge's inference-mode get_learned_conditioning could not train a text-encoder LoRA; the family's encoding can
    assert standin.get_learned_conditioning(CAPTIONS[:1]).is_inference()


def test_ldm_sd2_openclip_tower(pairs):
    diff, ldm, _, standin = pairs["sd2"]
    assert ldm.arch is Arch.SD2 and ldm.prediction_type == "v_prediction"
    te_names = {n for n, t in ldm.targets().targets.items() if t.component is Component.TE}
    diff_te = {n for n, t in diff.targets().targets.items() if t.component is Component.TE and "projection" not in n}
    assert te_names == diff_te  # 12 layers used of the tower's 13 blocks; the unused last block has no targets
    tower = standin.cond_stage_model.wrapped.model
    assert len(tower.transformer.resblocks) == 13 and not any("layers_12_" in n for n in te_names)
    fused = ldm.targets()["lora_te_text_model_encoder_layers_0_self_attn_k_proj"]
    assert fused.rows == (64, 128)
    for mtl, skip in [(None, None), (225, 2)]:
        torch.testing.assert_close(ldm.encode_prompts(CAPTIONS, max_token_length=mtl, clip_skip=skip).context,
                                   diff.encode_prompts(CAPTIONS, max_token_length=mtl, clip_skip=skip).context,
                                   atol=1e-5, rtol=1e-5)
    # a text-encoder LoRA trains through the fused q/k/v weights (parametrization) of nn.MultiheadAttention
    net = make_network(ldm.targets(), Arch.SD2, seed=4, roles=("te_attn", "te_mlp"))
    patcher = WeightPatcher(ldm.targets(), "hooked")
    with patcher.applied([Application(net)]):
        cond = ldm.encode_prompts(CAPTIONS, with_grad=True)
        cond.context.square().mean().backward()
    assert all(m.lora_up.weight.grad is not None and m.lora_up.weight.grad.abs().sum() > 0
               for m in net.modules.values())
    with pytest.raises(ConfigError, match="tokenizer"):
        LdmFamily(standin)  # OpenCLIP carries no transformers tokenizer: say what to pass


def test_ldm_sdxl_conditioner_and_vector(pairs):
    diff, ldm, dmodel, _ = pairs["sdxl"]
    assert ldm.arch is Arch.SDXL
    batch = _batch(CAPTIONS, _images())
    for mtl in (None, 225):
        d, c = diff.conditioning_for(batch, max_token_length=mtl), ldm.conditioning_for(batch, max_token_length=mtl)
        torch.testing.assert_close(c.context, d.context, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(c.pooled, d.pooled, atol=1e-5, rtol=1e-5)
    with torch.no_grad():  # SGM's y = [pooled, sinusoids of the six size numbers], what diffusers builds inside
        expected = torch.cat([d.pooled, dmodel.unet.add_time_proj(d.extra["time_ids"].flatten()).reshape(2, -1)], -1)
    torch.testing.assert_close(ldm._vector(c), expected, atol=1e-5, rtol=1e-5)
    names = set(ldm.targets().targets)
    assert {"lora_te1_text_model_encoder_layers_0_self_attn_q_proj", "lora_te2_text_model_encoder_layers_11_mlp_fc2",
            "lora_unet_input_blocks_4_1_proj_in", "lora_unet_label_emb_0_0"} <= names
    net = make_network(ldm.targets(), Arch.SDXL, seed=5)
    _, grads = loss_and_grads(ldm, net, _images())
    missing = {name for name, (_, up) in grads.items() if up is None or not up.abs().sum() > 0}
    assert missing == {n for n in net.modules if "te1_text_model_encoder_layers_11_" in n}


def test_ldm_own_checkpoint_flags_do_not_drop_lora_grads(pairs):
    _, plain_family, _, _ = pairs["sd1"]
    _, standin = ldm_standin.sd1_pair(use_checkpoint=True)  # as v1-inference.yaml builds it
    blocks = [m for m in standin.model.diffusion_model.modules() if getattr(m, "checkpoint", False) is True]
    assert blocks
    family = LdmFamily(standin)
    assert all(p.requires_grad is False for p in standin.model.diffusion_model.parameters())
    try:
        net = make_network(family.targets(), Arch.SD1, up_scale=0.02, seed=6)
        loss, grads = loss_and_grads(family, net, _images())
        ref_loss, ref = loss_and_grads(plain_family, make_network(plain_family.targets(), Arch.SD1, up_scale=0.02,
                                                                  seed=6), _images())
        torch.testing.assert_close(loss, ref_loss)
        attn = [n for n in grads if "transformer_blocks" in n]
        assert attn and all(torch.allclose(grads[n][1], ref[n][1], rtol=1e-4, atol=1e-7) for n in attn)
    finally:
        family.close()
    assert all("forward" not in m.__dict__ for m in blocks)  # ldm's own forward is back
    assert all(p.requires_grad for p in standin.model.diffusion_model.parameters())  # as the host had it


def test_ldm_reports_what_the_model_lacks(pairs):
    _, standin = pairs["sd1"][3], pairs["sd1"][3]
    with pytest.raises(TypeError, match="model.diffusion_model"):
        family_for(object())

    class NoSchedule:
        model = standin.model
        cond_stage_model = standin.cond_stage_model

    with pytest.raises(ConfigError, match="alphas_cumprod"):
        LdmFamily(NoSchedule())

    class NoVae(NoSchedule):
        alphas_cumprod = standin.alphas_cumprod

    family = LdmFamily(NoVae())
    try:
        with pytest.raises(ConfigError, match="encode_first_stage"):
            family.encode_images(_images())
    finally:
        family.close()
