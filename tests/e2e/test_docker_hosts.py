"""Two Docker hosts on flannel-bpf as the shipped systemd files set them up, with the real dockerd
(Debian's docker.io). Each host's agent is flannel-bpf.service's ExecStart, its settings FLANNELD_*
variables in its environment file. Each host runs its own dockerd (own data-root, exec-root,
pidfile, socket), started after the agent with the options that the docker.service drop-in's own
commands (`flannel-bpf docker-opts`, run as systemd would, twice) wrote from the agent's
subnet.env, so docker0 appears while the agent runs. Containers come from an image imported from
busybox-static. A container on host 1 pings and opens TCP to a container on host 2 and the encap
counters prove the BPF path; Docker's FORWARD policy DROP is passed by the agent's FLANNEL-FWD
rules on the kernel path; the rules come back when flushed; and nothing stays behind."""
from __future__ import annotations

import importlib.resources
import os
import re
import signal
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from ipaddress import IPv4Address, IPv4Interface
from pathlib import Path

import pytest

from flannel_bpf.controller.subnet_env import read_subnet_env
from flannel_bpf.lab import orchestrator as orch
from flannel_bpf.lab.dockerd import Dockerd, DockerdError, container_pids, mounts_below
from flannel_bpf.lab.run import nsenter_argv, run_in_netns
from flannel_bpf.lab.topology import AgentState, Lab, run_dir
from flannel_bpf.lab.units import run_drop_in, service_command
from flannel_bpf.loader.bpf.attach import default_pin_dir, list_tc
from flannel_bpf.loader.bpf.maps import DataPlaneMaps
from flannel_bpf.loader.netns import in_netns, write_sysctl

from e2e_lab import assert_lab_gone, counters, lab_name, root_snapshot, wait_until

pytestmark = pytest.mark.docker

RESYNC = 1  # the agents re-check their iptables rules every second here (flanneld: 5)
DEPLOY = importlib.resources.files("flannel_bpf.deploy")
UNIT = (DEPLOY / "systemd/flannel-bpf.service").read_text()
DROP_IN = (DEPLOY / "systemd/docker.service.d/flannel-bpf.conf").read_text()
FLANNEL_BPF = str(Path(sys.executable).parent / "flannel-bpf")
# docker.service's environment: what /etc/default/docker may say, and nothing of ours.
DEBIAN_DEFAULT_OPTS = "--log-level=info"
DOCKER_ENVIRONMENT = {"PATH": os.environ["PATH"], "DOCKER_OPTS": DEBIAN_DEFAULT_OPTS}


def _sh(netns: str, *argv: str) -> str:
    return run_in_netns(netns, list(argv)).stdout


def _endpoints(host) -> set[IPv4Address]:
    with DataPlaneMaps(host.agent.pin_dir) as maps:
        return {e.ip for e in maps.list_endpoints()}


def _encap_attached(host, veth: str) -> bool:
    with in_netns(host.netns):
        return any(f.name == "tc_encap_from_pods" for f in list_tc(veth))


def start_unit_agent(lab: Lab, host) -> None:
    """flannel-bpf.service's ExecStart in the host namespace, in the environment its
    EnvironmentFile= gives it: the lab's etcd and paths as FLANNELD_* settings."""
    directory = orch.host_dir(lab, host)
    directory.mkdir(parents=True, exist_ok=True)
    with in_netns(host.netns):
        pin_dir = str(default_pin_dir(host.uplink))
    agent = AgentState(backend="bpf", pid=None, healthz_port=orch.HEALTHZ_BASE_PORT + host.index,
                       log_path=str(directory / "agent.log"), subnet_file=str(directory / "subnet.env"),
                       pin_dir=pin_dir)
    env_file = directory / "flannel-bpf.env"
    env_file.write_text("".join(f"{key}={value}\n" for key, value in {
        "FLANNELD_ETCD_ENDPOINTS": ",".join(lab.state.etcd.endpoints), "FLANNELD_ETCD_PREFIX": lab.state.etcd.prefix,
        "FLANNELD_IFACE": host.uplink, "FLANNELD_SUBNET_FILE": agent.subnet_file,
        "FLANNELD_HEALTHZ_PORT": agent.healthz_port, "FLANNELD_IPTABLES_RESYNC": RESYNC}.items()))
    argv, env = service_command(UNIT, {"/etc/flannel-bpf/flannel-bpf.env": str(env_file),
                                       "/usr/local/bin/flannel-bpf": FLANNEL_BPF}, {"PATH": os.environ["PATH"]})
    assert argv[1:] == ["attach", "--bridge", "docker0"]
    with open(agent.log_path, "ab") as log_file:
        agent.pid = subprocess.Popen(nsenter_argv(host.netns, argv), env=env, stdin=subprocess.DEVNULL,
                                     stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True).pid
    host.agent = agent
    lab.save()


