"""The single-machine lab: hosts as network namespaces on an underlay bridge.

Lab NAME:
  fbpf-NAME-ul       underlay: bridge br-ul 198.18.0.254/24 (etcd listens there), and with a
                     second subnet also br-ul2 (no address) and a route to it via the router
  fbpf-NAME-rt       optional router: eth0 198.18.0.1/24 on br-ul, eth1 198.18.1.1/24 on br-ul2
  fbpf-NAME-hI       host I: uplink eth0 198.18.0.(10+I)/24 (or 198.18.1.(10+I)/24 on the second
                     subnet), pod bridge cni0, forwarding on; no default route, no way out
  fbpf-NAME-hI-pJ    pod J of host I: eth0 on host I's cni0 via vethpJ, default route via cni0

The topology is recorded in /run/flannel-bpf/lab/NAME.json. destroy() needs neither that file
nor a live creator: it also finds the lab's namespaces by name, after a crash.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import secrets
import shutil
import signal
import time
from dataclasses import asdict, dataclass, field
from ipaddress import IPv4Address, IPv4Interface, IPv4Network
from pathlib import Path
from typing import Iterable, Iterator

from pyroute2 import IPRoute

from flannel_bpf.lab.dockerd import stop_all_below
from flannel_bpf.lab.netns import create_netns, netns_exists, pids_by_netns, remove_netns
from flannel_bpf.loader.bpf.attach import PIN_ROOT, unlink_pins
from flannel_bpf.loader.netdefs import DEFAULT_BRIDGE
from flannel_bpf.loader.netns import in_netns, list_netns, write_sysctl

log = logging.getLogger(__name__)

STATE_DIR = Path("/run/flannel-bpf/lab")
DEFAULT_LAB = "lab"
UNDERLAY_NETWORKS = (IPv4Network("198.18.0.0/24"), IPv4Network("198.18.1.0/24"))
UNDERLAY_SUPERNET = IPv4Network("198.18.0.0/15")
UNDERLAY_BRIDGES = ("br-ul", "br-ul2")
UNDERLAY_BRIDGE_ADDRESS = IPv4Interface("198.18.0.254/24")
ROUTER_ADDRESSES = (IPv4Interface("198.18.0.1/24"), IPv4Interface("198.18.1.1/24"))
HOST_UPLINK = "eth0"
UPLINK_MTU = 1500
POD_IFNAME = "eth0"
POD_NETWORK = IPv4Network("10.244.0.0/16")
MAX_HOSTS = 200          # host I gets .(10+I); .1 is the router and .254 the etcd address
MAX_PODS_PER_HOST = 999  # keeps vethpJ within IFNAMSIZ
_LAB_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,31}$")
_STATE_VERSION = 1


class LabError(RuntimeError):
    """A lab cannot be built or used as asked."""


class LabNotFound(LabError):
    pass


# ---------------------------------------------------------------------------- state


@dataclass
class Pod:
    host: int
    index: int
    netns: str
    host_veth: str     # in the host namespace: a port of the pod bridge, or the routed pod's own device
    address: str       # "10.244.1.2/24" (a bridge pod), "10.244.1.2/32" (a routed pod)
    gateway: str       # "10.244.1.1"; "" on netkit, whose default route is the device
    mtu: int
    ifname: str = POD_IFNAME
    device: str = "veth"  # veth (on the bridge) | netkit | routed-veth (both by flannel-bpf-cni)

    @property
    def ip(self) -> str:
        return str(IPv4Interface(self.address).ip)


@dataclass
class AgentState:
    """The flannel-bpf agent `lab up` started on a host (flannel_bpf.lab.orchestrator)."""
    backend: str              # bpf | vxlan | host-gw
    pid: int | None
    healthz_port: int
    log_path: str
    subnet_file: str
    pin_dir: str | None = None   # bpf backend only
    subnet: str | None = None    # "10.244.7.0/24" once leased


@dataclass
class Host:
    index: int
    netns: str
    uplink: str
    address: str              # "198.18.0.11/24"
    underlay_subnet: int      # 1 or 2
    underlay_bridge: str      # the bridge (in the underlay namespace) the uplink plugs into
    underlay_veth: str        # the uplink's peer, in the underlay namespace
    pod_bridge: str | None = None
    pod_gateway: str | None = None   # "10.244.1.1/24" once the first pod exists
    pods: list[Pod] = field(default_factory=list)
    agent: AgentState | None = None

    @property
    def ip(self) -> str:
        return str(IPv4Interface(self.address).ip)

    def pod(self, index: int) -> Pod:
        for pod in self.pods:
            if pod.index == index:
                return pod
        raise LabError(f"host {self.index} has no pod {index}")


@dataclass
class RouterLeg:
    ifname: str
    address: str
    bridge: str
    underlay_veth: str


@dataclass
class Router:
    netns: str
    legs: list[RouterLeg]


@dataclass
class Bridge:
    name: str
    address: str | None


@dataclass
class EtcdMemberState:
    name: str
    client_url: str
    peer_url: str
    netns: str
    pid: int | None
    data_dir: str
    log_path: str


@dataclass
class EtcdState:
    """The lab's etcd (in the underlay namespace) and where flannel's keys live in it."""
    prefix: str
    token: str
    members: list[EtcdMemberState]

    @property
    def endpoints(self) -> list[str]:
        return [m.client_url for m in self.members]


@dataclass
class KubeApiState:
    """The lab's Kubernetes API stand-in (lab up --kube), in the underlay namespace."""
    url: str
    pid: int | None
    log_path: str
    net_config_path: str  # net-conf.json, as the kube-flannel ConfigMap holds it


