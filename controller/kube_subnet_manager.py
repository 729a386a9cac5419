"""flanneld's Kubernetes subnet manager (--kube-subnet-mgr), through the lightkube client.

start() finds this node's object, waits (and says so) while its spec.podCIDR is empty, checks
that the network config holds it, publishes the lease as flanneld does (the annotations of
kube_annotations, one strategic merge patch of nodes/status), writes subnet.env, clears the
node's NetworkUnavailable condition (reason FlannelIsUp) and starts two threads:
- the watcher lists all nodes, then watches from the listing's resourceVersion; on 410 Gone it
  lists again and diffs, after any other failure it resumes from the last resourceVersion
  (backoff 100 ms doubling to 5 s). Nodes without flannel's annotations, without a podCIDR or
  with malformed values are skipped and counted, never programmed;
- the dispatcher calls the sink's hooks, one at a time, in order.
There is nothing to renew: the podCIDR is the node's for its lifetime, as in flanneld.
"""
from __future__ import annotations

import copy
import logging
import os
import threading
import time
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path
from typing import Iterable, Mapping

import httpx2
from lightkube import ApiError, Client, ConfigError as KubeConfigError, KubeConfig
from lightkube.config.models import Cluster, User
from lightkube.resources.core_v1 import Node, Pod

from flannel_bpf.controller.config import NetworkConfig, load_network_config_file
from flannel_bpf.controller.kube_annotations import (AnnotationKeys, annotation_patch, is_flannel_node,
                                                     network_available_patch, node_lease, pod_cidr,
                                                     published_annotations)
from flannel_bpf.controller.lease import Lease, LeaseAttrs, LeaseFormatError
from flannel_bpf.controller.lease_check import BAD_VALUE, LeaseProblem, SkippedLeases, lease_problem
from flannel_bpf.controller.peers import PeerEvent, PeerEventThread, PeerSink, PeerTable
from flannel_bpf.controller.subnet_env import write_subnet_env
from flannel_bpf.loader.netdefs import DEFAULT_SUBNET_FILE

log = logging.getLogger(__name__)

DEFAULT_KUBE_NET_CONFIG = "/etc/kube-flannel/net-conf.json"
LEASE_LIFETIME = 24 * 3600  # what flanneld reports as the expiry of a kube lease
WATCH_SERVER_TIMEOUT = 300  # seconds; the API server ends the watch then and it is resumed
# Why a node is skipped, beside lease_check's reasons (metric labels).
NOT_A_FLANNEL_NODE = "not_flannel_node"
NO_POD_CIDR = "no_pod_cidr"
OUR_SUBNET = "our_subnet"


class KubeError(RuntimeError):
    """The Kubernetes API refused or could not be reached for something the node needs."""


# The errors of the client library that mean "not now": the API server is away or busy.
_TRANSIENT = (httpx2.TransportError, OSError)


def kube_config(api_url: str | None, kubeconfig: str | None) -> KubeConfig:
    """flanneld's choice (client-go's BuildConfigFromFlags): the kubeconfig file, with
    --kube-api-url overriding its server; else --kube-api-url alone; else in-cluster."""
    try:
        if kubeconfig:
            config = KubeConfig.from_file(kubeconfig)
            if api_url:
                single = config.get()
                cluster = copy.copy(single.cluster)
                cluster.server = api_url
                config = KubeConfig.from_one(cluster=cluster, user=single.user, namespace=single.context.namespace,
                                             fname=kubeconfig)
            return config
        if api_url:
            return server_config(api_url)
        return KubeConfig.from_service_account()
    except (KubeConfigError, KeyError, OSError, ValueError) as exc:
        where = kubeconfig or api_url or "the in-cluster service account"
        raise KubeError(f"no Kubernetes client config from {where}: {exc}") from None


def server_config(api_url: str) -> KubeConfig:
    """The API server at `api_url`, with no credentials."""
    return KubeConfig.from_one(cluster=Cluster(server=api_url), user=User())


def kube_client(config: KubeConfig) -> Client:
    # The HTTP library logs every request at INFO: a watch reconnect is not worth a line.
    logging.getLogger("httpx2").setLevel(logging.WARNING)
    # trust_env=False: no proxy from the environment between a node and its API server.
    return Client(config, timeout=httpx2.Timeout(10.0), field_manager="flannel-bpf", trust_env=False)


