"""Real etcd servers for tests and the lab: one member or a cluster, optionally inside network namespaces.

Each member runs /usr/bin/etcd with its own data directory, so a member can be stopped, killed
and restarted with its data intact. A member in a network namespace is started through
`nsenter --net=/run/netns/NAME` (which only switches the network namespace; `ip netns exec` would
remount /sys). Health is checked over the client URL's `/health` endpoint, from inside the
member's namespace.
"""
from __future__ import annotations

import contextlib
import ctypes
import json
import logging
import os
import shutil
import signal
import socket
import ssl
import subprocess
import tempfile
import threading
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger(__name__)

ETCD_BINARY = "/usr/bin/etcd"
NETNS_DIR = Path("/run/netns")
_CLONE_NEWNET = 0x40000000


class EtcdLaunchError(RuntimeError):
    """etcd did not start or did not become healthy; the message quotes the tail of its log."""


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port on `host` that is free right now (the kernel's pick)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def run_in_netns(netns: str | None, fn, *args):
    """Call fn(*args) in a thread that has joined network namespace `netns` (None: this one)."""
    if netns is None:
        return fn(*args)
    outcome: dict = {}

    def target():
        try:
            with open(NETNS_DIR / netns) as ns_file:
                libc = ctypes.CDLL(None, use_errno=True)
                if libc.setns(ns_file.fileno(), _CLONE_NEWNET) != 0:
                    raise OSError(ctypes.get_errno(), f"setns into network namespace {netns!r} failed")
            outcome["value"] = fn(*args)
        except BaseException as exc:  # handed to the caller's thread
            outcome["error"] = exc

    thread = threading.Thread(target=target, name=f"netns-{netns}", daemon=True)
    thread.start()
    thread.join()
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]


@dataclass(frozen=True)
class EtcdTLS:
    """Serve clients over TLS and require client certificates signed by `ca`."""

    cert: Path
    key: Path
    ca: Path

    def client_context(self) -> ssl.SSLContext:
        context = ssl.create_default_context(cafile=str(self.ca))
        context.load_cert_chain(str(self.cert), str(self.key))
        return context


@dataclass
class EtcdMember:
    """One etcd server. `host` is the address it listens on (in `netns` when given)."""

    name: str
    host: str = "127.0.0.1"
    client_port: int = 0
    peer_port: int = 0
    netns: str | None = None
    data_dir: Path | None = None
    process: subprocess.Popen | None = field(default=None, repr=False)
    log_path: Path | None = None
    tls: EtcdTLS | None = None

    @property
    def client_url(self) -> str:
        return f"{'https' if self.tls else 'http'}://{self.host}:{self.client_port}"

    @property
    def peer_url(self) -> str:
        return f"http://{self.host}:{self.peer_port}"

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def healthy(self, timeout: float = 1.0) -> bool:
        """True when the member answers `/health` with health true (needs quorum in a cluster)."""

        def probe() -> bool:
            try:
                context = self.tls.client_context() if self.tls else None
                with urllib.request.urlopen(self.client_url + "/health", timeout=timeout, context=context) as reply:
                    return json.loads(reply.read()).get("health") == "true"
            except (OSError, ValueError, urllib.error.URLError):
                return False

        return run_in_netns(self.netns, probe)

    def log_tail(self, lines: int = 15) -> str:
        if self.log_path is None or not self.log_path.exists():
            return "(no log)"
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])


