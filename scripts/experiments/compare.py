#!/usr/bin/env python3
"""PS sync, PS async and allreduce over 1-4 workers: a CSV, a table and a plot.

  compare.py [--workers 1,2,3,4] [--modes ps-sync,ps-async,allreduce] [--ps N]
             [--epochs E] [--train-limit N] [--batch-size B] [--seed S]
             [--repeats R] [--run-timeout S] [--bin-dir DIR] [--out DIR] [--quick]
             [--no-plot] [--from-csv FILE]

Every run is scripts/launch.py with the same seed, the same per-worker batch size
and the same data, with --summary and --log into OUT/runs/<mode>-w<W>[-r<k>]/. From the
chief's summary: steady examples/s and the final test accuracy; from the per-step
logs of ALL workers (the first 5% of steps skipped as warm-up), the mean time per
step split into

  compute        compute_ms + local_reduce_ms  (forward, backward, local reduce;
                 PS sync sends finished gradient pieces during the backward pass,
                 so that sending counts here)
  communication  comm_ms: allreduce, the ring; PS, the push/pull wait (in sync
                 mode it includes waiting for the slowest worker, and the
                 optimizer run on the PS shards)
  update         apply_ms: the optimizer on the worker (allreduce only; 0 in PS
                 mode, where the PS applies it)
  data wait      data_wait_ms: waiting for the prefetched batch
  other          step_ms minus the above: time no phase measures (gradient
                 scaling, handing the batch back to the prefetch thread, the chief's
                 checkpoint bookkeeping) and, on an oversubscribed machine, the
                 preemptions that fall there; typically 0.1 ms a step, more when
                 3-4 workers share 2 cores

With --repeats R every (mode, W) runs R times, the repeats interleaved (all
configurations once, then again) so that a change of load hits every one; the
table and the plot show, per (mode, W), the run with the median examples/s
(its time split and accuracy) and the range of examples/s over the repeats.

Writes OUT/results.csv (one row per run), OUT/results.md (a Markdown table) and
OUT/results.png (matplotlib, Agg; skipped with a note when it cannot be
imported), prints the table and a final JSON line. A run that fails or passes
--run-timeout is recorded with status=failed and the tail of its output; the
others go on, and the exit status is 1 when any failed. --from-csv FILE runs
nothing: it writes the table and the plot of an earlier results.csv into OUT.
"""
import argparse
import csv
import json
import math
import os
import signal
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.normpath(os.path.join(HERE, "..", ".."))
LAUNCH = os.path.join(ROOT, "scripts", "launch.py")
MODES = {  # name -> launcher options
    "ps-sync": ["--mode", "ps", "--sync", "sync"],
    "ps-async": ["--mode", "ps", "--sync", "async"],
    "allreduce": ["--mode", "allreduce"],
}
PARTS = ["compute_ms", "comm_ms", "update_ms", "data_wait_ms", "other_ms"]
FIELDS = (["mode", "workers", "repeat", "ps", "batch_size", "global_batch", "epochs", "train_limit",
           "seed", "status", "steps", "steady_examples_per_sec", "examples_per_sec",
           "train_seconds", "wall_seconds", "test_accuracy", "test_loss", "step_ms"] + PARTS
          + ["logged_steps", "error"])
WARMUP = 0.05  # share of each worker's steps left out of the means


