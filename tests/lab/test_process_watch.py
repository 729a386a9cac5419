"""How the lab tells a running agent from one that exited: an agent starts as `nsenter ... --
python -m flannel_bpf attach`, and while nsenter execs Python its /proc/PID/cmdline reads
empty. Taken for "not ours", that moment made `lab up` report "the agent exited before writing
subnet.env" for an agent that was only starting (its log held nothing but its command line)."""
import signal
import subprocess
import sys
import time

import pytest

from flannel_bpf.lab.orchestrator import exit_description, process_running
from flannel_bpf.lab.run import nsenter_argv
from flannel_bpf.lab.topology import temporary_lab

pytestmark = pytest.mark.usefixtures("require_root")

MARKER = "fbpf-process-watch-marker"


def _start(netns: str, code: str) -> subprocess.Popen:
    return subprocess.Popen(nsenter_argv(netns, [sys.executable, "-c", code, MARKER]))


def test_an_agent_in_the_middle_of_its_exec_counts_as_running():
    with temporary_lab(prefix="pw", hosts=1) as lab:
        netns = lab.host(1).netns
        misses = 0
        for _ in range(15):  # without the exec rule, ~half of these runs saw a false "exited"
            process = _start(netns, "import time; time.sleep(0.3)")
            try:
                start = time.monotonic()
                while time.monotonic() - start < 0.2:
                    misses += not process_running(process.pid, MARKER)
            finally:
                process.wait(10)
        assert misses == 0
        assert not process_running(process.pid, MARKER)  # and once it exited, it is gone


def test_how_a_child_ended_is_told():
    with temporary_lab(prefix="pw", hosts=1) as lab:
        netns = lab.host(1).netns
        failed = _start(netns, "import sys; sys.exit(3)")
        killed = _start(netns, "import time; time.sleep(30)")
        time.sleep(0.5)
        killed.send_signal(signal.SIGKILL)
        for process in (failed, killed):
            deadline = time.monotonic() + 10
            while process_running(process.pid, MARKER) and time.monotonic() < deadline:
                time.sleep(0.02)
        assert exit_description(failed.pid) == "exit code 3"
        assert exit_description(killed.pid).startswith("killed by SIGKILL")
        assert "unknown" in exit_description(1)
