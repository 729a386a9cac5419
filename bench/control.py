"""Control-plane benchmark: how fast peer leases become forwarding state.

Everything runs in a throwaway network namespace (`scratch_netns`: lo, and a veth uplink eth0
198.18.0.1/15, so every peer address 198.18.x.y is on-link) with its own etcd on that
namespace's 127.0.0.1. The measuring itself happens in a worker process started inside the
namespace (`nsenter --net`), so the project's own etcd client (gRPC, which connects from its
own threads) and netlink calls all act there; this process only builds and removes the
namespace, etcd and the pin directory, and reads the worker's results.

Measured, for each size N (default 1,000 and 10,000 flanneld-format vxlan leases in etcd):
- etcd list + decode: SubnetRegistry.list_leases(), what an agent does at start;
- map programming from cold: the N leases into empty maps in one batch
  (DataPlaneMaps.upsert_peers), the leases -> map entries conversion included;
- netlink, flanneld's way: per peer neighbour + FDB + route (replace), the three calls of
  flannel's vxlan backend, into a fresh flannel.1;
- netlink, loader/netlink/kernel_vxlan.py KernelVxlanBackend.apply_peers (what the agent calls);
- the agent (`flannel-bpf attach`, a real process) started on the N leases: time to its
  programs and config, to all N map entries, to /readyz, and to its kernel fallback (the
  neighbour + FDB + route of every peer, programmed by a background thread after the maps);
  sampled with py-spy while it works.
Both netlink runs and the agent are bounded by time budgets; a run cut short reports how far
it got and is marked partial.
Then lease put -> map entry: a fresh agent, and `puts` new leases put one after another; for
each, the time from the put (etcd commit included) until the entry is in the agent's pinned
fl_peers map. And the agent's memory at rest (VmRSS; VmHWM is the peak, during compiling).
"""
from __future__ import annotations

import contextlib
import ipaddress
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import etcd3
from prometheus_client.parser import text_string_to_metric_families
from pyroute2 import IPRoute
from pyroute2.netlink.rtnl import ndmsg

from flannel_bpf.bench.common import (Deadline, RUN_PREFIX, SCRATCH_UPLINK, SCRATCH_UPLINK_ADDRESS, bench_pin_dir,
                                      metric, percentile, process_memory, ratio, remove_stale, run_cli, scratch_netns,
                                      wait_until)
from flannel_bpf.controller.backends import peer_of
from flannel_bpf.controller.lease import LeaseAttrs, encode_lease_value, subnet_key, vxlan_backend_data
from flannel_bpf.controller.registry import EtcdOptions, SubnetRegistry, parse_endpoint
from flannel_bpf.lab.etcd import EtcdCluster, EtcdMember, free_port
from flannel_bpf.lab.run import nsenter_argv
from flannel_bpf.loader.bpf import layout
from flannel_bpf.loader.bpf.layout import PeerMode
from flannel_bpf.loader.bpf.maps import DataPlaneMaps, PeerEntry
from flannel_bpf.loader.bpf.program import load_programs
from flannel_bpf.loader.netlink.kernel_vxlan import KernelVxlanBackend
from flannel_bpf.loader.netlink.routes import replace_route

log = logging.getLogger(__name__)

COLD_TARGET_S = 2.0             # target: 10,000 leases programmed from cold in <= 2 s
NETLINK_RATIO_TARGET = 10.0     # ... and at least 10x faster than netlink
LEASE_P99_TARGET_MS = 50.0      # lease put -> map entry p99 <= 50 ms
TARGET_SIZE = 10_000

NETWORK = ipaddress.IPv4Network("10.244.0.0/16")
SUBNET_LEN = 30                 # 16,384 subnets: room for 10,000 peers inside 10.244.0.0/16
MAX_PEERS = (1 << (SUBNET_LEN - NETWORK.prefixlen)) - 1
ETCD_PORT = 2379
RESULT_MARKER = "FLANNEL-BPF-BENCH-RESULTS "
PUT_TIMEOUT = 5.0               # per lease put: how long to wait for its map entry


# ---------------------------------------------------------------------------- peers

