"""loader/bpf/layout.py against ebpf/lib/flannel_maps.h, two independent ways:
a probe compiled against the header reports sizeof/offsetof/enum values
from inside the kernel, and bcc's own ctypes classes for the loaded maps
(derived from the C declarations) are compared field by field."""
from __future__ import annotations

import ctypes
import ipaddress

import pytest

import fl_packets as P
from flannel_bpf.loader import netdefs
from flannel_bpf.loader.bpf import layout
from flannel_bpf.loader.bpf.program import ebpf_dir, expand_source
from flannel_bpf.bench.testrun import prog_test_run

pytestmark = pytest.mark.usefixtures("require_root")


def c_facts() -> list[tuple[str, str, int]]:
    """(what, C expression, Python's value) for every fact the two sides share."""
    facts = []
    for c_name, mirror in layout.STRUCTS.items():
        facts.append((f"sizeof({c_name})", f"sizeof({c_name})", ctypes.sizeof(mirror)))
        for field, _ in mirror._fields_:
            facts.append((f"offsetof({c_name}, {field})", f"offsetof({c_name}, {field})",
                          getattr(mirror, field).offset))
            facts.append((f"sizeof({c_name}.{field})", f"sizeof((({c_name} *)0)->{field})",
                          getattr(mirror, field).size))
    facts += [(f"FL_STAT_{s.name}", f"FL_STAT_{s.name}", int(s)) for s in layout.Stat]
    facts += [("FL_STAT_MAX", "FL_STAT_MAX", layout.STAT_MAX),
              ("FL_MODE_VXLAN", "FL_MODE_VXLAN", int(layout.PeerMode.VXLAN)),
              ("FL_MODE_DIRECT", "FL_MODE_DIRECT", int(layout.PeerMode.DIRECT)),
              ("FL_VXLAN_OVERHEAD", "FL_VXLAN_OVERHEAD", netdefs.VXLAN_OVERHEAD)]
    return facts


def probe_source(facts) -> bytes:
    stores = "\n".join(f"\tkey = {i}; value = (__u64)({expr}); probe_out.update(&key, &value);"
                       for i, (_, expr, _) in enumerate(facts))
    header = expand_source(ebpf_dir() / "lib" / "flannel_maps.h")
    return f"""{header}
BPF_ARRAY(probe_out, __u64, {len(facts)});
int layout_probe(struct __sk_buff *skb)
{{
\t__u32 key;
\t__u64 value;
{stores}
\treturn 0;
}}
""".encode()


def test_python_mirror_matches_the_header_as_compiled(pin_root):
    from bcc import BPF
    facts = c_facts()
    probe = BPF(text=probe_source(facts), cflags=[f'-DFL_PIN_DIR="{pin_root}/probe"'])
    try:
        fd = probe.load_func(b"layout_probe", BPF.SCHED_CLS).fd
        assert prog_test_run(fd, bytes(P.from_pod())).retval == 0
        out = probe[b"probe_out"]
        c_values = [out[out.Key(i)].value for i in range(len(facts))]
    finally:
        probe.cleanup()
    mismatches = [(what, c, py) for (what, _, py), c in zip(facts, c_values) if c != py]
    assert not mismatches, f"C vs Python: {mismatches}"


@pytest.mark.parametrize("name", list(layout.MAPS))
def test_bcc_sees_the_same_key_and_value_layout(programs, name):
    _, _, key_type, value_type = layout.MAPS[name]
    table = programs.modules[0][name.encode()]
    leaf = getattr(table, "sLeaf", table.Leaf)  # per-CPU tables: one CPU's value
    for ours, bccs in ((key_type, table.Key), (value_type, leaf)):
        assert ctypes.sizeof(ours) == ctypes.sizeof(bccs), name
        if hasattr(bccs, "_fields_"):  # a struct on the C side: compare every field
            assert [f for f, _ in ours._fields_] == [f for f, _ in bccs._fields_]
            for field, _ in ours._fields_:
                assert getattr(ours, field).offset == getattr(bccs, field).offset, f"{name}.{field}"


def test_config_written_by_python_reads_back_in_bccs_layout(programs, maps):
    config = P.node_config(vni=0xBEEF, vxlan_port=4789, mtu=9000, src_port_min=40000, src_port_max=50000,
                           bridge_ifindex=7, vxlan_ifindex=8)
    maps.set_local_config(config)
    assert maps.get_local_config() == config
    table = programs.modules[0][b"fl_config"]
    leaf = table[table.Key(0)]
    assert (leaf.configured, leaf.vni, leaf.vxlan_port, leaf.mtu) == (1, 0xBEEF, 4789, 9000)
    assert (leaf.src_port_min, leaf.src_port_max, leaf.bridge_ifindex, leaf.vxlan_ifindex) == (40000, 50000, 7, 8)
    assert ipaddress.IPv4Address(leaf.underlay_ip.to_bytes(4, "little")) == ipaddress.IPv4Address(P.UNDERLAY_IP)
    assert layout.bytes_to_mac(bytes(leaf.vtep_mac)) == P.VTEP_MAC
    assert layout.bytes_to_mac(bytes(leaf.bridge_mac)) == P.BRIDGE_MAC


def test_stat_names_and_actions_are_complete():
    assert [s.value for s in layout.Stat] == list(range(layout.STAT_MAX))
    assert set(layout.STAT_ACTION) == set(layout.Stat)
    S = layout.Stat
    assert {s for s, a in layout.STAT_ACTION.items() if a is layout.Action.DROP} == {
        S.DROP_WRITE_FAILED, S.DROP_UNKNOWN_PEER, S.DROP_UNKNOWN_PEER_OTHER_MAC, S.DROP_UNKNOWN_PEER_IP_OPTIONS,
        S.DROP_UNKNOWN_PEER_FRAGMENT, S.DROP_UNKNOWN_PEER_VLAN_TAGGED, S.DROP_UNKNOWN_PEER_OTHER_ADDRESS}


def test_address_helpers_round_trip():
    assert layout.bytes_to_mac(b"\x02\xab\xcd\x00\x00\x01") == "02:ab:cd:00:00:01"
    assert layout.bytes_to_ip4(layout.ip4_to_bytes("198.18.0.1")) == ipaddress.IPv4Address("198.18.0.1")
    for bad in ("fd00::1", "10.0.0.300", b"\x01\x02"):
        with pytest.raises(ValueError, match="not an IPv4 address"):
            layout.ip4(bad)
    with pytest.raises(ValueError, match="not an IPv4 subnet"):
        layout.ip4_network("10.244.1.5/24")
