"""The shipped install files: `systemd-analyze verify` passes on the units (next to Debian's own
docker.service, which the drop-in extends), and they are installed with the package."""
import configparser
import importlib.resources
import re
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
DEBIAN_UNITS = Path("/lib/systemd/system")
SHIPPED = ["flannel-bpf.env", "supervisor/flannel-bpf.ini", "supervisor/flannel-bpf-wrapper.sh",
           "systemd/flannel-bpf.service", "systemd/docker.service.d/flannel-bpf.conf"]
_EXEC = re.compile(r"^Exec\w+=[-@:+!]*(\S+)", re.MULTILINE)


def verify(root: Path, *units: str) -> subprocess.CompletedProcess:
    return subprocess.run(["systemd-analyze", "verify", f"--root={root}", "--man=no", *units],
                          capture_output=True, text=True, timeout=60)


def unit_root(tmp_path: Path, service: str, drop_in: str) -> Path:
    """A file system root with Debian's units, ours in /etc/systemd/system, and a stub for every
    command an Exec line names (verify checks that each is executable; this machine has no
    /usr/local/bin/flannel-bpf)."""
    if shutil.which("systemd-analyze") is None or not (DEBIAN_UNITS / "docker.service").exists():
        pytest.fail("systemd-analyze and Debian's docker.service are needed: run ./setup.sh")
    root = tmp_path / "root"
    shutil.copytree(DEBIAN_UNITS, root / "lib/systemd/system", symlinks=True)
    etc = root / "etc/systemd/system"
    (etc / "docker.service.d").mkdir(parents=True)
    (etc / "flannel-bpf.service").write_text(service)
    (etc / "docker.service.d/flannel-bpf.conf").write_text(drop_in)
    docker_unit = (DEBIAN_UNITS / "docker.service").read_text()
    for command in set(_EXEC.findall(service + drop_in + docker_unit)):
        stub = root / command.lstrip("/")
        stub.parent.mkdir(parents=True, exist_ok=True)
        stub.write_text("#!/bin/sh\n")
        stub.chmod(0o755)
    return root


def test_systemd_analyze_verify_passes_on_the_shipped_units(tmp_path):
    service = (DEPLOY / "systemd/flannel-bpf.service").read_text()
    drop_in = (DEPLOY / "systemd/docker.service.d/flannel-bpf.conf").read_text()
    done = verify(unit_root(tmp_path, service, drop_in), "flannel-bpf.service", "docker.service")
    assert (done.returncode, done.stderr) == (0, "")


def test_verify_would_see_a_broken_unit(tmp_path):
    """The check can fail: a misspelt key and a missing command."""
    service = (DEPLOY / "systemd/flannel-bpf.service").read_text().replace("Restart=", "Restrat=")
    drop_in = (DEPLOY / "systemd/docker.service.d/flannel-bpf.conf").read_text()
    root = unit_root(tmp_path, service, drop_in)
    (root / "etc/systemd/system/docker.service.d/flannel-bpf.conf").write_text(
        drop_in.replace("/bin/rm ", "/bin/no-such-rm "))
    done = verify(root, "flannel-bpf.service", "docker.service")
    assert done.returncode != 0
    assert "Unknown key 'Restrat'" in done.stderr and "/bin/no-such-rm" in done.stderr


def test_the_files_install_with_the_package():
    installed = importlib.resources.files("flannel_bpf.deploy")
    for name in SHIPPED:
        assert (installed / name).read_bytes() == (DEPLOY / name).read_bytes(), name


def test_the_supervisor_program_is_flanneld_s():
    """The settings the setups users copy: wrapper script, QUIT, autorestart, 30 s, a log file
    (tests/e2e/test_supervisor.py runs it under a real supervisord)."""
    ini = configparser.ConfigParser()
    ini.read(DEPLOY / "supervisor/flannel-bpf.ini")
    program = ini["program:flannel-bpf"]
    assert program["command"].endswith("/flannel-bpf-wrapper.sh")
    assert (program["stopsignal"], program["autorestart"], program["startsecs"]) == ("QUIT", "true", "30")
    assert program["stdout_logfile"].startswith("/var/log/") and program["redirect_stderr"] == "true"
