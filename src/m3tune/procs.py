"""Child processes that die with their parent.

Linux's PR_SET_PDEATHSIG: the kernel sends the child a signal when the thread that started it exits, however it
exits (SIGKILL and the out-of-memory killer included), where no handler of the parent could run. The request
survives exec. m3tune uses it for training's process tree: torchrun puts each worker in a session of its own, so
killing a step's process group missed them, and a killed `m3tune step train` left its workers training into the
run root.
"""

from __future__ import annotations

import functools
import os
import signal
import sys
from collections.abc import Callable

PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


@functools.cache
def _prctl():
    import ctypes

    return ctypes.CDLL(None, use_errno=True).prctl


def die_with_parent(sig: int = signal.SIGTERM, parent: int | None = None) -> bool:
    """Ask the kernel to send SIG to this process when its parent exits. False where the platform has no such
    request (anything but Linux). PARENT: the pid the parent had (default: the current one); if we have already
    been re-parented (it died before the request), SIG is sent to ourselves at once."""
    if not sys.platform.startswith("linux"):
        return False
    import ctypes

    parent = os.getppid() if parent is None else parent
    if _prctl()(PR_SET_PDEATHSIG, int(sig), 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
    if os.getppid() != parent:
        os.kill(os.getpid(), sig)
    return True


def dies_with_this_process(sig: int = signal.SIGTERM) -> Callable[[], None] | None:
    """A `preexec_fn` for subprocess that makes the child die with this process, or None off Linux. libc is
    resolved here, before the fork: loading a library in the forked child of a threaded process (the run lock's
    heartbeat is a thread) could deadlock on a lock another thread held at the fork."""
    if not sys.platform.startswith("linux"):
        return None
    _prctl()
    parent = os.getpid()
    return lambda: die_with_parent(sig, parent)
