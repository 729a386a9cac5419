"""flannel-bpf-cni against the CNI spec, every command, good and bad input."""
import json
import re
import subprocess
from pathlib import Path

import pytest

from flannel_bpf import deploy

from flannel_bpf.cni.pod import host_ifname
from flannel_bpf.loader.bpf.maps import DataPlaneMaps
from cni_state import netns_links, ping_from_node

pytestmark = pytest.mark.usefixtures("require_root")

NETKIT_MISSING = "CONFIG_NETKIT"


def endpoints(node):
    with DataPlaneMaps(node.pin_dir) as maps:
        return {str(e.ip): e for e in maps.list_endpoints()}


def assert_error(status, out, code, words=""):
    """Spec-shaped: non-zero exit, {cniVersion, code, msg} on stdout."""
    assert status != 0
    assert set(out) >= {"cniVersion", "code", "msg"} and out["code"] == code, out
    assert re.search(words, out["msg"]), out


def test_version_lists_what_the_plugin_speaks(node):
    status, out, _ = node.call("VERSION", {"cniVersion": "1.0.0"}, container=None, ifname=None)
    assert status == 0 and "1.0.0" in out["supportedVersions"] and "1.1.0" in out["supportedVersions"]


def test_veth_pod_add_check_del_del(node):
    pod = node.new_pod()
    conf = node.config("veth")
    status, result, err = node.call("ADD", conf, netns=pod)
    assert status == 0, (result, err)
    host = host_ifname("veth", "c1", "eth0")
    assert result["cniVersion"] == "1.0.0"
    assert [i["name"] for i in result["interfaces"]] == [host, "eth0"]
    assert result["interfaces"][1]["sandbox"] == f"/run/netns/{pod}"
    (ip,) = result["ips"]
    assert ip["address"] == "10.244.77.2/32" and ip["gateway"] == "10.244.77.1" and ip["interface"] == 1
    assert node.allocations() == ["10.244.77.2"]
    # the host side, its route, the pod side with the MTU from subnet.env, the endpoint entry
    assert host in netns_links(node.netns)
    assert netns_links(pod)["eth0"]["mtu"] == 1410
    routes = subprocess.run(["nsenter", f"--net=/run/netns/{node.netns}", "ip", "-j", "route"],
                            capture_output=True, text=True, check=True).stdout
    assert next(r for r in json.loads(routes) if r["dst"] == "10.244.77.2")["dev"] == host
    entry = endpoints(node)["10.244.77.2"]
    assert entry.ifindex == netns_links(node.netns)[host]["ifindex"]
    assert entry.mac == result["interfaces"][1]["mac"]
    # real packets both ways: the node pings the pod, which answers through its gateway
    assert ping_from_node(node.netns, "10.244.77.2")

    prev = {**conf, "prevResult": result}
    status, out, err = node.call("CHECK", prev, netns=pod)
    assert (status, out) == (0, None), (out, err)

    status, out, _ = node.call("DEL", conf, netns=pod)
    assert (status, out) == (0, None)
    assert host not in netns_links(node.netns) and "eth0" not in netns_links(pod)
    assert "10.244.77.2" not in endpoints(node) and node.allocations() == []
    status, out, _ = node.call("DEL", conf, netns=pod)  # again: nothing to do, still success
    assert (status, out) == (0, None)


def test_check_names_what_is_wrong(node):
    pod = node.new_pod()
    conf = node.config("veth")
    status, result, _ = node.call("ADD", conf, netns=pod)
    assert status == 0
    try:
        subprocess.run(["nsenter", f"--net=/run/netns/{pod}", "ip", "addr", "flush", "dev", "eth0"], check=True)
        status, out, _ = node.call("CHECK", {**conf, "prevResult": result}, netns=pod)
        assert_error(status, out, 100, "does not have 10.244.77.2")
    finally:
        assert node.call("DEL", conf, netns=pod)[0] == 0


def test_check_without_a_previous_result_is_refused(node):
    pod = node.new_pod()
    conf = node.config("veth")
    assert node.call("ADD", conf, netns=pod)[0] == 0
    try:
        status, out, _ = node.call("CHECK", conf, netns=pod)
        assert_error(status, out, 7, "prevResult")
    finally:
        assert node.call("DEL", conf, netns=pod)[0] == 0


