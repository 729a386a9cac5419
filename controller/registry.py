"""etcd access for the subnet registry, through the etcd3 library (v3 API).

One SubnetRegistry talks to the cluster behind `--etcd-endpoints`: it keeps one etcd3 client per
endpoint and moves to the next endpoint when one stops answering. Unary calls go through the
library's client. Watches use the library's generated Watch stub on the same channel, one gRPC
stream per watch, because etcd3 0.12's shared watcher thread re-creates its stream in a tight loop
while the server is down and cannot be resumed from a revision by its caller after an error.
"""
from __future__ import annotations

import ipaddress
import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from ipaddress import IPv4Network
from typing import Iterator
from urllib.parse import urlsplit

import etcd3
import etcd3.etcdrpc as etcdrpc
import etcd3.exceptions
import grpc

from flannel_bpf.controller.config import NetworkConfig, parse_network_config
from flannel_bpf.controller.lease import (Lease, LeaseAttrs, LeaseFormatError, decode_lease, encode_lease_value,
                                         parse_lease_key, subnet_key, subnets_prefix)
from flannel_bpf.loader.netdefs import DEFAULT_ETCD_PREFIX

log = logging.getLogger(__name__)

DEFAULT_ENDPOINT = "http://127.0.0.1:2379"
SYSTEM_CA_BUNDLE = "/etc/ssl/certs/ca-certificates.crt"
# Reconnect quickly after an etcd restart: gRPC's default backoff grows to two minutes.
_GRPC_OPTIONS = [
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 5000),
    ("grpc.keepalive_time_ms", 10000),
    ("grpc.keepalive_timeout_ms", 5000),
]
# An idle watch on a hung connection (no error, no bytes) looks like a quiet cluster, and gRPC's
# keepalive stops pinging a connection that carries no data. So a watch silent for
# WATCH_PROBE_AFTER s asks etcd for a progress report and fails if none comes in WATCH_PROBE_TIMEOUT s.
WATCH_PROBE_AFTER = 10.0
WATCH_PROBE_TIMEOUT = 5.0
# WatchRequest{progress_request: {}} (field 3, etcd >= 3.4; etcd3's generated messages predate it).
_PROGRESS_REQUEST = b"\x1a\x00"
STILL_WAITING_EVERY = 30.0  # seconds between reminders while etcd or the config is missing
_UNAVAILABLE_CODES = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED}


class EtcdError(RuntimeError):
    """etcd answered with an error (other than being unreachable)."""


class EtcdUnavailable(EtcdError):
    """No etcd endpoint answered."""


class WatchCompacted(EtcdError):
    """The watch's start revision is older than etcd's compaction point: re-list and diff."""

    def __init__(self, compact_revision: int):
        super().__init__(f"watch start revision is compacted (etcd kept history from revision {compact_revision})")
        self.compact_revision = compact_revision


@dataclass(frozen=True)
class EtcdOptions:
    """How to reach etcd: flanneld's --etcd-* flags."""

    endpoints: tuple[str, ...] = (DEFAULT_ENDPOINT,)
    prefix: str = DEFAULT_ETCD_PREFIX
    keyfile: str | None = None
    certfile: str | None = None
    cafile: str | None = None
    username: str | None = None
    password: str | None = None
    timeout: float = 5.0

    def __post_init__(self):
        if not self.endpoints:
            raise ValueError("--etcd-endpoints: at least one endpoint is needed")
        for endpoint in self.endpoints:
            parse_endpoint(endpoint)
        if not self.prefix.startswith("/"):
            raise ValueError(f"--etcd-prefix: {self.prefix!r} must start with '/'")
        if bool(self.keyfile) != bool(self.certfile):
            raise ValueError("--etcd-keyfile and --etcd-certfile: give both or neither")
        if bool(self.username) != bool(self.password):
            raise ValueError("--etcd-username and --etcd-password: give both or neither")
        object.__setattr__(self, "prefix", self.prefix.rstrip("/") or "/")

    @property
    def config_key(self) -> str:
        return f"{self.prefix.rstrip('/')}/config"


