"""Everything a training run needs, prepared and checked before the first step: dataset and caches, the network
attached to the model, optimizer and lr schedule, resume state, sample prompts, output folders.

Every problem that can be found up front (empty dataset, bad image, unwritable output folder, unknown optimizer,
a resume state of another network shape, ...) raises here, before any step runs and before any file is written.
"""
from __future__ import annotations

import functools
import random
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from lib_lora.errors import ConfigError
from lib_lora.train import checkpoint
from lib_lora.train.config import TrainConfig
from lib_lora.train.data import DataProgress, EpochSampler, ImageDataset, LatentCache, TextEncoderCache, build_dataset
from lib_lora.train.data.dataset_config import validation_datasets
from lib_lora.train.data.summary import dataset_metadata
from lib_lora.train.distributed import DistContext
from lib_lora.train.events import Broadcaster, ProgressEvent
from lib_lora.train.families import ModelFamily
from lib_lora.train.guard import DivergenceGuard
from lib_lora.train.metadata import ModelFacts
from lib_lora.train.network import TrainableNetwork, load_initial_weights
from lib_lora.train.optimizers import BuiltOptimizer, build_optimizer
from lib_lora.train.parking import Parking
from lib_lora.train.sample_prompts import SamplePrompt, load_prompts, prompts_from_text
from lib_lora.train.schedulers import ScheduledLR, build_scheduler

SampleFn = Callable[[list[SamplePrompt], int, int], list[Path]]  # (prompts, step, epoch) -> image files


@dataclass
class Session:
    """A prepared run. The loop (`loop.run`) mutates `step`, `epoch` and the modules; nothing else."""

    cfg: TrainConfig
    family: ModelFamily
    model: ModelFacts
    dataset: ImageDataset
    validation: ImageDataset | None
    sampler: EpochSampler
    network: TrainableNetwork
    optimizer: BuiltOptimizer
    scheduler: ScheduledLR
    guard: DivergenceGuard
    dist: DistContext
    emit: Broadcaster
    should_stop: Callable[[], bool]
    sample_fn: SampleFn | None
    prompts: list[SamplePrompt]
    output_dir: Path
    seed: int
    total_steps: int
    dataset_meta: dict[str, str]
    started_at: float = field(default_factory=time.time)
    session_id: int = field(default_factory=lambda: random.randint(0, 2**32))
    step: int = 0
    epoch: int = 1
    saves: checkpoint.SaveRegistry = field(default_factory=checkpoint.SaveRegistry)
    parking: Parking | None = None  # set by the loop: the VAE / text encoders off the device between steps

    @property
    def network_trains_text_encoder(self) -> bool:
        return any(p.target.component.is_text_encoder for p in self.network.plans.values())

    @functools.cached_property
    def text_encoder_is_deterministic(self) -> bool:
        """No dropout of any kind in the text-encoder part of the network (rows with the same caption then get
        the same conditioning, so each distinct caption is encoded once). Fixed when the network is built, so
        worked out once, not at every step."""
        return not any(getattr(m, attr, 0) for name, m in self.network.nets.items()
                       if self.network.plans[name].target.component.is_text_encoder
                       for attr in ("dropout", "rank_dropout", "module_dropout"))


def _check_output_dir(cfg: TrainConfig) -> Path:
    """The output folder, checked writable without creating it (a refused run leaves nothing behind); the loop
    creates it when the run starts."""
    folder = cfg.output.output_dir
    if folder is None:
        raise ConfigError("output_dir", None, "is required: the folder where LoRA files are written")
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise ConfigError("output_dir", str(folder), "is a file, not a folder")
    existing = next(p for p in (folder, *folder.parents) if p.exists())
    if not existing.is_dir():
        raise ConfigError("output_dir", str(folder), f"{existing} is a file, so the folder cannot be made")
    try:
        with tempfile.NamedTemporaryFile(dir=existing, prefix=".write-test-", delete=True):
            pass
    except OSError as exc:
        raise ConfigError("output_dir", str(folder), f"cannot write there ({exc.strerror or exc})") from None
    return folder


def _validation_dataset(cfg: TrainConfig, seed: int) -> ImageDataset | None:
    """Held-out images: a separate folder (validation_data_dir) or each dataset's validation_split."""
    folder = cfg.validation.validation_data_dir
    if folder is not None:
        first = cfg.data.datasets[0]
        fallback = {"resolution": first.resolution, "batch_size": first.batch_size,
                    "caption_extension": first.subsets[0].caption_extension}
        datasets = validation_datasets(Path(folder), fallback=fallback)
        return build_dataset(datasets, split="all", seed=seed, evaluation=True)
    if any(ds.validation_split > 0 for ds in cfg.data.datasets):
        return build_dataset(cfg.data, split="validation", seed=seed)
    return None


def _sample_prompts(cfg: TrainConfig) -> list[SamplePrompt]:
    sampling = cfg.sampling
    if sampling.sample_prompts is not None:
        return load_prompts(sampling.sample_prompts)
    return prompts_from_text(sampling.sample_prompt_text) if sampling.sample_prompt_text else []


