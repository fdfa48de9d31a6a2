"""Child processes that die with their parent.

Linux's PR_SET_PDEATHSIG: the kernel sends the child a signal when the thread that started it exits, however it
exits (SIGKILL and the out-of-memory killer included), where no handler of the parent could run. m3tune uses it
for training's process tree: torchrun puts each worker in a session of its own, so killing a step's process
group missed them, and a killed `m3tune step train` left its workers training into the run root.
"""

from __future__ import annotations

import os
import signal
import sys

PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def die_with_parent(sig: int = signal.SIGTERM) -> bool:
    """Ask the kernel to send SIG to this process when its parent exits. False where the platform has no such
    request (anything but Linux): there the process tree's own handling is all there is. If the parent has
    already gone (it died between starting us and this call), SIG is sent to ourselves at once."""
    if not sys.platform.startswith("linux"):
        return False
    import ctypes

    parent = os.getppid()
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
    if os.getppid() != parent:  # orphaned before the request took effect: re-parented already
        os.kill(os.getpid(), sig)
    return True