def parse_endpoint(endpoint: str) -> tuple[str, str, int]:
    """(scheme, host, port) of an etcd client URL such as http://127.0.0.1:2379."""
    try:
        parts = urlsplit(endpoint.strip())
        port = parts.port or 2379
    except ValueError:
        raise ValueError(f"--etcd-endpoints: {endpoint!r} has a bad port") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"--etcd-endpoints: {endpoint!r} is not a URL like http://127.0.0.1:2379")
    if parts.path not in ("", "/"):
        raise ValueError(f"--etcd-endpoints: {endpoint!r} must not have a path")
    host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
    return parts.scheme, host, port


@dataclass(frozen=True)
class InvalidEntry:
    """A key under <prefix>/subnets/ whose key or value does not parse."""

    key: str
    value: bytes
    reason: str
    subnet: IPv4Network | None = None  # set when only the value is bad: the subnet is still taken


@dataclass(frozen=True)
class LeaseListing:
    revision: int
    leases: list[Lease]
    invalid: list[InvalidEntry] = field(default_factory=list)

    def taken(self) -> list[IPv4Network]:
        """Every subnet that has a key, whether its value parses or not."""
        return [l.subnet for l in self.leases] + [e.subnet for e in self.invalid if e.subnet is not None]


@dataclass(frozen=True)
class LeaseChange:
    """One watch event: a PUT (lease set) or a DELETE (lease cleared or expired) of one key."""

    kind: str  # "put" | "delete"
    key: str
    revision: int
    subnet: IPv4Network | None
    lease: Lease | None = None  # for a put whose value parses
    invalid: InvalidEntry | None = None  # for a key or value that does not parse


def decode_entry(key: bytes, value: bytes, subnets_key_prefix: str, mod_revision: int = 0,
                 lease_id: int = 0) -> Lease | InvalidEntry:
    """A lease, or why the key or value is unusable. Only a key spelled as flannel spells it
    (<prefix>/subnets/10.5.52.0-24) names a subnet."""
    text_key = key.decode(errors="replace")
    try:
        subnet = parse_lease_key(text_key, subnets_key_prefix)
    except LeaseFormatError as exc:
        return InvalidEntry(key=text_key, value=bytes(value), reason=str(exc))
    try:
        return decode_lease(text_key, value, mod_revision=mod_revision, etcd_lease_id=lease_id)
    except LeaseFormatError as exc:
        return InvalidEntry(key=text_key, value=bytes(value), reason=str(exc), subnet=subnet)


