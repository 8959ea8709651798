#!/usr/bin/env python3
# SPDX-License-Identifier: MIT
"""Plot Google Benchmark results: GFLOP/s against sequence length, one line per kernel.

Usage (Debian: apt-get install python3-matplotlib; use the system python3):
  bench_attention --benchmark_out=one.json --benchmark_out_format=json
  python3 scripts/plot_bench.py one.json [two.json ...] -o docs/bench.svg [options]

What it reads, from each entry of the "benchmarks" list:
  kernel     the benchmark family: the name up to the first '/', e.g. BM_NaiveAttention
  x          the argument named by --x (default Lk), from the name: BM_X/Lq:512/Lk:512 -> 512
  rate       the FLOPS counter (Google Benchmark reports it per second), divided by 1e9
  threads    the first of: a "num_threads" counter (state.counters["num_threads"]; not
             "threads", which is Google Benchmark's own field); a "num_threads:N" or
             "threads:N" part of the name (an argument of that name, or Google Benchmark's
             /threads:N); the file's context value "num_threads" (AddCustomContext, for runs
             of one binary with different OMP_NUM_THREADS), else "eigen_threads" (what
             bench_common.hpp records: the threads Eigen's products use); --threads (default 1).
             Each thread count is one panel, side by side.

Which entries are drawn:
  - entries whose name lacks the --x argument (BM_EigenSgemm/n:2048, say) are not lines; with
    --ceiling FAMILY (default BM_EigenSgemm) that family's rate is drawn as a dashed
    horizontal line in every panel with the same thread count
  - --fix Lq=512 keeps entries whose Lq is 512; with no --fix and both Lq and Lk in the names,
    only Lq == Lk entries are kept (a square sweep; --fix Lq=any keeps all)
  - with --benchmark_repetitions, the aggregate named by --stat (default median) is used;
    otherwise repeated entries (same name, several files) are averaged
  - entries with error_occurred, or without a FLOPS counter, are skipped

The chart's subtitle names the machine (--machine, or the first file's context: host name,
CPU count and MHz) so a published chart says where it was measured. Exits with status 1 if
nothing could be plotted, 2 on bad arguments or unreadable files.
"""

import argparse
import json
import math
import re
import statistics
import sys
import textwrap
from collections import defaultdict

ARG = re.compile(r"^([A-Za-z_][A-Za-z0-9_]*):(-?\d+)$")


def parse_name(name):
    """BM_X/Lq:128/Lk:256/threads:2/real_time -> ("BM_X", {"Lq": 128, "Lk": 256, "threads": 2})."""
    parts = name.split("/")
    args = {}
    for part in parts[1:]:
        m = ARG.match(part)
        if m:
            args[m.group(1)] = int(m.group(2))
    return parts[0], args


def load(paths, default_threads):
    """Every usable entry of every file as a dict: kernel, args, threads, gflops, stat, name."""
    entries, context = [], None
    for path in paths:
        try:
            with open(path, encoding="utf-8") as f:
                doc = json.load(f)
        except (OSError, ValueError) as e:
            print(f"plot_bench: cannot read {path}: {e}", file=sys.stderr)
            sys.exit(2)
        ctx = doc.get("context", {})
        context = context or ctx
        file_threads = ctx.get("num_threads", ctx.get("eigen_threads"))
        for b in doc.get("benchmarks", []):
            if b.get("error_occurred") or "FLOPS" not in b:
                continue
            name = b.get("run_name", b["name"])
            kernel, args = parse_name(name)
            threads = b.get("num_threads")
            if threads is None:
                threads = args.get("num_threads", args.get("threads"))
            if threads is None:
                threads = file_threads if file_threads is not None else default_threads
            entries.append({
                "name": name,
                "kernel": kernel,
                "args": args,
                "threads": int(float(threads)),
                "gflops": float(b["FLOPS"]) / 1e9,
                "stat": b.get("aggregate_name") if b.get("run_type") == "aggregate" else None,
            })
    return entries, context or {}


def select(entries, stat):
    """One rate per benchmark name: the chosen aggregate if there are aggregates, else the mean."""
    by_name = defaultdict(list)
    for e in entries:
        by_name[(e["name"], e["threads"])].append(e)
    chosen = []
    for group in by_name.values():
        aggregates = [e for e in group if e["stat"] is not None]
        if aggregates:
            picked = [e for e in aggregates if e["stat"] == stat]
            if not picked:
                continue
            chosen.append(picked[0])
        else:
            e = dict(group[0])
            e["gflops"] = statistics.fmean(x["gflops"] for x in group)
            chosen.append(e)
    return chosen