def parse_args(argv):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workers", default="1,2,3,4", help="worker counts (default 1,2,3,4)")
    ap.add_argument("--modes", default="ps-sync,ps-async,allreduce")
    ap.add_argument("--ps", type=int, default=2, help="PS processes in PS modes (default 2)")
    ap.add_argument("--epochs", type=int, help="default 3 (--quick: 1)")
    ap.add_argument("--train-limit", type=int, help="training images (default all 60000; "
                    "--quick: 12000)")
    ap.add_argument("--batch-size", type=int, default=128, help="per worker (default 128)")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--repeats", type=int, help="runs per (mode, W) (default 3; --quick: 1)")
    ap.add_argument("--run-timeout", type=float, help="seconds per run (default: from the "
                    "configuration, at least 120)")
    ap.add_argument("--bin-dir", default=os.path.join(ROOT, "build", "bin"))
    ap.add_argument("--out", default="compare-out")
    ap.add_argument("--quick", action="store_true", help="a small configuration (~2 min)")
    ap.add_argument("--no-plot", action="store_true", help="CSV and table only")
    ap.add_argument("--from-csv", metavar="FILE", help="no runs: table and plot of FILE")
    a = ap.parse_args(argv)
    if a.epochs is None:
        a.epochs = 1 if a.quick else 3
    if a.train_limit is None:
        a.train_limit = 12000 if a.quick else 0
    if a.repeats is None:
        a.repeats = 1 if a.quick else 3
    try:
        a.workers = [int(w) for w in a.workers.split(",") if w]
    except ValueError:
        ap.error(f"--workers: a comma-separated list of numbers, not {a.workers!r}")
    a.modes = [m for m in a.modes.split(",") if m]
    bad = [m for m in a.modes if m not in MODES]
    if bad or not a.modes:
        ap.error(f"--modes: one or more of {','.join(MODES)} (not {','.join(bad)})")
    if not a.workers or min(a.workers) < 1 or a.ps < 1 or a.epochs < 1 or a.batch_size < 1 \
            or a.repeats < 1:
        ap.error("--workers, --ps, --epochs, --batch-size and --repeats must be >= 1")
    if a.run_timeout is None:
        # Generous: 2-core machine, up to 4 workers oversubscribing it.
        examples = (a.train_limit or 60000) * a.epochs
        a.run_timeout = max(120.0, 60.0 + examples / 1000.0)
    if not a.from_csv and not os.path.exists(os.path.join(a.bin_dir, "pstrain")):
        ap.error(f"no pstrain in {a.bin_dir}: build first (scripts/build.sh build)")
    return a


def read_steps(path):
    """The per-step records of one worker's --log file."""
    rows = []
    with open(path) as f:
        for line in f:
            try:
                r = json.loads(line)
            except ValueError:
                continue
            if "step" in r and "step_ms" in r:
                rows.append(r)
    return rows


def step_means(logs):
    """Mean per-step times over every worker's steady steps (the first 5% skipped)."""
    rows = []
    for path in logs:
        steps = read_steps(path)
        rows += steps[int(math.ceil(len(steps) * WARMUP)):]
    if not rows:
        raise ValueError("no step records in " + ", ".join(logs))
    mean = lambda f: sum(f(r) for r in rows) / len(rows)
    out = {
        "compute_ms": mean(lambda r: r["compute_ms"] + r["local_reduce_ms"]),
        "comm_ms": mean(lambda r: r["comm_ms"]),
        "update_ms": mean(lambda r: r["apply_ms"]),
        "data_wait_ms": mean(lambda r: r["data_wait_ms"]),
        "step_ms": mean(lambda r: r["step_ms"]),
        "logged_steps": len(rows),
    }
    out["other_ms"] = out["step_ms"] - sum(out[k] for k in PARTS[:-1])
    return out


def tail(path, n=600):
    """The launcher's and the error lines of a run's output (else its last lines)."""
    try:
        with open(path, errors="replace") as f:
            lines = f.read().strip().splitlines()
    except OSError:
        return ""
    said = [x for x in lines if "launcher:" in x or "error" in x.lower()]
    return " | ".join(said[-4:] or lines[-4:])[-n:]


def run_one(a, mode, w, k):
    """Repeat k of one launcher run; a CSV row (status ok or failed)."""
    d = os.path.join(a.out, "runs", f"{mode}-w{w}" + (f"-r{k}" if a.repeats > 1 else ""))
    os.makedirs(d, exist_ok=True)
    summary, log, out = (os.path.join(d, n) for n in ("summary.json", "steps.jsonl", "output.txt"))
    for name in os.listdir(d):
        os.remove(os.path.join(d, name))
    argv = [sys.executable, LAUNCH, "--bin-dir", a.bin_dir, "--timeout", str(a.run_timeout),
            *MODES[mode], "--workers", str(w), "--epochs", str(a.epochs), "--batch-size",
            str(a.batch_size), "--seed", str(a.seed), "--summary", summary, "--log", log]
    if mode.startswith("ps"):
        argv += ["--ps", str(a.ps)]
    if a.train_limit:
        argv += ["--train-limit", str(a.train_limit)]
    row = {"mode": mode, "workers": w, "repeat": k, "ps": a.ps if mode.startswith("ps") else 0,
           "batch_size": a.batch_size, "global_batch": a.batch_size * w, "epochs": a.epochs,
           "train_limit": a.train_limit or 60000, "seed": a.seed, "status": "failed", "error": ""}
    t0 = time.monotonic()
    with open(out, "w") as f:
        f.write("$ " + " ".join(argv) + "\n")
        f.flush()
        p = subprocess.Popen(argv, stdout=f, stderr=subprocess.STDOUT)
        try:
            rc = p.wait(timeout=a.run_timeout + 30)
        except subprocess.TimeoutExpired:
            p.send_signal(signal.SIGTERM)  # the launcher stops its cluster by PID
            try:
                p.wait(timeout=15)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
            rc = "timeout"
    row["wall_seconds"] = round(time.monotonic() - t0, 2)
    if rc != 0:
        row["error"] = f"launcher exit {rc}: " + tail(out)
        return row
    try:
        s = json.load(open(summary))
        logs = [log] + [f"{log}.worker{i}" for i in range(1, w)]
        row.update({key: round(v, 4) if isinstance(v, float) else v
                    for key, v in step_means(logs).items()})
        row.update(steps=s["steps"], steady_examples_per_sec=round(s["steady_examples_per_sec"], 1),
                   examples_per_sec=round(s["examples_per_sec"], 1),
                   train_seconds=round(s["seconds"], 3),
                   test_accuracy=round(s["test_accuracy"], 4), test_loss=round(s["test_loss"], 4))
        row["status"] = "ok"
    except (OSError, ValueError, KeyError) as e:
        row["error"] = f"cannot read the results: {e}: " + tail(out)
    return row


