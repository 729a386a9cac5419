"""The peer watch against a real etcd: events in order, bad entries skipped, expiry, compaction,
and etcd members dying and coming back without an event being lost."""
import json
import time
from ipaddress import IPv4Network

import etcd3
import pytest

from flannel_bpf.controller.lease import subnet_key

MAC = "0e:2a:00:00:00:%02x"


def flanneld_vxlan(ip: str, mac_byte: int, vni: int = 1) -> bytes:
    """A lease value exactly as flanneld's vxlan backend writes it."""
    return (f'{{"PublicIP":"{ip}","PublicIPv6":null,"BackendType":"vxlan",'
            f'"BackendData":{{"VNI":{vni},"VtepMAC":"{MAC % mac_byte}"}}}}').encode()


class RawEtcd:
    """Writes to etcd behind the agents' backs, retrying while a cluster elects a leader."""

    def __init__(self, member, prefix: str):
        self.client = etcd3.client(host=member.host, port=member.client_port, timeout=5)
        self.prefix = prefix

    def key(self, subnet: str) -> str:
        return subnet_key(self.prefix, IPv4Network(subnet))

    def _retry(self, operation):
        deadline = time.monotonic() + 15
        while True:
            try:
                return operation()
            except (etcd3.exceptions.Etcd3Exception, Exception) as exc:  # no leader yet, connection reset
                if time.monotonic() > deadline:
                    raise AssertionError(f"etcd write kept failing: {exc}") from None
                time.sleep(0.2)

    def put(self, subnet_or_key: str, value: bytes):
        key = subnet_or_key if subnet_or_key.startswith("/") else self.key(subnet_or_key)
        return self._retry(lambda: self.client.put(key, value))

    def delete(self, subnet_or_key: str):
        key = subnet_or_key if subnet_or_key.startswith("/") else self.key(subnet_or_key)
        return self._retry(lambda: self.client.delete(key))

    def compact_now(self) -> int:
        revision = self._retry(lambda: self.client.put(self.prefix + "/compaction-mark", b"x")).header.revision
        self._retry(lambda: self.client.compact(revision, physical=True))
        return revision

    def close(self):
        self.client.close()


@pytest.fixture
def raw(etcd, prefix):
    writer = RawEtcd(etcd.members[0], prefix)
    yield writer
    writer.close()


def kinds(sink):
    return [(e.kind, str(e.lease.subnet)) for e in sink.events]


def test_events_follow_puts_changes_and_deletes_in_order(network_config, agents, raw):
    raw.put("10.244.50.0/24", flanneld_vxlan("198.18.1.50", 0x50))  # before the agent starts: in the listing
    manager, sink = agents(1)
    sink.wait_for_peers({IPv4Network("10.244.50.0/24")})
    raw.put("10.244.51.0/24", flanneld_vxlan("198.18.1.51", 0x51))
    raw.put("10.244.51.0/24", flanneld_vxlan("198.18.1.51", 0x51))  # same value again (a renewal): no event
    raw.put("10.244.51.0/24", flanneld_vxlan("198.18.1.51", 0x99))  # new VtepMAC
    # A host-gw lease in a vxlan network is skipped, as flannel's vxlan backend ignores it.
    raw.put("10.244.52.0/24", b'{"PublicIP":"198.18.1.52","PublicIPv6":null,"BackendType":"host-gw"}')
    raw.delete("10.244.50.0/24")
    sink.wait_for(lambda s: len(s.events) == 4, what="four events")
    assert kinds(sink) == [("added", "10.244.50.0/24"), ("added", "10.244.51.0/24"), ("changed", "10.244.51.0/24"),
                           ("removed", "10.244.50.0/24")]
    assert manager.skipped.current() == {"wrong_backend_type": 1}
    changed = sink.events[2].lease
    assert (str(changed.public_ip), changed.backend_type, changed.vni, changed.vtep_mac) == \
        ("198.18.1.51", "vxlan", 1, MAC % 0x99)
    assert sink.threads == {"flannel-bpf-events"}  # one delivery thread
    assert manager.lease.subnet not in sink.state()  # our own lease is never a peer
    assert set(manager.peers()) == set(sink.state())


def test_unparseable_keys_and_values_are_skipped_and_logged_once(network_config, agents, raw, caplog):
    raw.put(raw.prefix + "/subnets/not-a-subnet", flanneld_vxlan("198.18.1.60", 0x60))
    raw.put("10.244.61.0/24", b"{not json")
    manager, sink = agents(1)
    raw.put("10.244.61.0/24", b"{not json")  # the same bad value again: no second warning
    raw.put("10.244.62.0/24", flanneld_vxlan("198.18.1.62", 0x62))
    sink.wait_for_peers({IPv4Network("10.244.62.0/24")})
    raw.put("10.244.62.0/24", b'{"PublicIP":"198.18.1.62","BackendType":"vxlan","BackendData":{"VNI":1}}')
    sink.wait_for_peers(set())  # a peer whose lease turns unusable is removed
    raw.put("10.244.62.0/24", flanneld_vxlan("198.18.1.62", 0x62))
    sink.wait_for_peers({IPv4Network("10.244.62.0/24")})
    assert kinds(sink) == [("added", "10.244.62.0/24"), ("removed", "10.244.62.0/24"), ("added", "10.244.62.0/24")]
    text = caplog.text
    assert text.count("subnets/10.244.61.0-24: value is not JSON") == 1
    assert text.count("subnets/not-a-subnet: key") == 1
    assert "bad vxlan BackendData.VtepMAC None" in text
    assert "Traceback" not in text


