"""The peer watch when etcd misbehaves: a connection that hangs (no error, no bytes), a watch
the server cancels, and etcd missing at start. Each time the agent notices, shows it (the
watch is down: /readyz answers 503, flannel_bpf_etcd_watch_up is 0), reconnects with backoff,
re-syncs and counts the reconnect."""
import json
import select
import socket
import threading
import time
from ipaddress import IPv4Network

import pytest

from flannel_bpf.controller import registry as registry_module
from flannel_bpf.controller.registry import EtcdOptions, SubnetRegistry

from test_peer_watch import RawEtcd, flanneld_vxlan


class FreezableProxy:
    """A TCP proxy on 127.0.0.1 in front of one etcd member. freeze() stops moving bytes in both
    directions while every connection stays open: to the client, the server hangs."""

    def __init__(self, host: str, port: int):
        self.target = (host, port)
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(0.2)
        self.endpoint = f"http://127.0.0.1:{self.listener.getsockname()[1]}"
        self.frozen = threading.Event()
        self._closed = threading.Event()
        self._sockets: list[socket.socket] = []
        self._threads = [threading.Thread(target=self._accept, name="proxy-accept", daemon=True)]
        self._threads[0].start()

    def _accept(self):
        while not self._closed.is_set():
            try:
                client, _ = self.listener.accept()
            except (socket.timeout, OSError):
                continue
            upstream = socket.create_connection(self.target, timeout=5)
            self._sockets += [client, upstream]
            thread = threading.Thread(target=self._pump, args=(client, upstream), daemon=True)
            thread.start()
            self._threads.append(thread)

    def _pump(self, a: socket.socket, b: socket.socket):
        peer = {a: b, b: a}
        try:
            while not self._closed.is_set():
                if self.frozen.is_set():
                    time.sleep(0.05)
                    continue
                readable, _, _ = select.select([a, b], [], [], 0.2)
                for sock in readable:
                    data = sock.recv(65536)
                    if not data:
                        return
                    peer[sock].sendall(data)
        except OSError:
            return
        finally:
            a.close()
            b.close()

    def close(self):
        self._closed.set()
        self.listener.close()
        for thread in self._threads:
            thread.join(5)
        for sock in self._sockets:
            sock.close()


def wait_until(predicate, timeout: float, what: str) -> float:
    start = time.monotonic()
    while not predicate():
        if time.monotonic() - start > timeout:
            raise AssertionError(f"{what}: not true after {timeout} s")
        time.sleep(0.05)
    return time.monotonic() - start


@pytest.fixture
def quick_probes(monkeypatch):
    """Progress probes after 1 s of silence, 1 s to answer (10 s and 5 s in service)."""
    monkeypatch.setattr(registry_module, "WATCH_PROBE_AFTER", 1.0)
    monkeypatch.setattr(registry_module, "WATCH_PROBE_TIMEOUT", 1.0)


def test_an_idle_watch_on_a_healthy_etcd_stays_up(etcd, prefix, network_config, agents, quick_probes, caplog):
    manager, sink = agents(1, ttl=300, renew_margin=10)
    wait_until(lambda: manager.watch_down_for() is None, 10, "watch up")
    downs = []
    for _ in range(50):  # 5 s: several probes, each answered
        downs.append(manager.watch_down_for())
        time.sleep(0.1)
    assert downs == [None] * 50 and manager.reconnect_count == 0
    assert "etcd watch interrupted" not in caplog.text


def test_a_hung_connection_is_noticed_shown_and_reconnected(etcd, prefix, network_config, agents, quick_probes,
                                                            caplog):
    member = etcd.members[0]
    proxy = FreezableProxy(member.host, member.client_port)
    raw = RawEtcd(member, prefix)
    try:
        # A long TTL: no renewal falls into the frozen time.
        manager, sink = agents(1, endpoints=[proxy.endpoint], ttl=300, renew_margin=10, backoff_max=1.0)
        wait_until(lambda: manager.watch_down_for() is None, 10, "watch up")
        proxy.frozen.set()
        time.sleep(0.5)  # every pump is past its last select()
        raw.put("10.244.40.0/24", flanneld_vxlan("198.18.1.40", 0x40))  # unseen while frozen
        # After 1 s of silence the watch asks etcd for progress; no answer in 1 s ends it.
        took = wait_until(lambda: manager.watch_down_for() is not None, 10, "the hung watch noticed")
        print(f"\nhung connection noticed after {took:.1f} s")
        assert IPv4Network("10.244.40.0/24") not in manager.peers()
        time.sleep(2)  # still frozen: reconnect attempts fail and back off
        assert manager.watch_down_for() >= 2 and manager.reconnect_count == 0
        proxy.frozen.clear()
        sink.wait_for_peers({IPv4Network("10.244.40.0/24")}, timeout=30)
        wait_until(lambda: manager.watch_down_for() is None, 10, "watch up again")
        assert manager.reconnect_count >= 1
        assert "etcd watch interrupted" in caplog.text and "etcd watch re-established" in caplog.text
    finally:
        raw.close()
        proxy.close()


def test_a_watch_cancelled_by_the_server_is_reestablished(etcd_cluster, prefix, open_registry, agents,
                                                          network_doc, caplog):
    """A member that loses its leader cancels its "hasleader" watches ("no leader")."""
    cluster = etcd_cluster(3)
    first, second, third = cluster.members
    open_registry(cluster.endpoints, prefix).put_network_config(json.dumps(network_doc))
    manager, sink = agents(1, endpoints=[first.client_url], ttl=300, renew_margin=10, backoff_max=1.0)
    wait_until(lambda: manager.watch_down_for() is None, 10, "watch up")
    cluster.kill_member(second)
    cluster.kill_member(third)
    wait_until(lambda: manager.watch_down_for() is not None, 30, "the cancelled watch noticed")
    assert "cancelled the watch" in caplog.text or "no leader" in caplog.text
    cluster.start_member(second)
    cluster.start_member(third)
    cluster.wait_healthy()
    raw = RawEtcd(first, prefix)
    try:
        raw.put("10.244.41.0/24", flanneld_vxlan("198.18.1.41", 0x41))
        sink.wait_for_peers({IPv4Network("10.244.41.0/24")}, timeout=30)
    finally:
        raw.close()
    wait_until(lambda: manager.watch_down_for() is None, 10, "watch up again")
    assert manager.reconnect_count >= 1


def test_waiting_for_an_unreachable_etcd_is_never_silent(monkeypatch, caplog):
    monkeypatch.setattr(registry_module, "STILL_WAITING_EVERY", 0.3)
    dead = f"http://127.0.0.1:{socket.create_server(('127.0.0.1', 0)).getsockname()[1]}"  # closed at once
    stop = threading.Event()
    threading.Timer(1.5, stop.set).start()
    with SubnetRegistry(EtcdOptions(endpoints=(dead,), timeout=0.5)) as registry:
        with pytest.raises(InterruptedError, match="stopped while waiting"):
            registry.wait_for_network_config(stop, interval=0.1)
    assert caplog.text.count("etcd unreachable") >= 3  # the first warning and reminders
    assert "still waiting after" in caplog.text
