"""subnet.env: flanneld's format, atomic replacement, mode 0644, and reading the previous subnet."""
import os
import stat
from ipaddress import IPv4Network

from flannel_bpf.controller.subnet_env import read_previous_subnet, read_subnet_env, write_subnet_env


def test_written_as_flanneld_writes_it(tmp_path):
    path = tmp_path / "run" / "flannel" / "subnet.env"
    write_subnet_env(path, IPv4Network("10.5.0.0/16"), IPv4Network("10.5.72.0/24"), 1450, False)
    assert path.read_text() == ("FLANNEL_NETWORK=10.5.0.0/16\nFLANNEL_SUBNET=10.5.72.1/24\n"
                                "FLANNEL_MTU=1450\nFLANNEL_IPMASQ=false\n")
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
    assert read_subnet_env(path)["FLANNEL_IPMASQ"] == "false"


def test_replacement_is_atomic_and_leaves_no_temp_files(tmp_path):
    path = tmp_path / "subnet.env"
    write_subnet_env(path, IPv4Network("10.5.0.0/16"), IPv4Network("10.5.72.0/24"), 1450, False)
    before = os.stat(path).st_ino
    write_subnet_env(path, IPv4Network("10.5.0.0/16"), IPv4Network("10.5.9.0/26"), 1500, True)
    assert os.stat(path).st_ino != before  # a new file renamed over the old one
    assert "FLANNEL_SUBNET=10.5.9.1/26\n" in path.read_text()
    assert "FLANNEL_IPMASQ=true\n" in path.read_text()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["subnet.env"]


def test_previous_subnet(tmp_path):
    path = tmp_path / "subnet.env"
    assert read_previous_subnet(path) is None  # no file
    write_subnet_env(path, IPv4Network("10.5.0.0/16"), IPv4Network("10.5.72.0/24"), 1450, False)
    assert read_previous_subnet(path) == IPv4Network("10.5.72.0/24")
    path.write_text("FLANNEL_NETWORK=10.5.0.0/16\n")
    assert read_previous_subnet(path) is None  # no FLANNEL_SUBNET


def test_bad_previous_subnet_is_ignored_with_a_warning(tmp_path, caplog):
    path = tmp_path / "subnet.env"
    path.write_text("FLANNEL_SUBNET=banana\n")
    assert read_previous_subnet(path) is None
    assert "ignoring FLANNEL_SUBNET=banana" in caplog.text


def test_a_directory_others_can_write_to_is_warned_about(tmp_path, caplog):
    net, sub = IPv4Network("10.244.0.0/16"), IPv4Network("10.244.1.0/24")
    loose, sticky = tmp_path / "loose", tmp_path / "sticky"
    for directory, mode in ((loose, 0o777), (sticky, 0o1777)):
        directory.mkdir()
        os.chmod(directory, mode)
    write_subnet_env(sticky / "subnet.env", net, sub, 1450, False)  # /tmp-like: others cannot replace ours
    assert "writable by users other than its owner" not in caplog.text
    write_subnet_env(loose / "subnet.env", net, sub, 1450, False)
    assert f"{loose} is writable by users other than its owner (mode 777)" in caplog.text
    assert stat.S_IMODE((loose / "subnet.env").stat().st_mode) == 0o644
