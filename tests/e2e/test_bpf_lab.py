"""The default lab end to end: 3 bpf hosts x 2 pods brought up with `flannel-bpf lab up`, then
reachability over the BPF path, joins and leaves, agent crashes under traffic, an etcd outage,
and `lab down` leaving nothing behind. The tests share one lab and run in file order."""
from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from ipaddress import IPv4Interface, IPv4Network
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from flannel_bpf.controller.subnet_env import read_subnet_env
from flannel_bpf.lab import orchestrator as orch
from flannel_bpf.lab.nshttp import http_get
from flannel_bpf.lab.run import ping, run_in_netns, tcp_transfer
from flannel_bpf.lab.topology import Host, Lab, run_dir
from flannel_bpf.loader.bpf.maps import DataPlaneMaps

from e2e_lab import (ContinuousPing, assert_lab_gone, cli, counters, fake_lease, forgotten, lab_name,
                     map_subnets, programmed, root_snapshot, steady_ping, wait_forgotten, wait_programmed,
                     wait_until)


@dataclass
class SharedLab:
    name: str
    lab: Lab
    up_output: str
    root_before: dict


@pytest.fixture(scope="module")
def shared():
    name = lab_name("b")
    before = root_snapshot()
    try:
        up = cli("lab", "up", "--name", name, timeout=240)
        assert up.returncode == 0, f"lab up failed:\n{up.stdout[-3000:]}\n{up.stderr[-3000:]}"
        yield SharedLab(name, Lab.load(name), up.stdout, before)
    finally:
        orch.down(name)


def free_subnets(lab: Lab, count: int) -> list[IPv4Network]:
    """Subnets no host holds, from the top of the pod network down."""
    used = {IPv4Network(h.agent.subnet) for h in lab.hosts if h.agent and h.agent.subnet}
    candidates = (IPv4Network(f"10.244.{n}.0/24") for n in range(254, 0, -1))
    return [s for s in candidates if s not in used][:count]


def original_hosts(lab: Lab) -> list[Host]:
    return [h for h in lab.hosts if h.index <= 3]


def test_lab_up_brings_up_three_bpf_hosts_that_all_reach_each_other(shared):
    assert "all 30 pairs reach each other" in shared.up_output
    lab = shared.lab
    assert [h.agent.backend for h in lab.hosts] == ["bpf"] * 3
    assert [len(h.pods) for h in lab.hosts] == [2, 2, 2]
    assert lab.state.network_config["Backend"]["Type"] == "bpf"
    for host in lab.hosts:  # pods sit in the host's leased subnet, with flannel's MTU
        assert all(IPv4Network(p.address, strict=False) == IPv4Network(host.agent.subnet) for p in host.pods)
        assert all(p.mtu == 1450 for p in host.pods)


def test_pods_reach_each_other_by_ping_and_tcp_over_the_bpf_path(shared):
    lab = shared.lab
    before = {h.index: counters(h) for h in lab.hosts}
    matrix = orch.ping_matrix(lab)
    assert matrix.ok, [(orch.pod_label(s), orch.pod_label(d), r) for s, d, r in matrix.failures]

    pods = orch.all_pods(lab)
    pairs = [(s, d) for s in pods for d in pods if s is not d]
    with ThreadPoolExecutor(max_workers=6) as pool:
        intact = list(pool.map(lambda pair: tcp_transfer(pair[0].netns, pair[1].netns, pair[1].ip,
                                                         nbytes=1 << 20), pairs))
    assert [(orch.pod_label(s), orch.pod_label(d)) for (s, d), ok in zip(pairs, intact) if not ok] == []

    # Each host's pods sent 16 echo requests to remote pods and answered 16: at least 32 packets
    # each way went through the programs (TCP adds more).
    for host in lab.hosts:
        after = counters(host)
        grew = {k: after[k] - before[host.index][k] for k in ("encap_vxlan", "decap_to_pod")}
        assert grew["encap_vxlan"] >= 32 and grew["decap_to_pod"] >= 32, (host.index, grew)