def machine_text(context):
    parts = []
    if context.get("host_name"):
        parts.append(str(context["host_name"]))
    if context.get("num_cpus"):
        parts.append(f"{context['num_cpus']} CPUs")
    if context.get("mhz_per_cpu"):
        parts.append(f"{context['mhz_per_cpu']} MHz")
    if context.get("eigen_version"):
        parts.append(f"Eigen {context['eigen_version']}")
    if context.get("eigen_simd"):
        parts.append(str(context["eigen_simd"]).split(",")[0])  # the widest instruction set
    return ", ".join(parts)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("json", nargs="+", help="Google Benchmark JSON files (--benchmark_out)")
    p.add_argument("-o", "--output", default="bench.svg", help="chart file (.svg, .png, .pdf)")
    p.add_argument("--x", default="Lk", help="argument along the x axis (default Lk)")
    p.add_argument("--fix", action="append", default=[], metavar="ARG=N",
                   help="keep entries with this argument value (repeatable; N=any keeps all)")
    p.add_argument("--stat", default="median", help="aggregate to use (median, mean, ...)")
    p.add_argument("--ceiling", default="BM_EigenSgemm",
                   help="family drawn as a horizontal reference line ('' for none)")
    p.add_argument("--threads", type=int, default=1, help="thread count when a file names none")
    p.add_argument("--title", default="Attention throughput", help="chart title")
    p.add_argument("--machine", default=None, help="machine description for the subtitle")
    a = p.parse_args(argv)

    fixed = {}
    for f in a.fix:
        m = re.match(r"^([A-Za-z_]\w*)=(any|-?\d+)$", f)
        if not m:
            p.error(f"--fix {f}: expected ARG=N or ARG=any")
        fixed[m.group(1)] = None if m.group(2) == "any" else int(m.group(2))

    entries, context = load(a.json, a.threads)
    entries = select(entries, a.stat)
    ceilings = defaultdict(list)  # threads -> [(kernel, gflops)]
    lines = defaultdict(lambda: defaultdict(list))  # threads -> kernel -> [(x, gflops)]
    for e in entries:
        args = e["args"]
        if a.x not in args:
            if e["kernel"] == a.ceiling:
                ceilings[e["threads"]].append((e["kernel"], e["gflops"]))
            continue
        if any(v is not None and args.get(k) != v for k, v in fixed.items()):
            continue
        if not fixed and "Lq" in args and "Lk" in args and args["Lq"] != args["Lk"]:
            continue  # default: the square sweep
        lines[e["threads"]][e["kernel"]].append((args[a.x], e["gflops"]))
    if not lines:
        print("plot_bench: no entries with a FLOPS counter and a '" + a.x + "' argument matched",
              file=sys.stderr)
        return 1

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = sorted(lines)
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels) + 0.6, 4.4), sharey=True,
                             squeeze=False)
    kernels = sorted({k for t in panels for k in lines[t]})
    markers = "osD^vP*X"
    ymax = 0.0
    for ax, t in zip(axes[0], panels):
        for n, kernel in enumerate(kernels):
            pts = sorted(lines[t].get(kernel, []))
            if not pts:
                continue
            xs, ys = zip(*pts)
            ymax = max(ymax, max(ys))
            ax.plot(xs, ys, marker=markers[n % len(markers)], color=f"C{n}", label=kernel)
        for kernel, rate in ceilings.get(t, []):
            ymax = max(ymax, rate)
            ax.axhline(rate, color="grey", linestyle="--", linewidth=1)
            ax.annotate(f"{kernel} {rate:.0f}", xy=(0.02, rate), xycoords=("axes fraction", "data"),
                        va="bottom", fontsize=8, color="dimgrey")
        ax.set_xscale("log", base=2)
        ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}"))
        fixed_text = ", ".join(f"{k} = {v}" for k, v in fixed.items() if v is not None)
        square = not fixed and a.x in ("Lq", "Lk")
        ax.set_xlabel(f"{a.x}" + (" (= Lq)" if square and a.x == "Lk" else "") +
                      (f", {fixed_text}" if fixed_text else ""))
        ax.set_title(f"{t} thread" + ("s" if t != 1 else ""))
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8, loc="best")
    axes[0][0].set_ylabel("GFLOP/s")
    axes[0][0].set_ylim(0, math.ceil(ymax * 1.1 / 10) * 10 if ymax > 0 else 1)
    machine = a.machine if a.machine is not None else machine_text(context)
    wrapped = textwrap.fill(machine, width=int(60 * len(panels))) if machine else ""
    fig.suptitle(a.title + (f"\n{wrapped}" if wrapped else ""), fontsize=11)
    fig.tight_layout()
    fig.savefig(a.output, dpi=120)
    print(f"plot_bench: wrote {a.output} ({len(panels)} panel(s), {len(kernels)} kernel(s))")
    return 0


if __name__ == "__main__":
    sys.exit(main())
