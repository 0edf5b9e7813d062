"""Epoch order: seeded, repeats expanded, batches formed within a bucket, deterministic given (seed, epoch).

Per epoch (as sd-scripts): each dataset's bucket lists (one entry per image per repeat) are shuffled and cut
into batches of the dataset's batch size, then all batches are shuffled together. The order depends only on
(seed, epoch), and every per-image random choice on (seed, epoch, batch index, slot), so `SamplerState` (epoch
and batches consumed) is enough for a resumed run to see exactly the batches an uninterrupted run would have.
"""
from __future__ import annotations

from collections.abc import Iterator
from random import Random

from lib_lora.errors import ConfigError
from lib_lora.train.data.dataset import ImageDataset
from lib_lora.train.data.records import BatchPlan, SamplerState, Size


def epoch_plan(dataset: ImageDataset, seed: int, epoch: int) -> list[BatchPlan]:
    """The batches of epoch `epoch` (1-based). Evaluation datasets keep a fixed order (no shuffling)."""
    rng = Random(f"order/{seed}/{epoch}")
    batches: list[tuple[int, Size, tuple[int, ...]]] = []
    for group in dataset.groups:
        buckets: dict[Size, list[int]] = {}
        for idx, reps in zip(group.items, group.repeats):
            buckets.setdefault(dataset.items[idx].placement.bucket_reso, []).extend([idx] * reps)
        size = group.config.batch_size
        for reso in sorted(buckets):
            entries = buckets[reso]
            if not dataset.evaluation:
                rng.shuffle(entries)
            batches.extend((group.index, reso, tuple(entries[k:k + size])) for k in range(0, len(entries), size))
    if not dataset.evaluation:
        rng.shuffle(batches)
    return [BatchPlan(epoch, i, ds, reso, items) for i, (ds, reso, items) in enumerate(batches)]


class EpochSampler:
    """Hands out `BatchPlan`s epoch after epoch and remembers where it stands.

    With several processes, each takes every `world_size`-th batch from `rank` (the epoch padded by wrapping
    around so all processes make the same number of steps). `position` counts batches handed out in the current
    epoch: save `state()` after the step that consumed the last batch taken.
    """

    def __init__(self, dataset: ImageDataset, seed: int, *, rank: int = 0, world_size: int = 1,
                 state: SamplerState | None = None):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world_size {world_size}")
        self.dataset, self.seed, self.rank, self.world_size = dataset, seed, rank, world_size
        self.epoch, self.position = 1, 0
        if state is not None:
            self.load_state(state)

    def batches(self, epoch: int) -> list[BatchPlan]:
        """This process's batches of an epoch."""
        plans = epoch_plan(self.dataset, self.seed, epoch)
        if self.world_size > 1:
            pad = -len(plans) % self.world_size
            plans = plans + plans[:pad]
            plans = plans[self.rank::self.world_size]
        return plans

    @property
    def batches_per_epoch(self) -> int:
        return -(-self.dataset.num_batches_per_epoch // self.world_size)

    def epoch_batches(self) -> Iterator[BatchPlan]:
        """The remaining batches of the current epoch; when exhausted, the sampler moves to the next epoch."""
        plans = self.batches(self.epoch)
        while self.position < len(plans):
            plan = plans[self.position]
            self.position += 1
            yield plan
        self.epoch, self.position = self.epoch + 1, 0

    def state(self) -> SamplerState:
        return SamplerState(seed=self.seed, epoch=self.epoch, position=self.position,
                            fingerprint=self.dataset.fingerprint)

    def load_state(self, state: SamplerState) -> None:
        """Continue from a saved state; it must come from the same dataset and seed."""
        if state.fingerprint != self.dataset.fingerprint:
            raise ConfigError("resume", state.fingerprint, "the saved data order belongs to another dataset "
                              f"(images, repeats, buckets or batch size changed; now {self.dataset.fingerprint})")
        if state.seed != self.seed:
            raise ConfigError("seed", self.seed, f"the resumed run was seeded with {state.seed}")
        if state.epoch < 1 or not 0 <= state.position <= len(self.batches(state.epoch)):
            raise ConfigError("resume", state.to_dict(), "position outside the epoch")
        self.epoch, self.position = state.epoch, state.position
