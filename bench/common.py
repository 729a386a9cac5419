"""What the benchmarks share: result records, percentiles, the rich table, the JSON file, and
throwaway kernel objects (network namespaces, bpffs pin directories) that are removed even
when a benchmark fails.

A result is a plain dict, so `flannel-bpf lab bench` can merge, print and plot results from any
benchmark module:

    {"metric": "prog.xdp_decap.testrun", "value": 48.2, "unit": "ns/packet",
     "target": "<= 60", "ok": True, "note": "...", ...details}

`ok` is True/False for a metric with a target and None for a figure reported for information.
A metric that could not be measured has value None and, when it has a target, ok False.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import json
import logging
import math
import operator
import os
import platform
import re
import shutil
import signal
import subprocess
import time
from collections import Counter
from pathlib import Path
from typing import Iterable, Iterator

from pyroute2 import IPRoute
from rich.logging import RichHandler
from rich.table import Table

from flannel_bpf.console import make_console
from flannel_bpf.lab.netns import create_netns, pids_in_netns, remove_netns
from flannel_bpf.loader.bpf.attach import unlink_pins
from flannel_bpf.loader.netns import in_netns, list_netns

log = logging.getLogger(__name__)

RESULTS_DIR = Path("bench-results")
# Per-run names: "fbb<pid>-<tag>"; the pid lets a later run find and remove what a killed run left.
RUN_PREFIX = f"fbb{os.getpid()}"
BENCH_PIN_ROOT = Path("/sys/fs/bpf") / f"flannel-bpf-bench-{os.getpid()}"
_STALE_NETNS = re.compile(r"^fbb(\d+)-")
_STALE_PINS = re.compile(r"^flannel-bpf-bench-(\d+)$")

# Underlay of the scratch namespaces: every peer address 198.18.0.2.. is on-link.
SCRATCH_UPLINK = "eth0"
SCRATCH_UPLINK_ADDRESS = "198.18.0.1"
SCRATCH_UPLINK_PREFIXLEN = 15

_COMPARATORS = {"<=": operator.le, ">=": operator.ge, "<": operator.lt, ">": operator.gt}


# ---------------------------------------------------------------------------- results

def metric(name: str, value: float | int | None, unit: str, *, target: tuple[str, float] | None = None,
           note: str = "", **details) -> dict:
    """One result. `target` is (comparator, bound), e.g. ("<=", 200)."""
    record = {"metric": name, "value": value, "unit": unit, "target": None, "ok": None}
    if target is not None:
        comparator, bound = target
        if comparator not in _COMPARATORS:
            raise ValueError(f"target comparator {comparator!r}: expected one of {sorted(_COMPARATORS)}")
        record["target"] = f"{comparator} {bound:g}"
        record["ok"] = value is not None and bool(_COMPARATORS[comparator](value, bound))
    if note:
        record["note"] = note
    record.update(details)
    return record


def percentile(values: Iterable[float], p: float) -> float | None:
    """Nearest-rank percentile (p in 0..100) of `values`; None when there are none."""
    ordered = sorted(values)
    if not ordered:
        return None
    if not 0 <= p <= 100:
        raise ValueError(f"percentile {p!r}: must be within 0..100")
    rank = max(1, math.ceil(p / 100 * len(ordered)))
    return ordered[rank - 1]


def median(values: Iterable[float]) -> float | None:
    return percentile(values, 50)


def ratio(numerator: float | None, denominator: float | None) -> float | None:
    if numerator is None or not denominator:
        return None
    return numerator / denominator


def host_info() -> dict:
    return {"kernel": platform.release(), "cpus": os.cpu_count(), "python": platform.python_version(),
            "machine": platform.machine()}


def write_json(benchmark: str, results: list[dict], params: dict | None = None,
               directory: Path | str | None = None) -> Path:
    """bench-results/<benchmark>-<UTC time>.json with the results, parameters and host."""
    directory = Path(directory) if directory is not None else RESULTS_DIR
    directory.mkdir(parents=True, exist_ok=True)
    now = _dt.datetime.now(_dt.timezone.utc)
    path = directory / f"{benchmark}-{now.strftime('%Y%m%dT%H%M%SZ')}.json"
    document = {"benchmark": benchmark, "finished": now.isoformat(timespec="seconds"),
                "host": host_info(), "params": params or {}, "results": results}
    path.write_text(json.dumps(document, indent=2, default=str) + "\n")
    return path


def _format_value(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, int) or (isinstance(value, float) and value.is_integer() and abs(value) >= 100):
        return f"{int(value):,}"
    if isinstance(value, float):
        return f"{value:,.3g}" if abs(value) < 100 else f"{value:,.0f}"
    return str(value)


def print_table(results: list[dict], title: str, console=None) -> None:
    """The results as a rich table: metric, value, unit, target, verdict, note."""
    console = console or make_console()
    table = Table(title=title, show_lines=False, title_justify="left")
    for column, justify in (("metric", "left"), ("value", "right"), ("unit", "left"), ("target", "left"),
                            ("ok", "center"), ("note", "left")):
        table.add_column(column, justify=justify, overflow="fold")
    for record in results:
        verdict = {True: "[green]yes[/]", False: "[red]NO[/]", None: ""}[record.get("ok")]
        table.add_row(record["metric"], _format_value(record["value"]), record.get("unit", ""),
                      record.get("target") or "", verdict, record.get("note", ""))
    console.print(table)


# ---------------------------------------------------------------------------- bounds

class Deadline:
    """A time budget: `expired` once `seconds` have passed since creation."""

    def __init__(self, seconds: float):
        if seconds <= 0:
            raise ValueError(f"time budget must be positive, got {seconds!r}")
        self.seconds = seconds
        self._end = time.monotonic() + seconds

    @property
    def remaining(self) -> float:
        return max(0.0, self._end - time.monotonic())

    @property
    def expired(self) -> bool:
        return time.monotonic() >= self._end


def wait_until(condition, timeout: float, interval: float = 0.05, what: str = "condition"):
    """Poll `condition()` until it returns something truthy (returned) or raise TimeoutError."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise TimeoutError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(interval)


