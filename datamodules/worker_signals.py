"""DataLoader workers leave the preemption signals to the main process.

SLURM signals every process of a job step (``--signal=USR1@90``, and SIGTERM at the time limit or on ``scancel``),
and ``kill -TERM -PGID`` reaches the whole process group. A DataLoader worker that dies of such a signal (torch
re-raises SIGTERM in its workers; a forked worker inherits the main process's requeue handler) fails the main
process's next batch with "DataLoader worker (pid ...) is killed by signal", before it can save.

In a worker, the requeue signals (SIGUSR1, SIGUSR2) are ignored. SIGTERM cannot simply be ignored: the main process
(torch's shutdown of stuck workers, multiprocessing's exit handler) ends workers with it and then waits for them. So
SIGTERM is blocked and a thread takes it with ``sigwaitinfo``: sent by the worker's parent, the worker exits at once
(as torch's worker handler does then); sent by anyone else (slurmstepd, a shell's ``kill``), it is dropped. Written
by hand because neither torch nor Lightning keeps a job-wide signal from killing workers. Where ``sigwaitinfo`` is
missing (macOS), SIGTERM keeps torch's handling.
"""

from __future__ import annotations

import os
import signal
import threading

__all__ = ["REQUEUE_SIGNALS", "leave_preemption_signals_to_the_main_process"]

REQUEUE_SIGNALS = (signal.SIGUSR1, signal.SIGUSR2)


def _take_sigterm(parent: int) -> None:
    while True:
        info = signal.sigwaitinfo({signal.SIGTERM})
        if info.si_pid == parent:
            os._exit(0)  # NOTE: what torch's own worker SIGTERM handler does when the parent sent it


def leave_preemption_signals_to_the_main_process() -> None:
    """Call in a DataLoader worker (``worker_init_fn``); see the module docstring."""
    for signum in REQUEUE_SIGNALS:
        signal.signal(signum, signal.SIG_IGN)
    if not hasattr(signal, "sigwaitinfo"):
        return
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
    threading.Thread(target=_take_sigterm, args=(os.getppid(),), name="sigterm-from-parent", daemon=True).start()