@pytest.fixture(scope="module")
def docker_lab():
    name = lab_name("dk")
    before = root_snapshot()
    daemons: list[Dockerd] = []
    try:
        lab = Lab.create(name, hosts=2)
        orch.start_etcd(lab)
        orch.write_network_config(lab, orch.network_config(["bpf", "bpf"]))
        for host in lab.hosts:
            start_unit_agent(lab, host)
        for host in lab.hosts:
            wait_until(lambda: Path(host.agent.subnet_file).exists(), 60, 0.1, f"host {host.index}'s subnet.env")
            wait_until(lambda: orch.readyz(host) == 200, 60, 0.1, f"host {host.index}'s agent ready")
        for host in lab.hosts:
            directory = orch.host_dir(lab, host)
            moves = {"/run/flannel/subnet.env": host.agent.subnet_file,
                     "/run/docker_opts.env": str(directory / "docker_opts.env"),
                     "/usr/local/bin/flannel-bpf": FLANNEL_BPF}
            options = run_drop_in(DROP_IN, moves, DOCKER_ENVIRONMENT)
            assert run_drop_in(DROP_IN, moves, DOCKER_ENVIRONMENT) == options  # a restart adds nothing
            daemon = Dockerd(host.netns, directory / "docker", options)
            daemons.append(daemon)
            # As on a host booting: Docker finds forwarding off, turns it on and sets FORWARD's
            # policy to DROP (it leaves the policy alone where forwarding was on already).
            write_sysctl("net.ipv4.ip_forward", 0, host.netns)
            daemon.start()
            daemon.import_busybox()
        daemons[0].run("c1", "sleep", "600")
        daemons[1].run("c2", "nc", "-ll", "-p", "8080", "-e", "cat")  # a TCP echo server
        for daemon, container, host in ((daemons[0], "c1", lab.host(1)), (daemons[1], "c2", lab.host(2))):
            gateway = IPv4Interface(read_subnet_env(host.agent.subnet_file)["FLANNEL_SUBNET"]).ip
            # As the lab's pods do: the host learns the container's MAC (its endpoint) now.
            assert daemon.exec(container, "ping", "-c", "1", "-W", "2", str(gateway)).returncode == 0
            veth = daemon.host_veth(container)
            wait_until(lambda: _encap_attached(host, veth), 15, 0.1, f"the encap on {container}'s veth {veth}")
        yield lab, daemons, before
    except DockerdError as err:
        pytest.fail(f"dockerd cannot run in a lab host namespace here: {err}")
    finally:
        for daemon in daemons:
            daemon.stop()
        orch.down(name)


def test_dockerd_runs_with_the_drop_in_s_options_on_docker0_made_after_the_agent_started(docker_lab):
    lab, daemons, _ = docker_lab
    for host, daemon in zip(lab.hosts, daemons):
        env = read_subnet_env(host.agent.subnet_file)
        assert daemon.options == [DEBIAN_DEFAULT_OPTS, f"--bip={env['FLANNEL_SUBNET']}", "--ip-masq=true",
                                  f"--mtu={env['FLANNEL_MTU']}"]
        bridge = _sh(host.netns, "ip", "-4", "-o", "addr", "show", "dev", "docker0")
        assert f"inet {env['FLANNEL_SUBNET']} " in bridge
        assert f"mtu {env['FLANNEL_MTU']} " in _sh(host.netns, "ip", "-o", "link", "show", "dev", "docker0")
        assert "pod bridge docker0 found" in Path(host.agent.log_path).read_text()
        # Docker's own masquerade rule for its subnet, and its FORWARD policy DROP, are in place.
        subnet = str(IPv4Interface(env["FLANNEL_SUBNET"]).network)
        assert f"-A POSTROUTING -s {subnet} ! -o docker0 -j MASQUERADE" in _sh(host.netns, "iptables", "-t", "nat", "-S")
        assert "-P FORWARD DROP" in _sh(host.netns, "iptables", "-S", "FORWARD")


def test_a_container_pings_and_opens_tcp_to_a_container_on_the_other_host_over_bpf(docker_lab):
    lab, (d1, d2), _ = docker_lab
    target = d2.container_ip("c2")
    before = [counters(h) for h in lab.hosts]
    ping = d1.exec("c1", "ping", "-c", "5", "-W", "2", target)
    assert ping.returncode == 0 and b"5 packets received" in ping.stdout, ping.stdout + ping.stderr
    echo = d1.exec("c1", "sh", "-c", f"echo over-flannel-bpf | nc -w 3 {target} 8080")
    assert echo.stdout == b"over-flannel-bpf\n", echo.stderr
    after = [counters(h) for h in lab.hosts]
    sent = [after[i].get("encap_vxlan", 0) - before[i].get("encap_vxlan", 0) for i in range(2)]
    delivered = [after[i].get("decap_to_pod", 0) - before[i].get("decap_to_pod", 0) for i in range(2)]
    # 5 echo requests and the TCP segments each way went through the BPF encap on both hosts.
    assert sent[0] >= 5 + 3 and sent[1] >= 5 + 3, sent
    assert delivered[0] >= 5 and delivered[1] >= 5, delivered


