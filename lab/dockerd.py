"""A real dockerd in a lab host's namespace, run as a Docker host on flannel runs it: options from
`flannel-bpf docker-opts` (--bip, --ip-masq, --mtu), bridge docker0 in the host namespace, and
everything of its own (data-root, exec-root, pidfile, socket, daemon.json, key) below one
directory. Containers come from an image imported from Debian's busybox-static: nothing is pulled.

    daemon = Dockerd(netns, base_dir, options)   # options: e.g. lab.units.run_drop_in(...)
    daemon.start()
    daemon.import_busybox()
    daemon.run("c1", "sleep", "600")
    ...
    daemon.stop()   # containers, the daemon and its containerd, their mounts and files

stop() also cleans up after a daemon that died: it finds the processes and mounts by directory.
"""
from __future__ import annotations

import io
import json
import logging
import os
import signal
import subprocess
import tarfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from flannel_bpf.lab.run import nsenter_argv

log = logging.getLogger(__name__)

DOCKERD = "/usr/sbin/dockerd"
DOCKER = "/usr/bin/docker"       # Debian's client, whatever else PATH holds
BUSYBOX = "/bin/busybox"         # Debian's busybox-static
IMAGE = "fbpf-busybox:1"
APPLETS = ("sh", "ping", "nc", "ip", "sleep", "cat", "echo", "netstat")
START_TIMEOUT = 60.0
STOP_TIMEOUT = 20.0
# Made by every dockerd and containerd whatever their options; removed again when left empty.
SHARED_DIRS = (Path("/run/docker/plugins"), Path("/run/docker"), Path("/run/containerd/s"), Path("/run/containerd"))


class DockerdError(RuntimeError):
    """dockerd did not start or a docker command failed; the message says why."""


def busybox_rootfs() -> bytes:
    """A tar of a root file system holding busybox and the applets the tests use."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        tar.add(BUSYBOX, arcname="bin/busybox")
        for applet in APPLETS:
            info = tarfile.TarInfo(f"bin/{applet}")
            info.type, info.linkname = tarfile.SYMTYPE, "busybox"
            tar.addfile(info)
        for directory in ("tmp", "proc", "sys", "dev", "etc"):
            info = tarfile.TarInfo(directory)
            info.type, info.mode = tarfile.DIRTYPE, 0o755
            tar.addfile(info)
    return buffer.getvalue()


@dataclass
class Dockerd:
    netns: str
    base: Path
    options: list[str] = field(default_factory=list)
    process: subprocess.Popen | None = None

    @property
    def socket(self) -> Path:
        return self.base / "docker.sock"

    @property
    def log_path(self) -> Path:
        return self.base / "dockerd.log"

    def argv(self) -> list[str]:
        return [DOCKERD, "--data-root", str(self.base / "data"), "--exec-root", str(self.base / "exec"),
                "--pidfile", str(self.base / "docker.pid"), "-H", f"unix://{self.socket}",
                "--config-file", str(self.base / "daemon.json"),
                "--storage-driver", "vfs", "--iptables=true", *self.options]

    def start(self, timeout: float = START_TIMEOUT) -> None:
        self.base.mkdir(parents=True, exist_ok=True)
        # Not the machine's /etc/docker/daemon.json, nor its /etc/docker/key.json.
        (self.base / "daemon.json").write_text(json.dumps({"deprecated-key-path": str(self.base / "key.json")}))
        with open(self.log_path, "ab") as log_file:
            self.process = subprocess.Popen(nsenter_argv(self.netns, self.argv()), stdin=subprocess.DEVNULL,
                                            stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + timeout
        while self.docker("version", check=False, timeout=10).returncode != 0:
            if self.process.poll() is not None:
                raise DockerdError(f"dockerd in {self.netns} exited ({self.process.returncode}):\n{self.log_tail()}")
            if time.monotonic() > deadline:
                raise DockerdError(f"dockerd in {self.netns} not answering after {timeout:.0f} s:\n{self.log_tail()}")
            time.sleep(0.2)

    def log_tail(self, lines: int = 15) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def docker(self, *args: str, check: bool = True, timeout: float = 60.0,
               stdin: bytes | None = None) -> subprocess.CompletedProcess:
        """The docker client on this daemon's socket (it needs no namespace: the socket is a file)."""
        done = subprocess.run([DOCKER, "-H", f"unix://{self.socket}", *args], input=stdin,
                              capture_output=True, timeout=timeout)
        if check and done.returncode != 0:
            raise DockerdError(f"docker {' '.join(args)}: {done.stderr.decode(errors='replace').strip()}")
        return done

    def import_busybox(self) -> str:
        self.docker("import", "-", IMAGE, stdin=busybox_rootfs())
        return IMAGE

    def run(self, name: str, *command: str) -> None:
        self.docker("run", "-d", "--name", name, IMAGE, *command)

    def exec(self, name: str, *command: str, timeout: float = 60.0) -> subprocess.CompletedProcess:
        return self.docker("exec", name, *command, check=False, timeout=timeout)

    def inspect(self, name: str, template: str) -> str:
        return self.docker("inspect", "-f", template, name).stdout.decode().strip()

    def container_ip(self, name: str) -> str:
        return self.inspect(name, "{{.NetworkSettings.IPAddress}}")

    def host_veth(self, name: str) -> str:
        """The container's veth in the host namespace: the peer of its eth0."""
        peer = self.exec(name, "cat", "/sys/class/net/eth0/iflink").stdout.decode().strip()
        out = subprocess.run(nsenter_argv(self.netns, ["ip", "-o", "link", "show"]), capture_output=True,
                             text=True, timeout=10, check=True).stdout
        for line in out.splitlines():
            index, name_field = line.split(":", 2)[:2]
            if index.strip() == peer:
                return name_field.strip().split("@")[0]
        raise DockerdError(f"no host veth with index {peer} for container {name}")

    # ------------------------------------------------------------------------------------ stop

    def stop(self, timeout: float = STOP_TIMEOUT) -> None:
        """Remove the containers, stop the daemon (and its containerd and shims), unmount what
        they mounted below the base directory and remove it. Idempotent, and works after a crash."""
        if self.socket.exists():
            ids = self.docker("ps", "-aq", check=False, timeout=30).stdout.decode().split()
            if ids:
                self.docker("rm", "-f", *ids, check=False, timeout=60)
        stop_processes_below(self.base, timeout)
        kill_containers_below(self.base)  # those a dead daemon left running
        unmount_below(self.base)
        subprocess.run(["rm", "-rf", "--one-file-system", str(self.base)], capture_output=True, timeout=60)
        if self.process is not None:
            self.process.wait(timeout=5)  # reaped; it ended above
        for directory in SHARED_DIRS:
            try:
                directory.rmdir()
            except OSError:
                pass  # not empty (someone else's) or gone