class SubnetRegistry:
    """flannel's etcd subnet registry: the network config and the subnet leases under a prefix."""

    def __init__(self, options: EtcdOptions):
        self.options = options
        for endpoint in options.endpoints:
            scheme, host, _ = parse_endpoint(endpoint)
            if scheme == "http" and not _is_loopback(host):
                secret = " and the etcd password" if options.username else ""
                log.warning("etcd endpoint %s is plain HTTP: leases%s cross the network unencrypted and "
                            "unauthenticated; use https with --etcd-cafile/--etcd-certfile/--etcd-keyfile",
                            endpoint, secret)
        self._lock = threading.Lock()
        self._clients: dict[str, etcd3.Etcd3Client] = {}
        self._current = 0

    # -- connections -------------------------------------------------------------------------

    def _client(self, endpoint: str) -> etcd3.Etcd3Client:
        with self._lock:
            client = self._clients.get(endpoint)
        if client is not None:
            return client
        scheme, host, port = parse_endpoint(endpoint)
        tls = {}
        if scheme == "https" or self.options.certfile:
            tls = {"ca_cert": self.options.cafile or SYSTEM_CA_BUNDLE,
                   "cert_key": self.options.keyfile, "cert_cert": self.options.certfile}
        try:
            client = etcd3.client(host=host, port=port, timeout=self.options.timeout,
                                  user=self.options.username, password=self.options.password,
                                  grpc_options=_GRPC_OPTIONS, **tls)
        except grpc.RpcError as exc:  # authentication happens in the constructor
            raise _translate(exc, endpoint) from None
        except OSError as exc:
            raise EtcdError(f"cannot read the etcd TLS files: {exc}") from None
        if not client.uses_secure_channel:
            # gRPC refuses call credentials on a plain channel; the auth token also travels in the
            # metadata etcd3 adds to every call, which is all etcd needs.
            client.call_credentials = None
        with self._lock:
            self._clients.setdefault(endpoint, client)
            return self._clients[endpoint]

    def _drop_client(self, endpoint: str) -> None:
        with self._lock:
            client = self._clients.pop(endpoint, None)
        if client is not None:
            client.close()

    def _call(self, operation):
        """Run operation(client) on the current endpoint, moving on to the next ones if it is down."""
        endpoints = self.options.endpoints
        errors = []
        for attempt in range(len(endpoints)):
            with self._lock:
                index = (self._current + attempt) % len(endpoints)
            endpoint = endpoints[index]
            try:
                result = self._with_auth_retry(endpoint, operation)
            except EtcdUnavailable as exc:
                errors.append(str(exc))
                continue
            if attempt:
                with self._lock:
                    self._current = index
                log.info("etcd: now using endpoint %s", endpoint)
            return result
        raise EtcdUnavailable("; ".join(errors))

    def _with_auth_retry(self, endpoint: str, operation):
        for attempt in (1, 2):
            client = self._client(endpoint)
            try:
                return operation(client)
            except grpc.RpcError as exc:
                # An expired auth token: log in again once.
                if exc.code() == grpc.StatusCode.UNAUTHENTICATED and attempt == 1 and self.options.username:
                    log.info("etcd %s: %s; logging in again", endpoint, exc.details())
                    self._drop_client(endpoint)
                    continue
                raise _translate(exc, endpoint) from None
            except (etcd3.exceptions.ConnectionFailedError, etcd3.exceptions.ConnectionTimeoutError) as exc:
                raise EtcdUnavailable(f"{endpoint}: {exc}") from None
            except etcd3.exceptions.Etcd3Exception as exc:
                raise EtcdError(f"{endpoint}: {type(exc).__name__} {exc}") from None

    def next_endpoint(self) -> None:
        """Move to the next endpoint (after a watch on the current one failed)."""
        with self._lock:
            self._current = (self._current + 1) % len(self.options.endpoints)

    def close(self) -> None:
        with self._lock:
            clients, self._clients = list(self._clients.values()), {}
        for client in clients:
            client.close()

    def __enter__(self) -> "SubnetRegistry":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    # -- network config ----------------------------------------------------------------------

    def get_network_config_text(self) -> str | None:
        value, _ = self._call(lambda c: c.get(self.options.config_key))
        return None if value is None else value.decode(errors="replace")

    def get_network_config(self) -> NetworkConfig | None:
        """The parsed config at <prefix>/config; None when absent; ConfigError when bad."""
        text = self.get_network_config_text()
        return None if text is None else parse_network_config(text)

    def wait_for_network_config(self, stop: threading.Event | None = None, interval: float = 1.0) -> NetworkConfig:
        """flanneld's startup: wait (checking every `interval` s) until <prefix>/config exists and
        while etcd is unreachable. A config that exists but is bad raises ConfigError at once."""
        stop = stop or threading.Event()
        complained, started, last_said = None, time.monotonic(), 0.0
        while True:
            try:
                config = self.get_network_config()
                if config is not None:
                    return config
                problem = f"no network config at {self.options.config_key} yet; waiting for one"
            except EtcdUnavailable as exc:
                problem = f"etcd unreachable ({exc}); retrying"
            now = time.monotonic()
            if problem != complained:
                log.warning("%s", problem)
                complained, last_said = problem, now
            elif now - last_said >= STILL_WAITING_EVERY:  # never silent for long
                log.warning("still waiting after %d s: %s", now - started, problem)
                last_said = now
            if stop.wait(interval):
                raise InterruptedError("stopped while waiting for the network config")

    def put_network_config(self, text: str) -> NetworkConfig:
        """Check the config and store it at <prefix>/config; a bad config raises ConfigError and
        writes nothing."""
        config = parse_network_config(text)
        self._call(lambda c: c.put(self.options.config_key, text))
        return config

    # -- leases ------------------------------------------------------------------------------

    def list_leases(self) -> LeaseListing:
        """Every lease under <prefix>/subnets/ and the etcd revision the listing is as of."""
        prefix = subnets_prefix(self.options.prefix)
        response = self._call(lambda c: c.get_prefix_response(prefix))
        leases, invalid = [], []
        for kv in response.kvs:
            entry = decode_entry(kv.key, kv.value, prefix, kv.mod_revision, kv.lease)
            (leases if isinstance(entry, Lease) else invalid).append(entry)
        return LeaseListing(revision=response.header.revision, leases=leases, invalid=invalid)

    def get_lease(self, subnet: IPv4Network) -> Lease | InvalidEntry | None:
        key = subnet_key(self.options.prefix, subnet)
        value, meta = self._call(lambda c: c.get(key))
        if value is None:
            return None
        return decode_entry(key.encode(), value, subnets_prefix(self.options.prefix), meta.mod_revision,
                            meta.lease_id)

    def create_lease(self, subnet: IPv4Network, attrs: LeaseAttrs, ttl: int) -> Lease | None:
        """Create the lease if the key does not exist (flannel's If(Version(key)==0) Then(Put)).
        Returns None when another node holds the key (a lost race)."""
        key = subnet_key(self.options.prefix, subnet)
        return self._put_with_new_etcd_lease(
            attrs.for_subnet(subnet), ttl, lambda c: [c.transactions.version(key) == 0])

    def update_lease(self, lease: Lease, attrs: LeaseAttrs, ttl: int) -> Lease | None:
        """Renew or rewrite `lease` with a fresh TTL, only while the key is as we last saw it
        (same mod revision). Returns None when the key is gone or changed (the lease was lost)."""
        key = subnet_key(self.options.prefix, lease.subnet)
        renewed = self._put_with_new_etcd_lease(
            attrs.for_subnet(lease.subnet), ttl, lambda c: [c.transactions.mod(key) == lease.mod_revision])
        if renewed is not None and lease.etcd_lease_id:
            self._revoke_quietly(lease.etcd_lease_id)  # holds no key any more
        return renewed

    def delete_lease(self, lease: Lease) -> bool:
        """Delete the key while it is as we last saw it (same mod revision). True when deleted."""
        key = subnet_key(self.options.prefix, lease.subnet)
        succeeded, _ = self._call(lambda c: c.transaction(
            compare=[c.transactions.mod(key) == lease.mod_revision], success=[c.transactions.delete(key)],
            failure=[]))
        if succeeded and lease.etcd_lease_id:
            self._revoke_quietly(lease.etcd_lease_id)
        return succeeded

    def _put_with_new_etcd_lease(self, lease: Lease, ttl: int, compare) -> Lease | None:
        key = subnet_key(self.options.prefix, lease.subnet)
        value = encode_lease_value(lease)
        grant = self._call(lambda c: c.lease(int(ttl)))
        try:
            succeeded, responses = self._call(lambda c: c.transaction(
                compare=compare(c), success=[c.transactions.put(key, value, lease=grant.id)], failure=[]))
        except EtcdError:
            self._revoke_quietly(grant.id)
            raise
        if not succeeded:
            self._revoke_quietly(grant.id)
            return None
        revision = responses[0].response_put.header.revision if responses else 0
        return Lease(subnet=lease.subnet, public_ip=lease.public_ip, backend_type=lease.backend_type,
                     backend_data=lease.backend_data, etcd_lease_id=grant.id, mod_revision=revision,
                     expires_at=time.time() + grant.ttl)

    def _revoke_quietly(self, etcd_lease_id: int) -> None:
        try:
            self._call(lambda c: c.revoke_lease(etcd_lease_id))
        except EtcdError as exc:
            log.debug("could not revoke etcd lease %x: %s", etcd_lease_id, exc)

    # -- watch -------------------------------------------------------------------------------

    def watch_leases(self, start_revision: int) -> "LeaseWatch":
        """A stream of lease changes under <prefix>/subnets/ from `start_revision` on."""
        prefix = subnets_prefix(self.options.prefix).encode()
        return self._call(lambda c: LeaseWatch(c, prefix, start_revision))