def test_host_reaches_remote_pods_through_flannel_vxlan_device(shared):
    lab = shared.lab
    before = {h.index: counters(h)["encap_vxlan"] for h in lab.hosts}
    pairs = [(h, p) for h in lab.hosts for other in lab.hosts if other is not h for p in other.pods]
    with ThreadPoolExecutor(max_workers=6) as pool:
        results = list(pool.map(lambda hp: ping(hp[0].netns, hp[1].ip, count=2, wait=1.0), pairs))
    assert [(h.index, p.ip) for (h, p), r in zip(pairs, results) if not r.ok] == []
    for host in lab.hosts:  # 4 remote pods x 2 probes, encapsulated by tc_encap_from_host
        assert counters(host)["encap_vxlan"] - before[host.index] >= 8


def test_a_new_gateway_mac_is_followed_and_pods_stay_on_the_bpf_path(shared):
    """The bridge's MAC is the pods' gateway: encap routes only frames sent to it. When it
    changes (here set by hand; a bridge without a set address takes its ports' smallest),
    the agent must follow, or every pod packet would fall back to the kernel path."""
    host, peer = shared.lab.host(1), shared.lab.host(2)
    pod = host.pods[0]
    new_mac = "02:aa:bb:cc:dd:01"
    run_in_netns(host.netns, ["ip", "link", "set", "cni0", "address", new_mac])
    with DataPlaneMaps(host.agent.pin_dir) as maps:
        wait_until(lambda: maps.get_local_config().bridge_mac == new_mac, timeout=5.0,
                   what="fl_config.bridge_mac follows cni0's new MAC")
    for each in host.pods:  # as with any router whose MAC changes, pods re-learn it by ARP
        run_in_netns(each.netns, ["ip", "neigh", "flush", "dev", "eth0"])
    before = counters(host)
    assert ping(pod.netns, peer.pods[0].ip, count=3, wait=1.0).ok
    after = counters(host)
    assert after["encap_vxlan"] - before["encap_vxlan"] >= 3
    # Encapsulated at the pod's veth, not handed to the kernel as "not for the gateway" first.
    assert after["pass_not_for_gateway"] == before["pass_not_for_gateway"]


def test_status_json_matches_etcd_and_ping_command(shared):
    lab = shared.lab
    status = cli("lab", "status", "--name", shared.name, "--json", timeout=30)
    assert status.returncode == 0, status.stderr
    info = json.loads(status.stdout)
    assert info["underlay"]["netns"] == lab.state.underlay_netns
    assert info["underlay"]["bridges"][0] == {"name": "br-ul", "address": "198.18.0.254/24"}
    assert info["etcd"]["endpoints"] == ["http://198.18.0.254:2379"]
    assert info["etcd"]["prefix"] == "/coreos.com/network"
    assert info["backends"] == {h.netns: "bpf" for h in lab.hosts}
    assert "198.18.0.14/24" in info["join"]["free_addresses"]

    etcd = orch.etcd_client(lab)
    assert json.loads(etcd.get("/coreos.com/network/config")) == info["network_config"]
    leases = etcd.get_prefix("/coreos.com/network/subnets/")
    for host in info["hosts"]:
        assert host["agent"]["running"] and host["agent"]["ready"]
        lease = json.loads(leases[orch.lease_key(lab, host["subnet"])])
        assert lease["PublicIP"] == host["address"].split("/")[0]
        assert lease["BackendType"] == "vxlan"  # bpf nodes publish what stock nodes accept
        assert len(host["pods"]) == 2

    table = cli("lab", "status", "--name", shared.name, timeout=30)
    assert table.returncode == 0 and "etcd1" in table.stdout
    matrix = cli("lab", "ping", "--name", shared.name, timeout=60)
    assert matrix.returncode == 0 and "all 30 pairs reach each other" in matrix.stdout, matrix.stdout