def test_docker_s_masquerade_leaves_the_bpf_path_alone(docker_lab):
    """Docker's `-s <subnet> ! -o docker0 -j MASQUERADE` would rewrite what leaves through the
    kernel; the BPF path encapsulates at the veth, before netfilter: c2 sees c1's own address."""
    _, (d1, d2), _ = docker_lab
    source, target = d1.container_ip("c1"), d2.container_ip("c2")
    with ThreadPoolExecutor(1) as pool:
        held = pool.submit(d1.exec, "c1", "sh", "-c", f"sleep 5 | nc -w 8 {target} 8080")
        peer = re.compile(rf"[ :]{re.escape(source)}:\d+ +ESTABLISHED")   # IPv4 or v4-mapped IPv6
        wait_until(lambda: peer.search(d2.exec("c2", "netstat", "-tn").stdout.decode()), 5, 0.2,
                   f"c2 seeing a connection from {source}")
        assert held.result(timeout=20).returncode == 0


def test_the_kernel_path_passes_docker_s_forward_drop_through_flannel_fwd(docker_lab):
    """A container the agent does not know yet (its neighbour entry flushed) is reached through
    the kernel: decapsulated, then forwarded to docker0, which Docker's policy DROP would stop
    but for the agent's FLANNEL-FWD accept rule."""
    lab, (d1, d2), _ = docker_lab
    host2, target = lab.host(2), d2.container_ip("c2")
    run_in_netns(host2.netns, ["ip", "neigh", "flush", "dev", "docker0"])
    wait_until(lambda: IPv4Address(target) not in _endpoints(host2), 10, 0.1, "c2 gone from the endpoints map")

    def accepted() -> int:
        out = run_in_netns(host2.netns, ["iptables", "-L", "FLANNEL-FWD", "-n", "-v", "-x"], check=False).stdout
        return sum(int(line.split()[0]) for line in out.splitlines() if "ACCEPT" in line)

    accepted_before = counters(host2).get("pass_not_local_endpoint", 0), accepted()
    ping = d1.exec("c1", "ping", "-c", "2", "-W", "2", target)
    assert ping.returncode == 0, ping.stdout + ping.stderr
    passed, accepted_after = counters(host2).get("pass_not_local_endpoint", 0), accepted()
    assert passed > accepted_before[0], "the decap handed the packet to the kernel"
    assert accepted_after > accepted_before[1], "FLANNEL-FWD accepted it"


def test_flushed_forward_rules_come_back(docker_lab):
    lab, _, _ = docker_lab
    host = lab.host(1)
    wanted = '-A FORWARD -m comment --comment "flanneld forward" -j FLANNEL-FWD'
    assert wanted in _sh(host.netns, "iptables", "-S", "FORWARD")
    run_in_netns(host.netns, ["iptables", "-F", "FLANNEL-FWD"])
    run_in_netns(host.netns, ["iptables", "-D", "FORWARD", "-m", "comment", "--comment", "flanneld forward",
                              "-j", "FLANNEL-FWD"])
    assert wanted not in _sh(host.netns, "iptables", "-S", "FORWARD")
    wait_until(lambda: wanted in _sh(host.netns, "iptables", "-S", "FORWARD")
               and "-A FLANNEL-FWD -d 10.244.0.0/16" in _sh(host.netns, "iptables", "-S", "FLANNEL-FWD"),
               RESYNC * 5 + 5, 0.2, "the agent restoring its forward rules")
    assert "were changed by someone else: restored" in Path(host.agent.log_path).read_text()
    assert "flannel_bpf_iptables_restored_total 1.0" in orch.metrics_text(host)


def test_lab_down_after_a_dockerd_crash_leaves_nothing_behind(docker_lab):
    """dockerd killed outright leaves its containers running outside the lab's namespaces and
    its mounts in place: `lab down` must find and remove them all the same."""
    lab, daemons, before = docker_lab
    container_ids = [daemon.inspect(name, "{{.Id}}") for daemon, name in zip(daemons, ("c1", "c2"))]
    for daemon in daemons:
        os.kill(int((daemon.base / "docker.pid").read_text()), signal.SIGKILL)
    assert container_pids(container_ids), "the containers outlive their daemon"
    assert mounts_below(run_dir(lab.name)) != []
    orch.down(lab.name)
    assert_lab_gone(lab.name, before)
    assert mounts_below(run_dir(lab.name)) == []
    assert container_pids(container_ids) == []
    for daemon in daemons:
        daemon.stop()  # the fixture's own cleanup: idempotent, finds nothing