def test_expired_peer_disappears(network_config, agents):
    watcher, sink = agents(1)
    dying, _ = agents(2, ttl=2, renew_margin=1)
    sink.wait_for_peers({dying.lease.subnet})
    dying.stop()  # a crash: no release, the key stays until its 2 s etcd lease runs out
    sink.wait_for_peers(set(), timeout=8)
    assert kinds(sink) == [("added", str(dying.lease.subnet)), ("removed", str(dying.lease.subnet))]


def test_compaction_during_a_watch_loses_no_event(network_config, agents, raw):
    manager, sink = agents(1)
    raw.put("10.244.70.0/24", flanneld_vxlan("198.18.1.70", 0x70))
    sink.wait_for_peers({IPv4Network("10.244.70.0/24")})
    raw.compact_now()
    raw.put("10.244.71.0/24", flanneld_vxlan("198.18.1.71", 0x71))
    raw.delete("10.244.70.0/24")
    sink.wait_for_peers({IPv4Network("10.244.71.0/24")})
    assert kinds(sink) == [("added", "10.244.70.0/24"), ("added", "10.244.71.0/24"), ("removed", "10.244.70.0/24")]


def test_etcd_restart_mid_watch_loses_no_event(etcd_cluster, prefix, open_registry, agents, network_doc, caplog):
    cluster = etcd_cluster(1)
    open_registry(cluster.endpoints, prefix).put_network_config(json.dumps(network_doc))
    manager, sink = agents(1, endpoints=cluster.endpoints, backoff_max=0.5, renew_retry=0.5, ttl=4,
                           renew_margin=2)
    assert manager.wait_synced(5)
    member = cluster.members[0]
    cluster.kill_member(member)
    time.sleep(2.5)  # past a renewal, which fails and is retried
    cluster.start_member(member)
    cluster.wait_healthy()
    raw = RawEtcd(member, prefix)
    try:
        raw.put("10.244.80.0/24", flanneld_vxlan("198.18.1.80", 0x80))
        sink.wait_for_peers({IPv4Network("10.244.80.0/24")})
    finally:
        raw.close()
    assert "etcd watch interrupted" in caplog.text and "etcd watch re-established" in caplog.text
    assert "could not renew lease" in caplog.text
    time.sleep(2)  # the lease (4 s TTL) lives on through renewals after the restart
    assert manager.reacquired_count == 0
    assert open_registry(cluster.endpoints, prefix).get_lease(manager.lease.subnet).public_ip == manager.attrs.public_ip


def test_member_down_with_writes_and_compaction_loses_no_event(etcd_cluster, prefix, open_registry, agents,
                                                               network_doc, caplog):
    cluster = etcd_cluster(3)
    first, second, third = cluster.members
    open_registry(cluster.endpoints, prefix).put_network_config(json.dumps(network_doc))
    # One agent can only reach the member that will die; the other knows all three endpoints.
    pinned, pinned_sink = agents(1, endpoints=[first.client_url], backoff_max=0.5)
    roaming, roaming_sink = agents(2, endpoints=cluster.endpoints, backoff_max=0.5)
    raw = RawEtcd(second, prefix)
    try:
        raw.put("10.244.90.0/24", flanneld_vxlan("198.18.1.90", 0x90))
        raw.put("10.244.92.0/24", flanneld_vxlan("198.18.1.92", 0x92))
        before = {IPv4Network("10.244.90.0/24"), IPv4Network("10.244.92.0/24")}
        pinned_sink.wait_for_peers(before | {roaming.lease.subnet})
        roaming_sink.wait_for_peers(before | {pinned.lease.subnet})

        cluster.kill_member(first)
        raw.put("10.244.91.0/24", flanneld_vxlan("198.18.1.91", 0x91))  # added while it is down
        raw.delete("10.244.90.0/24")  # removed while it is down
        raw.put("10.244.92.0/24", flanneld_vxlan("198.18.1.92", 0x77))  # changed while it is down
        raw.compact_now()  # and the history the pinned agent would resume from is gone
        after = {IPv4Network("10.244.91.0/24"), IPv4Network("10.244.92.0/24")}
        roaming_sink.wait_for_peers(after | {pinned.lease.subnet})  # moved to a live member at once

        cluster.start_member(first)
        cluster.wait_healthy([first])
        pinned_sink.wait_for_peers(after | {roaming.lease.subnet}, timeout=15)
        # The re-list diff is delivered in order (removed, added, changed): the subnet set
        # matches one event before the change of 10.244.92.0/24 arrives, so wait for it too.
        for sink in (pinned_sink, roaming_sink):
            sink.wait_for(lambda s: s.state()[IPv4Network("10.244.92.0/24")].vtep_mac == MAC % 0x77,
                          what="the VtepMAC change of 10.244.92.0/24")
        assert "fell behind etcd compaction" in caplog.text  # resumed by re-listing and diffing

        raw.put("10.244.93.0/24", flanneld_vxlan("198.18.1.93", 0x93))  # live events flow again
        pinned_sink.wait_for(lambda s: IPv4Network("10.244.93.0/24") in s.state(), what="10.244.93.0/24")
        roaming_sink.wait_for(lambda s: IPv4Network("10.244.93.0/24") in s.state(), what="10.244.93.0/24")
    finally:
        raw.close()
