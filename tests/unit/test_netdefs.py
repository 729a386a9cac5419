"""The shared values and field checks of loader/netdefs.py."""
from ipaddress import IPv4Address

import pytest

from flannel_bpf.loader import netdefs


@pytest.mark.parametrize("text", ["02:AB:cd:00:00:01", "02-ab-cd-00-00-01", " 02:ab:cd:00:00:01 "])
def test_mac_forms_normalise_to_lower_case_colons(text):
    assert netdefs.parse_mac(text) == "02:ab:cd:00:00:01"
    assert netdefs.mac_bytes(text) == b"\x02\xab\xcd\x00\x00\x01"


@pytest.mark.parametrize("bad", ["02:00:00:00:00", "zz:00:00:00:00:00", "02:00-00:00:00:00",
                                 "02:00:00:00:00:00:00", "", None, 5])
def test_a_bad_mac_names_the_value(bad):
    with pytest.raises(ValueError, match=f"bad VtepMAC {bad!r}"):
        netdefs.parse_mac(bad, "VtepMAC")


def test_mac_bytes_takes_six_raw_bytes_only():
    assert netdefs.mac_bytes(b"\x02" * 6) == b"\x02" * 6
    with pytest.raises(ValueError, match="6 bytes"):
        netdefs.mac_bytes(b"\x00" * 5)


@pytest.mark.parametrize("mac", ["01:00:5e:00:00:01", "ff:ff:ff:ff:ff:ff", "33:33:00:00:00:01"])
def test_a_vtep_mac_is_unicast(mac):
    with pytest.raises(ValueError, match="multicast"):
        netdefs.check_vtep_mac(mac)
    assert netdefs.check_vtep_mac("0A:58:0A:F4:01:01") == "0a:58:0a:f4:01:01"


@pytest.mark.parametrize("vni", [0, 1, 4096, 65535])
def test_vni_range_is_flannels_lease_uint16(vni):
    assert netdefs.check_vni(vni) == vni


@pytest.mark.parametrize("vni", [-1, 65536, 1 << 24, True, "1", 1.0, None])
def test_a_vni_outside_the_lease_range_is_refused(vni):
    with pytest.raises(ValueError, match=f"bad VNI {vni!r}: must be an integer 0..65535"):
        netdefs.check_vni(vni)


@pytest.mark.parametrize("ip", ["198.18.0.12", "10.1.2.3", "169.254.1.1"])
def test_usable_public_ips(ip):
    assert netdefs.check_public_ip(ip) == IPv4Address(ip)


@pytest.mark.parametrize("ip", ["0.0.0.0", "0.1.2.3", "127.0.0.1", "127.9.9.9", "224.0.0.1", "239.1.1.1",
                                "255.255.255.255", "240.0.0.1"])
def test_unusable_public_ips_are_refused(ip):
    with pytest.raises(ValueError, match=f"bad PublicIP '{ip}': not a unicast address"):
        netdefs.check_public_ip(ip)


@pytest.mark.parametrize("ip", ["198.18.0", "fd00::1", "", 7])
def test_a_public_ip_that_is_no_ipv4_address_is_named(ip):
    with pytest.raises(ValueError, match="not an IPv4 address"):
        netdefs.check_public_ip(ip)