def own_node_name(client: Client, environ: Mapping[str, str] | None = None) -> str:
    """flanneld's way: NODE_NAME, else the node of the pod POD_NAMESPACE/POD_NAME."""
    environ = os.environ if environ is None else environ
    if environ.get("NODE_NAME"):
        return environ["NODE_NAME"]
    pod_name, namespace = environ.get("POD_NAME"), environ.get("POD_NAMESPACE")
    if not pod_name or not namespace:
        raise KubeError("env variables POD_NAME and POD_NAMESPACE must be set (or NODE_NAME)")
    try:
        pod = client.get(Pod, pod_name, namespace=namespace)
    except (ApiError, *_TRANSIENT) as exc:
        raise KubeError(f"error retrieving pod spec for '{namespace}/{pod_name}': {exc}") from None
    if not pod.spec or not pod.spec.nodeName:
        raise KubeError(f"node name not present in pod spec '{namespace}/{pod_name}'")
    return pod.spec.nodeName


@dataclass(frozen=True)
class NodeView:
    """What the manager reads of a node object."""

    name: str
    resource_version: str
    annotations: dict
    subnet: IPv4Network | None  # None: no podCIDR yet
    cidr_error: str | None = None

    @classmethod
    def of(cls, node) -> "NodeView":
        spec = node.spec
        try:
            subnet = pod_cidr(spec.podCIDR if spec else None, spec.podCIDRs if spec else None)
            error = None
        except LeaseFormatError as exc:
            subnet, error = None, str(exc)
        return cls(name=node.metadata.name, resource_version=node.metadata.resourceVersion or "",
                   annotations=dict(node.metadata.annotations or {}), subnet=subnet, cidr_error=error)


