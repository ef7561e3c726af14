"""The train stage's launcher: a torchrun child never outlives the process that launched it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
from _procs import alive

PARENT = """
import subprocess, sys, time
from kubedistill.procs import die_with_parent
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"],
                         preexec_fn=die_with_parent)
print(child.pid, flush=True)
time.sleep(120)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux")
def test_child_is_terminated_when_the_launcher_is_killed():
    parent = subprocess.Popen([sys.executable, "-c", PARENT], stdout=subprocess.PIPE, text=True)
    child = int(parent.stdout.readline())
    os.kill(child, 0)  # alive
    parent.send_signal(signal.SIGKILL)  # no cleanup code can run in the parent
    parent.wait()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            os.waitpid(child, os.WNOHANG)  # not our child: raises once it is gone
        except ChildProcessError:
            pass
        if not alive(child):
            return
        time.sleep(0.1)
    os.kill(child, signal.SIGKILL)
    pytest.fail("the child outlived its killed launcher")