def _build_caches(cfg: TrainConfig, family: ModelFamily, dataset: ImageDataset, emit: Broadcaster) -> None:
    data = cfg.data
    if not data.caches_latents:
        return
    cache_dir = data.cache_dir

    def progress(p: DataProgress) -> None:
        emit(ProgressEvent("cache", message=f"{p.stage} {p.done}/{p.total}",
                           data={"stage": p.stage, "done": p.done, "total": p.total, "path": p.path}))

    cache = LatentCache(family.encode_images, family.identity("vae"), to_disk=data.cache_latents_to_disk,
                        cache_dir=cache_dir, batch_size=data.vae_batch_size)
    cache.build(dataset, progress)
    dataset.latent_cache = cache
    if data.caches_text_encoder_outputs:
        model_cfg = cfg.model

        def encode(captions: list[str]):
            return family.encode_prompts(captions, clip_skip=model_cfg.clip_skip,
                                         max_token_length=model_cfg.max_token_length, with_grad=False).as_dict()

        te_id = family.text_identity(model_cfg.clip_skip, model_cfg.max_token_length)
        te_cache = TextEncoderCache(encode, te_id, to_disk=data.cache_text_encoder_outputs_to_disk,
                                    cache_dir=cache_dir)
        te_cache.build(dataset, progress)
        dataset.text_cache = te_cache


def prepare(cfg: TrainConfig, family: ModelFamily, model: ModelFacts, *, listeners=(),
            should_stop: Callable[[], bool] | None = None, sample_fn: SampleFn | None = None,
            dist: DistContext | None = None) -> Session:
    """Build and check everything; raises on bad input before any step or write."""
    dist = dist or DistContext.detect()
    emit = Broadcaster(list(listeners))
    output_dir = _check_output_dir(cfg)
    seed = cfg.run.seed
    if seed is None:
        # a resumed run continues the data order and noise of the run it resumes: take that run's seed
        resumed = checkpoint.read_state(Path(cfg.run.resume)) if cfg.run.resume is not None else None
        seed = resumed.seed if resumed is not None else random.randint(0, 2**31 - 1)
    dataset = build_dataset(cfg.data, split="train", seed=seed, prior_loss_weight=cfg.loss.prior_loss_weight)
    validation = _validation_dataset(cfg, seed)
    prompts = _sample_prompts(cfg)
    initial = load_initial_weights(cfg.network.network_weights, family.arch) if cfg.network.network_weights else None
    network = TrainableNetwork(cfg.network, family.targets(), seed=seed, initial=initial)
    network.to(family.device)
    optimizer = build_optimizer(cfg.optimizer.optimizer_type, network.param_groups(cfg.optimizer),
                                cfg.optimizer.effective_unet_lr, cfg.optimizer.kwargs)
    sampler = EpochSampler(dataset, seed, rank=dist.rank, world_size=dist.world_size)
    total = cfg.total_steps(sampler.batches_per_epoch * dist.world_size, dist.world_size)
    spec = cfg.optimizer.schedule(total)
    if optimizer.scheduler_override:
        spec = type(spec)(**{**spec.__dict__, "name": optimizer.scheduler_override})
    scheduler = build_scheduler(optimizer.optimizer, spec)
    session = Session(cfg=cfg, family=family, model=model, dataset=dataset, validation=validation, sampler=sampler,
                      network=network, optimizer=optimizer, scheduler=scheduler, guard=DivergenceGuard(cfg.guard),
                      dist=dist, emit=emit, should_stop=should_stop or (lambda: False), sample_fn=sample_fn,
                      prompts=prompts, output_dir=output_dir, seed=seed, total_steps=total, dataset_meta={})
    if cfg.run.resume is not None:
        resume(session, Path(cfg.run.resume))
    _build_caches(cfg, family, dataset, emit)
    session.dataset_meta = dataset_metadata(dataset, cfg.data, num_batches_per_epoch=sampler.batches_per_epoch,
                                            total_batch_size=cfg.run.train_batch_size * dist.world_size *
                                            cfg.run.gradient_accumulation_steps)
    if initial is not None:
        missing = network.load_weights(initial)
        if missing:
            emit(ProgressEvent("warning", message=f"network_weights lacks {len(missing)} of our modules "
                                                  f"(they start fresh), e.g. {missing[0]}"))
    return session


def resume(session: Session, folder: Path) -> None:
    """Load a state folder into the prepared session (checked against the network's shapes first)."""
    expected = checkpoint.network_shapes(session.network.file_tensors())
    loaded = checkpoint.load_state(folder, expected)
    tensors = {k: v for k, v in loaded.network.items()}
    with torch.no_grad():
        for name, module in session.network.nets.items():
            for suffix, param in module.state_dict().items():
                key = f"{name}.{suffix}"
                if key in tensors:
                    param.copy_(tensors[key].to(param.dtype))
            alpha_key = f"{name}.alpha"
            if alpha_key in tensors:
                module.alpha = tensors[alpha_key].to(torch.float32).reshape(())
    session.optimizer.optimizer.load_state_dict(loaded.optimizer)
    session.scheduler.load_state_dict(loaded.scheduler)
    from lib_lora.train.data import SamplerState

    session.sampler.load_state(SamplerState.from_dict(loaded.state.sampler))
    if loaded.state.seed != session.seed:
        raise ConfigError("seed", session.seed, f"the state was trained with seed {loaded.state.seed}")
    session.step, session.epoch = loaded.state.step, loaded.state.epoch
    session.guard.rollbacks = loaded.state.rollbacks


