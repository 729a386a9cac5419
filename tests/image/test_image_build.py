"""deploy/image/build.sh end to end, against a real dockerd of its own (in a namespace made for
it, its own data-root and socket): the base root file system from Debian packages, the wheels,
the build with no network, then the image runs what the DaemonSet runs, compiles and pins the
data-plane programs, and is saved for nodes. Afterwards no daemon, netns or file is left.

Slow: mmdebstrap and the build take a few minutes (the daemon stores layers with vfs)."""
from __future__ import annotations

import subprocess
import uuid
from pathlib import Path

import pytest
import yaml

from flannel_bpf.lab.dockerd import Dockerd, _pids_below
from flannel_bpf.lab.netns import create_netns, netns_exists, remove_netns
from flannel_bpf.lab.run import run_in_netns

REPO = Path(__file__).resolve().parents[2]
BUILD = REPO / "deploy" / "image" / "build.sh"
MANIFEST = REPO / "deploy" / "kube-flannel-bpf.yml"
BUILD_TIMEOUT = 2400

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("require_root")]


def manifest_containers() -> list[dict]:
    """The DaemonSet's containers (init ones included) that run flannel-bpf's image."""
    daemonset = next(d for d in yaml.safe_load_all(MANIFEST.read_text()) if d and d["kind"] == "DaemonSet")
    spec = daemonset["spec"]["template"]["spec"]
    return [c for c in spec.get("initContainers", []) + spec["containers"] if "flannel-bpf" in c["image"]]


@pytest.fixture(scope="module")
def daemon(tmp_path_factory):
    netns = f"fbpf-img-{uuid.uuid4().hex[:6]}"
    base = tmp_path_factory.mktemp("dockerd")
    create_netns(netns)
    daemon = Dockerd(netns, base)
    try:
        run_in_netns(netns, ["ip", "link", "set", "lo", "up"])
        daemon.start()
        yield daemon
    finally:
        daemon.stop()
        remove_netns(netns)
    assert not _pids_below(base) and not base.exists() and not netns_exists(netns)


@pytest.fixture(scope="module")
def built(daemon, tmp_path_factory):
    saved = tmp_path_factory.mktemp("image") / "flannel-bpf.tar"
    done = subprocess.run([str(BUILD), "-H", f"unix://{daemon.socket}", "-o", str(saved)], capture_output=True,
                          text=True, timeout=BUILD_TIMEOUT, stdin=subprocess.DEVNULL)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    image = {c["image"] for c in manifest_containers()}
    assert len(image) == 1, image
    return image.pop(), saved, done.stdout


def run(daemon: Dockerd, image: str, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return daemon.docker("run", "--rm", "--network", "none", *args, check=False, timeout=timeout)


def test_the_manifest_s_image_is_built_and_saved(daemon, built):
    image, saved, log = built
    assert "built " + image in log
    assert daemon.docker("image", "inspect", image, check=False).returncode == 0
    assert saved.stat().st_size > 100 << 20
    listing = subprocess.run(["tar", "-tf", str(saved)], capture_output=True, text=True, timeout=120).stdout
    assert "manifest.json" in listing.split()


def test_the_cli_and_its_libraries_run_in_the_image(daemon, built):
    image = built[0]
    done = run(daemon, image, image, "--help")
    assert done.returncode == 0 and b"attach" in done.stdout, done.stderr
    imports = run(daemon, image, "--entrypoint", "/opt/flannel-bpf/bin/python", image, "-c",
                  "import bcc, etcd3, lightkube, pyroute2, rich, prometheus_client, flannel_bpf.cni.plugin")
    assert imports.returncode == 0, imports.stderr.decode()


def test_every_command_of_the_daemonset_is_in_the_image(daemon, built):
    image = built[0]
    commands = {c["command"][0] for c in manifest_containers()} | {"iptables", "ip", "mountpoint", "mount"}
    script = " && ".join(f"command -v {name}" for name in sorted(commands))
    done = run(daemon, image, "--entrypoint", "/bin/sh", image, "-c", script)
    assert done.returncode == 0, f"missing from the image: {done.stdout.decode()} {done.stderr.decode()}"
    assert len(done.stdout.split()) == len(commands)


def test_the_image_compiles_and_pins_the_programs_against_the_host_s_headers(daemon, built):
    """What the agent does first on a node, with the DaemonSet's capabilities (all others
    dropped) and host mounts. The bpffs is the container's own: it goes with the container."""
    image = built[0]
    agent = next(c for c in manifest_containers() if c["name"] == "kube-flannel")
    capabilities = agent["securityContext"]["capabilities"]
    assert capabilities["drop"] == ["ALL"]
    caps = [arg for cap in capabilities["add"] for arg in ("--cap-add", cap)]
    script = ("mount -t bpf bpf /sys/fs/bpf && "
              "/opt/flannel-bpf/bin/python -m flannel_bpf.loader.bpf.program compile --pin-dir /sys/fs/bpf/fbpf && "
              "ls /sys/fs/bpf/fbpf")
    done = run(daemon, image, "--cap-drop", "ALL", *caps, "--security-opt", "seccomp=unconfined",
               "-v", "/lib/modules:/lib/modules:ro", "-v", "/usr/src:/usr/src:ro",
               "--entrypoint", "/bin/sh", image, "-c", script, timeout=600)
    assert done.returncode == 0, done.stderr.decode()[-3000:]
    pins = done.stdout.decode().split()
    assert "prog_xdp_decap" in pins and "prog_tc_decap" in pins, pins
