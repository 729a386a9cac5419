"""Leases other nodes (or an attacker with etcd write access) put under <prefix>/subnets/: keys
that are not a subnet of the network, unusable PublicIPs, values that do not parse. Each is
skipped, logged once, counted by reason, and never becomes a peer; none of them stops a new
node from taking a subnet, and none makes the agent's memory grow without bound."""
import gc
import json
import threading
import tracemalloc
from ipaddress import IPv4Address, IPv4Network

import pytest

from flannel_bpf.controller.lease import encode_lease_value, subnet_key
from flannel_bpf.controller.subnet_manager import OutOfSubnets

from test_peer_watch import RawEtcd, flanneld_vxlan
from test_subnet_leases import etcd_lease_ids, stored


@pytest.fixture
def raw(etcd, prefix):
    writer = RawEtcd(etcd.members[0], prefix)
    yield writer
    writer.close()


# The agents here take subnets from 10.244.100.0 up: the hostile leases below sit on 10.244.60-99,
# and an agent that picked one of those at random would have its own lease overwritten.
AGENT_SUBNETS = {"Network": "10.244.0.0/16", "SubnetMin": "10.244.100.0", "Backend": {"Type": "vxlan", "VNI": 1}}


@pytest.fixture
def network_config(registry):
    return registry.put_network_config(json.dumps(AGENT_SUBNETS))


def key(raw, name: str) -> str:
    return f"{raw.prefix}/subnets/{name}"


GOOD = "10.244.60.0/24"

# Valid vxlan values on keys that are no subnet of Network 10.244.0.0/16 with SubnetLen 24:
# the underlay, one underlay host, all private /8 traffic, everything, the whole pod network,
# half a subnet, and a key one level deeper that names a real subnet.
HOSTILE_KEYS = {
    "198.18.0.0-24": "not_in_network",
    "198.18.0.12-32": "wrong_subnet_len",
    "10.0.0.0-8": "wrong_subnet_len",
    "0.0.0.0-0": "wrong_subnet_len",
    "10.244.0.0-16": "wrong_subnet_len",
    "10.244.61.0-25": "wrong_subnet_len",
    "evil/10.244.62.0-24": "bad_key",
    "010.244.63.0-24": "bad_key",
}


def test_keys_that_are_no_subnet_of_the_network_are_skipped_counted_and_logged_once(network_config, agents, raw,
                                                                                     caplog):
    for name in HOSTILE_KEYS:
        raw.put(key(raw, name), flanneld_vxlan("198.18.1.66", 0x66))  # before the agent: in its listing
    manager, sink = agents(1)
    raw.put(GOOD, flanneld_vxlan("198.18.1.60", 0x60))
    sink.wait_for_peers({IPv4Network(GOOD)})
    for name in HOSTILE_KEYS:  # again, through the watch: nothing new to say
        raw.put(key(raw, name), flanneld_vxlan("198.18.1.66", 0x66))
    raw.put(key(raw, "10.244.0.0-16"), flanneld_vxlan("198.18.1.67", 0x67))  # still a /16, another value
    raw.put(GOOD, flanneld_vxlan("198.18.1.60", 0x61))  # a change after them all: they were all handled
    sink.wait_for(lambda s: s.state()[IPv4Network(GOOD)].vtep_mac.endswith("61"), what="the VtepMAC change")

    assert set(manager.peers()) == {IPv4Network(GOOD)}
    assert all(e.lease.subnet == IPv4Network(GOOD) for e in sink.events)  # never announced, never removed
    expected = {}
    for reason in HOSTILE_KEYS.values():
        expected[reason] = expected.get(reason, 0) + 1
    assert manager.skipped.current() == expected
    assert manager.skipped.total == expected  # each logged once: the identical puts were not counted again
    for name in HOSTILE_KEYS:
        assert caplog.text.count(f"skipping lease {key(raw, name)}:") == 1, name
    assert "Traceback" not in caplog.text

    raw.delete(key(raw, "0.0.0.0-0"))
    raw.put(GOOD, flanneld_vxlan("198.18.1.60", 0x62))
    sink.wait_for(lambda s: s.state()[IPv4Network(GOOD)].vtep_mac.endswith("62"), what="the second change")
    assert manager.skipped.current()["wrong_subnet_len"] == expected["wrong_subnet_len"] - 1  # forgotten


UNUSABLE_PUBLIC_IPS = {
    "10.244.70.0/24": ("0.0.0.0", "bad_public_ip"),
    "10.244.71.0/24": ("224.0.0.1", "bad_public_ip"),
    "10.244.72.0/24": ("255.255.255.255", "bad_public_ip"),
    "10.244.73.0/24": ("127.0.0.1", "bad_public_ip"),
    "10.244.74.0/24": ("10.244.9.5", "public_ip_in_network"),  # a pod address
    "10.244.75.0/24": ("198.18.0.3", "public_ip_is_ours"),  # agent 1's PublicIP
    "10.244.76.0/24": ("198.18.0.250", "public_ip_is_ours"),  # another address of agent 1's uplink
}