def peer_subnet(index: int) -> ipaddress.IPv4Network:
    """Subnet of peer `index` (1..MAX_PEERS): the index-th /30 of 10.244.0.0/16."""
    if not 1 <= index <= MAX_PEERS:
        raise ValueError(f"peer index {index!r}: must be 1..{MAX_PEERS}")
    return ipaddress.IPv4Network((int(NETWORK.network_address) + (index << (32 - SUBNET_LEN)), SUBNET_LEN))


def peer_ip(index: int) -> ipaddress.IPv4Address:
    """Underlay address of peer `index`: 198.18.0.2 + index, on the scratch uplink's /15."""
    return ipaddress.IPv4Address(int(ipaddress.IPv4Address(SCRATCH_UPLINK_ADDRESS)) + 1 + index)


def peer_lease_value(index: int) -> bytes:
    """The etcd value flanneld's vxlan backend would write for peer `index`."""
    ip = peer_ip(index)
    mac = "0e:2a:%02x:%02x:%02x:%02x" % tuple(ip.packed)
    return encode_lease_value(LeaseAttrs(ip, "vxlan", vxlan_backend_data(1, mac)))


def network_config_text() -> str:
    return json.dumps({"Network": str(NETWORK), "SubnetLen": SUBNET_LEN,
                       "Backend": {"Type": "bpf", "VNI": 1}})


# ---------------------------------------------------------------------------- outer process

def measure_control(*, sizes: tuple[int, ...] = (1000, TARGET_SIZE), puts: int = 200,
                    netlink_budget: float = 120.0, agent_budget: float = 180.0, agent: bool = True,
                    profile: bool = True, profile_dir: str | Path | None = None) -> list[dict]:
    """All control-plane figures (see the module note) as result dicts. `profile_dir`: where
    py-spy's raw profiles go (default bench-results/profiles)."""
    sizes = tuple(sizes)
    for size in sizes:
        if not isinstance(size, int) or not 1 <= size <= MAX_PEERS - puts - 200:
            raise ValueError(f"size {size!r}: must be 1..{MAX_PEERS - puts - 200}")
    if not isinstance(puts, int) or not 0 <= puts <= 1000:
        raise ValueError(f"puts {puts!r}: must be 0..1000")
    for name, budget in (("netlink_budget", netlink_budget), ("agent_budget", agent_budget)):
        if not 0 < budget <= 3600:
            raise ValueError(f"{name} {budget!r}: must be within (0, 3600] seconds")
    profile_dir = Path(profile_dir or "bench-results/profiles").absolute()
    if profile:
        profile_dir.mkdir(parents=True, exist_ok=True)
    remove_stale()
    params = dict(sizes=list(sizes), puts=puts, netlink_budget=netlink_budget, agent_budget=agent_budget,
                  agent=agent, profile=profile, profile_dir=str(profile_dir))
    # Generous: every budget spent, plus start-ups (compiles, etcd writes) on a busy machine.
    timeout = 120 + len(sizes) * (2 * netlink_budget + (agent_budget + 60) * agent) + puts * PUT_TIMEOUT
    with contextlib.ExitStack() as stack:
        workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="flannel-bpf-bench-")))
        netns = stack.enter_context(scratch_netns("ctl"))
        params["pin_root"] = stack.enter_context(bench_pin_dir("ctl"))
        etcd = stack.enter_context(EtcdCluster(
            [EtcdMember(name=f"{RUN_PREFIX}-etcd", host="127.0.0.1", client_port=ETCD_PORT, netns=netns)],
            base_dir=workdir / "etcd"))
        params.update(etcd_endpoint=etcd.endpoints[0], workdir=str(workdir))
        return _run_worker(netns, params, timeout, workdir / "worker.log")


def _run_worker(netns: str, params: dict, timeout: float, log_path: Path) -> list[dict]:
    argv = nsenter_argv(netns, [sys.executable, "-m", "flannel_bpf.bench.control", "--worker",
                                json.dumps(params)])
    with open(log_path, "w") as stderr:
        process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=stderr, text=True,
                                   start_new_session=True)
        try:
            stdout, _ = process.communicate(timeout=timeout)
        except BaseException:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
            raise
    for line in reversed(stdout.splitlines()):
        if line.startswith(RESULT_MARKER):
            return json.loads(line[len(RESULT_MARKER):])
    tail = "\n".join(log_path.read_text(errors="replace").splitlines()[-25:])
    raise RuntimeError(f"control benchmark worker failed (exit {process.returncode}):\n{tail}")


