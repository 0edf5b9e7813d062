"""The training loop: batches in, optimizer steps out, with the divergence guard, samples, saves and events.

Read it top to bottom: `run` is the loop; each thing that happens around a step is a small named helper below.
Randomness of a step (noise, timesteps, dropout) is seeded from (seed, step, micro-batch, rank), and the data
order from the sampler state, so a resumed run continues exactly as an uninterrupted one would.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

import torch

from lib_lora.errors import WriteError
from lib_lora.io import remove_stale_temporaries
from lib_lora.train import checkpoint
from lib_lora.train.events import ProgressEvent
from lib_lora.train.guard import Verdict
from lib_lora.train.metadata import build_metadata
from lib_lora.train.parking import parking_for
from lib_lora.train.session import Session
from lib_lora.train.step import batch_loss, step_seed, validation_loss

SAVE_DTYPES = {None: torch.float32, "float": torch.float32, "fp32": torch.float32, "fp16": torch.float16,
               "bf16": torch.bfloat16}


@dataclass
class TrainResult:
    status: str  # 'finished' | 'stopped' | 'diverged'
    steps: int
    final_file: Path | None
    files: list[Path] = field(default_factory=list)
    report: str = ""


class Precision:
    """Mixed precision as sd-scripts' `mixed_precision`: autocast of the forward pass, loss scaling for fp16."""

    def __init__(self, mode: str, device: torch.device):
        self.device = device
        # Not on the CPU (`device_notes` says so at the start): bf16 attention there fails on CPUs without
        # AVX-512 ("pack_vnni2 is only supported when avx512 is supported"), and it saves no memory worth the
        # precision lost; sd-scripts' GPU figures are what users choose it for.
        self.dtype = None if device.type == "cpu" else {"fp16": torch.float16, "bf16": torch.bfloat16}.get(mode)
        use_scaler = self.dtype is torch.float16 and device.type == "cuda"
        self.scaler = torch.amp.GradScaler("cuda") if use_scaler else None

    def autocast(self):
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    def backward(self, loss: torch.Tensor) -> None:
        (self.scaler.scale(loss) if self.scaler else loss).backward()

    def step(self, optimizer: torch.optim.Optimizer, params: list[torch.nn.Parameter], max_norm: float) -> None:
        if self.scaler:
            self.scaler.unscale_(optimizer)
        if max_norm and max_norm > 0:
            torch.nn.utils.clip_grad_norm_(params, max_norm, foreach=True)
        if self.scaler:
            self.scaler.step(optimizer)
            self.scaler.update()
        else:
            optimizer.step()


class Meter:
    """Smoothed loss, it/s and ETA over a moving window of steps."""

    def __init__(self, window: int = 20):
        self.times: deque[float] = deque(maxlen=window)
        self.smoothed: float | None = None

    def update(self, loss: float) -> None:
        self.times.append(time.perf_counter())
        if math.isfinite(loss):
            self.smoothed = loss if self.smoothed is None else 0.9 * self.smoothed + 0.1 * loss

    def rate(self) -> float | None:
        if len(self.times) < 2:
            return None
        return (len(self.times) - 1) / max(self.times[-1] - self.times[0], 1e-9)


