"""Where the time of our train step goes: trace K steps, then aggregate device time per kernel / op.

    python benchmarks/profile_step.py --shape 0.5b:4096x4 --variant cudnn/none/noscan/2048 --steps 5
    python benchmarks/profile_step.py --shape tiny:128x2 --variant xla/none/noscan/64 --steps 2   # CPU smoke test

Builds the step exactly as `train_throughput.py` does (`build_jax_step`: same shapes, variant
string, random tokens), compiles it, runs --warmup steps, times --steps untraced steps (the
benchmark's step time, shown for reference), then traces --steps more under `jax.profiler.trace`
and reads the `.xplane.pb` back with jax's own parser (`jax.profiler.ProfileData`, no TensorBoard
plugin).  Busy time and every "% step" are against the mean wall time of the traced steps.

Events: on GPU the kernels of the device plane (`/device:GPU:0`), taken from its stream lines
(the derived lines `XLA Ops`, `XLA Modules`, ... only when there is no other); with no device
plane (CPU backend) the XLA op events of the host plane (events with an `hlo_op` stat), which
the output says.  Nested events on one line count their self time only.  Printed: device busy
time per step (union of all event intervals) against the wall step time, so launch gaps and
host stalls show; time per category (gemm/matmul, attention, collective, memcpy/memset, other
= XLA fusions, with their top ops); the top --top ops by device time, grouped by the `hlo_op`
stat where the events carry one (else by kernel name); by `tf_op` (JAX name stack) when present.
The variant's optional 5th field / --xla_flags_variants work as in `train_throughput.py`
(`--xla_flags` sets XLA_FLAGS directly); with CUDA graphs (command buffers) kernels may lose
their `hlo_op`: `--xla_flags '--xla_gpu_enable_command_buffer='` switches them off.

JSON: benchmarks/results/profile_<shape>_<variant>.json (and --out, default $OUT); the trace
itself stays under --trace_dir (default $OUT/trace_<shape>_<variant>, else /tmp).
"""

from __future__ import annotations

import argparse
import collections
import datetime
import glob
import json
import os
import re
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from train_throughput import (  # noqa: E402  (no jax import: XLA_FLAGS is set before jax starts)
    ROOT,
    build_jax_step,
    parse_shape,
    parse_variant,
    parse_xla_flags_variants,
    run_steps,
    xla_flags_for,
)

# first match wins: attention before gemm (cuDNN attention kernels), collectives first
CATEGORIES = (
    ("collective", ("nccl", "all-reduce", "allreduce", "all-gather", "allgather", "reduce-scatter",
                    "reducescatter", "all-to-all", "alltoall", "ppermute", "collective")),
    ("attention", ("cudnn", "flash", "fmha", "sdpa", "attention")),
    ("memcpy/memset", ("memcpy", "memset")),
    ("gemm/matmul", ("gemm", "cutlass", "nvjet", "xmma", "cublas", "matmul", "dot")),
)
OTHER = "other (XLA fusions)"
DERIVED_LINES = {"XLA Modules", "XLA Ops", "XLA TraceMe", "Async XLA Ops", "Steps", "Framework Ops",
                 "Framework Name Scope", "TensorFlow Ops", "TensorFlow Name Scope", "Source code", "Launch Stats"}
GROUP_STATS = ("hlo_op", "hlo_module", "tf_op")
NEST_TOL_NS = 2.0


def category(*names) -> str:
    text = " ".join(n for n in names if n).lower()
    for cat, keys in CATEGORIES:
        if any(k in text for k in keys):
            return cat
    return OTHER


def _stats(event) -> dict:
    return {k: v for k, v in event.stats if k is not None}


def _device_rank(name: str):
    return (not name.endswith("GPU:0"), "GPU" not in name, name)


