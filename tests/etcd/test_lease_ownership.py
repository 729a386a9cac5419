"""Our own lease against another node's: a key of ours overwritten, leases that name our public
IP, a subnet.env that disagrees with etcd. Pods live on our subnet (holds_pods) unless a test
says otherwise: the agent never renumbers them, never adopts a lease it did not write, and says
so (`conflict`) until the key is ours or free again."""
import time
from contextlib import contextmanager
from ipaddress import IPv4Network
from pathlib import Path

import etcd3

from flannel_bpf.controller.lease import encode_lease_value, subnet_key
from flannel_bpf.controller.subnet_env import read_previous_subnet, write_subnet_env

NETWORK = IPv4Network("10.244.0.0/16")


@contextmanager
def client_of(etcd):
    """A plain etcd client, as an operator or a hostile node writes keys."""
    member = etcd.members[0]
    client = etcd3.client(host=member.host, port=member.client_port, timeout=5)
    try:
        yield client
    finally:
        client.close()


def put(etcd, key: str, value: str) -> None:
    with client_of(etcd) as client:
        client.put(key, value)


def delete(etcd, key: str) -> None:
    with client_of(etcd) as client:
        client.delete(key)


def held_by_another(etcd, prefix, tmp_path, subnet: IPv4Network, holder) -> Path:
    """A subnet.env of ours naming `subnet`, whose key `holder` (LeaseAttrs) has in etcd."""
    subnet_file = tmp_path / "node" / "subnet.env"
    write_subnet_env(subnet_file, NETWORK, subnet, 1450, False)
    put(etcd, subnet_key(prefix, subnet), encode_lease_value(holder))
    return subnet_file


def pods_live(subnet: IPv4Network) -> bool:
    return True


def test_our_key_overwritten_keeps_our_subnet_and_takes_it_back_once_free(etcd, prefix, network_config, agents,
                                                                           tmp_path, node_attrs, caplog):
    manager, sink = agents(20, holds_pods=pods_live, renew_retry=0.2)
    ours = manager.lease.subnet
    key = subnet_key(prefix, ours)
    put(etcd, key, encode_lease_value(node_attrs(21)))  # a hijack: same key, another PublicIP

    deadline = time.monotonic() + 10
    while manager.conflict is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert manager.conflict is not None and str(node_attrs(21).public_ip) in manager.conflict
    time.sleep(1.0)  # several keeper retries: it must still not move
    assert manager.lease.subnet == ours and sink.reacquired == []
    assert read_previous_subnet(tmp_path / "agent20" / "subnet.env") == ours
    assert ours not in sink.state()  # our subnet is never taken for a peer
    assert caplog.text.count("lease conflict: our subnet") == 1  # loud, once

    delete(etcd, key)  # the operator removes the hostile key: ours again, same subnet
    sink.wait_for(lambda s: s.reacquired, what="re-acquisition")
    assert sink.reacquired[0][1].subnet == ours and manager.conflict is None
    assert manager.registry.get_lease(ours).public_ip == node_attrs(20).public_ip


def test_restart_takes_the_subnet_of_subnet_env_not_a_lease_another_node_wrote_with_our_ip(
        etcd, prefix, network_config, agents, tmp_path, node_attrs, caplog):
    subnet_file = tmp_path / "node" / "subnet.env"
    first, _ = agents(22, subnet_file=subnet_file, holds_pods=pods_live)
    ours = first.lease.subnet
    first.stop()  # a restart: our live lease stays in etcd
    hostile = IPv4Network("10.244.250.0/24")
    put(etcd, subnet_key(prefix, hostile), encode_lease_value(node_attrs(22)))  # names our PublicIP

    again, _ = agents(22, subnet_file=subnet_file, holds_pods=pods_live)
    assert again.lease.subnet == ours and again.conflict is None
    assert read_previous_subnet(subnet_file) == ours
    assert f"lease(s) {hostile} also name our public IP" in caplog.text

    again.stop(release=True)  # our lease gone meanwhile: still not the hostile one
    third, _ = agents(22, subnet_file=subnet_file, holds_pods=pods_live)
    assert third.lease.subnet == ours
    assert "that name our public IP" in caplog.text


def test_restart_whose_subnet_another_node_holds_serves_it_in_conflict_until_it_is_free(
        etcd, prefix, network_config, agents, tmp_path, node_attrs):
    ours = IPv4Network("10.244.77.0/24")
    subnet_file = held_by_another(etcd, prefix, tmp_path, ours, node_attrs(24))
    manager, sink = agents(23, subnet_file=subnet_file, holds_pods=pods_live, renew_retry=0.2)
    assert manager.lease.subnet == ours and manager.conflict is not None
    assert read_previous_subnet(subnet_file) == ours
    assert manager.registry.get_lease(ours).public_ip == node_attrs(24).public_ip  # not overwritten

    delete(etcd, subnet_key(prefix, ours))
    sink.wait_for(lambda s: s.reacquired, what="re-acquisition")
    assert manager.lease.subnet == ours and manager.conflict is None
    assert manager.registry.get_lease(ours).public_ip == node_attrs(23).public_ip


def test_without_pods_a_taken_subnet_is_left_for_a_new_one_as_flanneld_does(
        etcd, prefix, network_config, agents, tmp_path, node_attrs):
    ours = IPv4Network("10.244.78.0/24")
    subnet_file = held_by_another(etcd, prefix, tmp_path, ours, node_attrs(26))
    manager, _ = agents(25, subnet_file=subnet_file)
    assert manager.lease.subnet != ours and manager.conflict is None
    assert read_previous_subnet(subnet_file) == manager.lease.subnet