@dataclass
class LabState:
    name: str
    underlay_netns: str
    bridges: list[Bridge]
    hosts: list[Host] = field(default_factory=list)
    router: Router | None = None
    version: int = _STATE_VERSION
    etcd: EtcdState | None = None
    network_config: dict | None = None   # what `lab up` wrote to <prefix>/config (or net-conf.json)
    kube: KubeApiState | None = None

    def host(self, index: int) -> Host:
        for host in self.hosts:
            if host.index == index:
                return host
        raise LabError(f"lab {self.name} has no host {index} (hosts: "
                       f"{', '.join(str(h.index) for h in self.hosts) or 'none'})")

    def namespaces(self) -> list[str]:
        """Every namespace of the lab, innermost first (pods, hosts, router, underlay)."""
        names = [p.netns for h in self.hosts for p in h.pods]
        names += [h.netns for h in self.hosts]
        if self.router:
            names.append(self.router.netns)
        names.append(self.underlay_netns)
        return names

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "LabState":
        try:
            hosts = [Host(**{**h, "pods": [Pod(**p) for p in h.get("pods", [])],
                              "agent": AgentState(**h["agent"]) if h.get("agent") else None})
                     for h in data["hosts"]]
            etcd = data.get("etcd")
            if etcd is not None:
                etcd = EtcdState(**{**etcd, "members": [EtcdMemberState(**m) for m in etcd["members"]]})
            router = data.get("router")
            if router is not None:
                router = Router(netns=router["netns"],
                                legs=[RouterLeg(**leg) for leg in router["legs"]])
            return cls(name=data["name"], underlay_netns=data["underlay_netns"],
                       bridges=[Bridge(**b) for b in data["bridges"]], hosts=hosts,
                       router=router, version=data.get("version", _STATE_VERSION), etcd=etcd,
                       network_config=data.get("network_config"),
                       kube=KubeApiState(**data["kube"]) if data.get("kube") else None)
        except (KeyError, TypeError) as e:
            raise LabError(f"malformed lab state: {e!r}") from None


def validate_lab_name(name: str) -> str:
    if not isinstance(name, str) or not _LAB_NAME.match(name):
        raise LabError(f"bad lab name {name!r}: use 1-32 letters, digits, '_' or '-', "
                       "starting with a letter or digit")
    return name


def underlay_netns_name(name: str) -> str:
    return f"fbpf-{name}-ul"


def router_netns_name(name: str) -> str:
    return f"fbpf-{name}-rt"


def host_netns_name(name: str, host: int) -> str:
    return f"fbpf-{name}-h{host}"


def pod_netns_name(name: str, host: int, pod: int) -> str:
    return f"fbpf-{name}-h{host}-p{pod}"