def test_a_host_of_your_own_joins_with_only_what_status_json_tells(shared):
    """Plug a node into the running lab as its JSON describes (veth into the underlay bridge, a
    free address, attach with the etcd endpoints): here a stock-style vxlan node."""
    info = json.loads(cli("lab", "status", "--name", shared.name, "--json", timeout=30).stdout)
    join = info["join"]
    own = f"fbpf-{shared.name}-h9"   # the lab's naming, so `lab down` would also take it
    address = join["free_addresses"][-1]
    subnet_file = Path(run_dir(shared.name)) / "own-host.env"
    ul = join["underlay_netns"]
    agent = None
    try:
        subprocess.run(["ip", "netns", "add", own], check=True, timeout=10)
        run_in_netns(ul, ["ip", "link", "add", "own9", "type", "veth", "peer", "name", "eth0",
                          "netns", own])
        run_in_netns(ul, ["ip", "link", "set", "own9", "master", join["bridge"], "up"])
        run_in_netns(own, ["ip", "addr", "add", address, "dev", "eth0"])
        run_in_netns(own, ["ip", "link", "set", "eth0", "up"])
        run_in_netns(own, ["ip", "link", "set", "lo", "up"])
        with open(run_dir(shared.name) / "own-host.log", "wb") as log:
            agent = subprocess.Popen(
                ["nsenter", f"--net=/run/netns/{own}", "--", sys.executable, "-m", "flannel_bpf",
                 "attach", "--iface", "eth0", "--etcd-endpoints", join["etcd_endpoints"],
                 "--etcd-prefix", join["etcd_prefix"], "--backend", "vxlan", "--subnet-file",
                 str(subnet_file), "--healthz-port", "9109", "--cleanup-on-exit"],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
        wait_until(lambda: http_get(own, "http://127.0.0.1:9109/readyz", 1.0)[0] == 200, 30, 0.05,
                   "the host of our own ready")
        gateway = IPv4Interface(read_subnet_env(subnet_file)["FLANNEL_SUBNET"])
        for host in shared.lab.hosts:
            wait_until(lambda: programmed(host, gateway.network), 5, what=f"host {host.index} programs it")
        # A pod reaches the new node's flannel.1 address (its subnet's .0) and back.
        vtep_ip = str(gateway.network.network_address)
        assert ping(shared.lab.host(2).pods[0].netns, vtep_ip, count=2).ok
    finally:
        if agent is not None:
            agent.terminate()
            agent.wait(20)
        subprocess.run(["ip", "netns", "del", own], timeout=10)
    for host in shared.lab.hosts:
        wait_until(lambda: forgotten(host, gateway.network), 5, what=f"host {host.index} forgets it")


def test_health_readiness_and_metrics(shared):
    host = shared.lab.host(1)
    base = f"http://127.0.0.1:{host.agent.healthz_port}"
    assert http_get(host.netns, base + "/healthz")[0] == 200
    assert orch.readyz(host) == 200
    families = {f.name: f for f in text_string_to_metric_families(orch.metrics_text(host))}
    assert families["flannel_bpf_ready"].samples[0].value == 1
    assert families["flannel_bpf_peers"].samples[0].value == 2
    entries = {s.labels["map"]: s.value for s in families["flannel_bpf_map_entries"].samples}
    assert entries["peers"] == 2 and entries["endpoints"] >= 2
    packets = {s.labels["verdict"]: s.value for s in families["flannel_bpf_packets"].samples
               if s.name == "flannel_bpf_packets_total"}
    assert packets["encap_vxlan"] > 0 and packets["decap_to_pod"] > 0


# Keys that name the underlay, one underlay host, all private /8 traffic, everything, the whole
# pod network; and PublicIPs no node can have. Each with an otherwise valid vxlan value.
HOSTILE_KEYS = ("198.18.0.0-24", "198.18.0.12-32", "10.0.0.0-8", "0.0.0.0-0", "10.244.0.0-16")
UNUSABLE_PUBLIC_IPS = ("0.0.0.0", "224.0.0.1", "255.255.255.255", "127.0.0.1", "10.244.9.5")


def _routes_outside_the_pod_network(host: Host) -> set[str]:
    lines = run_in_netns(host.netns, ["ip", "-4", "-o", "route", "show", "table", "all"]).stdout.splitlines()
    return {line for line in lines if "10.244." not in line.split(" ")[0]}


def test_hostile_leases_are_never_programmed_and_pods_keep_talking(shared):
    lab = shared.lab
    hosts = original_hosts(lab)
    etcd = orch.etcd_client(lab)
    subnets_key = f"{lab.state.etcd.prefix}/subnets/"
    *bad_ip_subnets, marker = free_subnets(lab, len(UNUSABLE_PUBLIC_IPS) + 2)
    own_ip_subnet = bad_ip_subnets.pop()  # names host 1's own underlay address
    routes_before = {h.index: _routes_outside_the_pod_network(h) for h in hosts}
    peers_before = {h.index: map_subnets(h) for h in hosts}
    written = [subnets_key + name for name in HOSTILE_KEYS]
    written += [orch.lease_key(lab, s) for s in bad_ip_subnets + [own_ip_subnet, marker]]
    try:
        for name in HOSTILE_KEYS:
            etcd.put(subnets_key + name, fake_lease("0a:58:00:00:00:66"))
        for subnet, ip in zip(bad_ip_subnets, UNUSABLE_PUBLIC_IPS):
            etcd.put(orch.lease_key(lab, subnet), fake_lease("0a:58:00:00:00:67", public_ip=ip))
        etcd.put(orch.lease_key(lab, own_ip_subnet), fake_lease("0a:58:00:00:00:68", public_ip=hosts[0].ip))
        etcd.put(orch.lease_key(lab, marker), fake_lease("0a:58:00:00:00:69"))  # a valid one, after them all
        for host in hosts:
            wait_programmed(host, marker)
        for host in hosts:
            families = {f.name: f for f in text_string_to_metric_families(orch.metrics_text(host))}
            skipped = {s.labels["reason"]: s.value for s in families["flannel_bpf_leases_skipped"].samples}
            own = host is hosts[0]
            expected_peers = peers_before[host.index] | {marker} | (set() if own else {own_ip_subnet})
            assert map_subnets(host) == expected_peers, host.index
            assert families["flannel_bpf_peers"].samples[0].value == len(expected_peers)
            assert sum(skipped.values()) == len(HOSTILE_KEYS) + len(UNUSABLE_PUBLIC_IPS) + own, skipped
            assert _routes_outside_the_pod_network(host) == routes_before[host.index], host.index
            assert orch.readyz(host) == 200
        matrix = orch.ping_matrix(lab)
        assert matrix.ok, [(orch.pod_label(s), orch.pod_label(d)) for s, d, _ in matrix.failures]
    finally:
        for key in written:
            etcd.delete(key)
    for host in hosts:
        wait_forgotten(host, marker)
        assert map_subnets(host) == peers_before[host.index]


# ---------------------------------------------------------------------------- a host joins and leaves


@dataclass
class Join:
    host: Host
    subnet: IPv4Network
    peers_programmed_after: dict[int, float]   # host index -> s after the lease put
    first_ping_after: float
    ready_after: float


def _map_change_times(hosts: list[Host], changed, timeout: float) -> dict[int, float]:
    """time.monotonic() at which changed(host, peer subnets in its map) first held, per host,
    polling every 2 ms; hosts where it never did within `timeout` are missing."""
    seen: dict[int, float] = {}
    maps = {h.index: (h, DataPlaneMaps(h.agent.pin_dir)) for h in hosts}
    try:
        deadline = time.monotonic() + timeout
        while len(seen) < len(hosts) and time.monotonic() < deadline:
            for index, (host, m) in maps.items():
                if index not in seen and changed(host, {p.subnet for p in m.list_peers()}):
                    seen[index] = time.monotonic()
            time.sleep(0.002)
    finally:
        for _, m in maps.values():
            m.close()
    return seen


def _since(times: dict[int, float], start: float) -> dict[int, float]:
    return {index: round(t - start, 4) for index, t in times.items()}


def _has(subnet):
    return lambda host, subnets: subnet in subnets


def _lacks(subnet):
    return lambda host, subnets: subnet not in subnets


@pytest.fixture(scope="module")
def joined(shared):
    """Host 4 joins the running lab (orchestrator.join_host, agent with --cleanup-on-exit),
    timed from its lease put: when each peer's map got it, when its pod first answered."""
    lab = shared.lab
    old = original_hosts(lab)
    baseline = {h.index: map_subnets(h) for h in old}
    prefix = lab.state.etcd.prefix + "/subnets/"
    with orch.etcd_client(lab).watch_prefix(prefix) as watch, ThreadPoolExecutor(1) as pool:
        programmed_at = pool.submit(_map_change_times, old,
                                    lambda host, subnets: bool(subnets - baseline[host.index]), 30.0)
        host = orch.join_host(lab, "bpf", pods=1, extra_args=["--cleanup-on-exit"], wait=False)
        try:
            put = watch.wait_for(orch.lease_key(lab, host.agent.subnet), "put", timeout=1)
            assert put is not None, "host 4's lease put was not seen"
            source, pod = old[0].pods[0], host.pods[0]
            deadline = time.monotonic() + 30
            while not ping(source.netns, pod.ip, count=1, wait=0.1).ok:
                assert time.monotonic() < deadline, "the new host's pod never became reachable"
            first_ping = time.monotonic() - put.seen_at
            orch.wait_ready(lab, [host.index])
            ready = time.monotonic() - put.seen_at
            peers = _since(programmed_at.result(), put.seen_at)
        except BaseException:
            lab.remove_host(host.index)
            raise
    print(f"\njoin: peers programmed {peers} s, first ping {first_ping:.3f} s, "
          f"agent ready {ready:.3f} s after the lease put")
    yield Join(host, IPv4Network(host.agent.subnet), peers, first_ping, ready)
    if host in lab.hosts:
        lab.remove_host(host.index)


def test_joining_host_is_programmed_on_every_peer_within_a_second(shared, joined):
    assert sorted(joined.peers_programmed_after) == [1, 2, 3]
    assert max(joined.peers_programmed_after.values()) < 1.0, joined.peers_programmed_after
    lab = shared.lab
    for host in original_hosts(lab):
        wait_programmed(host, joined.subnet)
    new_pod = joined.host.pods[0]
    for pod in orch.all_pods(lab):
        if pod is not new_pod:
            assert ping(pod.netns, new_pod.ip, count=2).ok and ping(new_pod.netns, pod.ip, count=2).ok


def test_joining_hosts_pods_answer_within_a_second_of_its_lease(joined):
    """The agent compiles its programs before it publishes its lease, so a peer that sees the
    lease can already reach it."""
    assert joined.first_ping_after < 1.0, joined


def test_leaving_host_with_cleanup_releases_lease_and_peers_forget_it(shared, joined):
    lab = shared.lab
    old = original_hosts(lab)
    prefix = lab.state.etcd.prefix + "/subnets/"
    key = orch.lease_key(lab, joined.subnet)
    with orch.etcd_client(lab).watch_prefix(prefix) as watch:
        # Not waiting for the agent to exit first: its lease goes before its own data plane.
        stopping = ThreadPoolExecutor(max_workers=1)
        stopped = stopping.submit(orch.stop_agent, lab, joined.host.index, signal.SIGTERM)
        gone = watch.wait_for(key, "delete", timeout=10)
        assert gone is not None, "the lease was not released"
        forgot = _since(_map_change_times(old, _lacks(joined.subnet), 10.0), gone.seen_at)
        assert stopped.result(timeout=20)
        stopping.shutdown()
    print(f"\nleave: peers forgot the subnet {forgot} s after the lease delete")
    assert sorted(forgot) == [1, 2, 3] and max(forgot.values()) < 1.0, forgot
    for host in old:
        wait_forgotten(host, joined.subnet)
    # --cleanup-on-exit: its own data plane is gone too.
    assert "bpf" not in run_in_netns(joined.host.netns, ["tc", "filter", "show", "dev", "eth0", "ingress"]).stdout
    assert "flannel.1" not in run_in_netns(joined.host.netns, ["ip", "-o", "link"]).stdout
    lab.remove_host(joined.host.index)


def test_expired_lease_is_forgotten_by_every_peer(shared):
    """A node that died: its lease runs out (etcd deletes the key) and every peer drops it."""
    lab = shared.lab
    hosts = original_hosts(lab)
    subnet, = free_subnets(lab, 1)
    etcd = orch.etcd_client(lab)
    prefix = lab.state.etcd.prefix + "/subnets/"
    key = orch.lease_key(lab, subnet)
    with etcd.watch_prefix(prefix) as watch:
        put_revision = etcd.put(key, fake_lease("0a:58:00:00:00:04"), lease=etcd.grant_lease(2))
        put = watch.wait_for(key, "put", timeout=5)
        assert put is not None and put.revision == put_revision
        programmed_after = _since(_map_change_times(hosts, _has(subnet), 5.0), put.seen_at)
        assert sorted(programmed_after) == [1, 2, 3], programmed_after
        expired = watch.wait_for(key, "delete", timeout=10)
        assert expired is not None, "the 2 s lease did not expire"
        forgot = _since(_map_change_times(hosts, _lacks(subnet), 10.0), expired.seen_at)
    print(f"\nexpiry: programmed {programmed_after} s after the put, forgotten {forgot} s after the expiry")
    assert sorted(forgot) == [1, 2, 3] and max(forgot.values()) < 1.0, forgot
    for host in hosts:
        wait_forgotten(host, subnet)


# ---------------------------------------------------------------------------- crashes and outages


def _continuous_ping(src, dst, count: int, interval: float):
    pool = ThreadPoolExecutor(max_workers=1)
    future = pool.submit(steady_ping, src.netns, dst.ip, count, interval)
    pool.shutdown(wait=False)
    return future


def test_kill9_under_traffic_loses_nothing_and_restart_reconciles(shared):
    lab = shared.lab
    etcd = orch.etcd_client(lab)
    gone_while_down, added_while_down = free_subnets(lab, 2)
    h1, h2 = lab.host(1), lab.host(2)
    key_gone, key_added = orch.lease_key(lab, gone_while_down), orch.lease_key(lab, added_while_down)
    etcd.put(key_gone, fake_lease("0a:58:00:00:00:01"))
    try:
        wait_until(lambda: programmed(h1, gone_while_down), 5, what="fake peer programmed on host 1")
        # Probes 10 ms apart from before the crash until a second after the restarted agent
        # (which recompiles and re-attaches) is ready.
        before = counters(h1)
        with ContinuousPing(h2.pods[0].netns, h1.pods[0].ip, interval=0.01) as pinging:
            time.sleep(0.5)
            assert orch.stop_agent(lab, 1, signal.SIGKILL)
            etcd.delete(key_gone)
            etcd.put(key_added, fake_lease("0a:58:00:00:00:02"))
            orch.start_agent(lab, 1, "bpf")
            orch.wait_ready(lab, [1])
            time.sleep(1.0)
            sent, answered = pinging.stop()
        lost = set(range(1, sent + 1)) - answered
        print(f"\nkill -9 and restart under ping: {sent} probes, lost {sorted(lost)}")
        assert sent >= 150 and lost <= {sent}, f"lost replies {sorted(lost)} of {sent}"
        # And not merely through flannel.1, the kernel's safety net: host 1's programs handled
        # every request and every reply, while dead, while restarting and after.
        grew = {k: v - before[k] for k, v in counters(h1).items()}
        assert grew["decap_to_pod"] >= len(answered) and grew["encap_vxlan"] >= len(answered), grew
        # The restarted agent made its maps and routes match etcd as it is now.
        wait_forgotten(h1, gone_while_down)
        wait_programmed(h1, added_while_down)
        assert map_subnets(h1) == {IPv4Network(h.agent.subnet) for h in original_hosts(lab) if h is not h1} | {added_while_down}
    finally:
        etcd.delete(key_gone)
        etcd.delete(key_added)
    for host in original_hosts(lab):
        wait_until(lambda: forgotten(host, added_while_down), 5, what="fake peer removed")


def test_etcd_outage_keeps_forwarding_and_agents_resync(shared):
    lab = shared.lab
    hosts = original_hosts(lab)
    outage = 30.0
    metrics_before = _etcd_reconnects(hosts[0])
    encap_before = counters(hosts[0])["encap_vxlan"]
    orch.stop_etcd(lab)
    stopped = time.monotonic()
    try:
        pinging = _continuous_ping(hosts[0].pods[0], hosts[2].pods[1], count=300, interval=0.05)
        matrix = orch.ping_matrix(lab)
        assert matrix.ok, [(orch.pod_label(s), orch.pod_label(d)) for s, d, _ in matrix.failures]
        result = pinging.result(timeout=30)
        assert result.sent == 300 and result.received == 300, result
        assert counters(hosts[0])["encap_vxlan"] - encap_before >= 300  # on the bpf path
        assert all(orch.agent_running(h) for h in hosts), "an agent died while etcd was away"
        # Peers may be stale while the watch is down: not ready, and the metric says why.
        assert [orch.readyz(h) for h in hosts] == [503] * len(hosts)
        assert _metric(hosts[0], "flannel_bpf_etcd_watch_up") == 0
        time.sleep(max(0.0, outage - (time.monotonic() - stopped)))
    finally:
        orch.start_etcd_again(lab)
    new_peer, = free_subnets(lab, 1)
    key = orch.lease_key(lab, new_peer)
    etcd = orch.etcd_client(lab)
    etcd.put(key, fake_lease("0a:58:00:00:00:03"))
    try:
        for host in hosts:  # reconnect backoff tops out at 5 s
            took = wait_until(lambda: programmed(host, new_peer), 20, what=f"host {host.index} resynced")
            print(f"\nhost {host.index} programmed a lease put after the outage in {took:.2f} s")
        assert _etcd_reconnects(hosts[0]) > metrics_before
        for host in hosts:
            wait_until(lambda: orch.readyz(host) == 200, 10, what=f"host {host.index} ready again")
    finally:
        etcd.delete(key)
    for host in hosts:
        wait_until(lambda: forgotten(host, new_peer), 10, what="lease deleted after the outage")
    assert orch.ping_matrix(lab).ok


def _metric(host: Host, name: str) -> float:
    families = {f.name: f for f in text_string_to_metric_families(orch.metrics_text(host))}
    return families[name].samples[0].value


def _etcd_reconnects(host: Host) -> float:
    return _metric(host, "flannel_bpf_etcd_reconnects")


# ---------------------------------------------------------------------------- teardown


def test_lab_down_leaves_nothing_behind(shared):
    down = cli("lab", "down", "--name", shared.name, timeout=60)
    assert down.returncode == 0, down.stderr
    assert_lab_gone(shared.name, shared.root_before)
    again = cli("lab", "down", "--name", shared.name, timeout=60)
    assert again.returncode == 0 and "nothing to remove" in again.stdout