def _pids_below(base: Path) -> list[int]:
    marker = str(base).encode()
    found = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit() and int(proc.name) != os.getpid():
            try:
                if marker in (proc / "cmdline").read_bytes():
                    found.append(int(proc.name))
            except OSError:
                pass
    return found


def stop_processes_below(base: Path, timeout: float = STOP_TIMEOUT) -> None:
    """SIGTERM every process whose command line names `base` (dockerd, its containerd, shims),
    SIGKILL what is left after `timeout` s."""
    for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 5.0)):
        for pid in _pids_below(base):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + wait
        while _pids_below(base) and time.monotonic() < deadline:
            time.sleep(0.1)
    if left := _pids_below(base):
        log.warning("processes %s below %s would not end", left, base)


def container_pids(container_ids: list[str]) -> list[int]:
    """Processes in the cgroups of these containers."""
    found = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                cgroups = (proc / "cgroup").read_text()
            except OSError:
                continue
            if any(f"/docker/{cid}" in cgroups for cid in container_ids):
                found.append(int(proc.name))
    return found


def kill_containers_below(base: Path, timeout: float = 5.0) -> None:
    """SIGKILL the processes of the containers in `base`'s data-root and wait until they are gone."""
    containers = base / "data" / "containers"
    ids = [entry.name for entry in containers.iterdir()] if containers.is_dir() else []
    deadline = time.monotonic() + timeout
    while ids and (pids := container_pids(ids)) and time.monotonic() < deadline:
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.1)


def stop_all_below(directory: Path) -> None:
    """Stop every daemon whose files lie below `directory` (a lab's run directory), alive or not."""
    for log_file in sorted(directory.glob("**/dockerd.log")):
        Dockerd(netns="", base=log_file.parent).stop()


def mounts_below(base: Path) -> list[str]:
    """Mount points below `base` in this mount namespace, deepest first."""
    prefix = str(base).rstrip("/") + "/"
    points = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        point = line.split()[4].replace("\\040", " ")
        if point.startswith(prefix) or point == str(base):
            points.append(point)
    return sorted(points, key=len, reverse=True)


def unmount_below(base: Path) -> None:
    for point in mounts_below(base):
        subprocess.run(["umount", "-l", point], capture_output=True, timeout=10)

