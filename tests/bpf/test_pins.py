"""Pinned maps: state survives a reload of the programs (an agent restart),
another process reads them without compiling, stale layouts are refused."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
from scapy.layers.inet import IP
from scapy.layers.l2 import Ether

import fl_packets as P
from flannel_bpf.loader.bpf.bpfsys import LayoutMismatch
from flannel_bpf.loader.bpf.layout import Stat
from flannel_bpf.loader.bpf.maps import DataPlaneMaps
from flannel_bpf.loader.bpf.program import check_pin_dir, load_programs
from flannel_bpf.bench.testrun import SkBuff, prog_test_run

pytestmark = pytest.mark.usefixtures("require_root")


def test_state_survives_reloading_the_programs(pin_root):
    pin_dir = f"{pin_root}/reload"
    first = load_programs(pin_dir)
    with first:
        maps = first.maps
        maps.set_local_config(P.node_config())
        maps.upsert_peers([P.PEER2, P.PEER3])
        maps.set_endpoints([P.LOCAL_POD])
        prog_test_run(first.prog_fds["tc_encap_from_pods"], bytes(P.from_pod()), ctx=SkBuff(ifindex=1))
    del first, maps  # nothing of the first load is left in this process

    second = load_programs(pin_dir)
    with second:
        maps = second.maps
        assert maps.get_local_config() == P.node_config()
        assert maps.list_peers() == [P.PEER2, P.PEER3]
        assert maps.known_peer_ips() == {P.PEER2.underlay_ip, P.PEER3.underlay_ip}
        assert maps.list_endpoints() == [P.LOCAL_POD]
        assert maps.read_counters()["encap_vxlan"][0] == 1
        # The new programs use the old state straight away.
        out = prog_test_run(second.prog_fds["tc_encap_from_pods"], bytes(P.from_pod()), ctx=SkBuff(ifindex=1))
        assert Ether(out.data)[IP].dst == str(P.PEER2.underlay_ip)
        assert maps.read_counters()["encap_vxlan"][0] == 2


def test_another_process_reads_the_maps_without_compiling(node):
    script = textwrap.dedent(f"""
        import json, sys
        from flannel_bpf.loader.bpf.maps import DataPlaneMaps
        with DataPlaneMaps({node.maps.pin_dir!r}) as m:
            print(json.dumps({{"peers": [str(p.subnet) for p in m.list_peers()],
                               "vni": m.get_local_config().vni,
                               "decap": m.read_counters()["decap_xdp"],
                               "bcc_loaded": "bcc" in sys.modules}}))
    """)
    node.run("xdp_decap", P.vxlan_from_peer())
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=30, check=True)
    seen = json.loads(done.stdout)
    assert seen == {"peers": ["10.244.2.0/24", "10.244.3.0/24"], "vni": 1,
                    "decap": [1, len(P.vxlan_from_peer())], "bcc_loaded": False}


def test_a_pinned_map_of_another_layout_is_refused_by_name(pin_root):
    from bcc import BPF
    pin_dir = f"{pin_root}/stale"
    os.makedirs(pin_dir, exist_ok=True)
    # An "old version" fl_endpoints whose value is 4 bytes longer.
    old = BPF(text=f"""
        struct old_endpoint {{ __u32 ifindex; __u8 mac[6]; __u8 pad[6]; }};
        BPF_TABLE_PINNED("hash", __be32, struct old_endpoint, fl_endpoints, 16, "{pin_dir}/fl_endpoints");
    """.encode())
    old.cleanup()
    with pytest.raises(LayoutMismatch, match="map fl_endpoints: key/value sizes in the kernel are 4/16"):
        load_programs(pin_dir)
    with pytest.raises(FileNotFoundError, match="no pinned map fl_peers, fl_peer_ips, fl_config, fl_counters"):
        DataPlaneMaps(pin_dir)


@pytest.mark.parametrize("bad", ["relative/dir", "/sys/fs/bpf/has space", '/sys/fs/bpf/"quote',
                                 "/sys/fs/bpf/../etc", "/sys/fs/bpf/a:b"])
def test_unsafe_pin_dirs_are_refused(bad):
    with pytest.raises(ValueError, match="pin directory"):
        check_pin_dir(bad)


def test_pin_dir_must_be_on_bpffs(tmp_path):
    with pytest.raises(ValueError, match="not on a bpf filesystem"):
        check_pin_dir(str(tmp_path / "pins"))
    assert not (tmp_path / "pins").exists()


def test_counters_read_as_every_name_and_reset(node):
    node.run("tc_encap_from_pods", P.from_pod())
    node.run("xdp_decap", P.vxlan_from_peer(src=P.STRANGER_IP))
    counters = node.maps.read_counters()
    assert set(counters) == {s.counter_name for s in Stat}
    assert counters["encap_vxlan"] == (1, len(P.from_pod()))
    assert counters["drop_unknown_peer"] == (1, len(P.vxlan_from_peer()))
    node.maps.reset_counters()
    assert set(node.maps.read_counters().values()) == {(0, 0)}
