"""A real supervisord (Debian's supervisor) in a lab host's namespace, running the shipped
program (deploy/supervisor/flannel-bpf.ini and its wrapper) with its paths moved below one
directory: the wrapper, the agent's environment file and its log file.

    sv = Supervisord(netns, base_dir)
    sv.install_program(settings={"FLANNELD_ETCD_ENDPOINTS": ..., ...})
    sv.start()
    sv.ctl("status", "flannel-bpf")
    sv.stop()
"""
from __future__ import annotations

import importlib.resources
import os
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from flannel_bpf.lab.run import nsenter_argv

SUPERVISORD = "/usr/bin/supervisord"
SUPERVISORCTL = "/usr/bin/supervisorctl"
PROGRAM = "flannel-bpf"
# The shipped program's paths, and where each moves below the base directory.
SHIPPED_PATHS = {"/usr/local/lib/flannel-bpf/flannel-bpf-wrapper.sh": "flannel-bpf-wrapper.sh",
                 "/etc/flannel-bpf/flannel-bpf.env": "flannel-bpf.env",
                 "/var/log/flannel-bpf.log": "flannel-bpf.log"}
START_TIMEOUT = 20.0


class SupervisorError(RuntimeError):
    pass


def shipped(name: str) -> str:
    return (importlib.resources.files("flannel_bpf.deploy") / "supervisor" / name).read_text()


@dataclass
class Supervisord:
    netns: str
    base: Path
    process: subprocess.Popen | None = None

    @property
    def config(self) -> Path:
        return self.base / "supervisord.conf"

    @property
    def program_log(self) -> Path:
        return self.base / SHIPPED_PATHS["/var/log/flannel-bpf.log"]

    @property
    def log_path(self) -> Path:
        return self.base / "supervisord.log"

    def install_program(self, settings: dict[str, str]) -> None:
        """The shipped .ini (its paths moved below base) and wrapper, and an environment file
        with `settings`; a supervisord.conf that includes the program."""
        (self.base / "conf.d").mkdir(parents=True, exist_ok=True)
        lines = shipped("flannel-bpf.ini").splitlines(keepends=True)
        settings_lines = [i for i, line in enumerate(lines) if not line.lstrip().startswith(";")]
        for old, new in SHIPPED_PATHS.items():
            where = [i for i in settings_lines if old in lines[i]]
            if len(where) != 1:
                raise SupervisorError(f"the shipped flannel-bpf.ini no longer names {old} once")
            lines[where[0]] = lines[where[0]].replace(old, str(self.base / new))
        (self.base / "conf.d" / "flannel-bpf.conf").write_text("".join(lines))
        wrapper = self.base / SHIPPED_PATHS["/usr/local/lib/flannel-bpf/flannel-bpf-wrapper.sh"]
        wrapper.write_text(shipped("flannel-bpf-wrapper.sh"))
        wrapper.chmod(0o755)
        (self.base / SHIPPED_PATHS["/etc/flannel-bpf/flannel-bpf.env"]).write_text(
            "".join(f"{key}={value}\n" for key, value in settings.items()))
        self.config.write_text(
            "[unix_http_server]\nfile=%(here)s/supervisor.sock\n\n"
            "[supervisord]\nlogfile=%(here)s/supervisord.log\npidfile=%(here)s/supervisord.pid\n"
            "childlogdir=%(here)s\nnodaemon=true\n\n"
            "[rpcinterface:supervisor]\nsupervisor.rpcinterface_factory = supervisor.rpcinterface:make_main_rpcinterface\n\n"
            "[supervisorctl]\nserverurl=unix://%(here)s/supervisor.sock\n\n"
            "[include]\nfiles = conf.d/*.conf\n")

    def start(self, timeout: float = START_TIMEOUT) -> None:
        # FLANNELD_* of the caller would change the agent behind the environment file's back.
        env = {k: v for k, v in os.environ.items() if not k.startswith("FLANNELD_")}
        with open(self.base / "supervisord.out", "ab") as out:
            self.process = subprocess.Popen(nsenter_argv(self.netns, [SUPERVISORD, "-n", "-c", str(self.config)]),
                                            stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                            env=env, start_new_session=True)
        deadline = time.monotonic() + timeout
        while self.ctl("pid", check=False).returncode != 0:
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise SupervisorError(f"supervisord did not come up: {self.log_tail()}")
            time.sleep(0.2)

    def ctl(self, *args: str, check: bool = True, timeout: float = 90.0) -> subprocess.CompletedProcess:
        done = subprocess.run([SUPERVISORCTL, "-c", str(self.config), *args], capture_output=True,
                              text=True, timeout=timeout)
        if check and done.returncode != 0:
            raise SupervisorError(f"supervisorctl {' '.join(args)}: {done.stdout.strip()} {done.stderr.strip()}")
        return done

    def status(self) -> str:
        """The program's state word: STARTING, RUNNING, STOPPED, ..."""
        words = self.ctl("status", PROGRAM, check=False).stdout.split()
        return words[1] if len(words) > 1 else ""

    def program_pid(self) -> int:
        return int(self.ctl("pid", PROGRAM).stdout.strip())

    def log_tail(self, lines: int = 15) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def stop(self, timeout: float = 40.0) -> None:
        """supervisord stops its program (stopsignal, stopwaitsecs) and exits on SIGTERM."""
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(10)
