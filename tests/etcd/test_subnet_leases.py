"""Acquiring, reusing, renewing and losing subnet leases in a real etcd."""
import json
import threading
import time
from ipaddress import IPv4Address, IPv4Network

import etcd3
import etcd3.etcdrpc as etcdrpc
import pytest

from flannel_bpf.controller.config import ConfigError
from flannel_bpf.controller.lease import LeaseAttrs, encode_lease_value, subnet_key, vxlan_backend_data
from flannel_bpf.controller.subnet_env import read_previous_subnet, read_subnet_env
from flannel_bpf.controller.registry import EtcdError
from flannel_bpf.controller.subnet_manager import OutOfSubnets

TWENTY_SUBNETS = {"Network": "10.244.0.0/16", "SubnetMin": "10.244.1.0", "SubnetMax": "10.244.20.0",
                  "Backend": {"Type": "vxlan"}}


def raw_client(etcd) -> etcd3.Etcd3Client:
    member = etcd.members[0]
    return etcd3.client(host=member.host, port=member.client_port, timeout=5)


def stored(etcd, prefix) -> dict[str, bytes]:
    client = raw_client(etcd)
    try:
        return {meta.key.decode(): value for value, meta in client.get_prefix(prefix + "/subnets/")}
    finally:
        client.close()


def test_our_lease_in_etcd_is_byte_identical_to_flanneld(etcd, prefix, registry, network_config, agents, tmp_path):
    manager, _ = agents(0, attrs=LeaseAttrs(IPv4Address("192.168.64.3"), "vxlan",
                                             vxlan_backend_data(1, "c6:d2:32:6f:8f:44")))
    key = subnet_key(prefix, manager.lease.subnet)
    assert stored(etcd, prefix) == {key: b'{"PublicIP":"192.168.64.3","PublicIPv6":null,"BackendType":"vxlan",'
                                         b'"BackendData":{"VNI":1,"VtepMAC":"c6:d2:32:6f:8f:44"}}'}
    assert network_config.fits(manager.lease.subnet)
    # subnet.env is written with the first host address of the leased subnet.
    env = read_subnet_env(tmp_path / "agent0" / "subnet.env")
    assert env == {"FLANNEL_NETWORK": "10.244.0.0/16",
                   "FLANNEL_SUBNET": f"{manager.lease.subnet.network_address + 1}/24",
                   "FLANNEL_MTU": "1450", "FLANNEL_IPMASQ": "false"}
    # The etcd lease behind the key has the TTL we asked for.
    client = raw_client(etcd)
    try:
        assert 25 <= client.get_lease_info(manager.lease.etcd_lease_id).TTL <= 30
    finally:
        client.close()


def test_twenty_agents_at_once_never_share_a_subnet(etcd, prefix, registry, agents):
    config = registry.put_network_config(json.dumps(TWENTY_SUBNETS))  # exactly 20 subnets for 20 agents
    managers = [agents(i, config=config, start=False)[0] for i in range(20)]
    barrier = threading.Barrier(len(managers))
    failures = []

    def start(manager):
        barrier.wait()
        try:
            manager.start()
        except Exception as exc:  # reported below
            failures.append(exc)

    threads = [threading.Thread(target=start, args=(m,)) for m in managers]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert failures == []
    subnets = [m.lease.subnet for m in managers]
    assert len(set(subnets)) == 20
    assert set(subnets) == set(config.subnets())
    # etcd agrees: one key per subnet, each held by the agent that thinks it holds it.
    keys = stored(etcd, prefix)
    for manager in managers:
        assert keys[subnet_key(prefix, manager.lease.subnet)] == encode_lease_value(manager.attrs)
    # Every agent sees the 19 others as peers, never itself.
    for manager in managers:
        others = set(subnets) - {manager.lease.subnet}
        manager.sink.wait_for_peers(others)
    # A 21st agent finds no room, says so, and writes nothing.
    late, _ = agents(20, config=config, start=False)
    with pytest.raises(OutOfSubnets, match="out of subnets: every /24 from 10.244.1.0 to 10.244.20.0 is leased"):
        late.start()
    assert len(stored(etcd, prefix)) == 20


def etcd_lease_ids(etcd) -> set[int]:
    client = raw_client(etcd)
    try:
        return {status.ID for status in client.leasestub.LeaseLeases(etcdrpc.LeaseLeasesRequest(), 5).leases}
    finally:
        client.close()


