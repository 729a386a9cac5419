"""`flannel-bpf status` and `flannel-bpf stats`: what the data plane on an uplink holds and
does, read from the pinned maps and the kernel (no agent needed, nothing recompiled)."""
from __future__ import annotations

import argparse
import json
import time

from pyroute2 import IPRoute
from rich.live import Live
from rich.table import Table

from flannel_bpf.console import make_console
from flannel_bpf.controller.backends import choose_decap_hook, link_kind, pod_ports
from flannel_bpf.controller.subnet_env import read_subnet_env
from flannel_bpf.loader.bpf import attach
from flannel_bpf.loader.bpf.maps import DataPlaneMaps
from flannel_bpf.loader.netdefs import DEFAULT_BRIDGE, DEFAULT_SUBNET_FILE
from flannel_bpf.loader.netlink.kernel_vxlan import vxlan_device_name
from flannel_bpf.loader.netlink.routes import link_index
from flannel_bpf.usage import UsageError

MAX_WATCH_SECONDS = 24 * 3600


def add_parser(sub) -> None:
    for name, handler, text in (("status", run_status, "lease, peers, maps, attach points, counters"),
                                ("stats", run_stats, "per-verdict packet and byte rates")):
        parser = sub.add_parser(name, help=text, description=__doc__)
        parser.add_argument("--iface", required=True, help="the uplink given to attach")
        parser.add_argument("--pin-dir", help="pin directory given to attach, if not the default")
        parser.add_argument("--bridge", default=DEFAULT_BRIDGE, help="the pod bridge (default %(default)s)")
        if name == "status":
            parser.add_argument("--subnet-file", default=DEFAULT_SUBNET_FILE)
            parser.add_argument("--json", action="store_true", help="machine-readable output")
        else:
            parser.add_argument("--watch", action="store_true", help="refresh until interrupted")
            parser.add_argument("--interval", type=float, default=1.0, metavar="SECONDS")
            parser.add_argument("--count", type=int, default=0, help="stop after this many refreshes")
        parser.set_defaults(handler=handler)


def _open_maps(args):
    pin_dir = str(args.pin_dir or attach.default_pin_dir(args.iface))
    try:
        return DataPlaneMaps(pin_dir)
    except FileNotFoundError as err:
        raise UsageError(f"{err} (is `flannel-bpf attach --iface {args.iface}` running or was it run?)") from None


def attach_points(iface: str, bridge: str, vni: int) -> tuple[list[dict], dict]:
    points = []
    with IPRoute() as ipr:
        present = [d for d in (iface, vxlan_device_name(vni), bridge) if link_index(ipr, d)]
        kind = link_kind(ipr, link_index(ipr, iface)) if iface in present else None
        if bridge in present:  # the pods' veths carry the encap
            present += sorted(pod_ports(ipr, link_index(ipr, bridge)).values())
    for dev in present:
        for f in attach.list_tc(dev):
            points.append({"device": dev, "hook": f"tc {f.direction}", "program": f.name, "id": f.prog_id})
        if dev == iface:
            for x in attach.xdp_attachments(dev):
                points.append({"device": dev, "hook": f"xdp {x.mode}", "program": "xdp", "id": x.prog_id})
    hook = "xdp" if any(p["hook"].startswith("xdp") for p in points) else "tc"
    _, why = choose_decap_hook("auto", kind)
    return points, {"hook": hook, "auto_would_choose_because": why}


def collect_status(args) -> dict:
    with _open_maps(args) as maps:
        node = maps.get_local_config()
        peers = maps.list_peers()
        endpoints = maps.list_endpoints()
        counters = maps.read_counters()
    vni = node.vni if node else 1
    points, decap = attach_points(args.iface, args.bridge, vni)
    try:
        lease = read_subnet_env(args.subnet_file)
    except OSError:
        lease = {}
    return {
        "iface": args.iface,
        "lease": lease,
        "node": None if node is None else {
            "underlay_ip": str(node.underlay_ip), "subnet": str(node.subnet), "vtep_mac": node.vtep_mac,
            "vni": node.vni, "vxlan_port": node.vxlan_port, "mtu": node.mtu},
        "peers": [{"subnet": str(p.subnet), "underlay_ip": str(p.underlay_ip), "vtep_mac": p.vtep_mac,
                   "mode": p.mode.name.lower()} for p in peers],
        "endpoints": [{"ip": str(e.ip), "ifindex": e.ifindex, "mac": e.mac} for e in endpoints],
        "attach_points": points,
        "decap": decap,
        "counters": {name: {"packets": p, "bytes": b} for name, (p, b) in counters.items()},
    }


def run_status(args: argparse.Namespace) -> int:
    status = collect_status(args)
    if args.json:
        print(json.dumps(status, indent=2))
        return 0
    console = make_console(emoji=False)  # ":ab:" in a MAC address is not an emoji
    node = status["node"] or {}
    console.print(f"[bold]{args.iface}[/]: subnet {node.get('subnet', '?')} at {node.get('underlay_ip', '?')}, "
                  f"VtepMAC {node.get('vtep_mac', '?')}, VNI {node.get('vni', '?')}, "
                  f"decap at {status['decap']['hook']}")
    if status["lease"]:
        console.print("subnet.env: " + ", ".join(f"{k}={v}" for k, v in status["lease"].items()))
    console.print(_table("peers", ("subnet", "underlay_ip", "vtep_mac", "mode"), status["peers"]))
    console.print(_table("local endpoints", ("ip", "ifindex", "mac"), status["endpoints"]))
    console.print(_table("attach points", ("device", "hook", "program", "id"), status["attach_points"]))
    rows = [{"verdict": n, **c} for n, c in status["counters"].items() if c["packets"]]
    console.print(_table("counters (non-zero)", ("verdict", "packets", "bytes"), rows))
    return 0


def _table(title: str, columns, rows) -> Table:
    table = Table(title=title, title_justify="left")
    for column in columns:
        table.add_column(column, justify="right" if column in ("packets", "bytes", "pps", "bps") else "left")
    for row in rows:
        table.add_row(*(str(row[c]) for c in columns))
    return table


def rates(before: dict, after: dict, seconds: float) -> list[dict]:
    rows = []
    for name, (packets, octets) in after.items():
        dp, db = packets - before[name][0], octets - before[name][1]
        if packets:
            rows.append({"verdict": name, "packets": packets, "pps": f"{dp / seconds:,.0f}",
                         "bps": f"{8 * db / seconds:,.0f}"})
    return rows


def run_stats(args: argparse.Namespace) -> int:
    if args.interval <= 0:
        raise UsageError("--interval must be positive")
    with _open_maps(args) as maps:
        refreshes = args.count or (int(MAX_WATCH_SECONDS / args.interval) if args.watch else 1)
        previous, start = maps.read_counters(), time.monotonic()
        with Live(console=make_console(emoji=False), auto_refresh=False) as live:
            for _ in range(refreshes):
                time.sleep(args.interval)
                current, now = maps.read_counters(), time.monotonic()
                table = _table(f"{args.iface}: per-verdict rates over {now - start:.1f} s",
                               ("verdict", "packets", "pps", "bps"), rates(previous, current, now - start))
                live.update(table, refresh=True)
                previous, start = current, now
    return 0
