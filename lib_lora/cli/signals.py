"""Ctrl-C and SIGTERM for long CLI jobs: the first asks the job to stop at its next step; a second Ctrl-C
interrupts."""
from __future__ import annotations


class StopOnSignal:
    """Callable `should_stop` for the engine; `install()` sets the handlers and returns a function that restores
    the previous ones. `message` is printed once, at the first signal (what the job will do now)."""

    def __init__(self, message: str):
        self.message = message
        self.requested = False

    def __call__(self) -> bool:
        return self.requested

    def install(self):
        import signal

        def handler(signum, frame):
            if self.requested and signum == signal.SIGINT:
                raise KeyboardInterrupt
            self.requested = True
            print(f"\n[stop] {self.message}", flush=True)

        previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
        return lambda: [signal.signal(sig, h) for sig, h in previous.items()]