def run(s: Session) -> TrainResult:
    """Train until the step budget, a stop request, Ctrl-C, or unrecoverable divergence; always save at the end."""
    cfg = s.cfg
    params = [p for g in s.optimizer.optimizer.param_groups for p in g["params"]]
    precision = Precision(cfg.run.mixed_precision, s.family.device)
    meter, accum = Meter(), cfg.run.gradient_accumulation_steps
    s.output_dir.mkdir(parents=True, exist_ok=True)
    removed = remove_stale_temporaries(s.output_dir)
    if removed:
        s.emit(ProgressEvent("warning", message=f"removed {len(removed)} unfinished file(s) of an interrupted save: "
                                                f"{', '.join(p.name for p in removed)}"))
    s.network.attach()
    s.network.train()
    s.family.set_gradient_checkpointing(cfg.run.gradient_checkpointing)
    s.parking = parking_for(s.family, cfg.data.caches_latents, cfg.data.caches_text_encoder_outputs)
    s.guard.take(s.step, s.network.state_dict(), s.optimizer.optimizer.state_dict(), trusted=True)
    _emit_start(s)
    status, micro, losses, seen = "finished", 0, [], []
    try:
        s.parking.park()
        if cfg.sampling.sample_at_first and s.step == 0:
            _sample(s)
        while s.step < s.total_steps and status == "finished":
            s.epoch = s.sampler.epoch
            for plan in s.sampler.epoch_batches():
                batch = s.dataset.load_batch(plan, s.seed)
                with s.network.share_deltas():
                    with precision.autocast():
                        loss = batch_loss(s, batch, step_seed(s.seed, s.step, micro, s.dist.rank))
                    precision.backward(loss / accum)
                losses.append(float(loss.detach()))
                seen.extend(batch.paths)
                micro += 1
                if micro < accum:
                    continue
                value = s.dist.average(sum(losses) / len(losses))
                batch_paths, micro, losses, seen = tuple(seen), 0, [], []
                s.dist.average_gradients(params)
                precision.step(s.optimizer.optimizer, params, cfg.optimizer.max_grad_norm)
                s.scheduler.step()
                s.optimizer.optimizer.zero_grad(set_to_none=True)
                s.step += 1
                status = _after_step(s, value, meter, s.guard.check(s.step, value), batch_paths)
                if status != "finished" or s.step >= s.total_steps:
                    break
            else:
                _end_of_epoch(s)
    except KeyboardInterrupt:
        status = "stopped"
    finally:
        s.parking.unpark()
        s.network.detach()
        s.family.set_gradient_checkpointing(False)
    return _finish(s, status)


# -------------------------------------------------------------------------------------------- around a step


def _after_step(s: Session, loss: float, meter: Meter, verdict: Verdict, batch_paths: tuple[str, ...]) -> str:
    """Everything after an optimizer step; returns the run's status ('finished' = keep going)."""
    if verdict.action == "rollback":
        _rollback(s, verdict.reason)
        return "finished"
    if verdict.action == "stop":
        _restore_snapshot(s)
        s.emit(ProgressEvent("rollback", step=s.step, total_steps=s.total_steps,
                             message=f"stopping: {verdict.reason}; the last good state is kept"))
        return "diverged"
    extra = {}
    if s.cfg.network.scale_weight_norms:
        report = s.network.apply_max_norm(s.cfg.network.scale_weight_norms)
        extra["max_norm"] = {"keys_scaled": report.keys_scaled, "average_key_norm": report.mean_norm,
                             "max_key_norm": report.max_norm}
    meter.update(loss)
    rate = meter.rate()
    s.emit(ProgressEvent("step", step=s.step, total_steps=s.total_steps, epoch=s.sampler.epoch, loss=loss,
                         smoothed=meter.smoothed, lrs=_lrs(s), it_per_s=rate,
                         eta_s=(s.total_steps - s.step) / rate if rate else None,
                         data={"batch": batch_paths, **extra}))
    if s.guard.wants_snapshot(s.step):
        s.guard.take(s.step, s.network.state_dict(), s.optimizer.optimizer.state_dict())
    every = s.cfg.validation.validate_every_n_steps
    if s.validation is not None and every and s.step % every == 0:
        _validate(s)
    sampling = s.cfg.sampling
    if sampling.sample_every_n_steps and not sampling.sample_every_n_epochs and \
            s.step % sampling.sample_every_n_steps == 0:
        _sample(s)
    out = s.cfg.output
    if out.save_every_n_steps and s.step % out.save_every_n_steps == 0 and s.step < s.total_steps:
        _save(s, f"{out.output_name}-step{s.step:08d}", "steps", out.save_last_n_steps,
              out.save_last_n_steps_state)
    return "stopped" if s.should_stop() else "finished"


def _end_of_epoch(s: Session) -> None:
    epoch = s.sampler.epoch - 1  # the sampler already moved on
    s.emit(ProgressEvent("epoch", step=s.step, total_steps=s.total_steps, epoch=epoch))
    validation = s.cfg.validation
    if s.validation is not None and (validation.validate_every_n_epochs and epoch % validation.validate_every_n_epochs
                                     == 0 or not (validation.validate_every_n_steps or
                                                  validation.validate_every_n_epochs)):
        _validate(s)
    n = s.cfg.sampling.sample_every_n_epochs
    if n and epoch % n == 0:
        _sample(s, epoch)
    out = s.cfg.output
    if out.save_every_n_epochs and epoch % out.save_every_n_epochs == 0 and s.step < s.total_steps:
        _save(s, f"{out.output_name}-{epoch:06d}", "epochs", out.save_last_n_epochs, out.save_last_n_epochs_state)