class EtcdCluster:
    """A set of etcd members forming one cluster (one member by default), on 127.0.0.1 with free
    ports unless members are given explicitly (e.g. one per lab namespace).

    Use as a context manager, or call start() and destroy() (destroy also removes the data dirs).
    """

    def __init__(self, members: list[EtcdMember] | None = None, *, size: int = 1,
                 base_dir: str | os.PathLike | None = None, token: str | None = None,
                 start_timeout: float = 20.0, extra_args: tuple[str, ...] = (), tls: EtcdTLS | None = None):
        if members is None:
            tag = uuid.uuid4().hex[:6]
            members = [EtcdMember(name=f"etcd-{tag}-{i}") for i in range(size)]
        if not members:
            raise ValueError("an etcd cluster needs at least one member")
        self.members = members
        for member in self.members:
            if member.client_port == 0:
                member.client_port = free_port(member.host) if member.netns is None else 2379
            if member.peer_port == 0:
                member.peer_port = free_port(member.host) if member.netns is None else 2380
        self._own_base_dir = base_dir is None
        self.base_dir = Path(base_dir) if base_dir is not None else Path(tempfile.mkdtemp(prefix="flannel-bpf-etcd-"))
        self.token = token or f"flannel-bpf-{uuid.uuid4().hex[:8]}"
        self.start_timeout = start_timeout
        self.extra_args = tuple(extra_args)  # more etcd flags for every member, e.g. ("--auth-token-ttl", "1")
        for member in self.members:
            member.tls = member.tls or tls
            member.data_dir = member.data_dir or self.base_dir / member.name
            member.log_path = self.base_dir / f"{member.name}.log"

    @property
    def endpoints(self) -> list[str]:
        return [m.client_url for m in self.members]

    def _command(self, member: EtcdMember) -> list[str]:
        initial_cluster = ",".join(f"{m.name}={m.peer_url}" for m in self.members)
        command = [
            ETCD_BINARY,
            "--name", member.name,
            "--data-dir", str(member.data_dir),
            "--listen-client-urls", member.client_url,
            "--advertise-client-urls", member.client_url,
            "--listen-peer-urls", member.peer_url,
            "--initial-advertise-peer-urls", member.peer_url,
            "--initial-cluster", initial_cluster,
            "--initial-cluster-state", "new",
            "--initial-cluster-token", self.token,
            "--logger", "zap",
            "--log-outputs", "stderr",
            *self.extra_args,
        ]
        if member.tls is not None:
            command += ["--cert-file", str(member.tls.cert), "--key-file", str(member.tls.key),
                        "--trusted-ca-file", str(member.tls.ca), "--client-cert-auth"]
        if member.netns is not None:
            command = ["nsenter", f"--net={NETNS_DIR / member.netns}", *command]
        return command

    def start_member(self, member: EtcdMember) -> None:
        """Start (or restart, keeping its data) one member; does not wait for health."""
        if member.running:
            return
        member.data_dir.mkdir(parents=True, exist_ok=True)
        with open(member.log_path, "ab") as log_file:
            member.process = subprocess.Popen(self._command(member), stdin=subprocess.DEVNULL,
                                              stdout=log_file, stderr=subprocess.STDOUT,
                                              start_new_session=True)
        log.debug("started etcd member %s (pid %d) at %s", member.name, member.process.pid, member.client_url)

    def wait_healthy(self, members: list[EtcdMember] | None = None, timeout: float | None = None) -> None:
        deadline = time.monotonic() + (timeout or self.start_timeout)
        pending = list(members or self.members)
        while pending:
            for member in list(pending):
                if not member.running:
                    raise EtcdLaunchError(f"etcd member {member.name} exited with code "
                                          f"{member.process.returncode if member.process else None}:\n"
                                          f"{member.log_tail()}")
                if member.healthy():
                    pending.remove(member)
            if not pending:
                return
            if time.monotonic() > deadline:
                raise EtcdLaunchError(f"etcd member {pending[0].name} not healthy at {pending[0].client_url} "
                                      f"after {timeout or self.start_timeout:.0f} s:\n{pending[0].log_tail()}")
            time.sleep(0.05)

    def start(self) -> "EtcdCluster":
        try:
            for member in self.members:
                self.start_member(member)
            self.wait_healthy()
        except BaseException:
            self.destroy()
            raise
        return self

    def stop_member(self, member: EtcdMember, timeout: float = 5.0) -> None:
        """SIGTERM, then SIGKILL if it has not exited after `timeout` seconds."""
        self._end(member, signal.SIGTERM, timeout)

    def kill_member(self, member: EtcdMember) -> None:
        """SIGKILL: the abrupt end of a crash or power loss."""
        self._end(member, signal.SIGKILL, 5.0)

    @staticmethod
    def _end(member: EtcdMember, sig: signal.Signals, timeout: float) -> None:
        process = member.process
        if process is None or process.poll() is not None:
            return
        process.send_signal(sig)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(5.0)

    def stop(self) -> None:
        for member in self.members:
            self.stop_member(member)

    def destroy(self) -> None:
        """Stop every member and remove the data directories this object made."""
        for member in self.members:
            with contextlib.suppress(Exception):
                self.kill_member(member)
        if self._own_base_dir:
            shutil.rmtree(self.base_dir, ignore_errors=True)
        else:
            for member in self.members:
                shutil.rmtree(member.data_dir, ignore_errors=True)

    def __enter__(self) -> "EtcdCluster":
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.destroy()