def _lab_object_pattern(name: str) -> re.Pattern:
    # Exact shapes, so lab "a" never matches the objects of lab "a-b".
    return re.compile(rf"^fbpf-{re.escape(name)}-(ul|rt|h\d+|h\d+-p\d+)$")


def state_path(name: str) -> Path:
    return STATE_DIR / f"{validate_lab_name(name)}.json"


def run_dir(name: str) -> Path:
    """Where the lab's processes keep their files (etcd data, agent logs, subnet.env)."""
    return STATE_DIR / validate_lab_name(name)


def write_state(state: LabState) -> Path:
    """Atomically write the state file."""
    path = state_path(state.name)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(state.to_dict(), indent=2) + "\n")
    os.replace(tmp, path)
    return path


def read_state(name: str) -> LabState | None:
    """The recorded topology, or None when there is no state file."""
    path = state_path(name)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except json.JSONDecodeError as e:
        raise LabError(f"lab state file {path} is not JSON: {e}") from None
    return LabState.from_dict(data)


def list_labs() -> list[str]:
    """Labs that have a state file or at least one namespace."""
    names = {p.stem for p in STATE_DIR.glob("*.json")} if STATE_DIR.is_dir() else set()
    shape = re.compile(r"^fbpf-(.+?)-(ul|rt|h\d+|h\d+-p\d+)$")
    names.update(m.group(1) for ns in list_netns() if (m := shape.match(ns)))
    return sorted(names)


# ---------------------------------------------------------------------------- building


def prepare_namespace(netns: str, *, forwarding: bool) -> None:
    """Fresh namespace defaults: no IPv6 chatter, no reverse-path filter, lo up."""
    for key in ("net/ipv6/conf/all/disable_ipv6", "net/ipv6/conf/default/disable_ipv6"):
        write_sysctl(key, 1, netns)
    for key in ("net/ipv4/conf/all/rp_filter", "net/ipv4/conf/default/rp_filter"):
        write_sysctl(key, 0, netns)
    write_sysctl("net/ipv4/ip_forward", 1 if forwarding else 0, netns)
    with in_netns(netns), IPRoute() as ipr:
        ipr.link("set", index=ipr.link_lookup(ifname="lo")[0], state="up")


def new_namespace(netns: str, *, forwarding: bool) -> None:
    create_netns(netns)
    prepare_namespace(netns, forwarding=forwarding)


def _index(ipr: IPRoute, ifname: str) -> int:
    found = ipr.link_lookup(ifname=ifname)
    if not found:
        raise LabError(f"no interface {ifname}")
    return found[0]


def add_bridge(ipr: IPRoute, name: str, address: IPv4Interface | None, mtu: int | None = None) -> int:
    ipr.link("add", ifname=name, kind="bridge", br_stp_state=0)
    idx = _index(ipr, name)
    if address is not None:
        ipr.addr("add", index=idx, address=str(address.ip), prefixlen=address.network.prefixlen)
    if mtu is not None:
        ipr.link("set", index=idx, mtu=mtu)
    ipr.link("set", index=idx, state="up")
    return idx


def plug_veth(near_netns: str, near_ifname: str, bridge: str, far_netns: str,
               far_ifname: str, mtu: int) -> None:
    """A veth pair: `near_ifname` enslaved to `bridge` in `near_netns`, `far_ifname` (down,
    unconfigured) in `far_netns`."""
    with in_netns(near_netns), IPRoute() as ipr:
        ipr.link("add", ifname=near_ifname, kind="veth",
                 peer={"ifname": far_ifname, "net_ns_fd": far_netns})
        idx = _index(ipr, near_ifname)
        ipr.link("set", index=idx, master=_index(ipr, bridge), mtu=mtu, state="up")


def configure_interface(netns: str, ifname: str, address: IPv4Interface, mtu: int,
                         routes: Iterable[tuple[str, str]] = ()) -> None:
    """Address, MTU, up, then (destination, gateway) routes."""
    with in_netns(netns), IPRoute() as ipr:
        idx = _index(ipr, ifname)
        ipr.link("set", index=idx, mtu=mtu)
        ipr.addr("add", index=idx, address=str(address.ip), prefixlen=address.network.prefixlen)
        ipr.link("set", index=idx, state="up")
        for dst, gateway in routes:
            ipr.route("add", dst=dst, gateway=gateway, oif=idx)


