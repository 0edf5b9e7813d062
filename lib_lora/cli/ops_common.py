"""What the LoRA tool commands share: rank options, a tqdm progress bar, Ctrl-C as a clean cancel."""
from __future__ import annotations

import argparse
from contextlib import contextmanager

DTYPE_CHOICES = ("fp16", "bf16", "fp32")


def add_rank_arguments(parser: argparse.ArgumentParser, rank_help: str, rank_flag: str = "--rank",
                       conv_flag: str = "--conv-rank") -> None:
    parser.add_argument(rank_flag, type=int, default=None, help=rank_help)
    parser.add_argument(conv_flag, type=int, default=None,
                        help="rank of 3x3 convolutions (LoCon), if different (default: the same)")
    parser.add_argument("--dynamic", choices=("sv_ratio", "sv_fro", "sv_cumulative"), default=None,
                        help="sd-scripts' dynamic rank: keep singular values above max/PARAM (sv_ratio), a Frobenius "
                             "fraction PARAM (sv_fro) or a fraction PARAM of their sum (sv_cumulative); the rank "
                             "options are then the caps")
    parser.add_argument("--param", type=float, default=None, help="the --dynamic method's parameter")


def rank_rule(rank: int | None, conv_rank: int | None, args: argparse.Namespace, default_rank: int | None = None):
    """A RankRule from the options, or None when no rank was asked for and there is no default."""
    from lib_lora.ops import RankRule

    if args.dynamic is None:
        rank = rank if rank is not None else default_rank
        return None if rank is None else RankRule(rank, conv_rank)
    return RankRule(rank, conv_rank, args.dynamic, args.param)  # rank None: no cap beyond what the data has


def add_common_arguments(parser: argparse.ArgumentParser, dtype_help: str) -> None:
    parser.add_argument("--out", required=True, help="output .safetensors file")
    parser.add_argument("--dtype", choices=DTYPE_CHOICES, default=None, help=dtype_help)
    parser.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda, cuda:N")
    parser.add_argument("--force", action="store_true", help="replace the output if it exists")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


@contextmanager
def progress_bar(enabled: bool, unit: str):
    """Yields (progress, should_stop) for an ops call: a tqdm bar, and Ctrl-C/SIGTERM as a clean cancel."""
    from tqdm import tqdm

    bar = None
    stop = _StopOnSignal()
    uninstall = stop.install()

    def progress(done: int, total: int, message: str) -> None:
        nonlocal bar
        if not enabled:
            return
        if bar is None:
            bar = tqdm(total=total, unit=unit, dynamic_ncols=True, leave=False)
        bar.n = done
        bar.set_postfix_str(message[-60:], refresh=False)
        bar.refresh()

    try:
        yield progress, stop
    finally:
        uninstall()
        if bar is not None:
            bar.close()


class _StopOnSignal:
    """First Ctrl-C (SIGINT) or SIGTERM: cancel at the next step (nothing is written); a second Ctrl-C: now."""

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
            print("\n[stop] cancelling at the next step; nothing will be written", flush=True)

        previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
        return lambda: [signal.signal(sig, h) for sig, h in previous.items()]