# ---------------------------------------------------------------------------- worker: etcd

class Etcd:
    """The worker's etcd access: the project's registry (as agents use it) and raw puts."""

    def __init__(self, endpoint: str):
        _, host, port = parse_endpoint(endpoint)
        self.endpoint = endpoint
        self.client = etcd3.client(host=host, port=port, timeout=10)

    def put(self, key: str, value: bytes | str) -> None:
        self.client.put(key, value)

    def put_many(self, items: list[tuple[str, bytes]], batch: int = 128) -> None:
        """Puts in transactions of `batch` (etcd's default --max-txn-ops)."""
        for start in range(0, len(items), batch):
            self.client.transaction(compare=[], success=[self.client.transactions.put(k, v)
                                                         for k, v in items[start:start + batch]], failure=[])

    def registry(self, prefix: str):
        return SubnetRegistry(EtcdOptions(endpoints=(self.endpoint,), prefix=prefix))

    def close(self) -> None:
        self.client.close()


def _prefix(tag: str) -> str:
    return f"/bench-{tag}/coreos.com/network"


def _lease_key(prefix: str, index: int) -> str:
    return subnet_key(prefix, peer_subnet(index))


def _populate(etcd: Etcd, prefix: str, count: int) -> None:
    etcd.put(f"{prefix}/config", network_config_text())
    etcd.put_many([(_lease_key(prefix, i), peer_lease_value(i)) for i in range(1, count + 1)])


# ---------------------------------------------------------------------------- worker: in-process

def _time_listing(etcd: Etcd, prefix: str, size: int) -> tuple[float, list]:
    registry = etcd.registry(prefix)
    try:
        start = time.perf_counter()
        listing = registry.list_leases()
        elapsed = time.perf_counter() - start
    finally:
        registry.close()
    if len(listing.leases) != size:
        raise RuntimeError(f"etcd listing under {prefix}: {len(listing.leases)} leases, expected {size}")
    return elapsed, listing.leases


def _time_map_programming(maps, leases: list) -> float:
    """Cold: empty maps, then every lease into fl_peers (and fl_peer_ips) in one batch."""
    maps.sync_peers([])
    start = time.perf_counter()
    maps.upsert_peers(PeerEntry.make(lease.subnet, lease.public_ip, lease.vtep_mac, PeerMode.VXLAN)
                      for lease in leases)
    elapsed = time.perf_counter() - start
    present = sum(1 for _ in maps.map("fl_peers").keys())
    if present != len(leases):
        raise RuntimeError(f"map programming: {present} entries in fl_peers, expected {len(leases)}")
    maps.sync_peers([])
    return elapsed


def _peers_of(leases: list) -> list:
    return [peer_of(lease) for lease in leases]


@dataclass
class BoundedRun:
    done: int
    seconds: float
    complete: bool


def _bounded(peers: list, apply_chunk, budget: float, chunk: int = 100) -> BoundedRun:
    """apply_chunk(peers[i:i+chunk]) until done or the budget is spent."""
    deadline = Deadline(budget)
    start = time.perf_counter()
    done = 0
    while done < len(peers) and not deadline.expired:
        apply_chunk(peers[done:done + chunk])
        done = min(len(peers), done + chunk)
    return BoundedRun(done, time.perf_counter() - start, done == len(peers))


def _fresh_vxlan():
    backend = KernelVxlanBackend(uplink=SCRATCH_UPLINK, public_ip=SCRATCH_UPLINK_ADDRESS,
                                 subnet=peer_subnet(MAX_PEERS))
    backend.teardown()
    return backend, backend.setup()


