"""`python -m lib_lora train --config run.toml [--dataset_config ds.toml] [--key value ...]`

Options use sd-scripts' names, in the TOML or as overrides (`--network_dim 8`, `--learning_rate=1e-4`,
`--gradient_checkpointing`). Runs under `accelerate launch -m lib_lora train ...` for several processes.
Ctrl-C stops after the current step and saves the LoRA and a resumable state.
"""
from __future__ import annotations

import argparse
import os

from lib_lora.train.events import ProgressEvent


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="run TOML with sd-scripts option names")
    parser.add_argument("--dataset_config", help="dataset TOML ([general] / [[datasets]] / [[datasets.subsets]])")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar (log lines only)")
    parser.epilog = ("Any other --option value (sd-scripts' names) overrides the TOML, e.g. "
                     "--max_train_steps 10 --network_args conv_dim=4 conv_alpha=1 --flip_aug")


TAKES_OVERRIDES = True  # the front door hands every option it does not know to `run` as `args.overrides`


class ConsoleProgress:
    """tqdm bar for steps plus log lines for everything else."""

    def __init__(self, bar: bool):
        self.bar_enabled, self.bar = bar, None

    def __call__(self, e: ProgressEvent) -> None:
        if e.kind == "step":
            if self.bar_enabled:
                self._bar(e)
            elif e.step % 10 == 0 or e.step == e.total_steps:
                print(f"step {e.step}/{e.total_steps} loss {e.loss:.4f} avg {e.smoothed or 0:.4f}", flush=True)
            return
        if self.bar is not None and e.kind in ("done", "stopped"):
            self.bar.close()
        text = e.message or ", ".join(e.paths)
        if e.kind == "start" and e.data.get("notes"):
            text += "\n  " + "\n  ".join(e.data["notes"])
        if e.kind == "cache" and (e.data.get("done") not in (e.data.get("total"),)):
            return
        line = f"[{e.kind}] {text}" if text else f"[{e.kind}] step {e.step}"
        (self.bar.write if self.bar is not None else print)(line)

    def _bar(self, e: ProgressEvent) -> None:
        if self.bar is None:
            from tqdm import tqdm

            self.bar = tqdm(total=e.total_steps, initial=e.step - 1, unit="step", dynamic_ncols=True)
        self.bar.update(1)
        self.bar.set_postfix(loss=f"{e.loss:.4f}", avg=f"{e.smoothed or 0:.4f}")


class StopOnSignal:
    """First Ctrl-C (SIGINT) or SIGTERM: stop after the current step and save; a second Ctrl-C: interrupt now."""

    def __init__(self):
        self.requested = False

    def __call__(self) -> bool:
        return self.requested

    def install(self):
        import signal

        def handler(signum, frame):
            if self.requested and signum == signal.SIGINT:
                raise KeyboardInterrupt
            self.requested = True
            print("\n[stop] finishing the current step, then saving (Ctrl-C again to interrupt now)", flush=True)

        previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
        return lambda: [signal.signal(sig, h) for sig, h in previous.items()]


def run(args: argparse.Namespace) -> int:
    from lib_lora.train.run import train
    from lib_lora.train.toml_config import load_config

    cfg = load_config(args.config, args.dataset_config, args.overrides)
    if cfg.data.debug_dataset:  # sd-scripts: show the dataset, then exit without training
        from lib_lora.train.data.summary import debug_report

        seed = cfg.run.seed if cfg.run.seed is not None else 0
        print(debug_report(cfg.data, seed, prior_loss_weight=cfg.loss.prior_loss_weight))
        return 0
    stop = StopOnSignal()
    uninstall = stop.install()
    main_process = int(os.environ.get("RANK", "0")) == 0  # under a launcher only rank 0 talks
    try:
        listeners = [ConsoleProgress(not args.no_progress)] if main_process else []
        result = train(cfg, listeners=listeners, should_stop=stop)
    finally:
        uninstall()
    if main_process:
        print(result.report)
    return {"finished": 0, "stopped": 130, "diverged": 3}[result.status]
