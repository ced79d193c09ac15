#!/usr/bin/env python3
"""Scaling experiments: simulated devices on an emulated cluster, against the cost model.

  scaling.py [--plan full|quick|claims|overlap|phase] [--bin-dir DIR] [--out DIR]
             [--steps K] [--cpu-bound F] [--only SUBSTR] [--cc CC] [--no-plot]
             [--from-csv FILE]

Every point is one run of real psserver/pstrain processes in network namespaces
(netcluster.py: a namespace per node, each node's link shaped to the rate both
ways), the workers on simulated devices (pstrain --devices sim:G: a step's
gradient takes --sim-step-ms asleep, no CPU; everything after it is real), an
MLP of --model-mb MB, SGD (the PS's optimizer pass is cheap next to the wire).
PS runs push the whole gradient after the backward pass (--no-overlap), as the
cost model's serial term assumes, except the points of plan G (overlap-*), which
run pstrain's default (pushes as the backward pass makes each gradient, the
pipelined pull) against the model's pipelined term (costmodel.py
--pipeline-first), and its split-* points (pstrain's split calls, against the
model's --calls term); the PS processes have nodes of their own (layout
separate). Measured: the mean step time of the chief's per-step log after the
first 2 steps (the throughput's; in async mode every worker's, averaged, over 3x
the steps: their cycles vary as the workers drift in
and out of step, and the model gives, beside its estimate, the bounds of workers
never and always in step: async_low_ms, async_high_ms); predicted:
costmodel.step() from the run's own flags (nothing fitted).

Links faster than 1 Gbit/s are run time-dilated (DieCast's trick): rate / D on
the wire, every simulated time x D, the measured step / D, with D = rate /
1 Gbit/s, so that the emulation's own CPU cost per byte stays as small a share
as at 1 Gbit/s. Its assumption, said in the results: that cost shrinks with a
faster link too (it does not on this host; the dilated points say what the
modelled cluster does, not what this software does on a real 10 GbE NIC).

A point is marked cpu_bound when the host's CPUs were busier than --cpu-bound
(default 0.6 of all cores) while the measured steps ran (/proc/stat): the
emulation, not the modelled cluster, was then the limit, and the point is not
counted as a result. 0.6 and not more: on 2 cores, a host 60 % busy has
processes waiting for a core much of the time (measured: 10 Gbit/s without
dilation, 0.73 busy and 1.48x the model; every point at 0.5 or less within 15 %).
The host's load average before each run is recorded too.
The kernel here has no netem: links have no added delay (latency 0 in the model;
a namespace hop is ~0.05 ms); delay_emulated says so per point.

Plans: full (the default, 46 points, about 8 minutes on 2 cores), quick (3 points,
about a minute: the test), claims (the configurations of docs/SCALING.md's claims),
overlap (plan G alone, 7 points, and 4 of PS sync in pstrain's split calls), phase (6
PS async points on devices without jitter).
Writes OUT/scaling.csv, OUT/scaling.md, OUT/*.png (matplotlib, when it imports)
and prints the table and a JSON line of totals. Exit status 1 if a run failed.
Needs root (network namespaces); exits 77 without it.
"""
import argparse
import csv
import json
import os
import statistics
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import costmodel  # noqa: E402
import netcluster  # noqa: E402

ROOT = os.path.normpath(os.path.join(HERE, "..", ".."))
PER_DEVICE_BATCH = 32
WARMUP = 2
# PS async points: simulated step times vary by up to +-20 % (per worker and step).
# The model's MVA estimate assumes the workers' phases random, as on real devices,
# whose step times vary; devices that take exactly --sim-step-ms keep whatever
# offset the workers start with (they start nearly in step), and 30 steps then
# measure that accident (plan phase). Sync and ring steps wait for every worker,
# so their points keep exact times (the model has no max-of-N compute term).
ASYNC_JITTER = 0.2
FIELDS = ["name", "mode", "nodes", "devices", "ps", "rate", "dilation", "model_mb", "numel",
          "wire", "prefetch", "input_ms", "step_ms", "intra_gbps", "status", "measured_ms",
          "predicted_ms", "ratio", "comm_ms", "compute_ms", "cpu_busy", "cpu_bound",
          "loadavg_before", "speedup", "predicted_speedup", "delay_emulated", "async_low_ms",
          "async_high_ms", "model", "rows_mb", "overlap", "split", "jitter", "link_drops",
          "tcp_retrans", "tcp_timeouts", "cc"]