# ---------------------------------------------------------------------------- kernel objects

@contextlib.contextmanager
def bench_pin_dir(tag: str) -> Iterator[str]:
    """A bpffs directory for this run's maps and programs, removed afterwards."""
    path = BENCH_PIN_ROOT / tag
    try:
        yield str(path)
    finally:
        unlink_pins(path)
        with contextlib.suppress(OSError):
            BENCH_PIN_ROOT.rmdir()


def scratch_netns_name(tag: str) -> str:
    return f"{RUN_PREFIX}-{tag}"


@contextlib.contextmanager
def scratch_netns(tag: str, *, uplink: bool = True) -> Iterator[str]:
    """A throwaway network namespace with lo up and, with `uplink`, a veth pair whose `eth0`
    end holds 198.18.0.1/15 (the other end stays in the namespace too: nothing leads out).
    Processes left inside are killed and the namespace removed, also on failure."""
    name = scratch_netns_name(tag)
    create_netns(name)
    try:
        with in_netns(name), IPRoute() as ipr:
            ipr.link("set", index=ipr.link_lookup(ifname="lo")[0], state="up")
            if uplink:
                ipr.link("add", ifname=SCRATCH_UPLINK, kind="veth", peer=f"{SCRATCH_UPLINK}-peer")
                for ifname in (SCRATCH_UPLINK, f"{SCRATCH_UPLINK}-peer"):
                    ipr.link("set", index=ipr.link_lookup(ifname=ifname)[0], state="up")
                ipr.addr("add", index=ipr.link_lookup(ifname=SCRATCH_UPLINK)[0],
                         address=SCRATCH_UPLINK_ADDRESS, prefixlen=SCRATCH_UPLINK_PREFIXLEN)
        yield name
    finally:
        remove_scratch_netns(name)


