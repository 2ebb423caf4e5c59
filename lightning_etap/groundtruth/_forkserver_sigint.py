"""The last module the fork server of :class:`~lightning_etap.groundtruth.ProcessPoolExecutor` preloads.

The fork server is started with Ctrl-C ignored, so that a terminal's SIGINT
cannot interrupt it while it imports its preload modules (torch and lightning
take seconds); this module, imported after them, puts Python's default
handler back, so that the processes the fork server forks later, for this
library or for any other pool of the same program, handle Ctrl-C as usual.

It also quiets one traceback of a process the fork server forks: a worker
that starts after its pool was shut down (Ctrl-C while the pool starts its
workers) finds the pool's lock already removed, and Python printed the
``FileNotFoundError`` of rebuilding that lock. Such a worker has nothing to
do and exits as before, silently; every other error is printed as usual.
It acts only inside a fork server that was started that way.
"""

from __future__ import annotations

import os
import signal
import sys
import traceback


def _quiet_worker_of_a_closed_pool(previous):
    lock_module = os.path.join("multiprocessing", "synchronize.py")

    def hook(exc_type, exc, tb):
        if issubclass(exc_type, FileNotFoundError):
            frames = traceback.extract_tb(tb)
            if frames and frames[-1].name == "__setstate__" and frames[-1].filename.endswith(lock_module):
                return  # the pool's lock (a named semaphore) was removed before this worker could open it
        previous(exc_type, exc, tb)

    return hook


if "multiprocessing.forkserver" in sys.modules and signal.getsignal(signal.SIGINT) is signal.SIG_IGN \
        and sys.argv[:1] == ["-c"]:
    signal.signal(signal.SIGINT, signal.default_int_handler)
    sys.excepthook = _quiet_worker_of_a_closed_pool(sys.excepthook)