def point(name, mode, nodes, rate="1gbit", ps=1, devices=1, model_mb=10.0, wire="fp32",
          prefetch=True, input_ms=0.0, step_ms=50.0, intra_gbps=0.0, model="mlp",
          batch_per_device=PER_DEVICE_BATCH, dilate=True, overlap=False, split=False,
          jitter=None):
    """One configuration. overlap: PS sync as pstrain runs it by default (pushes during
    the backward pass, the pipelined pull); otherwise --no-overlap. split: a shard's
    push and pull go as pstrain's default calls of about 1 MiB (or of this many
    bytes), several in flight
    (a shard answers the pull of a call's partitions while later calls are still
    being pushed, which the model's serial term does not have); otherwise one call
    a shard (--call-bytes -1). jitter: each simulated step takes step_ms (1 +- up to
    jitter), drawn per worker and step (--sim-jitter); by default ASYNC_JITTER for PS
    async, 0 for the others."""
    if jitter is None:
        jitter = ASYNC_JITTER if mode == "ps_async" else 0.0
    return dict(name=name, mode=mode, nodes=nodes, devices=devices, ps=ps, rate=rate,
                model_mb=model_mb, wire=wire, prefetch=prefetch, input_ms=input_ms,
                step_ms=step_ms, intra_gbps=intra_gbps, model=model,
                batch_per_device=batch_per_device, dilate=dilate, overlap=overlap,
                split=split, jitter=jitter)


def overlap_points():
    """G: PS sync with pstrain's default overlap and pipelined pull, against the model's
    pipelined term: link-bound and compute-bound steps, 1-8 nodes, 1 and 2 PS."""
    pts = [point(f"overlap-ps_sync-n{n}", "ps_sync", n, overlap=True) for n in (1, 2, 4, 8)]
    pts.append(point("overlap-ps_sync-n4-s2", "ps_sync", 4, ps=2, overlap=True))
    pts.append(point("overlap-ps_sync-n2-compute", "ps_sync", 2, step_ms=400.0, overlap=True))
    pts.append(point("overlap-ps_sync-n4-40mb", "ps_sync", 4, model_mb=40.0, overlap=True))
    # pstrain's split calls (--call-bytes, 512 KiB) after the backward pass: the pull of
    # early calls overlaps later pushes (the model's --calls term).
    pts += [point(f"split-ps_sync-n{n}", "ps_sync", n, split=True) for n in (1, 2, 4, 8)]
    return pts


def phase_points():
    """PS async on deterministic devices (--sim-jitter 0): the workers keep the phase
    they drift into, so the cycle is one sample between the bounds, not the MVA
    estimate (which assumes their phases random, as ASYNC_JITTER makes them)."""
    return [point(f"phase-ps_async-{rate}-n{n}", "ps_async", n, rate=rate, jitter=0.0)
            for rate in ("1gbit", "10gbit") for n in (2, 4, 8)]


def plan(which):
    pts = []
    if which == "quick":
        return [point("quick-ps", "ps_sync", 2, rate="100mbit", model_mb=2),
                point("quick-async", "ps_async", 2, rate="100mbit", model_mb=2),
                point("quick-ar", "allreduce", 2, rate="100mbit", model_mb=2)]
    if which == "claims":
        return claims()
    if which == "overlap":
        return overlap_points()
    if which == "phase":
        return phase_points()
    # A: every mode over 1-8 nodes on 1 and 10 Gbit/s, a 10 MB model, one PS.
    for rate in ("1gbit", "10gbit"):
        for mode in ("ps_sync", "ps_async", "allreduce"):
            for n in (1, 2, 4, 8):
                pts.append(point(f"nodes-{mode}-{rate}-n{n}", mode, n, rate=rate))
    # B: more PS spread the shard's NIC.
    for mode in ("ps_sync", "ps_async"):
        for n in (4, 8):
            for s in (2, 4):
                pts.append(point(f"ps-{mode}-n{n}-s{s}", mode, n, ps=s))
    # C: bf16 gradients on the wire.
    for rate in ("1gbit", "10gbit"):
        for n in (2, 8):
            pts.append(point(f"bf16-ps_sync-{rate}-n{n}", "ps_sync", n, rate=rate, wire="bf16"))
    # D: input-bound steps with and without prefetching.
    for mode in ("ps_sync", "allreduce"):
        for pf in (True, False):
            pts.append(point(f"input-{mode}-{'prefetch' if pf else 'noprefetch'}", mode, 2,
                             prefetch=pf, input_ms=40.0, step_ms=50.0))
    # E: model size.
    for mode in ("ps_sync", "allreduce"):
        for mb in (1.0, 40.0):
            pts.append(point(f"size-{mode}-{mb:g}mb", mode, 4, model_mb=mb))
    # F: 10 Gbit/s without time dilation: this host's CPUs, not the links, set the pace
    # (these points should come out CPU-bound, and are then not results).
    for mode in ("ps_sync", "allreduce"):
        pts.append(point(f"raw-{mode}-10gbit-n4", mode, 4, rate="10gbit", model_mb=40,
                         step_ms=20, dilate=False))
    return pts


