"""HTTP from inside a lab namespace: the agents' /readyz and /metrics, and etcd's v3 JSON gateway.

The lab's etcd and agents listen only inside lab namespaces. A socket belongs to the namespace
of the thread that creates it, so these calls switch the calling thread (`in_netns`) while they
connect. The etcd3 gRPC client cannot be used this way: gRPC connects from its own threads.
"""
from __future__ import annotations

import base64
import http.client
import json
import queue
import socket
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass

from flannel_bpf.loader.netns import in_netns

# Never a proxy from the environment: lab addresses exist only inside the namespaces.
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


class GatewayError(RuntimeError):
    """No etcd endpoint answered, or one answered with an error."""


def http_get(netns: str | None, url: str, timeout: float = 2.0) -> tuple[int, str]:
    """(status, body) of a GET from inside `netns`; status 0 when nothing answered."""
    with in_netns(netns):
        try:
            with _OPENER.open(url, timeout=timeout) as reply:
                return reply.status, reply.read().decode(errors="replace")
        except urllib.error.HTTPError as err:
            return err.code, err.read().decode(errors="replace")
        except (OSError, urllib.error.URLError):
            return 0, ""


def _b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def _unb64(text: str | None) -> str:
    return base64.b64decode(text or "").decode()


def prefix_end(prefix: str) -> str:
    """etcd's range_end that selects every key starting with `prefix`."""
    raw = prefix.encode()
    return (raw[:-1] + bytes([raw[-1] + 1])).decode()


@dataclass(frozen=True)
class WatchEvent:
    kind: str          # "put" | "delete"
    key: str
    value: str | None
    revision: int
    seen_at: float     # time.monotonic() when the event reached this process


class EtcdGateway:
    """put/get/delete/watch through etcd's `/v3/*` JSON gateway, from inside `netns`."""

    def __init__(self, endpoints: list[str], netns: str | None, timeout: float = 5.0):
        if not endpoints:
            raise ValueError("no etcd endpoints")
        self.endpoints = list(endpoints)
        self.netns = netns
        self.timeout = timeout

    def _call(self, path: str, body: dict) -> dict:
        data = json.dumps(body).encode()
        errors = []
        for endpoint in self.endpoints:
            request = urllib.request.Request(endpoint + path, data=data, method="POST",
                                             headers={"Content-Type": "application/json"})
            with in_netns(self.netns):
                try:
                    with _OPENER.open(request, timeout=self.timeout) as reply:
                        return json.loads(reply.read())
                except urllib.error.HTTPError as err:
                    errors.append(f"{endpoint}: HTTP {err.code} {err.read()[:200]!r}")
                except (OSError, urllib.error.URLError, ValueError) as err:
                    errors.append(f"{endpoint}: {err}")
        raise GatewayError(f"etcd {path} failed: {'; '.join(errors)}")

    def put(self, key: str, value: str, lease: int | None = None) -> int:
        """Store `value` at `key`; returns the new revision."""
        body = {"key": _b64(key), "value": _b64(value)}
        if lease:
            body["lease"] = str(lease)
        return int(self._call("/v3/kv/put", body)["header"]["revision"])

    def get(self, key: str) -> str | None:
        kvs = self._call("/v3/kv/range", {"key": _b64(key)}).get("kvs", [])
        return _unb64(kvs[0].get("value")) if kvs else None

    def get_prefix(self, prefix: str) -> dict[str, str]:
        reply = self._call("/v3/kv/range", {"key": _b64(prefix), "range_end": _b64(prefix_end(prefix))})
        return {_unb64(kv["key"]): _unb64(kv.get("value")) for kv in reply.get("kvs", [])}

    def delete(self, key: str) -> int:
        """Delete `key`; returns how many keys went (0 or 1)."""
        return int(self._call("/v3/kv/deleterange", {"key": _b64(key)}).get("deleted", 0))

    def grant_lease(self, ttl: int) -> int:
        return int(self._call("/v3/lease/grant", {"TTL": ttl})["ID"])

    def watch_prefix(self, prefix: str, start_revision: int | None = None) -> "PrefixWatch":
        return PrefixWatch(self, prefix, start_revision)


class PrefixWatch:
    """A streaming watch of every key under a prefix, read by a thread into a queue. Use as a
    context manager; events carry the monotonic time they arrived."""

    def __init__(self, gateway: EtcdGateway, prefix: str, start_revision: int | None):
        self.gateway = gateway
        self.prefix = prefix
        self.start_revision = start_revision
        self.events: queue.Queue[WatchEvent] = queue.Queue()
        self._created = threading.Event()
        self._conn: http.client.HTTPConnection | None = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name=f"watch {prefix}", daemon=True)

    def __enter__(self) -> "PrefixWatch":
        self._thread.start()
        if not self._created.wait(self.gateway.timeout) or self._error:
            self.close()
            raise GatewayError(f"etcd watch of {self.prefix} did not start: {self._error}")
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _run(self) -> None:
        create = {"key": _b64(self.prefix), "range_end": _b64(prefix_end(self.prefix))}
        if self.start_revision:
            create["start_revision"] = str(self.start_revision)
        url = urllib.parse.urlsplit(self.gateway.endpoints[0])
        try:
            with in_netns(self.gateway.netns):
                self._conn = http.client.HTTPConnection(url.hostname, url.port, timeout=self.gateway.timeout)
                self._conn.connect()
            self._conn.sock.settimeout(None)  # events may be minutes apart; close() ends the read
            self._conn.request("POST", "/v3/watch", body=json.dumps({"create_request": create}),
                               headers={"Content-Type": "application/json"})
            reply = self._conn.getresponse()
            for line in reply:
                result = json.loads(line).get("result", {})
                if result.get("created"):
                    self._created.set()
                now = time.monotonic()
                for ev in result.get("events", []):
                    kv = ev.get("kv", {})
                    self.events.put(WatchEvent(
                        kind="delete" if ev.get("type") == "DELETE" else "put", key=_unb64(kv.get("key")),
                        value=_unb64(kv["value"]) if "value" in kv else None,
                        revision=int(kv.get("mod_revision", 0)), seen_at=now))
        except Exception as err:  # also what http.client raises once close() cut the stream
            if not self._created.is_set():
                self._error = err
        finally:
            self._created.set()

    def next(self, timeout: float) -> WatchEvent | None:
        try:
            return self.events.get(timeout=timeout)
        except queue.Empty:
            return None

    def wait_for(self, key: str, kind: str = "put", timeout: float = 10.0) -> WatchEvent | None:
        """The first event of `kind` on `key` within `timeout` s (others are dropped)."""
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            ev = self.next(left)
            if ev is not None and ev.key == key and ev.kind == kind:
                return ev
        return None

    def close(self) -> None:
        conn = self._conn
        if conn is not None and conn.sock is not None:
            try:
                conn.sock.shutdown(socket.SHUT_RDWR)  # unblocks the reading thread
            except OSError:
                pass
            conn.close()
        self._thread.join(2.0)