def _host_underlay(index: int, on_second: bool, with_router: bool):
    """(address, routes) of host `index`'s uplink: lab addresses only, never a default route."""
    network = UNDERLAY_NETWORKS[1 if on_second else 0]
    address = IPv4Interface(f"{network.network_address + 10 + index}/{network.prefixlen}")
    if on_second:
        routes = [(str(UNDERLAY_SUPERNET), str(ROUTER_ADDRESSES[1].ip))]
    elif with_router:
        routes = [(str(UNDERLAY_NETWORKS[1]), str(ROUTER_ADDRESSES[0].ip))]
    else:
        routes = []
    return address, routes


class Lab:
    """A lab on this machine; `Lab.create` builds one, `Lab.load` opens a running one."""

    def __init__(self, state: LabState):
        self.state = state

    @property
    def name(self) -> str:
        return self.state.name

    def host(self, index: int) -> Host:
        return self.state.host(index)

    @property
    def hosts(self) -> list[Host]:
        return self.state.hosts

    def save(self) -> Path:
        return write_state(self.state)

    @classmethod
    def load(cls, name: str = DEFAULT_LAB) -> "Lab":
        state = read_state(name)
        if state is None:
            raise LabNotFound(f"lab {name} has no state file {state_path(name)}")
        return cls(state)

    @classmethod
    def create(cls, name: str = DEFAULT_LAB, hosts: int = 2,
               second_subnet: Iterable[int] = ()) -> "Lab":
        """Build the underlay and `hosts` hosts; hosts listed in `second_subnet` sit behind the
        router on 198.18.1.0/24. On any failure everything built so far is destroyed."""
        validate_lab_name(name)
        if not isinstance(hosts, int) or not 1 <= hosts <= MAX_HOSTS:
            raise LabError(f"hosts must be 1..{MAX_HOSTS}, got {hosts!r}")
        second = set(second_subnet)
        if not second <= set(range(1, hosts + 1)):
            raise LabError(f"second_subnet names hosts that do not exist: "
                           f"{sorted(second - set(range(1, hosts + 1)))} (hosts are 1..{hosts})")
        if read_state(name) is not None or any(_lab_object_pattern(name).match(ns) for ns in list_netns()):
            raise LabError(f"lab {name} already exists; destroy it first")
        with_router = bool(second)
        state = LabState(
            name=name, underlay_netns=underlay_netns_name(name),
            bridges=[Bridge(UNDERLAY_BRIDGES[0], str(UNDERLAY_BRIDGE_ADDRESS))]
            + ([Bridge(UNDERLAY_BRIDGES[1], None)] if with_router else []))
        lab = cls(state)
        try:
            lab._build_underlay(with_router)
            for index in range(1, hosts + 1):
                lab._build_host(index, on_second=index in second, with_router=with_router)
            lab.save()
        except BaseException:
            log.warning("lab %s: creation failed, removing what was built", name)
            destroy(name)
            raise
        return lab

    def _build_underlay(self, with_router: bool) -> None:
        ul = self.state.underlay_netns
        new_namespace(ul, forwarding=False)
        with in_netns(ul), IPRoute() as ipr:
            add_bridge(ipr, UNDERLAY_BRIDGES[0], UNDERLAY_BRIDGE_ADDRESS)
            if with_router:
                add_bridge(ipr, UNDERLAY_BRIDGES[1], None)
        if not with_router:
            return
        rt = router_netns_name(self.name)
        new_namespace(rt, forwarding=True)
        legs = []
        for n, (bridge, address) in enumerate(zip(UNDERLAY_BRIDGES, ROUTER_ADDRESSES)):
            leg = RouterLeg(ifname=f"eth{n}", address=str(address), bridge=bridge,
                            underlay_veth=f"rt-eth{n}")
            plug_veth(ul, leg.underlay_veth, bridge, rt, leg.ifname, UPLINK_MTU)
            configure_interface(rt, leg.ifname, address, UPLINK_MTU)
            legs.append(leg)
        self.state.router = Router(netns=rt, legs=legs)
        # The underlay namespace answers second-subnet hosts (etcd) through the router.
        with in_netns(ul), IPRoute() as ipr:
            ipr.route("add", dst=str(UNDERLAY_NETWORKS[1]), gateway=str(ROUTER_ADDRESSES[0].ip))

    def add_host(self, on_second_subnet: bool = False) -> Host:
        """One more host in a running lab (the next free index), e.g. a node joining later."""
        with_router = self.state.router is not None
        if on_second_subnet and not with_router:
            raise LabError(f"lab {self.name} has no second underlay subnet (no router)")
        index = max((h.index for h in self.hosts), default=0) + 1
        if index > MAX_HOSTS:
            raise LabError(f"lab {self.name} already has {MAX_HOSTS} hosts")
        try:
            host = self._build_host(index, on_second=on_second_subnet, with_router=with_router)
        except BaseException:
            self.state.hosts = [h for h in self.hosts if h.index != index]
            remove_netns(host_netns_name(self.name, index))
            raise
        finally:
            self.save()
        return host

    def remove_host(self, index: int) -> None:
        """Take host `index` out of the lab: the processes inside it and its pods, their
        namespaces (and links) and its pin directory."""
        host = self.host(index)
        namespaces = [p.netns for p in host.pods] + [host.netns]
        _kill_all(namespaces)
        for ns in namespaces:
            remove_netns(ns)
        unlink_pins(PIN_ROOT / host.netns)
        self.state.hosts.remove(host)
        self.save()

    def _build_host(self, index: int, *, on_second: bool, with_router: bool) -> Host:
        netns = host_netns_name(self.name, index)
        address, routes = _host_underlay(index, on_second, with_router)
        host = Host(index=index, netns=netns, uplink=HOST_UPLINK, address=str(address),
                    underlay_subnet=2 if on_second else 1,
                    underlay_bridge=UNDERLAY_BRIDGES[1 if on_second else 0],
                    underlay_veth=f"h{index}-eth0")
        new_namespace(netns, forwarding=True)
        self.state.hosts.append(host)
        plug_veth(self.state.underlay_netns, host.underlay_veth, host.underlay_bridge,
                   netns, HOST_UPLINK, UPLINK_MTU)
        configure_interface(netns, HOST_UPLINK, address, UPLINK_MTU, routes)
        return host

    def add_pod(self, host: int, index: int, address: str, gateway: str, mtu: int) -> Pod:
        """Pod `index` on host `host`: namespace fbpf-NAME-hI-pJ, eth0 = `address`
        ("10.244.1.2/24") with `mtu` and a default route via `gateway` ("10.244.1.1"), which
        the host's pod bridge cni0 carries (created with the first pod)."""
        h = self.host(host)
        if not isinstance(index, int) or not 1 <= index <= MAX_PODS_PER_HOST:
            raise LabError(f"pod index must be 1..{MAX_PODS_PER_HOST}, got {index!r}")
        if any(p.index == index for p in h.pods):
            raise LabError(f"host {host} already has pod {index}")
        try:
            iface = IPv4Interface(address)
            gw = IPv4Address(gateway)
        except ValueError as e:
            raise LabError(f"bad pod address or gateway: {e}") from None
        if "/" not in str(address) or iface.network.prefixlen == 32:
            raise LabError(f"pod address {address!r} needs the pod subnet's prefix, e.g. 10.244.1.2/24")
        if not iface.network.subnet_of(POD_NETWORK):
            raise LabError(f"pod address {address} is outside the lab pod network {POD_NETWORK}")
        if gw not in iface.network or gw == iface.ip or gw == iface.network.network_address:
            raise LabError(f"pod gateway {gateway} must be another host address of {iface.network}")
        if not isinstance(mtu, int) or not 1280 <= mtu <= 9000:
            raise LabError(f"pod MTU must be 1280..9000, got {mtu!r}")
        bridge_address = IPv4Interface(f"{gw}/{iface.network.prefixlen}")
        if h.pod_gateway is not None and IPv4Interface(h.pod_gateway) != bridge_address:
            raise LabError(f"host {host}'s pod bridge already has {h.pod_gateway}, not {bridge_address}")

        pod = Pod(host=host, index=index, netns=pod_netns_name(self.name, host, index),
                  host_veth=f"vethp{index}", address=str(iface), gateway=str(gw), mtu=mtu)
        if h.pod_gateway is None:
            with in_netns(h.netns), IPRoute() as ipr:
                add_bridge(ipr, DEFAULT_BRIDGE, bridge_address)
            h.pod_bridge, h.pod_gateway = DEFAULT_BRIDGE, str(bridge_address)
            self.save()
        new_namespace(pod.netns, forwarding=False)
        try:
            plug_veth(h.netns, pod.host_veth, DEFAULT_BRIDGE, pod.netns, pod.ifname, mtu)
            configure_interface(pod.netns, pod.ifname, iface, mtu, [("default", str(gw))])
        except BaseException:
            remove_netns(pod.netns)  # takes the veth pair with it
            raise
        h.pods.append(pod)
        self.save()
        return pod

    def destroy(self) -> "DestroyReport":
        return destroy(self.name)


