"""A STAND-IN for the Kubernetes API server: only the calls flannel's subnet manager makes.

No Kubernetes API server can be installed here, so the lab and the tests serve this over real
HTTP and drive it through the real client library. It is not Kubernetes: it holds nodes and
pods in memory and implements only
- nodes: get, list (with the collection's resourceVersion), create, delete, and watch from a
  resourceVersion (history kept until compact(); an older one gets the API server's ERROR event
  with a 410 Gone Status); without a resourceVersion a watch first sends every node as ADDED;
- PATCH of a node and of its status subresource, as strategic merge patch (conditions and
  addresses merge by type, null deletes), JSON merge patch (RFC 7386) and JSON patch
  (RFC 6902, through jsonpatch); the status subresource keeps the spec, the main resource keeps
  the status, as the API server's node strategies do;
- pods: get (a pod records the node it runs on).
Every request is recorded (method, path, content type, body) for tests to compare bytes.

Run on its own (the lab does, inside its underlay namespace):
    python -m flannel_bpf.lab.kube_standin --listen 198.18.0.254:6443
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import json
import logging
import signal
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

import jsonpatch

log = logging.getLogger(__name__)

STRATEGIC = "application/strategic-merge-patch+json"
MERGE = "application/merge-patch+json"
JSON_PATCH = "application/json-patch+json"
# Node lists that a strategic merge patch merges by a key (the API's patchMergeKey).
_MERGE_KEYS = {("status", "conditions"): "type", ("status", "addresses"): "type"}
_MAX_WATCH_SECONDS = 1800


class ApiFailure(Exception):
    def __init__(self, code: int, reason: str, message: str):
        super().__init__(message)
        self.code, self.reason, self.message = code, reason, message

    def status(self) -> dict:
        return {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                "message": self.message, "reason": self.reason, "code": self.code}


@dataclass(frozen=True)
class Recorded:
    method: str
    path: str
    query: dict
    content_type: str | None
    body: bytes


def merge_patch(target, patch):
    """RFC 7386."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    result = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = merge_patch(result.get(key), value)
    return result