def _time_netlink_flanneld(peers: list, budget: float) -> BoundedRun:
    """Per peer what flannel's vxlan backend does: neighbour, FDB entry, route."""
    backend, device = _fresh_vxlan()
    permanent, self_flag = ndmsg.states["permanent"], ndmsg.flags["self"]
    try:
        with IPRoute() as ipr:
            def apply(chunk):
                for peer in chunk:
                    ipr.neigh("replace", ifindex=device.ifindex, dst=str(peer.vtep_ip), lladdr=peer.vtep_mac,
                              state=permanent)
                    ipr.fdb("replace", ifindex=device.ifindex, lladdr=peer.vtep_mac, dst=str(peer.public_ip),
                            state=permanent, flags=self_flag)
                    replace_route(ipr, peer.subnet, peer.vtep_ip, device.ifindex, onlink=True)
            return _bounded(peers, apply, budget)
    finally:
        backend.teardown()


def _time_netlink_apply_peers(peers: list, budget: float) -> BoundedRun:
    backend, _ = _fresh_vxlan()

    def apply(chunk):
        failures = backend.apply_peers(chunk)
        if failures:
            raise RuntimeError(f"apply_peers refused {len(failures)} peers, e.g. {failures[0].reason}")
    try:
        return _bounded(peers, apply, budget)
    finally:
        backend.teardown()


# ---------------------------------------------------------------------------- worker: the agent

class AgentRun:
    """A `flannel-bpf attach` process in this (the worker's) namespace, on prefix `prefix`."""

    def __init__(self, etcd: Etcd, prefix: str, pin_dir: str, workdir: Path, tag: str):
        self.pin_dir = pin_dir
        self.healthz_port = free_port()
        self.log_path = workdir / f"agent-{tag}.log"
        argv = [sys.executable, "-m", "flannel_bpf", "attach", "--iface", SCRATCH_UPLINK,
                "--etcd-endpoints", etcd.endpoint, "--etcd-prefix", prefix, "--pin-dir", pin_dir,
                "--subnet-file", str(workdir / f"subnet-{tag}.env"), "--healthz-ip", "127.0.0.1",
                "--healthz-port", str(self.healthz_port), "--cleanup-on-exit"]
        env = {k: v for k, v in os.environ.items() if not k.startswith("FLANNELD_")}
        with open(self.log_path, "wb") as log_file:
            self.process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log_file,
                                            stderr=subprocess.STDOUT, env=env)
        self.started = time.perf_counter()
        self.maps = None

    @property
    def pid(self) -> int:
        return self.process.pid

    def check_running(self) -> None:
        if self.process.poll() is not None:
            tail = "\n".join(self.log_path.read_text(errors="replace").splitlines()[-15:])
            raise RuntimeError(f"the agent exited with code {self.process.returncode}:\n{tail}")

    def configured(self) -> bool:
        """The agent's programs are loaded and its node config written."""
        self.check_running()
        if self.maps is None:
            try:
                self.maps = DataPlaneMaps(self.pin_dir)
            except (FileNotFoundError, OSError):
                return False
        return self.maps.get_local_config() is not None

    def has_peer(self, subnet: ipaddress.IPv4Network) -> bool:
        key = layout.FlLpmV4Key(prefixlen=subnet.prefixlen,
                              addr=layout.c_array(layout.Ip4, subnet.network_address.packed))
        # An LPM lookup also matches a covering prefix; the benchmark's subnets are all
        # /SUBNET_LEN and distinct, so a hit is this subnet's own entry.
        return self.maps.map("fl_peers").lookup(key) is not None

    def peer_count(self) -> int:
        return sum(1 for _ in self.maps.map("fl_peers").keys())

    @staticmethod
    def kernel_routes() -> int:
        """Routes the agent made (protocol 251) in this namespace: per peer the last netlink
        step of its kernel fallback. Counted by `ip`, so the agent is not asked for anything."""
        out = subprocess.run(["ip", "-4", "-o", "route", "show", "proto", "251"], capture_output=True,
                             text=True, timeout=60, check=True).stdout
        return sum(1 for line in out.splitlines() if line.strip())

    def gauge(self, name: str) -> float | None:
        """One gauge of the agent's /metrics (None when absent or unreachable)."""
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.healthz_port}/metrics", timeout=5) as reply:
                text = reply.read().decode()
        except OSError:
            return None
        for family in text_string_to_metric_families(text):
            if family.name == name and family.samples:
                return family.samples[0].value
        return None

    def ready(self) -> bool:
        self.check_running()
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.healthz_port}/readyz", timeout=1) as reply:
                return reply.status == 200
        except (OSError, urllib.error.URLError):
            return False

    def memory(self) -> dict[str, int]:
        return process_memory(self.pid)

    def stop(self) -> None:
        if self.maps is not None:
            self.maps.close()
            self.maps = None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)