@contextlib.contextmanager
def temporary_lab(prefix: str = "t", hosts: int = 2, second_subnet: Iterable[int] = ()) -> Iterator[Lab]:
    """A lab with a unique name (`prefix` + random hex), destroyed on exit even on failure."""
    name = f"{prefix}{secrets.token_hex(3)}"
    try:
        yield Lab.create(name, hosts, second_subnet)
    finally:
        destroy(name)


# ---------------------------------------------------------------------------- teardown


@dataclass
class DestroyReport:
    namespaces: list[str] = field(default_factory=list)
    killed_pids: list[int] = field(default_factory=list)
    pin_dirs: list[str] = field(default_factory=list)
    state_file_removed: bool = False


def _kill_all(namespaces: list[str], grace: float = 3.0) -> list[int]:
    """SIGTERM every process inside the namespaces, SIGKILL whatever is still (or newly)
    inside after `grace` seconds. Returns the PIDs it signalled."""
    me = os.getpid()

    def inside() -> set[int]:
        return {pid for pids in pids_by_netns(namespaces).values() for pid in pids if pid != me}

    signalled: set[int] = set()
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 2.0)):
        for pid in inside():
            try:
                os.kill(pid, sig)
                signalled.add(pid)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + wait
        while inside() and time.monotonic() < deadline:
            time.sleep(0.05)
    if left := inside():
        log.warning("processes %s would not leave their lab namespaces", sorted(left))
    return sorted(signalled)