def load_events(path: str, verbose: bool = False):
    """(events, info): events of the chosen plane as dicts (name, line, start, end, dur, stats)."""
    from jax.profiler import ProfileData

    planes = list(ProfileData.from_file(path).planes)
    layout = {}
    for plane in planes:
        lines = [(line.name, list(line.events)) for line in plane.lines]
        layout[plane.name] = lines
    if verbose:
        print(f"trace {path}")
        for name, lines in layout.items():
            print(f"  plane {name!r}: " + (", ".join(f"{ln!r} ({len(ev)})" for ln, ev in lines) or "no lines"))

    def rec(line, e, stats):
        start, dur = float(e.start_ns), float(e.duration_ns)
        return dict(name=e.name, line=line, start=start, end=start + dur, dur=dur, stats=stats)

    devices = sorted((n for n, lines in layout.items() if n.startswith("/device:") and any(ev for _, ev in lines)),
                     key=_device_rank)
    events, used, note = [], [], ""
    if devices:
        plane = devices[0]
        lines = [(ln, ev) for ln, ev in layout[plane] if ln not in DERIVED_LINES and ev]
        if not lines:
            lines = [(ln, ev) for ln, ev in layout[plane] if ln == "XLA Ops" and ev]
            note = "device plane has only derived lines: using 'XLA Ops'"
        for ln, evs in lines:
            events += [rec(ln, e, _stats(e)) for e in evs]
            used.append((ln, len(evs)))
        source = "device"
    else:
        plane = None
        for key in ("hlo_op", "hlo_module"):
            for pname, lines in layout.items():
                if not pname.startswith("/host:"):
                    continue
                for ln, evs in lines:
                    picked = [rec(f"{pname} {ln}", e, s) for e in evs if key in (s := _stats(e))]
                    if picked:
                        plane = pname
                        events += picked
                        used.append((ln, len(picked)))
            if events:
                break
        source = "host"
        note = (f"no device plane with events (CPU backend?): falling back to the XLA op events (with an "
                f"'hlo_op' stat) of host plane {plane!r}; ops run on several threads, so per-op sums can "
                f"exceed the busy time")
    info = dict(plane=plane, source=source, lines=used, note=note,
                planes={n: [(ln, len(ev)) for ln, ev in lines] for n, lines in layout.items()})
    return events, info


def self_times(events):
    """Set e['self'] = duration minus the durations of the events nested directly in it on the same line."""
    by_line = collections.defaultdict(list)
    for e in events:
        e["self"] = e["dur"]
        by_line[e["line"]].append(e)
    for evs in by_line.values():
        evs.sort(key=lambda e: (e["start"], -e["dur"]))
        stack = []
        for e in evs:
            while stack and stack[-1]["end"] <= e["start"] + NEST_TOL_NS:
                stack.pop()
            if stack and e["end"] <= stack[-1]["end"] + NEST_TOL_NS:
                stack[-1]["self"] -= e["dur"]
            stack.append(e)


def busy_ns(events) -> float:
    """Length of the union of the events' intervals."""
    total, cur_s, cur_e = 0.0, None, None
    for s, e in sorted((e["start"], e["end"]) for e in events):
        if cur_e is None or s > cur_e:
            if cur_e is not None:
                total += cur_e - cur_s
            cur_s, cur_e = s, e
        else:
            cur_e = max(cur_e, e)
    return total + (cur_e - cur_s if cur_e is not None else 0.0)


def analyse(events, info, steps: int, wall_s: float, top: int = 25) -> dict:
    """Per-step aggregates of `events` (from `steps` traced steps of mean wall time `wall_s`)."""
    self_times(events)
    n = max(len(events), 1)
    present = {k: sum(k in e["stats"] for e in events) for k in GROUP_STATS}
    group_key = "hlo_op" if present["hlo_op"] else "kernel name"
    ops = {}
    for e in events:
        op = str(e["stats"].get("hlo_op") or e["name"])
        g = ops.setdefault(op, dict(op=op, ns=0.0, count=0, kernels=collections.Counter(),
                                    modules=collections.Counter(), tf_op=""))
        g["ns"] += e["self"]
        g["count"] += 1
        g["kernels"][e["name"]] += e["self"]
        g["modules"][str(e["stats"].get("hlo_module", ""))] += 1
        g["tf_op"] = g["tf_op"] or str(e["stats"].get("tf_op", ""))
    per = 1.0 / steps
    wall_ms = wall_s * 1e3
    rows = []
    for g in ops.values():
        kernel = g["kernels"].most_common(1)[0][0]
        rows.append(dict(op=g["op"], kernel=kernel, kernels=len(g["kernels"]), category=category(kernel, g["op"]),
                         ms_per_step=g["ns"] * per / 1e6, count_per_step=g["count"] * per,
                         pct_step=100 * g["ns"] * per / 1e6 / wall_ms, module=g["modules"].most_common(1)[0][0],
                         tf_op=g["tf_op"]))
    rows.sort(key=lambda r: -r["ms_per_step"])
    cats = {}
    for r in rows:
        c = cats.setdefault(r["category"], dict(category=r["category"], ms_per_step=0.0, count_per_step=0.0,
                                                top_ops=[]))
        c["ms_per_step"] += r["ms_per_step"]
        c["count_per_step"] += r["count_per_step"]
        if len(c["top_ops"]) < 3:
            c["top_ops"].append(r["op"])
    for c in cats.values():
        c["pct_step"] = 100 * c["ms_per_step"] / wall_ms
    busy = busy_ns(events) * per / 1e6
    span = (max(e["end"] for e in events) - min(e["start"] for e in events)) * per / 1e6 if events else 0.0
    modules = collections.Counter()
    tf_ops = collections.Counter()
    for e in events:
        modules[str(e["stats"].get("hlo_module", "?"))] += e["self"]
        if "tf_op" in e["stats"]:
            tf_ops[str(e["stats"]["tf_op"])] += e["self"]
    return dict(
        source=info["source"], plane=info["plane"], lines=info["lines"], note=info["note"],
        stats_present={k: f"{v}/{n}" for k, v in present.items()}, grouped_by=group_key,
        events_per_step=len(events) * per, wall_step_ms=wall_ms, device_busy_ms_per_step=busy,
        device_span_ms_per_step=span, idle_ms_per_step=wall_ms - busy,
        sum_self_ms_per_step=sum(r["ms_per_step"] for r in rows),
        categories=sorted(cats.values(), key=lambda c: -c["ms_per_step"]), top_ops=rows[:top],
        n_ops=len(rows), by_module={k: v * per / 1e6 for k, v in modules.most_common(10)},
        by_tf_op=[dict(tf_op=k, ms_per_step=v * per / 1e6) for k, v in tf_ops.most_common(15)])