def read_csv(path):
    """The rows of an earlier results.csv, numbers as numbers."""
    def num(v):
        for t in (int, float):
            try:
                return t(v)
            except ValueError:
                pass
        return v
    with open(path, newline="") as f:
        return [{k: v if k in ("mode", "status", "error") else num(v) for k, v in r.items()}
                for r in csv.DictReader(f)]


def median_runs(rows):
    """Per (mode, W): the ok run with the median examples/s (the lower one of an even
    count), with ex_min / ex_max over the ok repeats and the count of failed ones."""
    out = []
    for key in dict.fromkeys((r["mode"], r["workers"]) for r in rows):
        runs = [r for r in rows if (r["mode"], r["workers"]) == key]
        ok = sorted((r for r in runs if r["status"] == "ok"),
                    key=lambda r: r["steady_examples_per_sec"])
        failed = len(runs) - len(ok)
        m = dict(ok[(len(ok) - 1) // 2]) if ok else dict(runs[-1])
        if ok:
            m["ex_min"] = ok[0]["steady_examples_per_sec"]
            m["ex_max"] = ok[-1]["steady_examples_per_sec"]
        m["status"] = "ok" if not failed else f"{failed} of {len(runs)} failed"
        m["runs"] = len(runs)
        out.append(m)
    return out


def table(rows):
    head = ["mode", "W", "examples/s", "range", "step ms", "compute", "comm", "update", "data wait",
            "other", "test acc", "train s", "status"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    f = lambda r, k, fmt: format(r[k], fmt) if r.get(k) not in (None, "") else "-"
    for r in rows:
        lines.append("| " + " | ".join([
            r["mode"], str(r["workers"]), f(r, "steady_examples_per_sec", ",.0f"),
            f"{r['ex_min']:,.0f}–{r['ex_max']:,.0f}" if r["runs"] > 1 and "ex_min" in r else "-",
            f(r, "step_ms", ".2f"), *(f(r, k, ".2f") for k in PARTS),
            f(r, "test_accuracy", ".4f"), f(r, "train_seconds", ".1f"), r["status"]]) + " |")
    return "\n".join(lines) + "\n"


def plot(rows, path, title):
    """results.png, or the reason it was not written."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        return f"plot skipped: cannot import matplotlib ({e})"
    ok = [r for r in rows if "ex_min" in r]
    modes = list(dict.fromkeys(r["mode"] for r in ok))
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 4.8),
                                   gridspec_kw={"width_ratios": [1, 1.6]})
    for m in modes:
        rs = [r for r in ok if r["mode"] == m]
        y = [r["steady_examples_per_sec"] for r in rs]
        ax1.errorbar([r["workers"] for r in rs], y, marker="o", label=m, capsize=3,
                     yerr=[[v - r["ex_min"] for v, r in zip(y, rs)],
                           [r["ex_max"] - v for v, r in zip(y, rs)]])
        for r in rs:  # one offset per mode, so that the labels do not overlap
            ax1.annotate(f"{r['test_accuracy']:.3f}", (r["workers"], r["steady_examples_per_sec"]),
                         textcoords="offset points", xytext=(5, 6 - 9 * modes.index(m)),
                         fontsize=7, color=ax1.get_lines()[-1].get_color())
    ax1.set_xlabel("workers")
    ax1.set_ylabel("examples/s (steady; median, bars: range)"
                   if any(r["runs"] > 1 for r in ok) else "examples/s (steady)")
    ax1.set_xticks(sorted({r["workers"] for r in ok}))
    ax1.set_ylim(bottom=0)
    ax1.grid(alpha=0.3)
    ax1.legend(fontsize=8, title="labels: test accuracy", title_fontsize=7)
    ax1.set_title("throughput", fontsize=10)
    colors = {"compute_ms": "#4c72b0", "comm_ms": "#dd8452", "update_ms": "#55a868",
              "data_wait_ms": "#c44e52", "other_ms": "#bbbbbb"}
    names = {"compute_ms": "compute", "comm_ms": "communication", "update_ms": "update",
             "data_wait_ms": "data wait", "other_ms": "other"}
    x, labels, top = 0.0, [], 0.0
    for m in modes:
        for r in (r for r in ok if r["mode"] == m):
            bottom = 0.0
            for k in PARTS:
                v = max(r[k], 0.0)
                ax2.bar(x, v, bottom=bottom, color=colors[k], width=0.8,
                        label=names[k] if not labels else None)
                bottom += v
            top = max(top, bottom)
            labels.append((x, f"{m}\nW={r['workers']}"))
            x += 1
        x += 0.6
    ax2.set_xticks([p for p, _ in labels], [t for _, t in labels], fontsize=7)
    ax2.set_ylabel("ms per step (mean over all workers)")
    ax2.set_ylim(0, top * 1.18 if top > 0 else 1)  # room for the legend
    ax2.legend(fontsize=8, loc="upper left", ncol=len(PARTS))
    ax2.grid(axis="y", alpha=0.3)
    ax2.set_title("time per step", fontsize=10)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return None


def main(argv=None):
    a = parse_args(argv if argv is not None else sys.argv[1:])
    os.makedirs(a.out, exist_ok=True)
    rows = read_csv(a.from_csv) if a.from_csv else []
    t0 = time.monotonic()
    for k in range(1, 0 if a.from_csv else a.repeats + 1):
        for mode in a.modes:
            for w in a.workers:
                name = f"{mode} W={w}" + (f" ({k}/{a.repeats})" if a.repeats > 1 else "")
                print(f"compare: {name} ...", file=sys.stderr, flush=True)
                r = run_one(a, mode, w, k)
                rows.append(r)
                if r["status"] == "ok":
                    print(f"compare: {name}: {r['steady_examples_per_sec']:,.0f} ex/s, "
                          f"{r['step_ms']:.2f} ms/step, acc {r['test_accuracy']:.4f} "
                          f"({r['wall_seconds']:.1f} s)", file=sys.stderr, flush=True)
                else:
                    print(f"compare: {name} FAILED: {r['error']}", file=sys.stderr, flush=True)
    csv_path, md_path, png_path = (os.path.join(a.out, n)
                                   for n in ("results.csv", "results.md", "results.png"))
    if a.from_csv:
        csv_path = a.from_csv
    else:
        with open(csv_path, "w", newline="") as f:
            wr = csv.DictWriter(f, fieldnames=FIELDS, extrasaction="ignore")
            wr.writeheader()
            wr.writerows(rows)
    if not rows:
        sys.exit(f"compare: no rows in {a.from_csv}")
    r0, repeats = rows[0], max(r["repeat"] for r in rows)
    config = (f"{r0['train_limit']} training images, {r0['epochs']} epoch(s), batch "
              f"{r0['batch_size']} per worker, seed {r0['seed']}, "
              f"{max(r['ps'] for r in rows)} PS in PS modes")
    if repeats > 1:
        config += f", {repeats} repeats"
    med = median_runs(rows)
    md = (f"Configuration: {config}. Times in ms per step, means over all workers' steps "
          f"after the first {WARMUP:.0%}; examples/s is the chief's steady rate"
          + ("; per (mode, W) the run with the median examples/s, and the range over the "
             "repeats" if repeats > 1 else "") + ".\n\n" + table(med))
    with open(md_path, "w") as f:
        f.write(md)
    if os.path.exists(png_path):
        os.remove(png_path)
    note = None if a.no_plot else plot(med, png_path, "pstrain: " + config)
    if a.no_plot:
        note = "plot skipped: --no-plot"
    print(md)
    if note:
        print(f"compare: {note}", file=sys.stderr)
    failed = [f"{r['mode']}-w{r['workers']}" + (f"-r{r['repeat']}" if repeats > 1 else "")
              for r in rows if r["status"] != "ok"]
    print(json.dumps({"runs": len(rows), "failed": failed, "csv": csv_path, "table": md_path,
                      "plot": png_path if os.path.exists(png_path) else None,
                      "seconds": round(time.monotonic() - t0, 1)}))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
