"""Faults, ownership and security in one 2-host bpf lab (one pod each), in this order: the
agent stopped by every signal under a 10 ms ping and a TCP stream, our own lease deleted by
hand, a peer that comes back with a new VtepMAC and PublicIP, an uplink flap, the pod bridge
recreated, our lease hijacked by another node, config changes, and the modes and capabilities
the agent runs with. What each lost is printed; docs/reliability.md quotes it."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time
from dataclasses import dataclass
from ipaddress import IPv4Network
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from flannel_bpf.controller.subnet_env import read_subnet_env
from flannel_bpf.lab import orchestrator as orch
from flannel_bpf.lab.run import nsenter_argv, ping, run_in_netns
from flannel_bpf.loader.bpf.maps import DataPlaneMaps

from e2e_lab import (ContinuousPing, assert_lab_gone, fake_lease, lab_name, root_snapshot, route_subnets,
                     wait_programmed, wait_until)

IPERF_PORT = 5201


@pytest.fixture(scope="module")
def lab():
    name = lab_name("o")
    before = root_snapshot()
    try:
        yield orch.up(orch.LabSpec(name=name, hosts=2, pods=1))
    finally:
        orch.down(name)
    assert_lab_gone(name, before)


def _sh(netns: str, *argv: str, check: bool = True) -> str:
    return run_in_netns(netns, list(argv), check=check).stdout


def _metric(host, name: str) -> float:
    for family in text_string_to_metric_families(orch.metrics_text(host)):
        if family.name == name:
            return family.samples[0].value
    raise AssertionError(f"no metric {name}")


def _subnet(host) -> IPv4Network:
    return IPv4Network(read_subnet_env(host.agent.subnet_file)["FLANNEL_SUBNET"], strict=False)


def _restart(lab, index: int, sig: int = signal.SIGTERM, extra_args=()) -> None:
    assert orch.stop_agent(lab, index, sig)
    orch.start_agent(lab, index, "bpf", extra_args=extra_args)
    orch.wait_ready(lab, [index])


@dataclass
class StreamResult:
    sent: int
    received: int
    retransmits: int
    errors: tuple[str, str]  # the client's and the server's

    @property
    def ended_by_us(self) -> bool:
        """Only our SIGINT ended it: no reset, no timeout, nothing else went wrong."""
        return self.errors in {("interrupt - the client has terminated", "the client has terminated"), ("", "")}


class TcpStream:
    """iperf3 from one pod to another at a bounded rate, until stop() (at most `limit` s)."""

    def __init__(self, client, server, rate: str = "20M", limit: int = 90):
        self.server = subprocess.Popen(nsenter_argv(server.netns, ["iperf3", "-s", "-1", "-J", "-B", server.ip,
                                                                   "-p", str(IPERF_PORT)]),
                                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        time.sleep(0.3)
        self.client = subprocess.Popen(nsenter_argv(client.netns, ["iperf3", "-c", server.ip, "-p", str(IPERF_PORT),
                                                                   "-t", str(limit), "-b", rate, "-J"]),
                                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    def stop(self) -> StreamResult:
        self.client.send_signal(signal.SIGINT)
        client_out, _ = self.client.communicate(timeout=15)
        server_out, _ = self.server.communicate(timeout=15)
        client, server = json.loads(client_out), json.loads(server_out)
        sent = client["end"].get("sum_sent", {})
        received = server["end"].get("sum_received", {})
        return StreamResult(sent.get("bytes", 0), received.get("bytes", 0), sent.get("retransmits", 0),
                            (client.get("error", ""), server.get("error", "")))

    def __enter__(self) -> "TcpStream":
        return self

    def __exit__(self, *exc) -> None:
        for process in (self.client, self.server):
            if process.poll() is None:
                process.kill()
                process.wait(10)


# ---------------------------------------------------------------------------- signals under load


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM, signal.SIGQUIT], ids=lambda s: s.name)
def test_agent_stopped_and_restarted_under_ping_and_tcp_loses_nothing(lab, sig):
    h1, h2 = lab.host(1), lab.host(2)
    pins_before = sorted(p.name for p in Path(h1.agent.pin_dir).iterdir())
    with ContinuousPing(h2.pods[0].netns, h1.pods[0].ip, interval=0.01) as pinging, \
            TcpStream(h2.pods[0], h1.pods[0]) as stream:
        time.sleep(1.0)
        _restart(lab, 1, sig)
        time.sleep(1.0)
        sent, answered = pinging.stop()
        tcp = stream.stop()
    lost = set(range(1, sent + 1)) - answered
    print(f"\n{sig.name} + restart under load: ping {sent} probes, lost {sorted(lost)}; TCP sent {tcp.sent} "
          f"bytes, received {tcp.received}, retransmits {tcp.retransmits}, errors {tcp.errors}")
    assert sent >= 100 and lost <= {sent}, f"lost replies {sorted(lost)} of {sent}"
    assert tcp.ended_by_us, tcp.errors
    assert tcp.sent > 0 and tcp.received >= tcp.sent * 0.99  # what was in flight at SIGINT aside
    # The restarted agent adopted the pinned state: same pins, same subnet.
    assert sorted(p.name for p in Path(h1.agent.pin_dir).iterdir()) == pins_before
    assert IPv4Network(h1.agent.subnet) == _subnet(h1)


# ---------------------------------------------------------------------------- leases


def test_own_lease_deleted_by_hand_is_taken_again_with_the_same_subnet(lab):
    """The owner puts its lease back within tens of ms; its peers hold the entry meanwhile
    (the agent's removal grace), so not one probe falls in between."""
    h1, h2 = lab.host(1), lab.host(2)
    etcd = orch.etcd_client(lab)
    key = orch.lease_key(lab, _subnet(h1))
    value = etcd.get(key)
    with ContinuousPing(h2.pods[0].netns, h1.pods[0].ip, interval=0.01) as pinging, \
            MapWatch(h2, _subnet(h1)) as peer_map:
        time.sleep(0.5)
        etcd.delete(key)
        took = wait_until(lambda: etcd.get(key) is not None, 10, 0.01, "the lease taken again")
        time.sleep(1.0)
        sent, answered = pinging.stop()
    lost = set(range(1, sent + 1)) - answered
    print(f"\nown lease deleted: taken again after {took:.3f} s; ping {sent} probes, lost {sorted(lost)}; "
          f"the peer's map read {peer_map.reads} times, entry missing in {peer_map.missing}")
    assert json.loads(etcd.get(key))["PublicIP"] == json.loads(value)["PublicIP"]
    assert _subnet(h1) == IPv4Network(h1.agent.subnet)
    assert peer_map.reads > 100 and peer_map.missing == 0, "the peer dropped our entry in between"
    assert lost <= {sent}, f"lost replies {sorted(lost)} of {sent}"


class MapWatch:
    """Reads `host`'s peer map every millisecond and counts the reads that lack `subnet`."""

    def __init__(self, host, subnet: IPv4Network):
        self.host, self.subnet = host, subnet
        self.reads = self.missing = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> "MapWatch":
        self._thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self._stop.set()
        self._thread.join(10)

    def _run(self) -> None:
        with DataPlaneMaps(self.host.agent.pin_dir) as maps:
            deadline = time.monotonic() + 30
            while not self._stop.wait(0.001) and time.monotonic() < deadline:
                self.reads += 1
                if all(entry.subnet != self.subnet for entry in maps.list_peers()):
                    self.missing += 1


def _kernel_state(host, subnet: IPv4Network) -> dict:
    """What `host` holds for the peer `subnet`: map entry, route, VTEP neighbour, FDB entries."""
    with DataPlaneMaps(host.agent.pin_dir) as maps:
        entry = next((p for p in maps.list_peers() if p.subnet == subnet), None)
    neighbour = _sh(host.netns, "ip", "-4", "neigh", "show", "dev", "flannel.1", "to", str(subnet.network_address))
    fdb = [line for line in _sh(host.netns, "bridge", "fdb", "show", "dev", "flannel.1").splitlines() if " dst " in line]
    return {"map": None if entry is None else (str(entry.underlay_ip), entry.vtep_mac),
            "route": subnet in route_subnets(host),
            "neighbour": neighbour.split()[2] if neighbour.strip() else None,
            "fdb": sorted((line.split()[0], line.split()[2]) for line in fdb)}


def test_peer_lease_expired_while_its_host_was_gone_comes_back_with_new_mac_and_ip(lab):
    h1, h2 = lab.host(1), lab.host(2)
    etcd = orch.etcd_client(lab)
    subnet = _subnet(h2)
    old = _kernel_state(h1, subnet)
    assert old["map"] is not None and old["route"]
    assert orch.stop_agent(lab, 2, signal.SIGKILL)  # the host is gone ...
    etcd.delete(orch.lease_key(lab, subnet))         # ... and its lease ran out (etcd deletes the key)
    wait_until(lambda: _kernel_state(h1, subnet) == {"map": None, "route": False, "neighbour": None, "fdb": []},
               10, 0.05, "host 1 forgets the peer everywhere")
    # It comes back with a new VTEP (its flannel.1 was recreated) and a new underlay address.
    _sh(h2.netns, "ip", "link", "del", "flannel.1")
    _sh(h2.netns, "ip", "addr", "del", h2.address, "dev", "eth0")
    _sh(h2.netns, "ip", "addr", "add", "198.18.0.42/24", "dev", "eth0")
    orch.start_agent(lab, 2, "bpf")
    orch.wait_ready(lab, [2])
    mac = json.loads(_sh(h2.netns, "ip", "-j", "link", "show", "flannel.1"))[0]["address"]
    assert mac != old["map"][1] and _subnet(h2) == subnet
    wait_until(lambda: _kernel_state(h1, subnet) == {"map": ("198.18.0.42", mac), "route": True, "neighbour": mac,
                                                     "fdb": [(mac, "198.18.0.42")]},
               10, 0.05, "host 1 holds exactly the new VtepMAC and PublicIP")
    assert ping(h1.pods[0].netns, h2.pods[0].ip, count=3, wait=1).ok


# ---------------------------------------------------------------------------- links


def _outage(src, dst, action) -> tuple[int, int, float]:
    """(probes sent, lost, seconds from the end of `action()` to the first answer) of a 10 ms
    ping from `src` to `dst` across `action()`."""
    with ContinuousPing(src.netns, dst.ip, interval=0.01) as pinging:
        time.sleep(0.3)
        action()
        start = time.monotonic()
        wait_until(lambda: ping(src.netns, dst.ip, count=1, wait=0.05).ok, 30, 0.0, f"{dst.ip} answers again")
        answered_after = time.monotonic() - start
        time.sleep(0.3)
        sent, answered = pinging.stop()
    return sent, len(set(range(1, sent + 1)) - answered), answered_after


def _bridge_config(host) -> tuple[int, str]:
    with DataPlaneMaps(host.agent.pin_dir) as maps:
        node = maps.get_local_config()
    return node.bridge_ifindex, node.bridge_mac


def test_uplink_flap_recovers_and_the_agent_stays(lab):
    h1, h2 = lab.host(1), lab.host(2)

    def flap():
        _sh(h1.netns, "ip", "link", "set", "eth0", "down")
        time.sleep(2)
        _sh(h1.netns, "ip", "link", "set", "eth0", "up")

    sent, lost, after = _outage(h2.pods[0], h1.pods[0], flap)
    print(f"\nuplink down 2 s, then up: {lost} of {sent} probes lost (10 ms apart), first answer {after:.2f} s "
          "after it was up")
    assert orch.agent_running(h1)
    wait_until(lambda: orch.readyz(h1) == 200, 10, 0.1, "ready after the flap")
    wait_programmed(h1, _subnet(h2))
    assert "tc_decap" in _sh(h1.netns, "tc", "filter", "show", "dev", "eth0", "ingress")


def test_pod_bridge_deleted_and_recreated_is_attached_again(lab):
    h1, h2 = lab.host(1), lab.host(2)
    pod = h1.pods[0]
    gateway = _sh(h1.netns, "ip", "-4", "-o", "addr", "show", "dev", "cni0").split()[3]
    old_bridge = _bridge_config(h1)

    def recreate():
        _sh(h1.netns, "ip", "link", "del", "cni0")
        _sh(h1.netns, "ip", "link", "add", "cni0", "type", "bridge")
        _sh(h1.netns, "ip", "addr", "add", gateway, "dev", "cni0")
        _sh(h1.netns, "ip", "link", "set", pod.host_veth, "master", "cni0")
        _sh(h1.netns, "ip", "link", "set", "cni0", "up")

    sent, lost, after = _outage(h2.pods[0], pod, recreate)
    bridge = json.loads(_sh(h1.netns, "ip", "-j", "link", "show", "cni0"))[0]
    adopted = wait_until(lambda: _bridge_config(h1) == (bridge["ifindex"], bridge["address"])
                         and "flbpf-headroom" in _sh(h1.netns, "ip", "link", "show", "master", "cni0"),
                         10, 0.01, "the agent adopting the new bridge")
    print(f"\npod bridge recreated: {lost} of {sent} probes lost, first answer {after:.2f} s after; the agent "
          f"had adopted the new bridge (config, headroom port) {after + adopted:.2f} s after")
    assert old_bridge[0] != bridge["ifindex"] and orch.agent_running(h1) and orch.pods_attached(h1)
    assert ping(h2.pods[0].netns, pod.ip, count=3, wait=1).ok


# ---------------------------------------------------------------------------- a hijacked lease


def test_our_lease_hijacked_is_refused_loudly_and_nothing_renumbered_or_removed(lab):
    h1, h2 = lab.host(1), lab.host(2)
    etcd = orch.etcd_client(lab)
    ours = _subnet(h1)
    key = orch.lease_key(lab, ours)
    env_before = Path(h1.agent.subnet_file).read_text()
    etcd.put(key, fake_lease("0a:58:00:00:00:66", "198.18.0.66"))  # another node's value on our key
    try:
        wait_until(lambda: orch.readyz(h1) == 503, 10, 0.05, "host 1 not ready while its key is hijacked")
        assert _metric(h1, "flannel_bpf_lease_conflict") == 1
        assert "lease conflict: our subnet" in Path(h1.agent.log_path).read_text()
        # A restart in the middle of it adopts nothing either.
        assert orch.stop_agent(lab, 1)
        orch.start_agent(lab, 1, "bpf")
        orch.wait_for_subnet(lab, 1)
        wait_until(lambda: orch.readyz(h1) == 503 and orch.agent_running(h1), 60, 0.1, "restarted, in conflict")
        assert Path(h1.agent.subnet_file).read_text() == env_before
        assert "cni0" in _sh(h1.netns, "ip", "route", "show", str(ours))
    finally:
        etcd.delete(key)  # the operator removes the hostile key: ours again, same subnet
    wait_until(lambda: orch.readyz(h1) == 200, 15, 0.1, "ready once the key is ours again")
    assert json.loads(etcd.get(key))["PublicIP"] == h1.ip
    assert _metric(h1, "flannel_bpf_lease_conflict") == 0
    assert Path(h1.agent.subnet_file).read_text() == env_before
    assert "cni0" in _sh(h1.netns, "ip", "route", "show", str(ours))  # the host's own route stays
    wait_programmed(h2, ours)
    assert ping(h2.pods[0].netns, h1.pods[0].ip, count=3, wait=1).ok


# ---------------------------------------------------------------------------- config changes


def _start_refused(lab, index: int) -> str:
    host = lab.host(index)
    orch.stop_agent(lab, index)  # (a refused one has exited already)
    log_size = Path(host.agent.log_path).stat().st_size
    orch.start_agent(lab, index, "bpf")
    wait_until(lambda: not orch.agent_running(host), 60, 0.1, "the agent refusing the config")
    return Path(host.agent.log_path).read_text()[log_size:]


def test_a_config_contradicting_the_node_is_refused_until_accepted(lab):
    h1, h2 = lab.host(1), lab.host(2)
    original = lab.state.network_config
    try:
        orch.write_network_config(lab, {**original, "Network": "10.245.0.0/16"})
        log = _start_refused(lab, 1)
        assert "Network 10.245.0.0/16, but this node runs in 10.244.0.0/16" in log and "--accept-config-change" in log
        assert "Traceback" not in log and "exiting with code 1" in log
        # Refused, the agent left its data plane forwarding.
        assert ping(h2.pods[0].netns, h1.pods[0].ip, count=3, wait=1).ok

        orch.write_network_config(lab, {**original, "Backend": {**original["Backend"], "VNI": 2}})
        log = _start_refused(lab, 1)
        assert "VNI 2, but this node runs flannel.1" in log
        assert "flannel.1" in _sh(h1.netns, "ip", "link", "show")

        orch.start_agent(lab, 1, "bpf", extra_args=["--accept-config-change"])
        orch.wait_ready(lab, [1])
        links = _sh(h1.netns, "ip", "-d", "link", "show")
        assert "flannel.2" in links and "flannel.1:" not in links  # nothing of VNI 1 left to decapsulate
        assert "vxlan id 2 " in links
    finally:
        orch.write_network_config(lab, original)
        orch.stop_agent(lab, 1)
        orch.start_agent(lab, 1, "bpf", extra_args=["--accept-config-change"])  # back to VNI 1
        orch.wait_ready(lab, [1])


# ---------------------------------------------------------------------------- security


def test_files_and_pins_are_the_agents_alone_even_under_umask_0(lab):
    h1 = lab.host(1)
    assert orch.stop_agent(lab, 1)
    Path(h1.agent.subnet_file).unlink()
    pin_root = Path(h1.agent.pin_dir).parent
    subprocess.run(["rm", "-rf", str(pin_root)], check=True)
    old = os.umask(0)
    try:
        orch.start_agent(lab, 1, "bpf")
    finally:
        os.umask(old)
    orch.wait_ready(lab, [1])
    paths = [Path(h1.agent.subnet_file), Path(h1.agent.subnet_file).parent, pin_root, *pin_root.rglob("*")]
    loose = {str(p): oct(p.stat().st_mode & 0o7777) for p in paths if p.stat().st_mode & 0o022 or p.stat().st_uid}
    assert loose == {}
    pin_dir = Path(h1.agent.pin_dir)
    assert oct(pin_dir.stat().st_mode & 0o777) == "0o700"
    assert {oct(p.stat().st_mode & 0o777) for p in pin_dir.iterdir()} == {"0o600"}


AGENT_CAPABILITIES = ("cap_net_admin", "cap_sys_admin")  # docs/reliability.md says why each
_CAP_BITS = {"cap_net_admin": 12, "cap_sys_admin": 21}


def _capsh_keeping(keep) -> list[str]:
    """capsh that runs a command line with a bounding set of only `keep`: as root, that is all
    the command can ever have."""
    bounding = subprocess.run(["capsh", "--print"], capture_output=True, text=True, check=True).stdout
    every = bounding.split("Bounding set =", 1)[1].splitlines()[0].strip().split(",")
    return ["capsh", "--drop=" + ",".join(c for c in every if c not in keep), "--", "-c"]


def test_the_agent_runs_with_only_net_admin_and_sys_admin(lab):
    h1, h2 = lab.host(1), lab.host(2)
    orch.stop_agent(lab, 1)
    orch.start_agent(lab, 1, "bpf", wrapper=_capsh_keeping(AGENT_CAPABILITIES),
                     extra_args=["--ip-masq"])
    orch.wait_ready(lab, [1])
    status = Path(f"/proc/{h1.agent.pid}/status").read_text()
    effective = int(status.split("CapEff:")[1].split()[0], 16)
    assert effective == sum(1 << _CAP_BITS[c] for c in AGENT_CAPABILITIES)
    assert "FLANNEL-POSTRTG" in _sh(h1.netns, "iptables", "-t", "nat", "-S")
    assert ping(h2.pods[0].netns, h1.pods[0].ip, count=3, wait=1).ok


def test_without_sys_admin_the_agent_says_what_it_could_not_do(lab):
    """CAP_BPF and CAP_PERFMON are not enough: bcc reopens the first program's pinned maps by
    id for the second (BPF_MAP_GET_FD_BY_ID), which takes CAP_SYS_ADMIN."""
    h1 = lab.host(1)
    orch.stop_agent(lab, 1)
    log_size = Path(h1.agent.log_path).stat().st_size
    orch.start_agent(lab, 1, "bpf", wrapper=_capsh_keeping(("cap_net_admin", "cap_bpf", "cap_perfmon")))
    wait_until(lambda: not orch.agent_running(h1), 60, 0.1, "the agent failing to load its programs")
    log = Path(h1.agent.log_path).read_text()[log_size:]
    assert "Operation not permitted" in log and "exiting with code 1" in log and "Traceback" not in log
    assert orch.exit_description(h1.agent.pid) == "exit code 1"
    orch.start_agent(lab, 1, "bpf")  # as it was, for the lab's teardown
    orch.wait_ready(lab, [1])
