"""Spoofed VXLAN in a running lab: a namespace on the underlay bridge that holds no lease sends
VXLAN for our port and VNI to a host, framed every way that once slipped past the sender check
(Ethernet broadcast and multicast destination, outer IP options, fragments), plus plain. The
pod behind it receives none of it and the host counts each drop; a real peer's VXLAN is still
delivered, and so is a forged source address of a real peer (what cannot be stopped here).
Both decap hooks, one small lab each (2 hosts x 1 pod)."""
from __future__ import annotations

import json
import subprocess
import sys
from ipaddress import IPv4Interface

import pytest
from scapy.layers.inet import IP, UDP, fragment
from scapy.layers.l2 import Ether
from scapy.layers.vxlan import VXLAN

from flannel_bpf.lab import orchestrator as orch
from flannel_bpf.lab.run import nsenter_argv, ping, run_in_netns
from flannel_bpf.lab.topology import Host, Lab

from e2e_lab import cli, counters, lab_name

pytestmark = pytest.mark.usefixtures("require_root")

POD_PORT = 7777          # the pod's listener: every datagram that reaches it is counted
MARKER = b"spoofed-vxlan-probe"
LISTEN_SECONDS = 4.0
STRANGER_IFACE = "eth0"

# Counts the datagrams that reach the pod (prints "ready" once bound, the count at the end).
LISTENER = f"""
import socket, sys, time
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("0.0.0.0", {POD_PORT}))
s.settimeout(0.1)
print("ready", flush=True)
end, got = time.monotonic() + float(sys.argv[1]), 0
while time.monotonic() < end:
    try:
        got += s.recv(2048).startswith({MARKER!r})
    except socket.timeout:
        pass
print(got, flush=True)
"""
# Writes raw frames (hex, one per line on stdin) to an interface.
SENDER = """
import socket, sys
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
s.bind((sys.argv[1], 0))
for line in sys.stdin.read().split():
    s.send(bytes.fromhex(line))
"""


@pytest.fixture(scope="module", params=["tc", "xdp"])
def lab(request):
    name = lab_name(f"s{request.param}")
    try:
        up = cli("lab", "up", "--name", name, "--hosts", "2", "--pods", "1", "--decap", request.param,
                 "--no-ping", timeout=240)
        assert up.returncode == 0, f"lab up failed:\n{up.stdout[-3000:]}\n{up.stderr[-3000:]}"
        yield Lab.load(name)
    finally:
        orch.down(name)


@pytest.fixture(scope="module")
def stranger(lab):
    """A namespace on the underlay bridge with a free address and no lease (the lab's naming,
    so `lab down` takes it too)."""
    info = json.loads(cli("lab", "status", "--name", lab.name, "--json", timeout=30).stdout)["join"]
    netns, address = f"fbpf-{lab.name}-h8", IPv4Interface(info["free_addresses"][-1])
    try:
        subprocess.run(["ip", "netns", "add", netns], check=True, timeout=10)
        run_in_netns(info["underlay_netns"], ["ip", "link", "add", "strange8", "type", "veth", "peer", "name",
                                              STRANGER_IFACE, "netns", netns])
        run_in_netns(info["underlay_netns"], ["ip", "link", "set", "strange8", "master", info["bridge"], "up"])
        run_in_netns(netns, ["ip", "addr", "add", str(address), "dev", STRANGER_IFACE])
        run_in_netns(netns, ["ip", "link", "set", STRANGER_IFACE, "up"])
        yield netns, str(address.ip)
    finally:
        subprocess.run(["ip", "netns", "del", netns], timeout=10)


def link_mac(netns: str, ifname: str) -> str:
    return json.loads(run_in_netns(netns, ["ip", "-j", "link", "show", ifname]).stdout)[0]["address"]


def host_ip(host: Host) -> str:
    return str(IPv4Interface(host.address).ip)


