"""What `flannel-bpf lab up` accepts, and the flannel network config it writes for a backend mix."""
import json

import pytest

from flannel_bpf.cli import build_parser
from flannel_bpf.controller.config import parse_network_config
from flannel_bpf.lab.orchestrator import LabSpec, network_config
from flannel_bpf.lab.topology import LabError


@pytest.mark.parametrize("backends, expected_type", [
    (["bpf", "bpf", "bpf"], "bpf"),
    (["vxlan", "vxlan"], "vxlan"),
    (["bpf", "vxlan", "bpf"], "vxlan"),   # stock nodes need "vxlan"; bpf hosts get --backend bpf
    (["host-gw", "host-gw"], "host-gw"),
])
def test_network_config_type_follows_the_backend_mix(backends, expected_type):
    config = network_config(backends, vni=7, direct_routing=True)
    assert config["Backend"]["Type"] == expected_type
    parsed = parse_network_config(json.dumps(config))  # the agents accept it
    assert str(parsed.network) == "10.244.0.0/16"
    if expected_type != "host-gw":
        assert parsed.backend.vni == 7 and parsed.backend.direct_routing


@pytest.mark.parametrize("backends", [["host-gw", "bpf"], ["vxlan", "host-gw"]])
def test_host_gw_cannot_be_mixed(backends):
    with pytest.raises(LabError, match="host-gw cannot share a lab"):
        network_config(backends)


@pytest.mark.parametrize("spec, message", [
    (LabSpec(hosts=0), "--hosts must be 1..50"),
    (LabSpec(pods=-1), "--pods must be 0..20"),
    (LabSpec(etcd_members=2), "--etcd must be 1 or 3"),
    (LabSpec(vni=65536), "bad --vni 65536: must be an integer 0..65535"),
    (LabSpec(hosts=3, backends=("bpf", "vxlan")), "names 2 backends for 3 hosts"),
    (LabSpec(hosts=2, backends=("bpf", "calico")), "unknown backend 'calico'"),
    (LabSpec(decap="ebpf"), "--decap must be"),
    (LabSpec(pod_devices=("veth", "macvlan")), "--pod-device 'macvlan'"),
    (LabSpec(pod_devices=()), "--pod-device"),
])
def test_bad_lab_specs_are_refused_with_the_reason(spec, message):
    with pytest.raises(LabError, match=message):
        spec.validate()


def test_lab_up_flags():
    args = build_parser().parse_args(["lab", "up", "--name", "x", "--hosts", "4", "--backends",
                                      "bpf,vxlan,bpf,vxlan", "--second-subnet", "3,4", "--etcd", "3",
                                      "--direct-routing", "--decap", "tc", "--vni", "2",
                                      "--pod-device", "veth,netkit"])
    assert (args.name, args.hosts, args.backends, args.second_subnet, args.etcd) == (
        "x", 4, ("bpf", "vxlan", "bpf", "vxlan"), (3, 4), 3)
    assert args.direct_routing and args.decap == "tc" and args.vni == 2
    assert args.pod_device == ("veth", "netkit")
    defaults = build_parser().parse_args(["lab", "up"])
    assert (defaults.name, defaults.hosts, defaults.pods, defaults.backend) == ("lab", 3, 2, "bpf")
    assert defaults.pod_device == ("veth",)


def test_lab_up_rejects_a_bad_host_list(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["lab", "up", "--second-subnet", "3,x"])
    assert "expected host numbers like 3,4" in capsys.readouterr().err