def claims():
    """The configurations of docs/SCALING.md's claims, in miniature."""
    pts = []
    # A 100 MB gradient on 1 vs 10 GbE: one worker, one PS, push + pull.
    for rate in ("1gbit", "10gbit"):
        pts.append(point(f"claim-100mb-{rate}", "ps_sync", 1, rate=rate, model_mb=100,
                         step_ms=20))
    # PS against allreduce as nodes grow, 1 GbE, 10 MB: where does the ring win?
    for n in (1, 2, 4, 8):
        for mode in ("ps_sync", "allreduce"):
            pts.append(point(f"claim-cross-{mode}-n{n}", mode, n, ps=max(1, n // 2)))
    # 1 x 8 and 8 x 8 devices on 10 GbE with NVLink-like 150 GB/s inside a node:
    # DeepFM (the real model: its embedding rows travel as they do in training, the
    # planted click data) and a ResNet-50-like 100 MB (25 M parameters) dense model.
    for n in (1, 8):
        for mode in ("ps_sync", "allreduce"):
            pts.append(point(f"claim-deepfm-{mode}-{n}x8", mode, n, rate="10gbit", devices=8,
                             model="deepfm", step_ms=100, ps=n if mode == "ps_sync" else 1,
                             intra_gbps=150, batch_per_device=256))
            pts.append(point(f"claim-resnet-{mode}-{n}x8", mode, n, rate="10gbit", devices=8,
                             model_mb=100, step_ms=200, ps=n if mode == "ps_sync" else 1,
                             intra_gbps=150))
    # bf16 on the wire, and prefetching an input-bound step.
    for wire in ("fp32", "bf16"):
        pts.append(point(f"claim-wire-{wire}", "ps_sync", 4, ps=2, wire=wire))
    for pf in (True, False):
        pts.append(point(f"claim-input-{'prefetch' if pf else 'serial'}", "ps_sync", 2,
                         prefetch=pf, input_ms=40.0, step_ms=50.0))
    return pts


def ctr_data(out):
    """A small planted click data set (100k rows) for the DeepFM points, made once."""
    d = os.path.join(out, "ctr-data")
    if not os.path.exists(os.path.join(d, "meta.json")):
        import subprocess
        subprocess.run([os.path.join(ROOT, "scripts", "make-ctr-data"), "--out", d,
                        "--train-rows", "100000", "--test-rows", "2000"], check=True,
                       stdout=subprocess.DEVNULL,
                       env=dict(os.environ, CTRGEN=os.path.join(BIN_DIR[0], "ctrgen")))
    return d


BIN_DIR = [None]
CC = [netcluster.DEFAULT_CC]  # TCP congestion control between the nodes (--cc)


def dilation(rate):
    return max(1.0, costmodel.rate_bits(rate) / 1e9)


class CpuSampler(threading.Thread):
    """/proc/stat every 0.2 s: (time, busy jiffies, total jiffies)."""

    def __init__(self):
        super().__init__(daemon=True)
        self.samples, self.stop = [], threading.Event()

    @staticmethod
    def read():
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:]]
        idle = v[3] + (v[4] if len(v) > 4 else 0)
        return sum(v) - idle, sum(v)

    def run(self):
        while not self.stop.is_set():
            self.samples.append((time.monotonic(), *self.read()))
            self.stop.wait(0.2)

    def busy_between(self, t0, t1):
        s = [x for x in self.samples if t0 <= x[0] <= t1]
        if len(s) < 2 or s[-1][2] == s[0][2]:
            return None
        return (s[-1][1] - s[0][1]) / (s[-1][2] - s[0][2])


def step_times(log):
    """The records of the chief's per-step log (one JSON object a line), in order; what
    it could read when the file is missing or a line is cut short."""
    out = []
    try:
        with open(log) as f:
            for line in f:
                out.append(json.loads(line))
    except (OSError, ValueError):
        pass
    return out


def first_layer_share(numel):
    """The first layer's share of an MLP 784,H,H,10 of numel parameters (--model-mb):
    784 H of H^2 + 796 H + 10."""
    h = (-796 + (796 ** 2 - 4 * (10 - numel)) ** 0.5) / 2
    return 784 * h / numel


CALL_BYTES, MAX_CALLS = 512 << 10, 16  # pstrain's --call-bytes default, PS_CLIENT_MAX_CALLS


def split_calls(numel, ps, call_bytes=CALL_BYTES):
    """About how many calls pstrain's --call-bytes makes of a shard's share: runs of
    whole partitions of at most call_bytes, or 1/16 of the share where that is more."""
    share = int(numel * 4.0 / ps)
    return max(1, -(-share // max(call_bytes, -(-share // MAX_CALLS))))


def call_bytes(p):
    """A point's --call-bytes: split True is pstrain's default, a number that many."""
    return CALL_BYTES if p.get("split") is True else int(p["split"])


def predict(p, numel, rows_bytes=0.0):
    mode_ps = p["mode"] != "allreduce"
    piped = first_layer_share(numel) if p.get("overlap") else None
    calls = split_calls(numel, p["ps"], call_bytes(p)) if p.get("split") and mode_ps else 1
    return costmodel.step(
        p["mode"], p["nodes"], numel * 4.0, costmodel.rate_bytes(p["rate"]),
        ps=p["ps"] if mode_ps else 1, devices=p["devices"], rows_bytes=rows_bytes,
        wire=0.5 if (p["wire"] == "bf16" and mode_ps) else 1.0, compute_s=p["step_ms"] / 1e3,
        input_s=p["input_ms"] / 1e3, prefetch=p["prefetch"],
        intra_Bps=p["intra_gbps"] * 1e9 or None, batch_per_device=p["batch_per_device"],
        pipeline_first=piped, calls=calls)


def run_point(p, bin_dir, out, steps, cpu_limit, timeout):
    d = dilation(p["rate"]) if p.get("dilate", True) else 1.0
    emu_rate = f"{costmodel.rate_bits(p['rate']) / d / 1e6:g}mbit"
    mode = "ps" if p["mode"] != "allreduce" else "allreduce"
    nps = p["ps"] if mode == "ps" else 0
    need, _, _ = netcluster.place(mode, nps, p["nodes"], "separate")
    rundir = os.path.join(out, "runs", p["name"])
    os.makedirs(rundir, exist_ok=True)
    log, summ = os.path.join(rundir, "steps-worker0.jsonl"), os.path.join(rundir, "summary.json")
    batch = p["batch_per_device"] * p["devices"]
    if p["mode"] == "ps_async":
        steps *= 3
    wargs = ["--devices", f"sim:{p['devices']}", "--sim-step-ms", f"{p['step_ms'] * d:g}",
             "--max-steps", str(steps), "--epochs", "1000", "--test-limit", "100",
             "--batch-size", str(batch), "--optimizer", "sgd", "--threads", "1",
             "--progress-every", "0"]
    if p["model"] == "deepfm":
        wargs += ["--model", "deepfm", "--data-dir", ctr_data(out), "--table-optimizer", "sgd"]
    else:
        wargs += ["--model-mb", f"{p['model_mb']:g}",
                  "--train-limit", str(max(4096, batch * p["nodes"]))]
    if p.get("jitter"):
        wargs += ["--sim-jitter", f"{p['jitter']:g}"]
    if p["intra_gbps"]:
        wargs += ["--sim-intra-gbps", f"{p['intra_gbps'] / d:g}"]
    if p["input_ms"]:
        wargs += ["--sim-input-ms", f"{p['input_ms'] * d:g}"]
    if not p["prefetch"]:
        wargs.append("--no-prefetch")
    ps_args = []
    if mode == "ps" and p["model"] == "mlp" and p["model_mb"] / nps > 60:
        # A shard's parameters travel in one message: allow it on both sides.
        ps_args = ["--max-message-mb", "512"]
        wargs += ps_args
    if mode == "ps":
        wargs += ["--sync", "async" if p["mode"] == "ps_async" else "sync"]
        if not p.get("overlap"):
            wargs.append("--no-overlap")
        if not p.get("split"):
            wargs += ["--call-bytes", "-1"]
        elif p["split"] is not True:
            wargs += ["--call-bytes", str(call_bytes(p))]
        if p["wire"] == "bf16":
            wargs += ["--wire-dtype", "bf16"]
    row = dict(p, dilation=d, status="failed", loadavg_before=os.getloadavg()[0])
    sampler = CpuSampler()
    sampler.start()
    try:
        with netcluster.NetCluster(need, emu_rate, say=lambda m: None, cc=CC[0]) as c:
            row["delay_emulated"] = c.delay_emulated
            row["cc"] = c.info()["cc"]
            t0 = time.monotonic()
            rc, secs = netcluster.train(c, bin_dir, mode, nps, p["nodes"], "separate", wargs,
                                        rundir, timeout, chief_args=["--summary", summ],
                                        ps_args=ps_args, step_logs=True)
            # The chief's exit: train() returns later, once the PS processes are gone
            # too (their shutdown grace), and a window ending then is partly idle.
            t1 = t0 + secs
            row.update(c.link_stats())
    finally:
        sampler.stop.set()
        sampler.join()
    recs = step_times(log)
    if rc != 0 or len(recs) <= WARMUP:
        row["status"] = f"failed ({rc})"
        return row
    steady = recs[WARMUP:]
    # The CPU while the measured steps ran: from the end of the warm-up steps (their
    # time, counted back from the end of the run) to the chief's exit.
    span = sum(r["step_ms"] for r in steady) / 1e3
    busy = sampler.busy_between(t1 - span - 0.3, t1)
    s = json.load(open(summ))
    # Embedding rows: each node's unique rows of a batch (the run's own count), on the
    # wire as an 8-byte id and the row's floats (PS), or as 3 + row floats (ring).
    rows = 0.0
    if p["model"] == "deepfm":
        row_floats = 11  # --emb-dim 10: the first-order weight and 10 factors
        per_row = 4 * (row_floats + 3) if p["mode"] == "allreduce" else 4 * row_floats + 8
        rows = s.get("unique_ids_per_batch", 0.0) * per_row
    row["rows_mb"] = round(rows / 1e6, 3)
    pred = predict(p, s["numel"], rows)
    meas = statistics.mean(r["step_ms"] for r in steady) / d
    if p["mode"] == "ps_async":  # every worker's cycle
        cycles = []
        for i in range(p["nodes"]):
            wr = step_times(os.path.join(rundir, f"steps-worker{i}.jsonl"))[WARMUP:]
            if wr:
                cycles.append(statistics.mean(r["step_ms"] for r in wr))
        meas = statistics.mean(cycles) / d
    comm = statistics.mean(r["comm_ms"] for r in steady) / d
    comp = statistics.mean(r["compute_ms"] + r["local_reduce_ms"] for r in steady) / d
    n_dev = p["nodes"] * p["devices"]
    base = pred["work"]
    if p["mode"] == "ps_async":
        row.update(async_low_ms=round(pred["async_low"] * 1e3, 2),
                   async_high_ms=round(pred["async_high"] * 1e3, 2))
    row.update(status="ok", numel=s["numel"], measured_ms=round(meas, 2),
               predicted_ms=round(pred["step"] * 1e3, 2),
               ratio=round(meas / (pred["step"] * 1e3), 3), comm_ms=round(comm, 2),
               compute_ms=round(comp, 2),
               cpu_busy=None if busy is None else round(busy, 3),
               cpu_bound=busy is not None and busy > cpu_limit,
               speedup=round(n_dev * base * 1e3 / meas, 2),
               predicted_speedup=round(pred["speedup"], 2))
    return row


def table(rows):
    head = ("| point | mode | nodes x dev | PS | link | model MB | measured ms | predicted ms "
            "| ratio | speedup (model) | CPU busy | |")
    out = [head, "|" + "---|" * 12]
    for r in rows:
        if r["status"] != "ok":
            out.append(f"| {r['name']} | {r['mode']} | {r['nodes']}x{r['devices']} | | "
                       f"{r['rate']} | | {r['status']} | | | | | |")
            continue
        flag = "CPU-bound" if r["cpu_bound"] else ("within 20 %" if abs(r["ratio"] - 1) <= 0.2
                                                   else "OFF")
        extra = []
        if r["wire"] == "bf16":
            extra.append("bf16")
        if r["input_ms"]:
            extra.append(f"input {r['input_ms']:g} ms {'prefetch' if r['prefetch'] else 'serial'}")
        if r["dilation"] > 1:
            extra.append(f"dilated x{r['dilation']:g}")
        ps = r["ps"] if r["mode"] != "allreduce" else "-"
        out.append(f"| {r['name']} | {r['mode']} | {r['nodes']}x{r['devices']} | {ps} | "
                   f"{r['rate']} | {r['model_mb']:g} | {r['measured_ms']:.1f} | "
                   f"{r['predicted_ms']:.1f} | {r['ratio']:.2f} | {r['speedup']:.2f} "
                   f"({r['predicted_speedup']:.2f}) | {r['cpu_busy']} | {flag}"
                   f"{'; ' + ', '.join(extra) if extra else ''} |")
    return "\n".join(out)


def plots(rows, out):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        return f"plots skipped: cannot import matplotlib ({e})"
    ok = [r for r in rows if r["status"] == "ok"]
    made = []
    # Speedup and efficiency against nodes, per mode and link (plan A's points).
    a = [r for r in ok if r["name"].startswith("nodes-")]
    if a:
        fig, ax = plt.subplots(1, 2, figsize=(11, 4))
        for (mode, rate), style in zip(sorted({(r["mode"], r["rate"]) for r in a}),
                                       ["o-", "s-", "^-", "o--", "s--", "^--"]):
            pts = sorted((r["nodes"], r) for r in a if r["mode"] == mode and r["rate"] == rate)
            xs = [n for n, _ in pts]
            ax[0].plot(xs, [r["speedup"] for _, r in pts], style, label=f"{mode} {rate}")
            ax[0].plot(xs, [r["predicted_speedup"] for _, r in pts], ":", color="grey")
            ax[1].plot(xs, [r["speedup"] / n for n, r in pts], style, label=f"{mode} {rate}")
        ax[0].plot([1, 8], [1, 8], "k:", linewidth=0.8)
        ax[0].set(xlabel="nodes", ylabel="speedup (measured; grey: model)",
                  title="speedup, 10 MB model, 50 ms steps")
        ax[1].set(xlabel="nodes", ylabel="scaling efficiency", ylim=(0, 1.1),
                  title="efficiency")
        ax[0].legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(os.path.join(out, "speedup.png"), dpi=110)
        plt.close(fig)
        made.append("speedup.png")
    # Measured against predicted.
    fig, ax = plt.subplots(figsize=(5.5, 5))
    for bound, color in ((False, "tab:blue"), (True, "tab:red")):
        pts = [r for r in ok if bool(r["cpu_bound"]) == bound]
        ax.scatter([r["predicted_ms"] for r in pts], [r["measured_ms"] for r in pts], s=14,
                   color=color, label="CPU-bound (not a result)" if bound else "points")
    hi = max([r["predicted_ms"] for r in ok] + [r["measured_ms"] for r in ok] + [1])
    for f, st in ((1.0, "k-"), (1.2, "k:"), (0.8, "k:")):
        ax.plot([0.5, hi * 1.2], [0.5 * f, hi * 1.2 * f], st, linewidth=0.8)
    ax.set(xscale="log", yscale="log", xlabel="predicted step (ms)",
           ylabel="measured step (ms)", title="measured vs cost model (dotted: ±20 %)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "measured-vs-model.png"), dpi=110)
    plt.close(fig)
    made.append("measured-vs-model.png")
    # The step split of every point.
    fig, ax = plt.subplots(figsize=(max(6, len(ok) * 0.25), 4))
    xs = range(len(ok))
    comp = [r["compute_ms"] for r in ok]
    comm = [r["comm_ms"] for r in ok]
    rest = [max(0.0, r["measured_ms"] - r["compute_ms"] - r["comm_ms"]) for r in ok]
    ax.bar(xs, comp, label="compute (simulated) + local reduce")
    ax.bar(xs, comm, bottom=comp, label="communication")
    ax.bar(xs, rest, bottom=[a + b for a, b in zip(comp, comm)], label="other")
    ax.set_xticks(list(xs), [r["name"] for r in ok], rotation=90, fontsize=6)
    ax.set(ylabel="ms per step", yscale="log", title="step-time split")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "split.png"), dpi=110)
    plt.close(fig)
    made.append("split.png")
    return "plots: " + ", ".join(made)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog=__doc__.split("\n\n", 1)[1])
    ap.add_argument("--plan", choices=["full", "quick", "claims", "overlap", "phase"],
                    default="full")
    ap.add_argument("--bin-dir", default=os.path.join(ROOT, "build", "bin"))
    ap.add_argument("--out", default=None)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--cpu-bound", type=float, default=0.6)
    ap.add_argument("--only", help="run the points whose name contains this")
    ap.add_argument("--run-timeout", type=float, default=300)
    ap.add_argument("--cc", default=netcluster.DEFAULT_CC,
                    help="TCP congestion control between the nodes ('' for the host's)")
    ap.add_argument("--no-plot", action="store_true")
    ap.add_argument("--from-csv", help="run nothing: the table and plots of an earlier CSV")
    a = ap.parse_args()
    out = a.out or tempfile.mkdtemp(prefix="scaling-")
    os.makedirs(out, exist_ok=True)
    rows = []
    if a.from_csv:
        with open(a.from_csv) as f:
            for r in csv.DictReader(f):
                for k in ("nodes", "devices", "ps", "numel"):
                    r[k] = int(r[k]) if r[k] not in ("", "None") else None
                for k in ("dilation", "model_mb", "input_ms", "step_ms", "intra_gbps",
                          "measured_ms", "predicted_ms", "ratio", "comm_ms", "compute_ms",
                          "speedup", "predicted_speedup", "loadavg_before"):
                    r[k] = float(r[k]) if r[k] not in ("", "None") else None
                r["cpu_busy"] = float(r["cpu_busy"]) if r["cpu_busy"] not in ("", "None") else None
                for k in ("prefetch", "cpu_bound", "delay_emulated"):
                    r[k] = r[k] == "True"
                rows.append(r)
    else:
        if os.geteuid() != 0:
            print("scaling: network namespaces need root", file=sys.stderr)
            return 77
        BIN_DIR[0] = os.path.abspath(a.bin_dir)
        CC[0] = a.cc or None
        pts = [p for p in plan(a.plan) if not a.only or a.only in p["name"]]
        for i, p in enumerate(pts):
            t = time.monotonic()
            try:
                r = run_point(p, a.bin_dir, out, a.steps, a.cpu_bound, a.run_timeout)
            except netcluster.Unsupported as e:
                print(f"scaling: cannot emulate a cluster here: {e}", file=sys.stderr)
                return 77
            rows.append(r)
            print(f"[{i + 1}/{len(pts)}] {p['name']}: {r['status']}"
                  + (f", {r['measured_ms']} ms measured, {r['predicted_ms']} ms predicted "
                     f"(x{r['ratio']}), CPU {r['cpu_busy']}" if r["status"] == "ok" else "")
                  + f" [{time.monotonic() - t:.0f} s]", flush=True)
        with open(os.path.join(out, "scaling.csv"), "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=FIELDS, extrasaction="ignore")
            w.writeheader()
            for r in rows:
                w.writerow(r)
    md = table(rows)
    with open(os.path.join(out, "scaling.md"), "w") as f:
        f.write(md + "\n")
    print(md)
    if not a.no_plot:
        print(plots(rows, out))
    ok = [r for r in rows if r["status"] == "ok"]
    results = [r for r in ok if not r["cpu_bound"]]
    within = [r for r in results if abs(r["ratio"] - 1) <= 0.2]
    print(json.dumps({"points": len(rows), "ok": len(ok), "cpu_bound": len(ok) - len(results),
                      "results": len(results), "within_20pct": len(within),
                      "failed": len(rows) - len(ok), "out": out}))
    return 0 if len(ok) == len(rows) else 1


if __name__ == "__main__":
    sys.exit(main())