def frames(target: Host, source: Host, src_ip: str, src_mac: str, eth_dst: str | None = None,
           ip_options: bool = False, fragmented: bool = False) -> list[bytes]:
    """VXLAN for VNI 1 to `target`'s underlay address, carrying UDP from a pod address of
    `source`'s subnet to `target`'s pod listener."""
    pod_ip = str(IPv4Interface(target.pods[0].address).ip)
    from_pod = str(IPv4Interface(source.pods[0].address).network.network_address + 77)
    inner = (Ether(dst=link_mac(target.netns, "flannel.1"), src="0a:58:0a:f4:63:4d")
             / IP(src=from_pod, dst=pod_ip) / UDP(sport=40000, dport=POD_PORT) / (MARKER + b"x" * 200))
    outer = (IP(src=src_ip, dst=host_ip(target), options=b"\x01\x01\x01\x01" if ip_options else [])
             / UDP(sport=41234, dport=8472, chksum=0) / VXLAN(flags=0x08, vni=1) / inner)
    l2 = Ether(dst=eth_dst or link_mac(target.netns, target.uplink), src=src_mac)
    packets = fragment(outer, fragsize=128) if fragmented else [outer]
    return [bytes(l2 / p) for p in packets]


def delivered(target: Host, sender_netns: str, to_send: list[bytes]) -> int:
    """How many probes reach `target`'s pod when `sender_netns` sends `to_send` (raw frames)."""
    listener = subprocess.Popen(nsenter_argv(target.pods[0].netns, [sys.executable, "-c", LISTENER,
                                                                    str(LISTEN_SECONDS)]),
                                stdout=subprocess.PIPE, text=True)
    try:
        assert listener.stdout.readline().strip() == "ready"
        run_in_netns(sender_netns, [sys.executable, "-c", SENDER, STRANGER_IFACE],
                     input="\n".join(f.hex() for f in to_send), timeout=20)
        out, _ = listener.communicate(timeout=LISTEN_SECONDS + 20)
    finally:
        if listener.poll() is None:
            listener.kill()
            listener.wait(10)
    return int(out.strip())


SPOOFS = {  # name: (how it is framed, the drop counter that must see it)
    "plain": (dict(), "drop_unknown_peer"),
    "broadcast-mac": (dict(eth_dst="ff:ff:ff:ff:ff:ff"), "drop_unknown_peer_other_mac"),
    "multicast-mac": (dict(eth_dst="01:00:5e:00:00:01"), "drop_unknown_peer_other_mac"),
    "ip-options": (dict(ip_options=True), "drop_unknown_peer_ip_options"),
    "fragmented": (dict(fragmented=True), "drop_unknown_peer_fragment"),
}


@pytest.mark.parametrize("spoof", sorted(SPOOFS))
def test_vxlan_from_an_address_without_a_lease_never_reaches_a_pod(lab, stranger, spoof):
    netns, address = stranger
    target, peer = lab.host(1), lab.host(2)
    framing, counter = SPOOFS[spoof]
    sent = frames(target, peer, address, link_mac(netns, STRANGER_IFACE), **framing)
    before = counters(target)
    assert delivered(target, netns, sent) == 0
    after = counters(target)
    assert after[counter] - before[counter] == 1, {k: after[k] - before[k] for k in after if after[k] != before[k]}


def test_a_real_peer_is_still_delivered(lab):
    target, peer = lab.host(1), lab.host(2)
    sent = frames(target, peer, host_ip(peer), link_mac(peer.netns, peer.uplink))
    before = counters(target)
    assert delivered(target, peer.netns, sent) == 1
    after = counters(target)
    assert sum(after[k] - before[k] for k in ("decap_xdp", "decap_to_pod")) == 1  # the fast path took it
    assert ping(peer.pods[0].netns, str(IPv4Interface(target.pods[0].address).ip), count=2).ok


def test_a_forged_source_address_of_a_real_peer_is_delivered(lab, stranger):
    """What the sender check cannot stop: the outer source is all it sees (docs/reliability.md)."""
    netns, _ = stranger
    target, peer = lab.host(1), lab.host(2)
    sent = frames(target, peer, host_ip(peer), link_mac(netns, STRANGER_IFACE))
    assert delivered(target, netns, sent) == 1

