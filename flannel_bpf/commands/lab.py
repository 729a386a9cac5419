"""`flannel-bpf lab up|down|status|ping`: the single-machine lab (hosts as network namespaces,
a real etcd, one flannel-bpf agent per host, pods), and who reaches whom in it."""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

from flannel_bpf.bench import run as bench
from flannel_bpf.bench import vms as vm_bench
from flannel_bpf.console import make_console
from flannel_bpf.lab import orchestrator as orch
from flannel_bpf.lab.topology import DEFAULT_LAB, Lab, LabError, LabNotFound
from flannel_bpf.loader.netdefs import DEFAULT_VNI
from flannel_bpf.usage import UsageError

log = logging.getLogger("flannel-bpf")

STAGE_TITLES = {"measuring": "measuring (interleaved rounds)", "topology": "namespaces and links", "etcd": "etcd and network config",
                "kube-api": "Kubernetes API stand-in, net-conf.json",
                "leases": "agents: subnet leases", "pods": "pods", "ready": "agents: data plane ready",
                "ping": "reachability matrix"}
# The counters that say which path packets took, in the order a reader follows a packet.
PATH_COUNTERS = ("encap_vxlan", "fwd_direct", "decap_to_pod", "decap_xdp", "direct_to_pod")


def _int_list(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected host numbers like 3,4, got {text!r}") from None


def _name_list(text: str) -> tuple[str, ...]:
    return tuple(x.strip() for x in text.split(",") if x.strip())


def add_parser(sub) -> None:
    parser = sub.add_parser("lab", help="the single-machine lab: up, down, status, ping",
                            description=__doc__)
    lab_sub = parser.add_subparsers(dest="lab_command", required=True, metavar="ACTION")

    up = lab_sub.add_parser("up", help="build the lab, start etcd and the agents, show who reaches whom")
    up.add_argument("--name", default=DEFAULT_LAB, help="lab name (default: lab)")
    up.add_argument("--hosts", type=int, default=3, help="number of hosts (default 3)")
    up.add_argument("--pods", type=int, default=2, help="pods per host (default 2)")
    up.add_argument("--backend", choices=orch.BACKENDS, default="bpf", help="backend of every host (default bpf)")
    up.add_argument("--backends", type=_name_list, default=(), metavar="B1,B2,...",
                    help="backend per host, e.g. bpf,vxlan,bpf (overrides --backend)")
    up.add_argument("--etcd", type=int, choices=(1, 3), default=1, help="etcd members (default 1)")
    up.add_argument("--kube", action="store_true",
                    help="Kubernetes mode: agents run --kube-subnet-mgr against the lab's Kubernetes API "
                         "stand-in (node objects with podCIDRs) instead of etcd")
    up.add_argument("--second-subnet", type=_int_list, default=(), metavar="I,J",
                    help="hosts on a second underlay subnet behind a router, e.g. 3,4")
    up.add_argument("--direct-routing", action="store_true",
                    help="Backend.DirectRouting: no encapsulation between hosts on one L2 segment")
    up.add_argument("--pod-device", type=_name_list, default=("veth",), metavar="D1,D2,...",
                    help="pod devices, cycled over each host's pods: veth (a port of cni0, default), "
                         "netkit or routed-veth (made by flannel-bpf-cni)")
    up.add_argument("--decap", choices=("auto", "xdp", "tc"), help="decap hook of bpf hosts")
    up.add_argument("--vni", type=int, default=DEFAULT_VNI, help="VXLAN network identifier (default %(default)s)")
    up.add_argument("--keep-on-failure", action="store_true",
                    help="leave a lab that failed to come up in place, for inspection")
    up.add_argument("--no-ping", action="store_true", help="skip the reachability matrix")
    up.set_defaults(handler=run_up)

    down = lab_sub.add_parser("down", help="remove the lab and everything it started")
    down.add_argument("--name", default=DEFAULT_LAB)
    down.set_defaults(handler=run_down)

    status = lab_sub.add_parser("status", help="the lab's hosts, agents, etcd and pods")
    status.add_argument("--name", default=DEFAULT_LAB)
    status.add_argument("--json", action="store_true", help="machine-readable, e.g. to plug in a host of your own")
    status.set_defaults(handler=run_status)

    ping = lab_sub.add_parser("ping", help="every pod pings every other pod")
    ping.add_argument("--name", default=DEFAULT_LAB)
    ping.add_argument("--count", type=int, default=2, help="probes per pair (default 2)")
    ping.set_defaults(handler=run_ping)

    bench = lab_sub.add_parser("bench", help="benchmarks: every backend side by side, program cost, control plane",
                               description=__import__("flannel_bpf.bench.run", fromlist=["x"]).__doc__,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
    bench.add_argument("--only", type=_name_list, default=("net", "prog", "control"), metavar="PART,...",
                       help="parts to run: net, prog, control (default all; about 20 minutes)")
    bench.add_argument("--rounds", type=int, default=3, help="interleaved rounds of the network part (default 3)")
    bench.add_argument("--seconds", type=float, default=5.0, help="length of each traffic run (default 5)")
    bench.add_argument("--quick", action="store_true", help="a functional check of every part, in about 2 minutes")
    bench.add_argument("--out", default="bench-results", help="directory for the JSON and the chart")
    bench.add_argument("--vms", metavar="SSH_CONFIG",
                       help="measure the network part between the VMs of the Vagrant lab instead, reached "
                            "through this `vagrant ssh-config` (vagrant/run.sh bench passes it)")
    bench.set_defaults(handler=run_bench)


class RichProgress:
    """orchestrator.Progress drawn as rich progress bars, one per stage."""

    def __init__(self, progress: Progress):
        self.progress = progress
        self.tasks: dict[str, int] = {}

    def stage(self, name: str, total: int) -> None:
        for other, task in self.tasks.items():  # a new stage means the earlier ones are done
            self.progress.update(task, completed=self.progress.tasks[task].total)
        self.tasks[name] = self.progress.add_task(STAGE_TITLES.get(name, name), total=max(total, 1))

    def advance(self, name: str) -> None:
        if name in self.tasks:
            self.progress.advance(self.tasks[name])


def _progress(console: Console) -> Progress:
    return Progress(SpinnerColumn(), TextColumn("{task.description:<28}"), BarColumn(),
                    MofNCompleteColumn(), TimeElapsedColumn(), console=console, transient=False)


def _load(name: str) -> Lab:
    try:
        return Lab.load(name)
    except LabNotFound:
        raise UsageError(f"no lab named {name!r} is up (flannel-bpf lab up --name {name})") from None
    except LabError as err:
        raise UsageError(str(err)) from None


def run_up(args: argparse.Namespace) -> int:
    spec = orch.LabSpec(name=args.name, hosts=args.hosts, pods=args.pods, backend=args.backend,
                        backends=args.backends, etcd_members=args.etcd,
                        second_subnet=args.second_subnet, direct_routing=args.direct_routing,
                        decap=args.decap, vni=args.vni, pod_devices=args.pod_device,
                        kube=args.kube)
    console = make_console()
    try:
        spec.validate()
        with _progress(console) as bars:
            lab = orch.up(spec, RichProgress(bars), keep_on_failure=args.keep_on_failure)
    except LabError as err:
        log.error("%s", err)
        return 1
    _print_hosts(console, orch.describe(lab))
    if args.no_ping:
        return 0
    return _ping_and_print(console, lab, count=2)


def run_down(args: argparse.Namespace) -> int:
    try:
        report = orch.down(args.name)
    except LabError as err:
        raise UsageError(str(err)) from None
    if not (report.namespaces or report.killed_pids or report.pin_dirs or report.state_file_removed):
        make_console().print(f"lab {args.name}: nothing to remove")
        return 0
    make_console().print(f"lab {args.name} removed: {len(report.namespaces)} namespaces, "
                    f"{len(report.killed_pids)} processes, {len(report.pin_dirs)} pin directories")
    return 0


def run_status(args: argparse.Namespace) -> int:
    lab = _load(args.name)
    info = orch.describe(lab)
    if args.json:
        json.dump(info, sys.stdout, indent=2)
        sys.stdout.write("\n")
        return 0
    console = make_console()
    _print_hosts(console, info)
    etcd = info["etcd"]
    if etcd:
        t = Table(title=f"etcd (namespace {etcd['netns']}, prefix {etcd['prefix']})")
        for col in ("member", "client URL", "running", "log"):
            t.add_column(col)
        for m in etcd["members"]:
            t.add_row(m["name"], m["client_url"], _yes(m["running"]), m["log"])
        console.print(t)
    if info["kube_api"]:
        api = info["kube_api"]
        console.print(f"Kubernetes API stand-in: {api['url']} in namespace {api['netns']} "
                      f"({'running' if api['running'] else 'not running'}; log {api['log']}); "
                      f"net-conf.json: {api['net_config_path']}")
    console.print(f"network config: {json.dumps(info['network_config'])}")
    console.print(f"underlay: bridge {info['join']['bridge']} in namespace {info['underlay']['netns']}; "
                  f"free addresses for a host of your own: {', '.join(info['join']['free_addresses'])}")
    return 0


def run_ping(args: argparse.Namespace) -> int:
    if not 1 <= args.count <= 100:
        raise UsageError(f"--count must be 1..100, got {args.count}")
    return _ping_and_print(make_console(), _load(args.name), count=args.count)


def _yes(flag) -> str:
    return {True: "[green]yes[/]", False: "[red]no[/]", None: "-"}[flag]


def _print_hosts(console: Console, info: dict) -> None:
    t = Table(title=f"lab {info['name']}: hosts (underlay bridge {info['join']['bridge']} "
                    f"in {info['underlay']['netns']})")
    for col in ("host", "namespace", "underlay", "backend", "subnet", "pods", "agent", "ready"):
        t.add_column(col)
    for h in info["hosts"]:
        agent = h["agent"] or {}
        t.add_row(str(h["index"]), h["netns"], h["address"], agent.get("backend", "-"), h["subnet"] or "-",
                  " ".join(p["address"].split("/")[0] for p in h["pods"]) or "-",
                  f"pid {agent['pid']}" if agent.get("running") else "[red]not running[/]",
                  _yes(agent.get("ready")))
    console.print(t)


def _ping_and_print(console: Console, lab: Lab, count: int) -> int:
    pods = orch.all_pods(lab)
    if len(pods) < 2:
        console.print("fewer than two pods: nothing to ping")
        return 0
    before = {h.index: orch.read_counters(h) for h in lab.hosts}
    with _progress(console) as bars:
        task = bars.add_task(STAGE_TITLES["ping"], total=len(pods) * (len(pods) - 1))
        matrix = orch.ping_matrix(lab, count=count, on_result=lambda: bars.advance(task))
    after = {h.index: orch.read_counters(h) for h in lab.hosts}

    t = Table(title=f"who reaches whom (ping -c {count}, average RTT in ms; row pings column)")
    t.add_column("from \\ to")
    for dst in pods:
        t.add_column(orch.pod_label(dst), justify="center")
    for src in pods:
        cells = []
        for dst in pods:
            if src is dst:
                cells.append("·")
                continue
            r = matrix.result(src, dst)
            cells.append(f"[green]✓[/]{r.rtt_avg_ms:.2f}" if r.ok else f"[red]✗ {r.received}/{r.sent}[/]")
        t.add_row(f"{orch.pod_label(src)} {src.ip}", *cells)
    console.print(t)

    paths = Table(title="path taken during the matrix (packets counted by the bpf programs)")
    paths.add_column("host")
    paths.add_column("backend")
    for name in PATH_COUNTERS:
        paths.add_column(name, justify="right")
    paths.add_column("other verdicts (pass_*: handed to the kernel)")
    for h in lab.hosts:
        backend = h.agent.backend if h.agent else "-"
        if backend != "bpf":
            paths.add_row(str(h.index), backend, *["-"] * len(PATH_COUNTERS), "all (kernel path)")
            continue
        delta = orch.counter_deltas(before[h.index], after[h.index])
        passed = ", ".join(f"{v} {k}" for k, v in sorted(delta.items())
                           if k not in PATH_COUNTERS) or "0"
        paths.add_row(str(h.index), backend, *[str(delta.get(n, 0)) for n in PATH_COUNTERS], passed)
    console.print(paths)

    failures = matrix.failures
    if failures:
        console.print(f"[red]{len(failures)} of {len(matrix.results)} pairs failed[/]")
        return 1
    console.print(f"[green]all {len(matrix.results)} pairs reach each other[/]")
    return 0


def run_bench(args: argparse.Namespace) -> int:
    unknown = [p for p in args.only if p not in bench.PARTS]
    if unknown:
        raise UsageError(f"--only: unknown part(s) {', '.join(unknown)}; use {', '.join(bench.PARTS)}")
    if not 1 <= args.rounds <= 20 or not 1 <= args.seconds <= 60:
        raise UsageError("--rounds must be 1..20 and --seconds 1..60")
    console = make_console()
    if args.vms:
        with _progress(console) as progress:
            results, params = vm_bench.run(args.vms, rounds=args.rounds, seconds=args.seconds,
                                           progress=RichProgress(progress), console=console)
        bench.report(results, params, Path(args.out), console, benchmark="vm-bench",
                     title="pod to pod between VMs", notice=vm_bench.NOTICE if params["emulated"] else "")
        return 0
    with _progress(console) as progress:
        results, params = bench.run(tuple(args.only), rounds=args.rounds, seconds=args.seconds,
                                    quick=args.quick, progress=RichProgress(progress))
    bench.report(results, params, Path(args.out), console)
    return 0