def _profile(pid: int, seconds: float, path: Path) -> subprocess.Popen | None:
    """py-spy sampling the agent for `seconds` (non-blocking: the agent is never paused)."""
    spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not Path(spy).exists():
        log.warning("py-spy not found: no profile (pip install py-spy, in the bench extras)")
        return None
    return subprocess.Popen([spy, "record", "--pid", str(pid), "--duration", str(max(1, int(seconds))),
                             "--rate", "50", "--nonblocking", "--format", "raw", "--output", str(path)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


# Leaf frames of a thread that is waiting, not working: left out of the profile summary.
_IDLE_LEAVES = ("wait", "select", "sleep", "channel_spin", "acquire", "serve_forever", "_wait_for_tstate_lock")
_PROJECT_FILES = ("controller/", "loader/", "lab/", "flannel_bpf/")


def summarize_profile(path: Path, top: int = 10) -> dict:
    """From py-spy's raw output (lines `frame;frame;...;leaf count`, frames `func (file:line)`):
    the busy samples (leaf not a wait); for each, the innermost frame of the project's own code
    (which of our functions the time is spent under) and the leaf (what it is spent on)."""
    if not path.exists():
        return {}
    innermost: Counter = Counter()
    leaves: Counter = Counter()
    busy = 0
    for line in path.read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if not count.isdigit() or not stack:
            continue
        frames = [_frame_name(f) for f in stack.split(";")]
        leaf = frames[-1]
        if any(leaf.split(" (")[0].lower().endswith(word) for word in _IDLE_LEAVES):
            continue
        busy += int(count)
        leaves[leaf] += int(count)
        ours = [f for f in frames if any(f"({prefix}" in f for prefix in _PROJECT_FILES)]
        if ours:
            innermost[ours[-1]] += int(count)
    if not busy:
        return {"busy_samples": 0}

    def shares(counter: Counter) -> list[dict]:
        return [{"function": f, "share": round(c / busy, 3)} for f, c in counter.most_common(top)]
    return {"busy_samples": busy, "project_innermost": shares(innermost), "leaf": shares(leaves)}


def _frame_name(frame: str) -> str:
    """`Class.method (path/file.py:123)` -> `Class.method (path/file.py)`."""
    name, _, where = frame.partition(" (")
    return f"{name} ({where.rsplit(':', 1)[0]})" if where else name


def _agent_cold(etcd: Etcd, prefix: str, size: int, params: dict, tag: str) -> list[dict]:
    """The agent started on `size` leases: time to programs+config, to all entries, to ready."""
    # The agent programs peers in the order etcd lists them: by key, as text.
    in_key_order = sorted(range(1, size + 1), key=lambda i: _lease_key(prefix, i))
    first, last = peer_subnet(in_key_order[0]), peer_subnet(in_key_order[-1])
    budget = Deadline(params["agent_budget"])
    agent = AgentRun(etcd, prefix, f"{params['pin_root']}/agent-{tag}", Path(params["workdir"]), tag)
    spy = None
    profile_path = Path(params["profile_dir"]) / f"agent-cold-{size}-{os.getpid()}.txt"
    times: dict[str, float | None] = {"config": None, "first": None, "all": None, "ready": None,
                                      "fallback": None}
    count = routes = 0
    fallback_pending = None
    try:
        wait_until(agent.configured, budget.remaining, 0.01, "the agent's programs and config")
        times["config"] = time.perf_counter() - agent.started
        if params["profile"]:
            spy = _profile(agent.pid, min(10.0, budget.remaining), profile_path)
        with contextlib.suppress(TimeoutError):
            wait_until(lambda: agent.has_peer(first), budget.remaining, 0.002, "the first peer entry")
            times["first"] = time.perf_counter() - agent.started
            wait_until(lambda: agent.has_peer(last), budget.remaining, 0.005, "the last peer entry")
            count = agent.peer_count()
            if count >= size:
                times["all"] = time.perf_counter() - agent.started
                wait_until(agent.ready, budget.remaining, 0.01, "/readyz")
                times["ready"] = time.perf_counter() - agent.started
                wait_until(lambda: agent.kernel_routes() >= size, budget.remaining, 0.25,
                           "the kernel fallback of every peer")
                times["fallback"] = time.perf_counter() - agent.started
        if times["all"] is None:
            count = agent.peer_count()
        routes = agent.kernel_routes()
        fallback_pending = agent.gauge("flannel_bpf_fallback_pending")
        memory = agent.memory()
    finally:
        profile = _finish_profile(spy, profile_path)
        agent.stop()
    after_config = None if times["all"] is None else times["all"] - times["config"]
    complete = times["all"] is not None
    note = (f"agent process: programs loaded at {times['config']:.2f} s; the listing's peers in one map "
            "batch, then ready; netlink in a background thread")
    if not complete:
        note = (f"PARTIAL: {count:,} of {size:,} map entries after the {params['agent_budget']:g} s budget; "
                + note)
        after_config = budget.seconds - times["config"]
    fallback_complete = times["fallback"] is not None
    fallback_s = (times["fallback"] if fallback_complete else budget.seconds) - times["config"]
    fallback_note = (f"programs loaded -> neighbour + FDB + route of every peer (counted by `ip`: {routes:,} "
                     f"routes; /metrics fallback_pending {fallback_pending})")
    if not fallback_complete:
        fallback_note = f"PARTIAL: {routes:,} of {size:,} routes within the budget; " + fallback_note
    return [
        metric(f"control.agent_cold.{size}.peers_programmed", after_config, "s",
               target=("<=", COLD_TARGET_S) if size == TARGET_SIZE else None, note=note, group="control.cold",
               partial=not complete, entries=count, size=size, seconds_from_start=times,
               profile_top=profile, profile_file=str(profile_path) if profile else None),
        metric(f"control.agent_cold.{size}.fallback_programmed", fallback_s, "s", note=fallback_note,
               group="control.cold", partial=not fallback_complete, routes=routes,
               fallback_pending=fallback_pending),
        metric(f"control.agent_cold.{size}.rss", memory.get("VmRSS", 0) / 1024, "MiB",
               note=f"agent VmRSS with {count:,} peers (peak VmHWM {memory.get('VmHWM', 0) / 1024:.0f} MiB)",
               group="control.rss", peak_mib=memory.get("VmHWM", 0) / 1024),
    ]


# Lease-latency series: (name, pause after each entry appeared). Back to back, every put lands
# while the agent may still program the previous peer's netlink fallback; spaced, it never does.
LATENCY_SERIES = (("back_to_back", 0.0), ("spaced", 0.25))


def _latency_series(etcd: Etcd, agent: AgentRun, prefix: str, indices: list[int], gap: float):
    latencies, commits, after_commit, slowest, missing = [], [], [], [], 0
    for index in indices:
        subnet = peer_subnet(index)
        start = time.perf_counter()
        etcd.put(_lease_key(prefix, index), peer_lease_value(index))
        commits.append(1000 * (time.perf_counter() - start))
        try:
            wait_until(lambda: agent.has_peer(subnet), PUT_TIMEOUT, 0.00025, f"the map entry of {subnet}")
        except TimeoutError:
            missing += 1
            continue
        latencies.append(1000 * (time.perf_counter() - start))
        after_commit.append(latencies[-1] - commits[-1])
        slowest.append((round(latencies[-1], 2), round(commits[-1], 2)))
        if gap:
            time.sleep(gap)
    # The slowest puts with their etcd commit: a slow commit is etcd's, the rest the agent's.
    return latencies, commits, after_commit, sorted(slowest, reverse=True)[:5], missing


def _lease_latency(etcd: Etcd, params: dict) -> list[dict]:
    """A fresh agent, then for each series `puts` new leases one after another: put -> entry."""
    puts = params["puts"]
    prefix = _prefix("latency")
    etcd.put(f"{prefix}/config", network_config_text())
    agent = AgentRun(etcd, prefix, f"{params['pin_root']}/agent-latency", Path(params["workdir"]), "latency")
    results = []
    next_index = MAX_PEERS  # from the top: the agent leased one of the lowest free subnets
    try:
        wait_until(agent.ready, 120, 0.05, "the agent's /readyz")
        wait_until(agent.configured, 10, 0.01, "the agent's config")
        time.sleep(2.0)  # at rest: past start-up work
        idle = agent.memory()
        for series, gap in LATENCY_SERIES:
            indices = list(range(next_index, next_index - puts, -1))
            next_index -= puts
            spy, profile_path = None, Path(params["profile_dir"]) / f"agent-latency-{series}-{os.getpid()}.txt"
            if params["profile"] and series == "back_to_back":
                spy = _profile(agent.pid, min(30.0, puts * 0.1 + 1), profile_path)
            ms, commit_ms, agent_ms, slowest, missing = _latency_series(etcd, agent, prefix, indices, gap)
            profile = _finish_profile(spy, profile_path)
            held = MAX_PEERS - indices[0]  # peers the agent holds when the series starts
            note = (f"{len(ms)} puts, {'back to back' if not gap else f'{gap:g} s apart'}, to an agent "
                    f"holding {held}..{held + len(ms)} peers; etcd commit included")
            if missing:
                note = f"{missing} of {puts} entries never appeared within {PUT_TIMEOUT:g} s; " + note
            results += [
                metric(f"control.lease_to_map.{series}.p50", percentile(ms, 50), "ms", note=note,
                       group="control.latency"),
                metric(f"control.lease_to_map.{series}.p99", percentile(ms, 99) if not missing else None, "ms",
                       target=("<=", LEASE_P99_TARGET_MS), note=note, group="control.latency", samples=len(ms),
                       missing=missing, max_ms=max(ms, default=None), slowest_ms_and_commit_ms=slowest,
                       profile_top=profile,
                       profile_file=str(profile_path) if profile else None),
                metric(f"control.lease_to_map.{series}.after_commit_p99", percentile(agent_ms, 99), "ms",
                       note="put answered -> map entry: the agent's part (watch, event, map write)",
                       group="control.latency", p50=percentile(agent_ms, 50)),
                metric(f"control.etcd_put.{series}.p99", percentile(commit_ms, 99), "ms",
                       note=f"the put's round trip alone (p50 {percentile(commit_ms, 50) or 0:.1f} ms)",
                       group="control.latency"),
            ]
        time.sleep(2.0)
        loaded = agent.memory()
    finally:
        agent.stop()
    return results + [
        metric("control.agent_rss.idle", idle.get("VmRSS", 0) / 1024, "MiB",
               note=f"agent at rest, no peers (peak VmHWM {idle.get('VmHWM', 0) / 1024:.0f} MiB: the BPF compile)",
               group="control.rss", peak_mib=idle.get("VmHWM", 0) / 1024),
        metric("control.agent_rss.after_puts", loaded.get("VmRSS", 0) / 1024, "MiB",
               note=f"agent at rest with {puts * len(LATENCY_SERIES)} peers", group="control.rss"),
    ]


def _finish_profile(spy: subprocess.Popen | None, path: Path) -> dict:
    """Wait for py-spy (it stops by itself), then its summary."""
    if spy is None:
        return {}
    with contextlib.suppress(subprocess.TimeoutExpired):
        spy.wait(60)
    if spy.poll() is None:
        spy.kill()
        spy.wait(5)
    return summarize_profile(path)


def _in_process(etcd: Etcd, size: int, maps, params: dict) -> list[dict]:
    prefix = _prefix(f"cold-{size}")
    _populate(etcd, prefix, size)
    list_s, leases = _time_listing(etcd, prefix, size)
    map_s = _time_map_programming(maps, leases)
    peers = _peers_of(leases)
    flanneld = _time_netlink_flanneld(peers, params["netlink_budget"])
    apply = _time_netlink_apply_peers(peers, params["netlink_budget"])
    cold_s = list_s + map_s
    is_target = size == TARGET_SIZE

    def netlink_metric(name: str, run: BoundedRun, what: str) -> dict:
        note = what if run.complete else (f"PARTIAL: {run.done:,} of {size:,} peers in the "
                                          f"{params['netlink_budget']:g} s budget; {what}")
        return metric(f"control.netlink_{name}.{size}", run.seconds, "s", note=note, group="control.cold",
                      partial=not run.complete, done=run.done, per_peer_ms=1000 * run.seconds / max(1, run.done))

    def ratio_metric(name: str, run: BoundedRun, baseline: str) -> dict:
        # A partial run only says "at least": the time it took for part of the peers.
        value = ratio(run.seconds, map_s)
        return metric(f"control.ratio_netlink_{name}_vs_map.{size}", value, "x",
                      target=(">=", NETLINK_RATIO_TARGET) if is_target else None,
                      note=(("at least: netlink was cut short; " if not run.complete else "")
                            + f"{baseline} / map programming of the same {size:,} leases"),
                      group="control.cold", lower_bound=not run.complete)

    return [
        metric(f"control.etcd_list_decode.{size}", list_s, "s", note="SubnetRegistry.list_leases()",
               group="control.cold"),
        metric(f"control.map_program.{size}", map_s, "s",
               note="leases -> PeerEntry -> upsert_peers, one batch, into empty maps", group="control.cold"),
        metric(f"control.cold_map_path.{size}", cold_s, "s", target=("<=", COLD_TARGET_S) if is_target else None,
               note="etcd list + decode + map programming: the leases forwarding in BPF", group="control.cold"),
        netlink_metric("flanneld", flanneld, "neighbour + FDB + route per peer, as flannel's vxlan backend"),
        netlink_metric("apply_peers", apply, "KernelVxlanBackend.apply_peers (the agent's netlink path)"),
        ratio_metric("flanneld", flanneld, "netlink as flanneld"),
        ratio_metric("apply_peers", apply, "KernelVxlanBackend.apply_peers"),
    ]


def worker(params: dict) -> list[dict]:
    etcd = Etcd(params["etcd_endpoint"])
    results = []
    try:
        with load_programs(f"{params['pin_root']}/maps") as loaded, loaded.open_maps() as maps:
            for size in params["sizes"]:
                log.info("in-process programming of %d leases", size)
                results += _in_process(etcd, size, maps, params)
        if params["agent"]:
            if params["puts"]:
                log.info("lease put -> map entry, %d puts", params["puts"])
                results += _lease_latency(etcd, params)
            for size in params["sizes"]:
                log.info("agent cold start on %d leases", size)
                results += _agent_cold(etcd, _prefix(f"cold-{size}"), size, params, f"cold-{size}")
    finally:
        etcd.close()
    return results


# ---------------------------------------------------------------------------- entry points

def _cli_args(parser) -> None:
    parser.add_argument("--sizes", default="1000,10000", help="comma-separated lease counts (default 1000,10000)")
    parser.add_argument("--puts", type=int, default=200, help="lease puts for the put -> map latency")
    parser.add_argument("--netlink-budget", type=float, default=120.0, help="seconds per netlink run at most")
    parser.add_argument("--agent-budget", type=float, default=180.0, help="seconds per agent cold start at most")
    parser.add_argument("--no-agent", action="store_true", help="skip the agent process runs")
    parser.add_argument("--no-profile", action="store_true", help="no py-spy profile of the agent")


def _cli_run(args):
    try:
        sizes = tuple(int(s) for s in args.sizes.split(",") if s.strip())
    except ValueError:
        raise SystemExit(f"--sizes: {args.sizes!r} is not a comma-separated list of integers") from None
    results = measure_control(sizes=sizes, puts=args.puts, netlink_budget=args.netlink_budget,
                              agent_budget=args.agent_budget, agent=not args.no_agent,
                              profile=not args.no_profile, profile_dir=Path(args.out) / "profiles")
    return results, vars(args)


def main() -> int:
    if len(sys.argv) == 3 and sys.argv[1] == "--worker":
        logging.basicConfig(level=logging.INFO, format="worker %(asctime)s %(message)s", stream=sys.stderr)
        for noisy in ("pyroute2", "grpc"):
            logging.getLogger(noisy).setLevel(logging.WARNING)
        results = worker(json.loads(sys.argv[2]))
        print(RESULT_MARKER + json.dumps(results, default=str), flush=True)
        return 0
    return run_cli("control", "Control-plane benchmark: leases to forwarding state.", _cli_args, _cli_run)


if __name__ == "__main__":
    raise SystemExit(main())