def remove_scratch_netns(name: str, grace: float = 3.0) -> None:
    """Kill what still runs in namespace `name` (it was made by a benchmark, so whatever runs
    there was started by one) and remove the namespace."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        pids = [pid for pid in pids_in_netns(name) if pid != os.getpid()]
        if not pids:
            break
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        with contextlib.suppress(TimeoutError):
            wait_until(lambda: not [p for p in pids_in_netns(name) if p != os.getpid()], grace, 0.05,
                       f"processes in {name} to exit")
    remove_netns(name)


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale(exclude_pid: int | None = None) -> list[str]:
    """Namespaces and pin directories left by benchmark runs whose process is gone (killed
    runs cannot clean up after themselves). Returns what was removed."""
    own = os.getpid() if exclude_pid is None else exclude_pid
    removed = []
    for name in list_netns():
        match = _STALE_NETNS.match(name)
        if match and int(match.group(1)) != own and not pid_alive(int(match.group(1))):
            remove_scratch_netns(name)
            removed.append(f"netns {name}")
    for entry in Path("/sys/fs/bpf").iterdir():
        match = _STALE_PINS.match(entry.name)
        if match and int(match.group(1)) != own and not pid_alive(int(match.group(1))):
            unlink_pins(entry)
            removed.append(f"pins {entry}")
    return removed


def process_memory(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM (peak) of a process, in KiB."""
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[key] = int(value.split()[0])
    return out


# ---------------------------------------------------------------------------- kernel profiles

def perf_available() -> bool:
    return shutil.which("perf") is not None


@contextlib.contextmanager
def perf_record(path: Path | str, seconds: float, delay: float = 0.0) -> Iterator[None]:
    """System-wide cpu-clock samples with call chains, for `seconds` after `delay`, taken in
    the background while the block runs (it should last at least delay + seconds)."""
    argv = ["perf", "record", "-q", "-e", "cpu-clock", "-a", "-g", "-o", str(path)]
    if delay > 0:
        argv += ["-D", str(int(delay * 1000))]
    process = subprocess.Popen(argv + ["--", "sleep", f"{delay + seconds:g}"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        yield
    finally:
        try:
            process.wait(delay + seconds + 30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(5)


def summarize_perf(path: Path | str, anchor: str, top: int = 12) -> dict:
    """Of the samples whose call chain has a symbol containing `anchor` (a BPF program's name,
    or bpf_test_run): how many, and the leaf functions by share (where that time goes)."""
    try:
        out = subprocess.run(["perf", "script", "-i", str(path), "-F", "ip,sym"], capture_output=True,
                             text=True, timeout=180).stdout
    except (OSError, subprocess.TimeoutExpired) as err:
        return {"error": str(err)}
    leaves: Counter = Counter()
    samples = 0
    for block in out.split("\n\n"):
        symbols = [line.split(None, 1)[1] if len(line.split(None, 1)) == 2 else "?"
                   for line in block.strip().splitlines() if line.strip()]
        if not symbols or not any(anchor in symbol for symbol in symbols):
            continue
        samples += 1
        leaves[re.sub(r"^bpf_prog_[0-9a-f]+_", "bpf_prog:", symbols[0].split("+0x")[0])] += 1
    if not samples:
        return {"samples": 0}
    return {"samples": samples,
            "leaf": [{"function": f, "share": round(c / samples, 3)} for f, c in leaves.most_common(top)]}


# ---------------------------------------------------------------------------- entry points

def run_cli(benchmark: str, description: str, add_arguments, run) -> int:
    """`python -m flannel_bpf.lab.bench_<x>`: parse flags, run, print the table, write JSON.
    `add_arguments(parser)` adds the benchmark's flags; `run(args)` returns (results, params)."""
    parser = argparse.ArgumentParser(prog=f"python -m flannel_bpf.lab.bench_{benchmark}", description=description)
    parser.add_argument("--out", default=str(RESULTS_DIR), help="directory for the JSON results (default bench-results)")
    parser.add_argument("-v", "--verbose", action="store_true")
    add_arguments(parser)
    args = parser.parse_args()
    console = make_console(stderr=True)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(message)s",
                        handlers=[RichHandler(console=console, show_path=False)])
    for noisy in ("pyroute2", "grpc"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    if os.geteuid() != 0:
        console.print("[red]benchmarks need root (BPF, network namespaces)[/]")
        return 2
    for what in remove_stale():
        log.info("removed %s left by an earlier run", what)
    results, params = run(args)
    print_table(results, f"flannel-bpf bench: {benchmark}", make_console())
    path = write_json(benchmark, results, params, args.out)
    console.print(f"results written to {path}")
    missed = [r["metric"] for r in results if r.get("ok") is False]
    if missed:
        console.print(f"[yellow]targets missed: {', '.join(missed)}[/]")
    return 0