def test_unusable_public_ips_are_refused_on_every_host(network_config, agents, raw):
    manager, sink = agents(1, own_addresses={IPv4Address("198.18.0.250")})
    other, other_sink = agents(2)
    raw.put(GOOD, flanneld_vxlan("198.18.1.60", 0x60))
    for subnet, (ip, _) in UNUSABLE_PUBLIC_IPS.items():
        raw.put(subnet, flanneld_vxlan(ip, 0x70))
    raw.put("10.244.77.0/24", flanneld_vxlan("198.18.1.77", 0x77))  # after them all
    wanted = {IPv4Network(GOOD), IPv4Network("10.244.77.0/24")}
    sink.wait_for_peers(wanted | {other.lease.subnet})
    # The other host refuses the same leases, except those naming agent 1's addresses: to it
    # they are a peer's underlay addresses.
    other_sink.wait_for_peers(wanted | {manager.lease.subnet, IPv4Network("10.244.75.0/24"),
                                        IPv4Network("10.244.76.0/24")})
    reasons = {}
    for _, reason in UNUSABLE_PUBLIC_IPS.values():
        reasons[reason] = reasons.get(reason, 0) + 1
    assert manager.skipped.current() == reasons
    assert other.skipped.current() == {"bad_public_ip": 4, "public_ip_in_network": 1}

    # A peer whose lease turns unusable is removed, and comes back when it is mended.
    raw.put(GOOD, flanneld_vxlan("224.0.0.1", 0x60))
    sink.wait_for_peers(wanted - {IPv4Network(GOOD)} | {other.lease.subnet})
    raw.put(GOOD, flanneld_vxlan("198.18.1.60", 0x60))
    sink.wait_for_peers(wanted | {other.lease.subnet})


BAD_VALUES = {
    "10.244.80.0/24": b"{not json",
    "10.244.81.0/24": b'["PublicIP", "198.18.1.81"]',
    "10.244.82.0/24": b'{"PublicIP": 3321, "BackendType": "vxlan", "BackendData": {"VtepMAC": "0e:2a:00:00:00:82"}}',
    "10.244.83.0/24": b'{"BackendType": "vxlan", "BackendData": {"VtepMAC": "0e:2a:00:00:00:83"}}',
    "10.244.84.0/24": b'{"PublicIP": "198.18.1.84", "BackendType": "vxlan", "BackendData": ["x"]}',
    "10.244.85.0/24": b'{"PublicIP": "198.18.1.85", "BackendType": "vxlan", "BackendData": {"VtepMAC": "zz"}}',
    "10.244.86.0/24": b'{"PublicIP": "198.18.1.86", "BackendType": "vxlan", "BackendData": {"VtepMAC": "01:00:5e:00:00:01"}}',
    "10.244.87.0/24": b'{"PublicIP": "198.18.1.87", "BackendType": "vxlan", "BackendData": {"VNI": "1", "VtepMAC": "0e:2a:00:00:00:87"}}',
    "10.244.88.0/24": b'{"PublicIP": "' + b"1" * (1 << 20) + b'", "BackendType": "vxlan"}',
    "10.244.89.0/24": b'{"PublicIP": "198.18.1.89", "BackendType": "' + b"v" * (1 << 20) + b'"}',
    "10.244.90.0/24": b'{"PublicIP": "198.18.1.90", "BackendType": "vxlan", "BackendData": {"VtepMAC": "'
                      + b"a" * (1 << 20) + b'"}}',
}


def test_values_that_do_not_parse_are_skipped_counted_and_never_programmed(network_config, agents, raw, caplog):
    manager, sink = agents(1)
    for subnet, value in BAD_VALUES.items():
        raw.put(subnet, value)
    raw.put(GOOD, flanneld_vxlan("198.18.1.60", 0x60))
    sink.wait_for_peers({IPv4Network(GOOD)})
    assert [e.lease.subnet for e in sink.events] == [IPv4Network(GOOD)]
    current = manager.skipped.current()
    assert sum(current.values()) == len(BAD_VALUES)
    assert current == {"bad_value": len(BAD_VALUES) - 2, "wrong_backend_type": 1, "bad_vtep_mac": 1}
    assert max(len(line) for line in caplog.text.splitlines()) < 1000  # a 1 MB value is not a 1 MB log line
    # The subnets of unparseable values stay taken: some node may hold them.
    late, _ = agents(2, start=False, config=network_config)
    late.start()
    assert str(late.lease.subnet) not in BAD_VALUES