class KubeSubnetManager:
    """This node's lease from its node object, and every other flannel node as a peer event.

    Same surface as the etcd manager: start() -> Lease, stop(), lease, peers(), wait_synced(),
    reconnect_count, reacquired_count; events go to `sink.on_peer_event` on one thread."""

    def __init__(self, client: Client, node_name: str, config: NetworkConfig, attrs: LeaseAttrs,
                 keys: AnnotationKeys, *, mtu: int, ip_masq: bool = False,
                 subnet_file: str | Path | None = DEFAULT_SUBNET_FILE, sink: PeerSink | None = None,
                 set_network_unavailable: bool = True, stop: threading.Event | None = None,
                 own_addresses: Iterable[IPv4Address] = (), poll_interval: float = 1.0,
                 backoff_initial: float = 0.1, backoff_max: float = 5.0,
                 watch_timeout: int = WATCH_SERVER_TIMEOUT):
        self.client = client
        self.node_name = node_name
        self.config = config
        self.attrs = attrs
        self.keys = keys
        self.mtu = mtu
        self.ip_masq = ip_masq
        self.subnet_file = Path(subnet_file) if subnet_file is not None else None
        self.set_network_unavailable = set_network_unavailable
        self.own_addresses = frozenset({attrs.public_ip, *own_addresses})
        self.poll_interval = poll_interval
        self.backoff_initial = backoff_initial
        self.backoff_max = backoff_max
        self.watch_timeout = watch_timeout
        _bound_watch_reads(client, watch_timeout)
        self._stopping = stop or threading.Event()
        self._lease: Lease | None = None
        self._peers = PeerTable()
        self._peers_lock = threading.Lock()
        self._subnet_of: dict[str, IPv4Network] = {}  # node name -> subnet it is programmed for
        self._synced = threading.Event()
        self._events = PeerEventThread(sink)
        self._watcher: threading.Thread | None = None
        self.skipped = SkippedLeases()  # keyed "node/NAME"
        self._watch_down_since: float | None = time.monotonic()  # None while the watch is up
        self.reconnect_count = 0
        self.reacquired_count = 0  # a podCIDR is never lost
        self.conflict: str | None = None  # nor claimed by another node: the controller manager assigns it

    # -- public ------------------------------------------------------------------------------

    @property
    def lease(self) -> Lease | None:
        return self._lease

    def peers(self) -> dict[IPv4Network, Lease]:
        with self._peers_lock:
            return self._peers.snapshot()

    def wait_synced(self, timeout: float | None = None) -> bool:
        return self._synced.wait(timeout)

    def watch_down_for(self) -> float | None:
        since = self._watch_down_since
        return None if since is None else time.monotonic() - since

    def start(self) -> Lease:
        """Publish our lease on our node and write subnet.env (waiting for the podCIDR), then
        start watching the other nodes. KubeError when the node cannot be used."""
        node = self._wait_for_pod_cidr()
        subnet = node.subnet
        if not (subnet.prefixlen >= self.config.network.prefixlen and subnet.subnet_of(self.config.network)):
            raise KubeError(f"subnet {self.config.network} specified in the flannel net config doesn't contain "
                            f"{subnet} PodCIDR of the {self.node_name!r} node")
        changed = published_annotations(node.annotations, self.attrs, self.keys)
        if changed:
            self._patch_status(annotation_patch(changed), "annotations")
            log.info("published our lease on node %s: %s", self.node_name,
                     ", ".join(f"{k}={v}" for k, v in sorted(changed.items())))
        self._lease = self.attrs.for_subnet(subnet, expires_at=time.time() + LEASE_LIFETIME)
        if self.subnet_file is not None:
            write_subnet_env(self.subnet_file, self.config.network, subnet, self.mtu, self.ip_masq)
            log.info("wrote %s (subnet %s, MTU %d)", self.subnet_file, subnet, self.mtu)
        self._events.start()
        self._watcher = threading.Thread(target=self._watch, name="flannel-bpf-watch", daemon=True)
        self._watcher.start()
        if self.set_network_unavailable:
            try:
                self._patch_status(network_available_patch(), "NetworkUnavailable condition")
            except KubeError as exc:  # flanneld logs it and goes on
                log.warning("%s", exc)
        return self._lease

    def stop(self, release: bool = False, timeout: float = 10.0) -> None:
        """Stop watching (events already queued are still delivered). The node's annotations
        stay, as flanneld leaves them: `release` has nothing to release."""
        self._stopping.set()
        self.client.close()
        if self._watcher is not None and self._watcher is not threading.current_thread():
            # A watch blocked on a quiet stream cannot be woken from here (the client library
            # keeps the socket); it announces nothing more and ends with its next line or the
            # server's timeout, on a daemon thread.
            self._watcher.join(min(timeout, 0.5))
        self._events.stop(timeout)

    # -- our node ----------------------------------------------------------------------------

    def _wait_for_pod_cidr(self) -> NodeView:
        said = None
        while True:
            try:
                node = NodeView.of(self.client.get(Node, self.node_name))
                if node.cidr_error:
                    raise KubeError(f"node {self.node_name!r}: {node.cidr_error}")
                if node.subnet is not None:
                    return node
                problem = f"node {self.node_name!r} has no podCIDR assigned yet; waiting for one"
            except ApiError as exc:
                if exc.status.code != 404:
                    raise KubeError(f"reading node {self.node_name!r}: {_describe(exc)}") from None
                problem = f"node {self.node_name!r} does not exist (yet); waiting for it"
            except _TRANSIENT as exc:
                problem = f"Kubernetes API unreachable ({exc}); retrying"
            if problem != said:
                log.warning("%s", problem)
                said = problem
            if self._stopping.wait(self.poll_interval):
                raise InterruptedError("stopped while waiting for this node's podCIDR")

    def _patch_status(self, patch: dict, what: str) -> None:
        try:
            self.client.patch(Node.Status, self.node_name, patch)
        except (ApiError, *_TRANSIENT) as exc:
            detail = _describe(exc) if isinstance(exc, ApiError) else str(exc)
            raise KubeError(f"could not patch the {what} of node {self.node_name!r}: {detail}") from None

    # -- watching peers ----------------------------------------------------------------------

    def _watch(self) -> None:
        version = None
        backoff = self.backoff_initial
        outage = None
        while not self._stopping.is_set():
            try:
                if version is None:
                    listing = self.client.list(Node)
                    nodes = [NodeView.of(n) for n in listing]
                    version = listing.resourceVersion
                    outage = self._end_outage(outage)
                    self._watch_down_since = None
                    self._apply_listing(nodes)
                for kind, obj in self.client.watch(Node, resource_version=version, server_timeout=self.watch_timeout):
                    if self._stopping.is_set():
                        return
                    outage = self._end_outage(outage)
                    self._watch_down_since = None
                    backoff = self.backoff_initial
                    node = NodeView.of(obj)
                    version = node.resource_version or version
                    if kind in ("ADDED", "MODIFIED"):
                        self._apply_node(node)
                    elif kind == "DELETED":
                        self._forget(node.name, deleted=True)
            except ApiError as exc:
                if exc.status.code == 410:
                    log.warning("node watch from resourceVersion %s is too old (410 Gone); listing again", version)
                    version = None
                    continue
                outage = self._interrupted(outage, _describe(exc))
            except Exception as exc:  # transport errors are expected; anything else is a bug, keep watching
                if self._stopping.is_set():
                    return
                if not isinstance(exc, _TRANSIENT):
                    log.exception("node watch failed unexpectedly")
                outage = self._interrupted(outage, str(exc) or type(exc).__name__)
            self._stopping.wait(backoff)
            backoff = min(backoff * 2, self.backoff_max)

    def _interrupted(self, outage: str | None, why: str) -> str:
        if self._watch_down_since is None:
            self._watch_down_since = time.monotonic()
        if outage is None:
            log.warning("node watch interrupted (%s); reconnecting with backoff up to %g s", why, self.backoff_max)
            return why
        return outage

    def _end_outage(self, outage: str | None) -> None:
        if outage is not None:
            self.reconnect_count += 1
            log.info("node watch re-established after: %s", outage)

    def _apply_listing(self, nodes: list[NodeView]) -> None:
        leases: dict[IPv4Network, Lease] = {}
        subnet_of: dict[str, IPv4Network] = {}
        self.skipped.retain(_key(node.name) for node in nodes)
        for node in nodes:
            lease = self._peer_lease(node)
            if lease is not None:
                leases[lease.subnet] = lease
                subnet_of[node.name] = lease.subnet
        with self._peers_lock:
            self._subnet_of = subnet_of
            events = self._peers.reset(leases)
        for event in events:
            self._announce(event)
        self._synced.set()

    def _apply_node(self, node: NodeView) -> None:
        lease = self._peer_lease(node)
        if lease is None:
            self._forget(node.name)
            return
        self.skipped.forget(_key(node.name))
        with self._peers_lock:
            events = []
            previous = self._subnet_of.get(node.name)
            if previous is not None and previous != lease.subnet:
                events.append(self._peers.apply(previous, None))
            self._subnet_of[node.name] = lease.subnet
            events.append(self._peers.apply(lease.subnet, lease))
        for event in events:
            if event is not None:
                self._announce(event)

    def _forget(self, name: str, deleted: bool = False) -> None:
        if deleted:
            self.skipped.forget(_key(name))
        with self._peers_lock:
            subnet = self._subnet_of.pop(name, None)
            event = self._peers.apply(subnet, None) if subnet is not None else None
        if event is not None:
            self._announce(event)

    def _peer_lease(self, node: NodeView) -> Lease | None:
        """The node's lease, or None (counted and said once) when it is not a usable peer."""
        if node.name == self.node_name:
            return None
        if not is_flannel_node(node.annotations, self.keys):
            return self._skip(node, LeaseProblem(NOT_A_FLANNEL_NODE, f"no {self.keys.kube_subnet_manager}: "
                                                                     f"\"true\" annotation"))
        if node.subnet is None:
            return self._skip(node, LeaseProblem(BAD_VALUE, node.cidr_error) if node.cidr_error
                              else LeaseProblem(NO_POD_CIDR, "no podCIDR assigned"))
        try:
            lease = node_lease(node.annotations, node.subnet, self.keys)
        except LeaseFormatError as exc:
            return self._skip(node, LeaseProblem(BAD_VALUE, str(exc)))
        problem = lease_problem(lease, self.config, self.own_addresses)
        if problem is None and self._lease is not None and node.subnet.overlaps(self._lease.subnet):
            problem = LeaseProblem(OUR_SUBNET, f"its podCIDR {node.subnet} overlaps ours")
        return lease if problem is None else self._skip(node, problem)

    def _skip(self, node: NodeView, problem: LeaseProblem) -> None:
        self.skipped.skip(_key(node.name), problem)
        return None

    def _announce(self, event: PeerEvent) -> None:
        if self._stopping.is_set():
            return
        log.info("%s", event.describe())
        self._events.put(event)