def strategic_merge_patch(target, patch, path: tuple = ()):
    """Kubernetes' strategic merge patch for the node fields it is used on here."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    if any(k.startswith("$") for k in patch):
        raise ApiFailure(422, "Invalid", f"patch directives ({', '.join(k for k in patch if k.startswith('$'))}) "
                                         "are not implemented by this stand-in")
    result = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        where = path + (key,)
        if value is None:
            result.pop(key, None)
        elif where in _MERGE_KEYS and isinstance(value, list):
            merge_key = _MERGE_KEYS[where]
            merged = [dict(item) for item in result.get(key) or []]
            for item in value:
                match = next((m for m in merged if m.get(merge_key) == item.get(merge_key)), None)
                if match is None:
                    merged.append(copy.deepcopy(item))
                else:
                    match.update(strategic_merge_patch(match, item, where))
            result[key] = merged
        else:
            result[key] = strategic_merge_patch(result.get(key), value, where)
    return result


class KubeApiStandIn:
    """The stand-in's state and HTTP server. Thread-safe."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0):
        self._lock = threading.Condition()
        self._nodes: dict[str, dict] = {}
        self._pods: dict[tuple[str, str], dict] = {}
        self._version = 100
        self._history: list[tuple[int, str, dict]] = []
        self._oldest = self._version  # watches from before this get 410 Gone
        self._generation = 0  # bumped to end every open watch
        self._held = False  # open watches deliver nothing while held
        self._open_watches = 0
        self.silent_watches = False  # new watches get headers, then nothing, ever (a dead link)
        self.requests: list[Recorded] = []
        self.fail_next: list[int] = []  # HTTP codes to answer the next requests with (faults)
        self._closed = False
        standin = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self):  # noqa: N802 (http.server's naming)
                standin._handle(self, "GET")

            def do_POST(self):  # noqa: N802
                standin._handle(self, "POST")

            def do_PATCH(self):  # noqa: N802
                standin._handle(self, "PATCH")

            def do_DELETE(self):  # noqa: N802
                standin._handle(self, "DELETE")

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer((host, port), Handler)
        self.httpd.daemon_threads = True
        self._thread = threading.Thread(target=self.httpd.serve_forever, name="kube-standin", daemon=True)

    @property
    def url(self) -> str:
        host, port = self.httpd.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> "KubeApiStandIn":
        self._thread.start()
        return self

    def close(self) -> None:
        with self._lock:
            self._closed = True
            self._generation += 1
            self._lock.notify_all()
        self.httpd.shutdown()
        self.httpd.server_close()

    def __enter__(self) -> "KubeApiStandIn":
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.close()

    # -- faults ------------------------------------------------------------------------------

    def compact(self) -> None:
        """Forget the event history (as etcd compaction does) and end the open watches: a
        watch resumed from an older resourceVersion now gets 410 Gone."""
        with self._lock:
            self._history.clear()
            self._oldest = self._version
            self._generation += 1
            self._lock.notify_all()

    @contextlib.contextmanager
    def watches_held(self):
        """Open watches deliver nothing inside this block (changes made in it, then a
        compact(), are seen by a client only through a new listing)."""
        with self._lock:
            self._held = True
        try:
            yield
        finally:
            with self._lock:
                self._held = False
                self._lock.notify_all()

    def wait_for_watches(self, count: int = 1, timeout: float = 10.0) -> bool:
        """Wait until `count` watches are open: a fault aimed at a watch needs the watch there
        (a client's listing is answered before its watch request arrives)."""
        with self._lock:
            return self._lock.wait_for(lambda: self._open_watches >= count, timeout)

    def drop_watches(self) -> None:
        """End every open watch (as an API server restart does)."""
        with self._lock:
            self._generation += 1
            self._lock.notify_all()

    # -- objects (also used directly by the tests and the lab) ------------------------------

    def node(self, name: str) -> dict | None:
        with self._lock:
            return copy.deepcopy(self._nodes.get(name))

    def put_pod(self, namespace: str, name: str, node_name: str) -> None:
        with self._lock:
            self._pods[(namespace, name)] = {
                "kind": "Pod", "apiVersion": "v1", "metadata": {"name": name, "namespace": namespace},
                "spec": {"nodeName": node_name, "containers": []}}

    def _commit(self, kind: str, node: dict) -> dict:
        """Record a change of `node` (lock held): new resourceVersion, history, wake watches."""
        self._version += 1
        node.setdefault("metadata", {})["resourceVersion"] = str(self._version)
        self._history.append((self._version, kind, copy.deepcopy(node)))
        self._lock.notify_all()
        return copy.deepcopy(node)

    # -- HTTP --------------------------------------------------------------------------------

    def _handle(self, handler: BaseHTTPRequestHandler, method: str) -> None:
        parts = urlsplit(handler.path)
        query = {k: v[-1] for k, v in parse_qs(parts.query).items()}
        length = int(handler.headers.get("Content-Length") or 0)
        body = handler.rfile.read(length) if length else b""
        content_type = (handler.headers.get("Content-Type") or "").split(";")[0].strip() or None
        with self._lock:
            self.requests.append(Recorded(method, parts.path, query, content_type, body))
            injected = self.fail_next.pop(0) if self.fail_next else None
        try:
            if injected is not None:
                raise ApiFailure(injected, "InternalError", "fault injected by the test")
            segments = [s for s in parts.path.split("/") if s]
            if segments[:2] != ["api", "v1"]:
                raise ApiFailure(404, "NotFound", f"the stand-in serves only /api/v1 (not {parts.path})")
            rest = segments[2:]
            if rest == ["nodes"] and method == "GET" and query.get("watch") in ("true", "1"):
                self._watch(handler, query)
                return
            reply = self._route(method, rest, query, content_type, body)
            self._send(handler, 201 if method == "POST" else 200, reply)
        except ApiFailure as failure:
            self._send(handler, failure.code, failure.status())
        except (BrokenPipeError, ConnectionResetError):
            pass

    def _route(self, method: str, rest: list[str], query: dict, content_type: str | None, body: bytes) -> dict:
        with self._lock:
            if rest == ["nodes"] and method == "GET":
                return {"kind": "NodeList", "apiVersion": "v1", "metadata": {"resourceVersion": str(self._version)},
                        "items": [copy.deepcopy(n) for _, n in sorted(self._nodes.items())]}
            if rest == ["nodes"] and method == "POST":
                node = _json(body)
                name = (node.get("metadata") or {}).get("name")
                if not name:
                    raise ApiFailure(422, "Invalid", "metadata.name: Required value")
                if name in self._nodes:
                    raise ApiFailure(409, "AlreadyExists", f'nodes "{name}" already exists')
                node.update(kind="Node", apiVersion="v1")
                node["metadata"].setdefault("uid", f"standin-{name}-{self._version}")
                node["metadata"].setdefault("creationTimestamp", time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
                self._nodes[name] = node
                return self._commit("ADDED", node)
            if len(rest) in (2, 3) and rest[0] == "nodes":
                name = rest[1]
                if name not in self._nodes:
                    raise ApiFailure(404, "NotFound", f'nodes "{name}" not found')
                subresource = rest[2] if len(rest) == 3 else None
                if subresource not in (None, "status"):
                    raise ApiFailure(404, "NotFound", f"the stand-in has no nodes/{subresource}")
                if method == "GET":
                    return copy.deepcopy(self._nodes[name])
                if method == "DELETE" and subresource is None:
                    node = self._nodes.pop(name)
                    return self._commit("DELETED", node)
                if method == "PATCH":
                    return self._patch(name, subresource, content_type, body)
            if len(rest) == 4 and rest[0] == "namespaces" and rest[2] == "pods" and method == "GET":
                pod = self._pods.get((rest[1], rest[3]))
                if pod is None:
                    raise ApiFailure(404, "NotFound", f'pods "{rest[3]}" not found')
                return copy.deepcopy(pod)
        raise ApiFailure(405, "MethodNotAllowed", f"{method} /api/v1/{'/'.join(rest)} is not implemented by the stand-in")

    def _patch(self, name: str, subresource: str | None, content_type: str | None, body: bytes) -> dict:
        old = self._nodes[name]
        patch = _json(body)
        if content_type == STRATEGIC:
            new = strategic_merge_patch(old, patch)
        elif content_type == MERGE:
            new = merge_patch(old, patch)
        elif content_type == JSON_PATCH:
            try:
                new = jsonpatch.apply_patch(old, patch)
            except (jsonpatch.JsonPatchException, jsonpatch.JsonPointerException) as exc:
                raise ApiFailure(422, "Invalid", f"the JSON patch does not apply: {exc}") from None
        else:
            raise ApiFailure(415, "UnsupportedMediaType", f"the body of the request was in an unknown format: "
                                                          f"{content_type}")
        # The node strategies: status writes keep the spec, main-resource writes keep the status.
        kept = "spec" if subresource == "status" else "status"
        if kept in old:
            new[kept] = copy.deepcopy(old[kept])
        else:
            new.pop(kept, None)
        new.setdefault("metadata", {})["name"] = name
        new["metadata"]["resourceVersion"] = old["metadata"]["resourceVersion"]
        if new == old:
            return copy.deepcopy(old)
        self._nodes[name] = new
        return self._commit("MODIFIED", new)

    def _watch(self, handler: BaseHTTPRequestHandler, query: dict) -> None:
        since = query.get("resourceVersion")
        timeout = min(float(query.get("timeoutSeconds") or _MAX_WATCH_SECONDS), _MAX_WATCH_SECONDS)
        deadline = time.monotonic() + timeout
        handler.send_response(200)
        handler.send_header("Content-Type", "application/json")
        handler.send_header("Transfer-Encoding", "chunked")
        handler.end_headers()
        if self.silent_watches:
            while not self._closed:
                time.sleep(0.1)
            return
        with self._lock:
            generation = self._generation
            self._open_watches += 1
            self._lock.notify_all()
            if since in (None, "", "0"):
                pending = [("ADDED", copy.deepcopy(n)) for _, n in sorted(self._nodes.items())]
                cursor = self._version
            elif int(since) < self._oldest:
                pending = [("ERROR", ApiFailure(410, "Expired", f"too old resource version: {since} "
                                                               f"({self._oldest})").status())]
                cursor = None
            else:
                pending, cursor = [], int(since)
        try:
            while True:
                for kind, obj in pending:
                    _write_chunk(handler, json.dumps({"type": kind, "object": obj}).encode() + b"\n")
                if cursor is None:
                    break
                with self._lock:
                    while (self._generation == generation and not self._closed
                           and (self._held or not any(v > cursor for v, _, _ in self._history))
                           and time.monotonic() < deadline):
                        self._lock.wait(max(0.0, min(1.0, deadline - time.monotonic())))
                    if self._generation != generation or self._closed or time.monotonic() >= deadline:
                        break
                    pending = [(k, copy.deepcopy(o)) for v, k, o in self._history if v > cursor]
                    cursor = self._history[-1][0]
            _write_chunk(handler, b"")
        except (BrokenPipeError, ConnectionResetError):
            pass
        finally:
            with self._lock:
                self._open_watches -= 1
        handler.close_connection = True

    @staticmethod
    def _send(handler: BaseHTTPRequestHandler, code: int, document: dict) -> None:
        data = json.dumps(document).encode()
        handler.send_response(code)
        handler.send_header("Content-Type", "application/json")
        handler.send_header("Content-Length", str(len(data)))
        handler.end_headers()
        handler.wfile.write(data)


def _json(body: bytes):
    try:
        return json.loads(body or b"null")
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ApiFailure(400, "BadRequest", f"the body is not JSON: {exc}") from None


def _write_chunk(handler: BaseHTTPRequestHandler, data: bytes) -> None:
    handler.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
    handler.wfile.flush()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m flannel_bpf.lab.kube_standin", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--listen", default="127.0.0.1:6443", metavar="ADDRESS:PORT")
    args = parser.parse_args(argv)
    host, _, port = args.listen.rpartition(":")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s kube-standin %(message)s")
    standin = KubeApiStandIn(host, int(port)).start()
    log.info("Kubernetes API stand-in serving %s", standin.url)
    stopped = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stopped.set())
    stopped.wait()
    standin.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