def test_lost_race_returns_none_and_leaves_no_etcd_lease(etcd, registry, network_config, node_attrs):
    subnet = IPv4Network("10.244.7.0/24")
    assert registry.create_lease(subnet, node_attrs(1), ttl=30) is not None
    before = etcd_lease_ids(etcd)
    assert registry.create_lease(subnet, node_attrs(2), ttl=30) is None
    assert etcd_lease_ids(etcd) - before == set()  # the loser's etcd lease was revoked
    assert registry.get_lease(subnet).public_ip == node_attrs(1).public_ip  # the winner's value stands


def test_restarted_agent_reuses_the_lease_of_its_public_ip(etcd, prefix, network_config, agents, tmp_path):
    first, _ = agents(3)
    subnet, old_etcd_lease = first.lease.subnet, first.lease.etcd_lease_id
    first.stop()  # a crash or restart: the lease stays in etcd
    # A fresh start of the same node (same public IP, no subnet.env): same subnet, renewed key.
    again, _ = agents(3, subnet_file=tmp_path / "elsewhere" / "subnet.env")
    assert again.lease.subnet == subnet
    assert again.lease.etcd_lease_id != old_etcd_lease
    assert list(stored(etcd, prefix)) == [subnet_key(prefix, subnet)]


def test_restarted_agent_gets_the_subnet_from_its_previous_subnet_env(etcd, prefix, network_config, agents,
                                                                      tmp_path, node_attrs):
    subnet_file = tmp_path / "node" / "subnet.env"
    first, _ = agents(4, subnet_file=subnet_file)
    subnet = first.lease.subnet
    first.stop(release=True)
    assert stored(etcd, prefix) == {}
    assert read_previous_subnet(subnet_file) == subnet
    # Same node with a new public IP: no lease of its own, but subnet.env names the old subnet.
    again, _ = agents(5, subnet_file=subnet_file)
    assert again.lease.subnet == subnet
    assert again.lease.public_ip == node_attrs(5).public_ip


def test_previous_subnet_taken_by_another_node_is_not_stolen(etcd, prefix, registry, network_config, agents,
                                                            tmp_path, caplog, node_attrs):
    subnet_file = tmp_path / "node" / "subnet.env"
    first, _ = agents(6, subnet_file=subnet_file)
    subnet = first.lease.subnet
    first.stop(release=True)
    registry.create_lease(subnet, node_attrs(7), ttl=30)  # another node took it meanwhile
    again, _ = agents(8, subnet_file=subnet_file)
    assert again.lease.subnet != subnet
    assert f"previous subnet {subnet} is leased by another node" in caplog.text


def test_own_lease_outside_the_config_is_replaced(etcd, prefix, registry, agents, caplog, node_attrs, network_doc):
    registry.put_network_config(json.dumps(network_doc))
    registry.create_lease(IPv4Network("10.244.200.0/24"), node_attrs(9), ttl=30)
    config = registry.put_network_config(json.dumps({**network_doc, "SubnetMax": "10.244.100.0"}))
    manager, _ = agents(9, config=config)
    assert manager.lease.subnet != IPv4Network("10.244.200.0/24") and config.fits(manager.lease.subnet)
    assert list(stored(etcd, prefix)) == [subnet_key(prefix, manager.lease.subnet)]
    assert "does not fit the network config" in caplog.text


def test_renewal_keeps_the_lease_past_its_ttl(etcd, prefix, network_config, agents):
    manager, _ = agents(10, ttl=2, renew_margin=1)
    first_expiry = manager.lease.expires_at
    time.sleep(3.5)  # past the 2 s TTL: only renewals keep the key
    assert manager.lease.expires_at > first_expiry + 1
    assert subnet_key(prefix, manager.lease.subnet) in stored(etcd, prefix)
    assert manager.reacquired_count == 0


def test_deleted_own_lease_is_reacquired(etcd, prefix, registry, network_config, agents):
    manager, sink = agents(11)
    old = manager.lease
    client = raw_client(etcd)
    try:
        client.delete(subnet_key(prefix, old.subnet))
    finally:
        client.close()
    sink.wait_for(lambda s: s.reacquired, what="re-acquisition")
    previous, new = sink.reacquired[0]
    assert previous == old and new.subnet == old.subnet  # it was free again: same subnet
    assert stored(etcd, prefix) == {subnet_key(prefix, old.subnet): encode_lease_value(manager.attrs)}
    assert sink.events == []  # our own lease never shows as a peer