class LeaseWatch:
    """One etcd watch stream. Iterate it for lists of LeaseChange (one list per etcd response,
    an empty one when the watch is created); it raises WatchCompacted, EtcdUnavailable (also when
    the stream goes silent and etcd does not answer a progress request) or EtcdError, and ends
    after cancel()."""

    def __init__(self, client: etcd3.Etcd3Client, prefix: bytes, start_revision: int):
        self._requests: queue.Queue = queue.Queue()
        self._cancelled = threading.Event()
        self._silent = threading.Event()
        self._heard = time.monotonic()
        self._probe_after, self._probe_timeout = WATCH_PROBE_AFTER, WATCH_PROBE_TIMEOUT
        create = etcdrpc.WatchCreateRequest(key=prefix, range_end=_prefix_end(prefix),
                                            start_revision=start_revision)
        self._requests.put(etcdrpc.WatchRequest(create_request=create))
        # "hasleader": etcd cancels the watch when its member loses the cluster leader.
        metadata = tuple(client.metadata or ()) + (("hasleader", "true"),)
        watch = client.channel.stream_stream("/etcdserverpb.Watch/Watch", request_serializer=_serialize,
                                             response_deserializer=etcdrpc.WatchResponse.FromString)
        self._call = watch(self._request_stream(), credentials=client.call_credentials, metadata=metadata)
        self.start_revision = start_revision
        self._prefix = prefix.decode()

    def _request_stream(self):
        probe_sent = None
        while True:
            try:
                request = self._requests.get(timeout=min(1.0, self._probe_timeout / 2))
            except queue.Empty:
                now = time.monotonic()
                if probe_sent is not None and self._heard < probe_sent and now - probe_sent > self._probe_timeout:
                    self._silent.set()
                    self._call.cancel()
                    return
                if now - self._heard > self._probe_after and (probe_sent is None or self._heard >= probe_sent):
                    probe_sent = now
                    yield _PROGRESS_REQUEST
                continue
            if request is None:
                return
            yield request

    def __iter__(self) -> Iterator[list[LeaseChange]]:
        try:
            for response in self._call:
                self._heard = time.monotonic()
                if response.compact_revision:
                    raise WatchCompacted(response.compact_revision)
                if response.canceled:
                    raise EtcdUnavailable(f"etcd cancelled the watch: {response.cancel_reason or 'no reason given'}")
                if response.created or response.events:
                    # An empty list on creation tells the caller the stream is up.
                    yield [_change(event, self._prefix) for event in response.events]
        except grpc.RpcError as exc:
            if self._silent.is_set():
                raise EtcdUnavailable(f"watch: no answer from etcd for {self._probe_after + self._probe_timeout:g} s "
                                      f"(a hung connection?)") from None
            if self._cancelled.is_set():
                return
            raise _translate(exc, "watch") from None
        finally:
            self._requests.put(None)

    def cancel(self) -> None:
        self._cancelled.set()
        self._requests.put(None)
        self._call.cancel()