def _lrs(s: Session) -> dict[str, float]:
    return {g.get("name", str(i)): float(g["lr"]) for i, g in enumerate(s.optimizer.optimizer.param_groups)
            if g.get("lr") is not None}


def _rollback(s: Session, reason: str) -> None:
    _restore_snapshot(s)
    s.scheduler.scale(s.cfg.guard.guard_lr_decay)
    s.guard.after_rollback()
    s.emit(ProgressEvent("rollback", step=s.step, total_steps=s.total_steps, lrs=_lrs(s),
                         message=f"divergence: {reason}; rolled back to step {s.guard.snapshot.step} and lowered "
                                 f"the lr x{s.cfg.guard.guard_lr_decay:g} (rollback {s.guard.rollbacks} of at most "
                                 f"{s.cfg.guard.guard_max_rollbacks})"))


def _restore_snapshot(s: Session) -> None:
    snap = s.guard.snapshot
    if snap is None:
        return
    s.network.load_state_dict(snap.network)
    s.optimizer.optimizer.load_state_dict(snap.optimizer)
    s.optimizer.optimizer.zero_grad(set_to_none=True)


# -------------------------------------------------------------------------------------- evaluate, sample


def _eval_mode(s: Session):
    @contextlib.contextmanager
    def mode():
        s.network.eval()
        s.optimizer.eval_mode()
        try:
            yield
        finally:
            s.network.train()
            s.optimizer.train_mode()

    return mode()


def _validate(s: Session) -> None:
    with _eval_mode(s), torch.no_grad(), s.parking.unparked():
        value = s.dist.average(validation_loss(s))
    s.emit(ProgressEvent("validation", step=s.step, total_steps=s.total_steps, epoch=s.sampler.epoch,
                         val_loss=value))


def _sample(s: Session, epoch: int | None = None) -> None:
    if not (s.prompts and s.sample_fn and s.dist.is_main):
        return
    with _eval_mode(s), torch.no_grad(), s.parking.unparked():
        paths = s.sample_fn(s.prompts, s.step, epoch if epoch is not None else s.sampler.epoch)
    s.emit(ProgressEvent("sample", step=s.step, total_steps=s.total_steps, paths=tuple(str(p) for p in paths)))


# -------------------------------------------------------------------------------------------------- saving


def _save(s: Session, stem: str, kind: str, keep: int | None, keep_state: int | None,
          state: bool | None = None) -> Path | None:
    """Write `<stem>.safetensors` (+ `<stem>-state/` when saving state); keep-last-N per kind."""
    if not s.dist.is_main:
        return None
    try:
        return _write(s, stem, kind, keep, keep_state, state)
    except WriteError as exc:
        raise WriteError(exc.path, f"{exc.reason}; {_what_is_kept(s)}") from exc


def _what_is_kept(s: Session) -> str:
    files = [p for kind, paths in s.saves.saved.items() if not kind.endswith("-state") for p in paths]
    states = [p for kind, paths in s.saves.saved.items() if kind.endswith("-state") for p in paths]
    kept = f"the last file written is {max(files, key=_mtime)}" if files else "no file of this run was written yet"
    if states:
        kept += f"; resume from {max(states, key=_mtime)}"
    return kept + " (free some space, or set save_every_n_steps and save_state, and run again)"


def _mtime(path: Path) -> float:
    return path.stat().st_mtime if path.exists() else 0.0


def _write(s: Session, stem: str, kind: str, keep: int | None, keep_state: int | None,
           state: bool | None) -> Path:
    with _eval_mode(s):
        dtype = SAVE_DTYPES.get(s.cfg.output.save_precision, torch.float32)
        tensors = s.network.file_tensors(dtype)
        metadata = build_metadata(s.cfg, model=s.model, dataset_meta=s.dataset_meta, runtime=_runtime(s),
                                  resolution=s.cfg.data.datasets[0].resolution, started_at=s.started_at,
                                  tensors=tensors)
        path = checkpoint.save_lora(s.output_dir / f"{stem}.safetensors", tensors, metadata)
        s.saves.add(kind, path, keep)
        written = [path]
        if state if state is not None else s.cfg.run.save_state:
            folder = _save_state(s, s.output_dir / f"{stem}-state")
            s.saves.add(f"{kind}-state", folder, keep_state)
            written.append(folder)
    s.emit(ProgressEvent("save", step=s.step, total_steps=s.total_steps, epoch=s.sampler.epoch,
                         paths=tuple(str(p) for p in written)))
    return path