def destroy(name: str = DEFAULT_LAB) -> DestroyReport:
    """Remove every trace of lab `name`: processes inside its namespaces, the namespaces (and
    with them every link), its pin directories and its state file. Works from the state file
    and from a scan of /run/netns, so it cleans up after a crash too. Idempotent."""
    validate_lab_name(name)
    report = DestroyReport()
    pattern = _lab_object_pattern(name)
    try:
        state = read_state(name)
    except LabError as e:
        log.warning("ignoring unreadable lab state: %s", e)
        state = None
    namespaces = [ns for ns in list_netns() if pattern.match(ns)]
    if state is not None:
        namespaces += [ns for ns in state.namespaces() if ns not in namespaces and netns_exists(ns)]
    # Pods, then hosts, then router and underlay: each veth goes with its inner end.
    namespaces.sort(key=lambda ns: ("-p" not in ns.removeprefix(f"fbpf-{name}-"), ns))

    if run_dir(name).is_dir():
        stop_all_below(run_dir(name))  # dockerd first: its containers and mounts live outside the namespaces
    report.killed_pids = _kill_all(namespaces)
    for ns in namespaces:
        if remove_netns(ns):
            report.namespaces.append(ns)
    if PIN_ROOT.is_dir():
        for entry in sorted(PIN_ROOT.iterdir()):
            if pattern.match(entry.name):
                unlink_pins(entry)
                report.pin_dirs.append(str(entry))
    if run_dir(name).is_dir():
        shutil.rmtree(run_dir(name), ignore_errors=True)
    try:
        state_path(name).unlink()
        report.state_file_removed = True
    except FileNotFoundError:
        pass
    return report