def _serialize(request) -> bytes:
    return request if isinstance(request, bytes) else request.SerializeToString()


def _change(event, subnets_key_prefix: str) -> LeaseChange:
    key = event.kv.key.decode(errors="replace")
    if event.type == event.DELETE:
        try:
            subnet = parse_lease_key(key, subnets_key_prefix)
        except LeaseFormatError:
            subnet = None
        return LeaseChange(kind="delete", key=key, revision=event.kv.mod_revision, subnet=subnet)
    entry = decode_entry(event.kv.key, event.kv.value, subnets_key_prefix, event.kv.mod_revision, event.kv.lease)
    if isinstance(entry, Lease):
        return LeaseChange(kind="put", key=key, revision=event.kv.mod_revision, subnet=entry.subnet, lease=entry)
    return LeaseChange(kind="put", key=key, revision=event.kv.mod_revision, subnet=entry.subnet, invalid=entry)


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a name: it may resolve anywhere


def _prefix_end(prefix: bytes) -> bytes:
    return prefix[:-1] + bytes([prefix[-1] + 1])


def _translate(exc: grpc.RpcError, where: str) -> EtcdError:
    code = exc.code() if hasattr(exc, "code") else None
    details = exc.details() if hasattr(exc, "details") else str(exc)
    if code in _UNAVAILABLE_CODES:
        return EtcdUnavailable(f"{where}: {details or code}")
    name = code.name if code is not None else "error"
    return EtcdError(f"{where}: {name}: {details}")
