"""The last module the fork server of :class:`~lightning_etap.groundtruth.ProcessPoolExecutor` preloads.

The fork server is started with Ctrl-C ignored, so that a terminal's SIGINT
cannot interrupt it while it imports its preload modules (torch and lightning
take seconds); this module, imported after them, puts Python's default
handler back, so that the processes the fork server forks later, for this
library or for any other pool of the same program, handle Ctrl-C as usual.
It acts only inside a fork server that was started that way.
"""

from __future__ import annotations

import signal
import sys

if "multiprocessing.forkserver" in sys.modules and signal.getsignal(signal.SIGINT) is signal.SIG_IGN \
        and sys.argv[:1] == ["-c"]:
    signal.signal(signal.SIGINT, signal.default_int_handler)