def test_own_subnet_taken_over_moves_us_and_shows_the_taker_as_a_peer(etcd, prefix, registry, network_config,
                                                                      agents, tmp_path, node_attrs):
    manager, sink = agents(12)
    old = manager.lease
    client = raw_client(etcd)
    try:  # an operator hands our subnet to another node
        client.put(subnet_key(prefix, old.subnet), encode_lease_value(node_attrs(13)))
    finally:
        client.close()
    sink.wait_for(lambda s: s.reacquired, what="re-acquisition")
    new = sink.reacquired[0][1]
    assert new.subnet != old.subnet and manager.lease == new
    assert read_previous_subnet(tmp_path / "agent12" / "subnet.env") == new.subnet
    sink.wait_for_peers({old.subnet})
    assert sink.state()[old.subnet].public_ip == node_attrs(13).public_ip


def test_bad_config_in_etcd_is_an_error_and_writes_nothing(etcd, prefix, registry):
    client = raw_client(etcd)
    try:
        client.put(prefix + "/config", json.dumps({"Network": "10.244.0.0/16", "SubnetLen": 31,
                                                   "Backend": {"Type": "vxlan"}}))
    finally:
        client.close()
    with pytest.raises(ConfigError, match="SubnetLen: must be at most 30"):
        registry.wait_for_network_config()
    assert stored(etcd, prefix) == {}


def test_bad_config_is_never_stored(etcd, prefix, registry):
    for bad in ('{"Network": "10.244.0.0/16", "Backend": {"Type": "bpf", "Decap": "skb"}}', "{oops"):
        with pytest.raises(ConfigError):
            registry.put_network_config(bad)
    assert registry.get_network_config_text() is None


def test_missing_config_is_waited_for(etcd, prefix, registry, caplog, network_doc):
    timer = threading.Timer(0.5, registry.put_network_config, args=(json.dumps(network_doc),))
    timer.start()
    try:
        config = registry.wait_for_network_config(interval=0.1)
    finally:
        timer.cancel()
    assert config.network == IPv4Network("10.244.0.0/16")
    assert f"no network config at {prefix}/config yet" in caplog.text


def enable_auth(cluster, password: str) -> None:
    """etcd's auth as an operator sets it up: a root user with the root role, then auth on
    (through a client that presents the cluster's certificate when it serves TLS)."""
    member = cluster.members[0]
    tls = member.tls
    files = {} if tls is None else {"ca_cert": str(tls.ca), "cert_key": str(tls.key), "cert_cert": str(tls.cert)}
    client = etcd3.client(host=member.host, port=member.client_port, timeout=5, **files)
    try:
        auth = etcdrpc.AuthStub(client.channel)
        auth.RoleAdd(etcdrpc.AuthRoleAddRequest(name="root"), 5)
        auth.UserAdd(etcdrpc.AuthUserAddRequest(name="root", password=password), 5)
        auth.UserGrantRole(etcdrpc.AuthUserGrantRoleRequest(user="root", role="root"), 5)
        auth.AuthEnable(etcdrpc.AuthEnableRequest(), 5)
    finally:
        client.close()


def test_username_and_password(etcd_cluster, prefix, open_registry, network_doc, agents, caplog):
    # Tokens live 1 s here, so the agent must log in again on its own while it works.
    cluster = etcd_cluster(1, extra_args=("--auth-token-ttl", "1"))
    enable_auth(cluster, "s3cret")
    with pytest.raises(EtcdError, match="user name is empty|permission denied"):
        open_registry(cluster.endpoints, prefix).get_network_config_text()
    with pytest.raises(EtcdError, match="authentication failed"):
        open_registry(cluster.endpoints, prefix, username="root", password="wrong").get_network_config_text()
    registry = open_registry(cluster.endpoints, prefix, username="root", password="s3cret")
    registry.put_network_config(json.dumps(network_doc))
    manager, _ = agents(1, endpoints=cluster.endpoints, etcd_options={"username": "root", "password": "s3cret"},
                        ttl=2, renew_margin=1)
    time.sleep(3)  # renewals after the first token expired
    assert registry.get_lease(manager.lease.subnet).public_ip == manager.attrs.public_ip
    assert manager.reacquired_count == 0
    assert "logging in again" in caplog.text