def test_netkit_pod_or_a_clean_refusal(node):
    """On a kernel without netkit: one spec-shaped error naming CONFIG_NETKIT, the address
    back in host-local's pool, no device on either side. With netkit: a pod like the veth one."""
    pod = node.new_pod()
    conf = node.config("netkit")
    status, out, _ = node.call("ADD", conf, netns=pod)
    if status != 0:
        assert_error(status, out, 101, NETKIT_MISSING)
        assert node.allocations() == [] and set(netns_links(pod)) == {"lo"}
        assert not [n for n in netns_links(node.netns) if n.startswith("lxc")]
        assert "10.244.77.2" not in endpoints(node)
        return
    host = host_ifname("netkit", "c1", "eth0")
    assert out["ips"][0]["address"] == "10.244.77.2/32" and "gateway" not in out["ips"][0]
    assert endpoints(node)["10.244.77.2"].ifindex == netns_links(node.netns)[host]["ifindex"]
    assert ping_from_node(node.netns, "10.244.77.2")
    assert node.call("CHECK", {**conf, "prevResult": out}, netns=pod)[:2] == (0, None)
    assert node.call("DEL", conf, netns=pod)[:2] == (0, None)
    assert host not in netns_links(node.netns) and node.allocations() == []


@pytest.mark.parametrize("case, code, words", [
    ("no container id", 4, "CNI_CONTAINERID"),
    ("no cniVersion", 7, "cniVersion"),
    ("unknown cniVersion", 1, "9.9.9"),
    ("not JSON", 6, "not JSON"),
    ("unknown podDevice", 7, "podDevice"),
    ("unknown field", 2, "bogus"),
    ("no subnet.env", 50, "no such file"),
    ("missing netns", 3, "does not exist"),
    ("bad ifname", 4, "CNI_IFNAME"),
])
def test_bad_add_is_refused_and_leaves_nothing(node, case, code, words):
    pod = node.new_pod()
    conf, kw = node.config("veth"), {"netns": pod}
    if case == "no container id":
        kw["container"] = None
    elif case == "no cniVersion":
        conf.pop("cniVersion")
    elif case == "unknown cniVersion":
        conf["cniVersion"] = "9.9.9"
    elif case == "not JSON":
        conf = "{not json"
    elif case == "unknown podDevice":
        conf["podDevice"] = "macvlan"
    elif case == "unknown field":
        conf["bogus"] = 1
    elif case == "no subnet.env":
        node.subnet_file.unlink()
    elif case == "missing netns":
        kw["netns"] = "/run/netns/fbcni-no-such-namespace"
    elif case == "bad ifname":
        kw["ifname"] = "eth0/x"
    status, out, _ = node.call("ADD", conf, **kw)
    assert_error(status, out, code, words)
    assert node.allocations() == [] and set(netns_links(pod)) == {"lo"}
    assert not [n for n in netns_links(node.netns) if n.startswith(("veth", "lxc"))]


def test_status_says_whether_pods_can_be_added(node):
    conf = node.config("veth")
    assert node.call("STATUS", conf, container=None, ifname=None)[:2] == (0, None)
    node.subnet_file.unlink()
    status, out, _ = node.call("STATUS", conf, container=None, ifname=None)
    assert_error(status, out, 50, "subnet.env|no such file")


def test_del_after_the_namespace_went_cleans_the_host_side(node):
    pod = node.new_pod()
    conf = node.config("veth")
    assert node.call("ADD", conf, netns=pod)[0] == 0
    subprocess.run(["ip", "netns", "del", pod], check=True)  # takes the pod's end, and with it the pair
    status, out, _ = node.call("DEL", conf, netns=pod)
    assert (status, out) == (0, None)
    assert node.allocations() == [] and "10.244.77.2" not in endpoints(node)


def test_range_start_and_the_shipped_example(node):
    """The example configuration passes as it ships (paths pointed at the test node), and a
    rangeStart keeps the pods off addresses handed out otherwise."""
    shipped = json.loads((Path(deploy.__file__).parent / "cni-conf.json").read_text())
    conf = {**shipped, "name": "fbpf-test", "podDevice": "veth", "subnetFile": str(node.subnet_file),
            "dataDir": str(node.data_dir), "bpfPinDir": node.pin_dir, "rangeStart": "10.244.77.100"}
    assert node.call("STATUS", conf, container=None, ifname=None)[:2] == (0, None)
    pod = node.new_pod()
    status, result, _ = node.call("ADD", conf, netns=pod)
    assert status == 0 and result["ips"][0]["address"] == "10.244.77.100/32"
    assert node.call("DEL", conf, netns=pod)[:2] == (0, None)