def _bound_watch_reads(client: Client, watch_timeout: int) -> None:
    """lightkube reads a watch without a read timeout, so a connection that died silently (no
    FIN, no RST) would stall the watch for good. The server ends every watch after
    `watch_timeout`: a stream silent for clearly longer than that is dead."""
    timeout = getattr(getattr(client, "_client", None), "_watch_timeout", None)
    if timeout is None:
        log.warning("this lightkube keeps no watch timeout to bound: a silently dead API connection "
                    "would not be noticed")
        return
    timeout.read = watch_timeout * 1.5 + 5


def _key(node_name: str) -> str:
    return f"node/{node_name}"


def _describe(exc: ApiError) -> str:
    status = exc.status
    return f"{status.code} {status.reason or ''}: {status.message or ''}".strip()


class KubeControlPlane:
    """flanneld's --kube-subnet-mgr: the config from net-conf.json, this node's lease from its
    node object, the peers from the node watch."""

    def __init__(self, client: Client, node_name: str, keys: AnnotationKeys,
                 net_config_path: str = DEFAULT_KUBE_NET_CONFIG, set_network_unavailable: bool = True):
        self.client = client
        self.node_name = node_name
        self.keys = keys
        self.net_config_path = net_config_path
        self.set_network_unavailable = set_network_unavailable

    def network_config(self, stop: threading.Event) -> NetworkConfig:
        return load_network_config_file(self.net_config_path)

    def subnet_manager(self, config: NetworkConfig, attrs: LeaseAttrs, settings) -> KubeSubnetManager:
        return KubeSubnetManager(self.client, self.node_name, config, attrs, self.keys, mtu=settings.mtu,
                                 ip_masq=settings.ip_masq, subnet_file=settings.subnet_file, sink=settings.sink,
                                 set_network_unavailable=self.set_network_unavailable, stop=settings.stop,
                                 own_addresses=settings.own_addresses)

    def close(self) -> None:
        self.client.close()
