"""`flannel-bpf lab bench`: every benchmark in one run, one table, one JSON, one chart.

Parts (each its own module, each returning plain result records, see bench_common.metric):
- net      pod to pod across hosts for every backend and the bare underlay (bench_net)
- prog     per-packet program cost: BPF_PROG_TEST_RUN and live run-time stats (bench_prog)
- control  lease put -> map entry, cold programming of 1,000/10,000 leases vs netlink (bench_control)
"""
from __future__ import annotations

import logging
import textwrap
from pathlib import Path

from rich.table import Table

from flannel_bpf.bench import control as bench_control
from flannel_bpf.bench import net as bench_net
from flannel_bpf.bench import prog as bench_prog
from flannel_bpf.bench.common import RESULTS_DIR, print_table, remove_stale, write_json
from flannel_bpf.console import make_console

log = logging.getLogger(__name__)

PARTS = ("net", "prog", "control")
# Columns of the side-by-side network table, and what "better" means for each.
NET_FIGURES = (("tcp1_gbps", "TCP x1 Gb/s"), ("tcp4_gbps", "TCP x4 Gb/s"), ("udp64_kpps", "UDP 64 B kpps"),
               ("rr_p50_us", "RR p50 us"), ("rr_p99_us", "RR p99 us"), ("cpu_s_per_gb", "CPU s/GB"))


def run(parts: tuple[str, ...] = PARTS, *, rounds: int = 3, seconds: float = 5.0, quick: bool = False,
        progress=None) -> tuple[list[dict], dict]:
    """Run the chosen parts in order; `quick` shrinks every part to a functional check."""
    params = {"parts": list(parts), "rounds": rounds, "seconds": seconds, "quick": quick}
    results: list[dict] = []
    for what in remove_stale():
        log.info("removed %s left by an earlier run", what)
    if "net" in parts:
        net, _ = bench_net.run(rounds=1 if quick else rounds, seconds=1.0 if quick else seconds,
                               progress=progress)
        results += net
    if "prog" in parts:
        if quick:
            results += bench_prog.measure_testrun(repeat=1000, rounds=1, single_shots=50, extra_peers=10,
                                                  profile=False)
        else:
            results += bench_prog.measure_testrun()
            results += bench_prog.measure_live(duration=seconds)
    if "control" in parts:
        if quick:
            results += bench_control.measure_control(sizes=(50,), puts=10, netlink_budget=30, agent_budget=60,
                                                     profile=False)
        else:
            results += bench_control.measure_control()
    return results, params


def net_table(results: list[dict], console=None, title: str = "pod to pod") -> None:
    """The network figures side by side, each path a row, with ratios to kernel vxlan."""
    by_path: dict[str, dict[str, dict]] = {}
    for record in results:
        parts = record["metric"].split(".")
        if parts[0] == "net" and len(parts) == 3:
            by_path.setdefault(parts[1], {})[parts[2]] = record
    if not by_path:
        return
    table = Table(title=f"{title}, medians (x: ratio to kernel vxlan in the same run)", title_justify="left")
    table.add_column("path")
    for _, label in NET_FIGURES:
        table.add_column(label, justify="right")
    for path, figures in by_path.items():
        cells = []
        for name, _ in NET_FIGURES:
            record = figures.get(name)
            if record is None or record["value"] is None:
                cells.append("-")
                continue
            ratio = record.get("vs_vxlan")
            cells.append(f"{record['value']:.3g}" + (f" ({ratio:.2f}x)" if ratio is not None and path != "vxlan" else ""))
        table.add_row(path, *cells)
    (console or make_console()).print(table)


def chart(results: list[dict], path: Path, title: str = "flannel-bpf lab bench: pod to pod") -> Path | None:
    """Bar chart of the network figures, each normalised to kernel vxlan (1.0)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.warning("matplotlib is not installed: no chart (pip install flannel-bpf[bench])")
        return None
    ratios: dict[str, dict[str, float]] = {}
    for record in results:
        parts = record["metric"].split(".")
        if parts[0] == "net" and len(parts) == 3 and record.get("vs_vxlan") is not None:
            ratios.setdefault(parts[1], {})[parts[2]] = record["vs_vxlan"]
    if not ratios:
        return None
    names = [n for n, _ in NET_FIGURES if any(n in r for r in ratios.values())]
    labels = [label for n, label in NET_FIGURES if n in names]
    width = 0.8 / len(ratios)
    fig, ax = plt.subplots(figsize=(11, 5))
    for i, (name, figures) in enumerate(ratios.items()):
        xs = [j + i * width for j in range(len(names))]
        ax.bar(xs, [figures.get(n, 0) for n in names], width, label=name)
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_xticks([j + width * (len(ratios) - 1) / 2 for j in range(len(names))], labels)
    ax.set_ylabel("ratio to kernel vxlan (same run)")
    ax.set_title(f"{title}\n(higher is better for rates, lower for latency and CPU)")
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def report(results: list[dict], params: dict, out: Path = RESULTS_DIR, console=None, *,
           benchmark: str = "bench", title: str = "pod to pod", notice: str = "") -> tuple[Path, Path | None]:
    """Print the tables, write the JSON and the chart: one report for the netns and the VM
    bench. `notice` (e.g. "these figures are not performance") is shown above and below the
    tables, kept in the JSON's params and written on the chart."""
    console = console or make_console()
    if notice:
        params = {**params, "notice": notice}
        console.print(f"[bold red]{notice}[/]", soft_wrap=True)
    net_table(results, console, title)
    print_table(results, f"flannel-bpf {benchmark}: every figure", console)
    json_path = write_json(benchmark, results, params, out)
    png_path = chart(results, json_path.with_suffix(".png"),
                     f"flannel-bpf {benchmark}: {title}" + (f"\n{textwrap.fill(notice, 110)}" if notice else ""))
    missed = [r["metric"] for r in results if r.get("ok") is False]
    if missed:
        console.print(f"[yellow]targets missed ({len(missed)}): {', '.join(missed)}[/]")
    if notice:
        console.print(f"[bold red]{notice}[/]", soft_wrap=True)
    console.print(f"results: {json_path}" + (f", chart: {png_path}" if png_path else ""))
    return json_path, png_path