def test_memory_for_the_log_once_rule_is_bounded(network_config, agents, raw, caplog):
    """60 distinct 1 MB invalid values on one key, and 200 distinct invalid keys: the agent keeps
    one small record per key, and forgets it when the key goes."""
    manager, sink = agents(1)
    raw.put(GOOD, flanneld_vxlan("198.18.1.60", 0x60))
    sink.wait_for_peers({IPv4Network(GOOD)})
    gc.collect()
    tracemalloc.start()
    try:
        baseline = tracemalloc.get_traced_memory()[0]
        for round_ in range(60):
            raw.put("10.244.91.0/24", b'{"PublicIP": "%d' % round_ + b"9" * (1 << 20) + b'"}')
        for index in range(200):
            raw.put(key(raw, f"junk-{index}-" + "k" * 2000), b'{"x": %d}' % index)
        raw.put(GOOD, flanneld_vxlan("198.18.1.60", 0x61))  # after them all
        sink.wait_for(lambda s: s.state()[IPv4Network(GOOD)].vtep_mac.endswith("61"), timeout=30,
                      what="the change after the flood")
        gc.collect()
        grown = tracemalloc.get_traced_memory()[0] - baseline
    finally:
        tracemalloc.stop()
    print(f"\nlog-once memory: {grown / 1024:.0f} KiB more after 60 x 1 MiB values and 200 junk keys")
    assert len(manager.skipped) == 201
    assert grown < 2 << 20, f"grew by {grown} bytes after 60 MB of invalid values"
    # Each value is a new reason, so each is logged once (a shortened line), and then forgotten.
    assert caplog.text.count("skipping lease " + subnet_key(raw.prefix, IPv4Network("10.244.91.0/24"))) == 60
    raw.delete("10.244.91.0/24")
    raw.client.delete_prefix(key(raw, "junk-"))
    raw.put(GOOD, flanneld_vxlan("198.18.1.60", 0x62))
    sink.wait_for(lambda s: s.state()[IPv4Network(GOOD)].vtep_mac.endswith("62"), what="the change after deletes")
    assert len(manager.skipped) == 0


FOUR_SUBNETS = {"Network": "10.244.0.0/16", "SubnetMin": "10.244.1.0", "SubnetMax": "10.244.4.0",
                "Backend": {"Type": "vxlan"}}


def test_a_key_that_is_no_subnet_of_the_network_does_not_stop_nodes_joining(registry, agents, raw):
    """flannel counts every key as taken, so one 10.244.0.0-16 key leaves no free /24. Here a key
    that is no subnet of the config never takes a subnet: it is never programmed either."""
    config = registry.put_network_config(json.dumps(FOUR_SUBNETS))
    for name in ("10.244.0.0-16", "0.0.0.0-0", "10.244.2.0-23", "10.244.1.128-25", "x/10.244.3.0-24"):
        raw.put(key(raw, name), flanneld_vxlan("198.18.1.66", 0x66))
    raw.put("10.244.4.0/24", b"{not json")  # a real subnet's key, even unparseable, stays taken
    managers = [agents(i, config=config)[0] for i in range(3)]
    assert {m.lease.subnet for m in managers} == {IPv4Network(f"10.244.{i}.0/24") for i in (1, 2, 3)}
    late, _ = agents(3, config=config, start=False)
    with pytest.raises(OutOfSubnets, match="out of subnets"):
        late.start()


FORTY_SUBNETS = {"Network": "10.244.0.0/16", "SubnetMin": "10.244.1.0", "SubnetMax": "10.244.40.0",
                 "Backend": {"Type": "vxlan"}}


def test_fifty_agents_racing_for_forty_subnets(etcd_cluster, prefix, open_registry, agents):
    cluster = etcd_cluster(1)  # its own etcd: every etcd lease in it is one of these agents'
    registry = open_registry(cluster.endpoints, prefix)
    config = registry.put_network_config(json.dumps(FORTY_SUBNETS))
    managers = [agents(i, config=config, endpoints=cluster.endpoints, start=False)[0] for i in range(50)]
    barrier = threading.Barrier(len(managers))
    outcomes: dict[int, object] = {}

    def start(index, manager):
        barrier.wait()
        try:
            outcomes[index] = manager.start()
        except Exception as exc:  # the losers: checked below
            outcomes[index] = exc

    threads = [threading.Thread(target=start, args=(i, m)) for i, m in enumerate(managers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert len(outcomes) == 50
    losers = [o for o in outcomes.values() if isinstance(o, Exception)]
    winners = [m for i, m in enumerate(managers) if not isinstance(outcomes[i], Exception)]
    assert len(winners) == 40 and len(losers) == 10
    assert all(isinstance(e, OutOfSubnets) and "out of subnets" in str(e) for e in losers), losers
    assert {m.lease.subnet for m in winners} == set(config.subnets())  # no duplicate
    # Nothing half-written: one key per winner with its value, one etcd lease per key.
    keys = stored(cluster, prefix)
    assert len(keys) == 40
    for manager in winners:
        assert keys[subnet_key(prefix, manager.lease.subnet)] == encode_lease_value(manager.attrs)
    assert etcd_lease_ids(cluster) == {m.lease.etcd_lease_id for m in winners}

