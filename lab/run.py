"""Run commands inside lab namespaces, always bounded in time.

`nsenter --net` switches only the network namespace, so bpffs (/sys/fs/bpf) stays visible;
`ip netns exec` would remount /sys and hide it.
"""
from __future__ import annotations

import hashlib
import os
import re
import socket
import subprocess
import threading
from dataclasses import dataclass
from typing import Sequence

from flannel_bpf.loader.netns import NetnsNotFound, in_netns, netns_path

DEFAULT_TIMEOUT = 10.0


def nsenter_argv(netns: str, argv: Sequence[str]) -> list[str]:
    path = netns_path(netns)
    if not path.exists():
        raise NetnsNotFound(f"network namespace {netns} does not exist ({path})")
    return ["nsenter", f"--net={path}", "--", *map(str, argv)]


def run_in_netns(netns: str, argv: Sequence[str], *, timeout: float = DEFAULT_TIMEOUT,
                 check: bool = True, input: str | None = None) -> subprocess.CompletedProcess:
    """Run argv in the namespace and capture text output; raises CalledProcessError when
    `check` and the command fails, TimeoutExpired (after killing it) on timeout."""
    return subprocess.run(nsenter_argv(netns, argv), capture_output=True, text=True,
                          timeout=timeout, check=check, input=input)


def popen_in_netns(netns: str, argv: Sequence[str], **popen_kwargs) -> subprocess.Popen:
    """Start a long-running process (a server, an agent) in the namespace. The caller owns it;
    lab destroy() also kills whatever is left inside the lab's namespaces."""
    return subprocess.Popen(nsenter_argv(netns, argv), **popen_kwargs)


@dataclass(frozen=True)
class PingResult:
    sent: int
    received: int
    rtt_min_ms: float | None
    rtt_avg_ms: float | None
    rtt_max_ms: float | None
    error: str | None = None  # ping's complaint when it printed no summary

    @property
    def loss(self) -> float:
        """Fraction lost, 0.0 to 1.0."""
        return 1.0 - self.received / self.sent if self.sent else 1.0

    @property
    def ok(self) -> bool:
        return self.sent > 0 and self.received == self.sent


_TRANSMITTED = re.compile(r"(\d+) packets transmitted, (\d+) (?:packets )?received")
_RTT = re.compile(r"= ([\d.]+)/([\d.]+)/([\d.]+)/")


def parse_ping(output: str) -> PingResult:
    m = _TRANSMITTED.search(output)
    if not m:
        raise ValueError(f"no ping summary in output: {output.strip()[-200:]!r}")
    rtt = _RTT.search(output)
    mn, avg, mx = (float(x) for x in rtt.groups()) if rtt else (None, None, None)
    return PingResult(int(m.group(1)), int(m.group(2)), mn, avg, mx)


def ping(netns: str, destination: str, *, count: int = 3, wait: float = 1.0,
         interval: float = 0.2, size: int | None = None, dont_fragment: bool = False,
         source: str | None = None) -> PingResult:
    """Ping from a namespace, bounded: `count` probes, each waited for at most `wait` s."""
    if not 1 <= count <= 1000:
        raise ValueError(f"ping count must be 1..1000, got {count}")
    argv = ["ping", "-n", "-q", "-c", str(count), "-W", str(wait), "-i", str(interval)]
    if size is not None:
        argv += ["-s", str(size)]
    if dont_fragment:
        argv += ["-M", "do"]
    if source:
        argv += ["-I", source]
    argv.append(str(destination))
    deadline = count * interval + wait + 5.0
    proc = run_in_netns(netns, argv, timeout=deadline, check=False)
    # ping exits 1 when replies are missing and 2 on errors such as "Network is unreachable";
    # both still print a summary, except when it could not start at all.
    try:
        return parse_ping(proc.stdout)
    except ValueError:
        return PingResult(count, 0, None, None, None, error=(proc.stderr or proc.stdout).strip())


def tcp_transfer(client_netns: str, server_netns: str, server_ip: str, nbytes: int = 4 << 20,
                 timeout: float = 10.0) -> bool:
    """Send `nbytes` of random data over one TCP connection between two namespaces; True if
    every byte arrived intact. The listening socket exists before the client connects, so
    there is no start-up race; every step is bounded by `timeout`."""
    payload = os.urandom(nbytes)
    with in_netns(server_netns):
        server = socket.create_server((server_ip, 0))
    server.settimeout(timeout)
    digest = hashlib.sha256()
    received = 0

    def serve() -> None:
        nonlocal received
        try:
            conn, _ = server.accept()
        except OSError:
            return
        with conn:
            conn.settimeout(timeout)
            try:
                while chunk := conn.recv(1 << 16):
                    digest.update(chunk)
                    received += len(chunk)
            except OSError:
                pass

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        with in_netns(client_netns):
            client = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        with client:
            client.settimeout(timeout)
            try:
                client.connect((server_ip, server.getsockname()[1]))
                client.sendall(payload)
                client.shutdown(socket.SHUT_WR)
            except OSError:
                return False
        thread.join(timeout)
    finally:
        server.close()
        thread.join(timeout)
    return received == nbytes and digest.digest() == hashlib.sha256(payload).digest()
