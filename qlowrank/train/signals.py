"""SIGTERM / SIGINT during training: finish the micro-batch in flight, checkpoint the last completed step, exit 143 / 130.

Schedulers (SLURM, Kubernetes, `timeout`) stop a job with SIGTERM; a person presses Ctrl-C
(SIGINT). While `StopSignals` is active both only *record* the request: the handler never
raises into the middle of an optimizer update or a checkpoint write (an exception there
could leave half-updated weights or a half-built checkpoint). The trainer polls
`requested` between micro-batches and between steps, rolls back to the last completed
step, writes its checkpoint and raises `TrainingInterrupted`. Further signals while that
checkpoint is written are noted and otherwise ignored, so they cannot corrupt it.
"""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Callable
from types import FrameType

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class TrainingInterrupted(KeyboardInterrupt):
    """Training stopped on a signal after checkpointing the last completed step.

    A KeyboardInterrupt, so `except KeyboardInterrupt` catches SIGTERM stops too.
    `exit_code` is the shell convention 128 + signal number: 130 for SIGINT, 143 for SIGTERM.
    """

    def __init__(self, signum: int, step: int, checkpoint) -> None:
        self.signum, self.step, self.checkpoint = signum, step, checkpoint
        self.exit_code = 128 + signum
        super().__init__(f"{signal.Signals(signum).name}: stopped after step {step}, checkpoint {checkpoint}")


class StopRequested(Exception):
    """A stop signal was seen at a safe point (the trainer rolls back and raises TrainingInterrupted)."""


class StopSignals:
    """While active (a context manager), SIGINT and SIGTERM set `requested` instead of stopping.

    Installed only in the main thread (Python delivers signals there), and a signal the
    parent process set to be ignored stays ignored (`nohup`, background jobs).
    """

    def __init__(self) -> None:
        self.requested: int | None = None   # the first signal received
        self.count = 0                      # how many arrived
        self.agreed = 0                     # the signal all ranks agreed to stop on (poll)
        self._previous: dict[int, object] = {}

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for signum in STOP_SIGNALS:
                previous = signal.getsignal(signum)
                if previous is not signal.SIG_IGN:
                    self._previous[signum] = previous
                    signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)
        self._previous.clear()

    def poll(self, ranks: int, agree: Callable[[float], float] | None = None) -> None:
        """Raise StopRequested at a safe point once SIGTERM / SIGINT has arrived.

        On several processes the ranks must stop at the same step (the checkpoint and every
        step synchronize them), and a launcher's signal reaches them at slightly different
        moments: there the request is only acted on where all ranks agree (`agree`: the
        largest value over the ranks, one small all-reduce between steps), and stops on
        whichever rank saw it first.
        """
        local = self.requested or 0
        if ranks > 1:
            if agree is None:
                return
            local = agree(local)
        if local:
            self.agreed = int(local)
            raise StopRequested

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.count += 1
        name = signal.Signals(signum).name
        if self.requested is None:
            self.requested = signum
            message = (f"\nqlowrank: {name} received: finishing the current micro-batch, then writing a checkpoint "
                       "of the last completed step\n")
        else:
            message = f"\nqlowrank: {name} received again: already stopping, the checkpoint is being written\n"
        os.write(2, message.encode())   # print() is not safe here: the handler may run inside another print