def _save_state(s: Session, folder: Path) -> Path:
    tensors = s.network.file_tensors(torch.float32)
    state = checkpoint.TrainState(step=s.step, epoch=s.sampler.epoch, sampler=s.sampler.state().to_dict(),
                                  seed=s.seed, rollbacks=s.guard.rollbacks,
                                  shapes=checkpoint.network_shapes(tensors))
    return checkpoint.save_state(folder, state, tensors, s.optimizer.optimizer.state_dict(), s.scheduler.state_dict())


def _runtime(s: Session) -> dict[str, object]:
    dim = s.network.ranks()[0]
    return {"ss_session_id": s.session_id, "ss_steps": s.step, "ss_epoch": s.sampler.epoch - (s.sampler.position == 0),
            "ss_num_epochs": math.ceil(s.total_steps / max(1, s.sampler.batches_per_epoch)),
            "ss_max_train_steps": s.total_steps, "ss_optimizer": s.optimizer.ss_optimizer, "ss_seed": s.seed,
            "ss_network_dim": dim}


def _finish(s: Session, status: str) -> TrainResult:
    out = s.cfg.output
    keep_state = status == "stopped" or s.cfg.run.save_state or s.cfg.run.save_state_on_train_end
    final = _save(s, out.output_name, "final", None, None, state=keep_state and status != "diverged")
    report = _report(s, status, final)
    s.emit(ProgressEvent("stopped" if status != "finished" else "done", step=s.step, total_steps=s.total_steps,
                         paths=(str(final),) if final else (), message=report))
    files = [p for kind in s.saves.saved.values() for p in kind]
    return TrainResult(status, s.step, final, files, report)


def _report(s: Session, status: str, final: Path | None) -> str:
    what = {"finished": f"finished {s.step} steps", "stopped": f"stopped at step {s.step} (state saved, resume with "
            f"resume = '{s.output_dir / (s.cfg.output.output_name + '-state')}')",
            "diverged": f"stopped at step {s.step}: the loss diverged and rollbacks did not help; the file holds the "
            f"last good state (step {s.guard.snapshot.step if s.guard.snapshot else 0})"}[status]
    streak, guard = s.guard.unconfirmed_steps, s.cfg.guard
    if status == "finished" and streak:
        what += (f" (warning: the loss of the last {streak} steps stayed above {guard.guard_spike_factor:g} x the "
                 f"baseline, fewer than guard_patience = {guard.guard_patience}; look at the samples before using "
                 "the file)")
    return f"{what}. Output: {final}. {s.guard.report()}"


def device_notes(s: Session) -> list[str]:
    """What a GPU setting means on the device the run got."""
    if s.family.device.type != "cpu":
        return []
    notes = []
    if s.cfg.run.mixed_precision != "no":
        notes.append(f"mixed_precision = {s.cfg.run.mixed_precision}: training in float32 on the CPU (mixed "
                     "precision is for GPUs; on CPUs without AVX-512 bf16 attention does not run)")
    if s.optimizer.entry.bitsandbytes:
        notes.append(f"{s.optimizer.entry.name} on the CPU: bitsandbytes' CPU kernels run it; its 8-bit states "
                     "are meant to save GPU memory")
    return notes


def _emit_start(s: Session) -> None:
    from lib_lora.train.network import summarize

    counts = ", ".join(f"{k} {v}" for k, v in summarize(s.network).items())
    notes = list(s.cfg.notes) + list(s.dataset.warnings) + list(s.optimizer.notes) + device_notes(s)
    if s.parking is not None and s.parking.describe():
        notes.append(s.parking.describe())
    config = json.dumps(dataclasses.asdict(s.cfg), default=str, indent=1)
    s.emit(ProgressEvent("start", step=s.step, total_steps=s.total_steps, epoch=s.sampler.epoch,
                         message=f"training {counts} modules ({s.cfg.network.algo}) on {s.dataset.num_train_images} "
                                 f"images, {s.total_steps} steps, seed {s.seed}",
                         data={"notes": notes, "config": config}))
