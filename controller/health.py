"""flanneld's health endpoints plus Prometheus metrics, on one small HTTP server.

/healthz answers 200 while the agent runs; /readyz answers 200 once the data plane is programmed
and subnet.env is written and while the etcd peer watch is up, 503 otherwise; /metrics is the Prometheus text format, collected on
each scrape from the agent (nothing is computed between scrapes).
"""
from __future__ import annotations

import logging
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable, Iterable

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import GaugeMetricFamily, CounterMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST

log = logging.getLogger(__name__)


class AgentCollector:
    """Reads the agent's state at scrape time. `snapshot()` returns a dict with: peers,
    map_entries {map: count}, counters {name: (packets, bytes)}, lease_expiry (unix time or
    None), etcd_reconnects, lease_reacquired, ready, and optionally leases_skipped and
    leases_skipped_total {reason: count}, etcd_watch_up, iptables_restored, peer_events_pending,
    fallback_pending, netlink_failures."""

    def __init__(self, snapshot: Callable[[], dict]):
        self.snapshot = snapshot

    def collect(self) -> Iterable:
        s = self.snapshot()
        yield _gauge("flannel_bpf_ready", "1 once the data plane is programmed and subnet.env written",
                     int(s["ready"]))
        yield _gauge("flannel_bpf_peers", "peers programmed (valid leases of other nodes)", s["peers"])
        skipped = GaugeMetricFamily("flannel_bpf_leases_skipped", "leases in etcd skipped now, by reason",
                                    labels=["reason"])
        skipped_total = CounterMetricFamily("flannel_bpf_lease_skips", "leases skipped (each new reason "
                                            "for a key, as logged), by reason", labels=["reason"])
        for reason, count in sorted(s.get("leases_skipped", {}).items()):
            skipped.add_metric([reason], count)
        for reason, count in sorted(s.get("leases_skipped_total", {}).items()):
            skipped_total.add_metric([reason], count)
        yield skipped
        yield skipped_total
        yield _gauge("flannel_bpf_etcd_watch_up", "1 while the etcd peer watch is established",
                     int(s.get("etcd_watch_up", False)))
        entries = GaugeMetricFamily("flannel_bpf_map_entries", "entries in each BPF map", labels=["map"])
        for name, count in sorted(s["map_entries"].items()):
            entries.add_metric([name], count)
        yield entries
        packets = CounterMetricFamily("flannel_bpf_packets", "packets by program verdict", labels=["verdict"])
        octets = CounterMetricFamily("flannel_bpf_bytes", "bytes by program verdict", labels=["verdict"])
        for name, (npackets, nbytes) in sorted(s["counters"].items()):
            packets.add_metric([name], npackets)
            octets.add_metric([name], nbytes)
        yield packets
        yield octets
        if s["lease_expiry"] is not None:
            yield _gauge("flannel_bpf_lease_expiry_timestamp_seconds", "when our subnet lease expires",
                         s["lease_expiry"])
        yield CounterMetricFamily("flannel_bpf_etcd_reconnects", "times the etcd watch reconnected",
                                  value=s["etcd_reconnects"])
        yield CounterMetricFamily("flannel_bpf_lease_reacquired", "times our lost lease was taken again",
                                  value=s["lease_reacquired"])
        if "iptables_restored" in s:
            yield CounterMetricFamily("flannel_bpf_iptables_restored",
                                      "times the agent rebuilt iptables rules someone had changed",
                                      value=s["iptables_restored"])
        for key, doc in _QUEUE_GAUGES:
            if key in s:
                yield _gauge(f"flannel_bpf_{key}", doc, s[key])


_QUEUE_GAUGES = (
    ("peer_events_pending", "peer changes recorded and not yet applied"),
    ("lease_conflict", "1 while another node holds our subnet's key in etcd (the agent's log says which)"),
    ("fallback_pending", "peers whose kernel safety net (neighbour, FDB entry, route) is not programmed yet"),
    ("netlink_failures", "peers the kernel refused to program (the agent's log says why)"),
)


def _gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, doc, value=value)


class HealthServerError(RuntimeError):
    """The health server cannot listen where it was asked to."""


class HealthServer:
    def __init__(self, address: str, port: int, is_ready: Callable[[], bool], snapshot: Callable[[], dict]):
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(AgentCollector(snapshot))
        registry = self.registry

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 (http.server's naming)
                path = self.path.split("?", 1)[0]
                if path == "/healthz":
                    self._reply(200, b"ok\n")
                elif path == "/readyz":
                    ready = is_ready()
                    self._reply(200 if ready else 503, b"ready\n" if ready else b"not ready\n")
                elif path == "/metrics":
                    try:
                        body = generate_latest(registry)
                    except Exception as err:  # a scrape must never take the agent down
                        log.warning("metrics: %s", err)
                        self._reply(500, f"metrics unavailable: {err}\n".encode())
                        return
                    self._reply(200, body, CONTENT_TYPE_LATEST)
                else:
                    self._reply(404, b"not found\n")

            def _reply(self, code: int, body: bytes, content_type: str = "text/plain; charset=utf-8"):
                self.send_response(code)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):  # scrapes are not events worth a log line
                pass

        try:
            self.httpd = ThreadingHTTPServer((address, port), Handler)
        except OSError as exc:  # e.g. an address that is not this host's, or a port in use
            raise HealthServerError(f"--healthz-ip {address} --healthz-port {port}: cannot listen there: "
                                    f"{exc.strerror or exc}") from None
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        self._thread = threading.Thread(target=self.httpd.serve_forever, name="flannel-bpf-healthz",
                                        daemon=True)

    def start(self) -> None:
        self._thread.start()
        log.info("health and metrics on http://%s:%d/ (healthz, readyz, metrics)",
                 self.httpd.server_address[0], self.port)

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