def _cut(text: str, width: int) -> str:
    text = str(text)
    return text if len(text) <= width else text[: width - 3] + "..."


def report(r: dict):
    print(f"\nevents: {r['source']} plane {r['plane']!r}, lines "
          + ", ".join(f"{ln!r} ({k})" for ln, k in r["lines"][:8]) + (" ..." if len(r["lines"]) > 8 else ""))
    if r["note"]:
        print(f"NOTE: {r['note']}")
    print("stats on these events: " + ", ".join(f"{k} {v}" for k, v in r["stats_present"].items())
          + f"; ops grouped by {r['grouped_by']}")
    busy_pct = 100 * r["device_busy_ms_per_step"] / r["wall_step_ms"]
    print(f"wall step {r['wall_step_ms']:.2f} ms (traced, mean; untraced median {r['untraced_step_ms']:.2f} ms) | "
          f"device busy {r['device_busy_ms_per_step']:.2f} ms/step ({busy_pct:.1f}%)"
          f" | idle/launch gaps {r['idle_ms_per_step']:.2f} ms/step | first-to-last event "
          f"{r['device_span_ms_per_step']:.2f} ms/step | {r['events_per_step']:.0f} events/step, {r['n_ops']} ops")
    print(f"\n{'category':<22}{'ms/step':>10}{'% step':>8}{'count/step':>12}  top ops")
    for c in r["categories"]:
        print(f"{c['category']:<22}{c['ms_per_step']:>10.3f}{c['pct_step']:>7.1f}%{c['count_per_step']:>12.1f}  "
              + ", ".join(_cut(o, 40) for o in c["top_ops"]))
    print(f"{'sum (self times)':<22}{r['sum_self_ms_per_step']:>10.3f}"
          f"{100 * r['sum_self_ms_per_step'] / r['wall_step_ms']:>7.1f}%")
    print(f"\ntop {len(r['top_ops'])} ops by device time ({r['grouped_by']}; kernel = the op's longest kernel)")
    print(f"{'#':>3} {'op':<42}{'category':<15}{'ms/step':>9}{'count':>7}{'%':>7}  kernel")
    for i, o in enumerate(r["top_ops"], 1):
        kernel = "" if o["kernel"] == o["op"] else _cut(o["kernel"], 60)
        kernel += f" (+{o['kernels'] - 1} kernels)" if o["kernels"] > 1 else ""
        print(f"{i:>3} {_cut(o['op'], 41):<42}{o['category'].split(' ')[0]:<15}{o['ms_per_step']:>9.3f}"
              f"{o['count_per_step']:>7.1f}{o['pct_step']:>6.1f}%  {kernel}")
    if len(r["by_module"]) > 1:
        print("\nby hlo_module (ms/step): " + ", ".join(f"{k} {v:.3f}" for k, v in r["by_module"].items()))
    if r["by_tf_op"]:
        print("\ntop tf_op (JAX name stack), ms/step:")
        for t in r["by_tf_op"]:
            print(f"  {t['ms_per_step']:>9.3f}  {_cut(t['tf_op'], 110)}")


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shape", default="0.5b:4096x4", help="size:SEQxBATCH as in train_throughput.py")
    p.add_argument("--variant", default="cudnn/none/noscan/2048",
                   help="attention/remat/scan|noscan/loss_chunk[/xla_flags_name]")
    p.add_argument("--xla_flags_variants", default="", help="name=FLAGS;... as in train_throughput.py")
    p.add_argument("--xla_flags", default=None, help="XLA_FLAGS for this run (a variant's 5th field wins)")
    p.add_argument("--steps", type=int, default=5, help="steps timed untraced, then steps traced")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--top", type=int, default=25)
    p.add_argument("--trace_dir", default="")
    p.add_argument("--out", default=os.environ.get("OUT", ""))
    p.add_argument("--verbose", action="store_true", help="list every plane / line of the trace and the stat names")
    args = p.parse_args()

    try:
        preset, seq, batch = parse_shape(args.shape)
        parse_variant(args.variant)
        table = parse_xla_flags_variants(args.xla_flags_variants)
        inherited = args.xla_flags if args.xla_flags is not None else os.environ.get("XLA_FLAGS")
        os.environ["XLA_FLAGS"] = xla_flags_for(args.variant, table, inherited)
    except ValueError as e:
        p.error(str(e))
    os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.92")
    tag = re.sub(r"[^A-Za-z0-9.]+", "_", f"{args.shape}_{args.variant}").strip("_")
    trace_dir = args.trace_dir or (os.path.join(args.out, f"trace_{tag}") if args.out else
                                   os.path.join("/tmp", f"qwen_jax_profile_{tag}_{int(time.time())}"))

    import jax

    print(f"{args.shape} {args.variant} on {jax.devices()[0].device_kind} (jax {jax.__version__}), "
          f"XLA_FLAGS={os.environ['XLA_FLAGS']!r}", flush=True)
    step, state, batches, cfg = build_jax_step(preset, seq, batch, args.variant)
    t0 = time.perf_counter()
    state, m, _ = run_steps(step, state, batches, 1)
    compile_s = time.perf_counter() - t0
    state, m, _ = run_steps(step, state, batches, args.warmup, timed=False)
    state, m, wall = run_steps(step, state, batches, args.steps)
    wall_s = statistics.median(wall)
    print(f"compile+first step {compile_s:.1f} s, untraced step {wall_s * 1e3:.2f} ms (median of {args.steps}), "
          f"loss {float(m['loss']):.4f}; tracing {args.steps} steps into {trace_dir}", flush=True)

    options = None
    try:
        options = jax.profiler.ProfileOptions()
        options.python_tracer_level = 0  # python function events only add host overhead here
    except Exception as e:  # a jax without these options: trace with the defaults
        print(f"(ProfileOptions unavailable: {e}; tracing with the defaults)")
        options = None
    traced = []
    with jax.profiler.trace(trace_dir, profiler_options=options):
        for i in range(args.steps):
            with jax.profiler.StepTraceAnnotation("train", step_num=i):
                t0 = time.perf_counter()
                state, m = step(state, batches[i % len(batches)])
                jax.block_until_ready(m)
                traced.append(time.perf_counter() - t0)
    files = sorted(glob.glob(os.path.join(trace_dir, "**", "*.xplane.pb"), recursive=True), key=os.path.getmtime)
    if not files:
        sys.exit(f"no .xplane.pb under {trace_dir}")
    events, info = load_events(files[-1], verbose=args.verbose)
    if not events:
        sys.exit(f"no op/kernel events found in {files[-1]}; planes: {json.dumps(info['planes'])}")
    if args.verbose:
        names = collections.Counter(k for e in events for k in e["stats"])
        print("stat names on the chosen events: " + ", ".join(f"{k} ({v})" for k, v in names.most_common()))
        for e in events[:3]:
            print(f"  e.g. {e['name']!r} {e['dur']:.0f} ns {e['stats']}")
    r = analyse(events, info, args.steps, sum(traced) / len(traced), top=args.top)
    r["untraced_step_ms"] = wall_s * 1e3
    result = dict(date=datetime.date.today().isoformat(), shape=args.shape, variant=args.variant,
                  xla_flags=os.environ["XLA_FLAGS"], device=jax.devices()[0].device_kind, jax=jax.__version__,
                  steps_traced=args.steps, compile_s=compile_s, trace_file=files[-1], **r)
    report(result)
    for folder in filter(None, [os.path.join(ROOT, "benchmarks", "results"), args.out]):
        os.makedirs(folder, exist_ok=True)
        with open(os.path.join(folder, f"profile_{tag}.json"), "w") as f:
            json.dump(result, f, indent=1)
    print(f"\nJSON: benchmarks/results/profile_{tag}.json; trace: {files[-1]}")


if __name__ == "__main__":
    main()
