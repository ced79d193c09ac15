#!/usr/bin/env python3
"""Kill processes of a training cluster at random and check that every run still ends well.

  chaos.py [--runs N] [--seed S] [--bin-dir DIR] [--out DIR] [--plan quick]
           [--modes sync,async,allreduce] [--ps-arg=ARG ...]

Each run is one launcher run (scripts/launch.py) of a small job (the MLP on
Fashion-MNIST, 2 PS x 2 workers, or 3 workers in allreduce mode) in which
one random kill (SIGKILL) hits: a PS, the chief, another worker, a PS and a
worker together, or two workers (allreduce) - at a random step of the
chief's, or at a random time from the start (start-up and shutdown
included). The launcher starts the dead processes again. Each mode's
undisturbed run is the reference, measured first in the same session.

A run passes when it exits 0 within 3x its reference's time, and:
  sync PS    its final parameters are bit-identical to the reference's, and
             the versions rolled back are at most K + 1 (a shard that committed
             may have applied the next step; the steps are redone, not lost);
  async PS   the updates lost (summary versions_lost: the pushes a rollback
             took from a shard and no worker pushed again, as the shards count
             them) are at most K, the checkpoint interval (psserver waits for
             each checkpoint by default), or 2K with
             --ps-arg=--checkpoint-async (the interval since the last committed
             checkpoint, plus one more when the kill came while the next was
             being written; 2K + 1 versions in sync mode); its accuracy is
             reported, not checked: async runs differ from each other anyway;
  allreduce  test accuracy is within 0.5 points of the reference.
A kill planned past the end of the run kills nothing; such runs are counted
apart (killed = 0).
Results: a table on stdout, DIR/chaos.csv (one row per run) and
DIR/chaos.json (the totals); without --out the directory is removed after a
run where everything passed. Exit status 1 when any run failed, hung or
broke its bound. --plan quick runs ten kills, each victim class of each mode
once, at steps drawn from --seed, instead of random ones: the test suite's
fault-injection check.
"""
import argparse
import csv
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
LAUNCH = os.path.join(HERE, "..", "launch.py")
JOB = ["--epochs", "3", "--train-limit", "12000", "--test-limit", "2000", "--batch-size", "64",
       "--threads", "1", "--seed", "11"]
CKPT_EVERY = 20
PS_WORKERS = 2


def max_lost(ps_args, mode):
    """What a PS kill may cost (as tests/integration/ps_recovery.py bounds it). By
    default a shard waits for each checkpoint's commit before it takes another push, so
    async runs lose at most K updates, and sync runs roll back at most K + 1 versions
    (a shard that committed may have applied the next step). With
    --checkpoint-async the versions since the newest checkpoint every shard committed
    are < K, plus K when the kill lands while the next one is written (one due while
    the writer is still busy holds the shard until the writer takes it)."""
    if "--checkpoint-async" in ps_args:
        return 2 * CKPT_EVERY + (mode == "sync")
    return CKPT_EVERY + (mode == "sync")
# (mode, victims) of --plan quick: each PS, the chief, another worker and a PS with a
# worker in sync mode; a PS, the chief and another worker in async mode; the chief,
# another worker and two workers in allreduce mode; each at a step drawn from --seed.
QUICK = [("sync", ["ps1"]), ("sync", ["worker0"]), ("sync", ["worker1"]),
         ("sync", ["ps0", "worker1"]), ("async", ["ps0"]), ("async", ["worker0"]),
         ("async", ["worker1"]), ("allreduce", ["worker0"]), ("allreduce", ["worker2"]),
         ("allreduce", ["worker1", "worker2"])]


def cluster_args(mode):
    if mode == "allreduce":
        return ["--mode", "allreduce", "--workers", "3"]
    return ["--mode", "ps", "--ps", "2", "--workers", str(PS_WORKERS), "--sync", mode]


def processes(mode):
    return ["worker0", "worker1", "worker2"] if mode == "allreduce" else \
        ["ps0", "ps1", "worker0", "worker1"]


def launch(args, mode, tag, out, extra, timeout):
    """One launcher run; returns (rc, seconds, output, summary or None, params bytes or None)."""
    summ, prm = os.path.join(out, f"{tag}.json"), os.path.join(out, f"{tag}.params")
    for f in (summ, prm):
        if os.path.exists(f):
            os.remove(f)
    argv = [sys.executable, LAUNCH, "--bin-dir", args.bin_dir, "--timeout", str(int(timeout)),
            "--checkpoint-every", str(CKPT_EVERY), *cluster_args(mode),
            *[f"--ps-arg={x}" for x in args.ps_arg if mode != "allreduce"], *JOB, "--summary", summ,
            "--params-out", prm, *extra]
    t0 = time.monotonic()
    try:
        p = subprocess.run(argv, capture_output=True, text=True, timeout=timeout + 30)
        rc, text = p.returncode, p.stdout + p.stderr
    except subprocess.TimeoutExpired as e:
        rc, text = "hang", (e.stdout or b"").decode(errors="replace")
    took = time.monotonic() - t0
    with open(os.path.join(out, f"{tag}.log"), "w") as f:
        f.write(text)
    summary = json.load(open(summ)) if os.path.exists(summ) else None
    params = open(prm, "rb").read() if os.path.exists(prm) else None
    return rc, took, text, summary, params


def plan(args):
    """[(mode, victims, when)]: when is a step (int) or seconds from the start (float)."""
    rng = random.Random(args.seed)
    if args.plan == "quick":  # Steps 10 % to 90 % into the run.
        return [(m, v, ("step", rng.uniform(0.1, 0.9))) for m, v in QUICK if m in args.modes]
    runs = []
    for _ in range(args.runs):
        mode = rng.choice(args.modes)
        procs = processes(mode)
        if mode == "allreduce":
            kinds = [["worker0"], [rng.choice(procs[1:])], rng.sample(procs, 2)]
        else:
            kinds = [[rng.choice(["ps0", "ps1"])], ["worker0"], ["worker1"],
                     [rng.choice(["ps0", "ps1"]), rng.choice(["worker0", "worker1"])]]
        victims = rng.choice(kinds)
        # A step of the run, or a time in the reference's duration (start-up
        # and shutdown included): fractions, scaled once the references ran.
        when = ("step", rng.random()) if rng.random() < 0.7 else ("time", rng.random())
        runs.append((mode, victims, when))
    return runs


def scaled(when, ref_seconds, ref_steps):
    """A plan's (kind, fraction) as a step of the run or seconds from its start."""
    if not isinstance(when, tuple):
        return when
    kind, frac = when
    if kind == "step":
        return int(frac * (ref_steps - 1))
    return round(frac * ref_seconds, 3)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=50)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--bin-dir", default=os.path.join(HERE, "..", "..", "build", "bin"))
    ap.add_argument("--out", help="results directory (default: a new temporary one)")
    ap.add_argument("--plan", choices=["random", "quick"], default="random")
    ap.add_argument("--modes", default="sync,async,allreduce")
    ap.add_argument("--ps-arg", action="append", default=[], metavar="ARG",
                    help="pass ARG to every psserver (e.g. --ps-arg=--checkpoint-async)")
    args = ap.parse_args()
    args.modes = args.modes.split(",")
    out = args.out or tempfile.mkdtemp(prefix="chaos-")
    os.makedirs(out, exist_ok=True)
    load = os.getloadavg()[0]
    print(f"chaos: results in {out}; load average {load:.2f} at the start", flush=True)
    ref = {}
    for mode in args.modes:
        rc, took, text, summ, prm = launch(args, mode, f"ref-{mode}", out, [], 300)
        if rc != 0 or not summ:
            sys.exit(f"chaos: the undisturbed {mode} run failed ({rc}):\n{text[-3000:]}")
        ref[mode] = (took, summ, prm)
        print(f"reference {mode}: {took:.1f} s, test accuracy {summ['test_accuracy']:.4f}",
              flush=True)
    rows = []
    for i, (mode, victims, when) in enumerate(plan(args)):
        rt, rsumm, rprm = ref[mode]
        when = scaled(when, rt, rsumm["steps"])
        spec = (f"@{when}" if isinstance(when, float) else str(when)) + ":" + ",".join(victims)
        limit = max(3 * rt, rt + 20)  # the launcher's own bound; 3x is checked below
        rc, took, text, summ, prm = launch(args, mode, f"run{i:03d}", out,
                                           ["--chaos-kill", spec], limit)
        killed = text.count("chaos: killed")
        restarts = text.count("started it again")
        acc = summ["test_accuracy"] if summ else float("nan")
        why = []
        if rc == "hang":
            why.append("hung")
        elif rc != 0:
            why.append(f"exit {rc}")
        if took > 3 * rt and rc != "hang":
            why.append(f"{took / rt:.1f}x the reference time")
        if rc == 0 and not summ:
            why.append("no summary")
        if rc == 0 and summ:
            if mode == "sync" and prm != rprm:
                why.append("parameters differ from the undisturbed run")
            bound = max_lost(args.ps_arg, mode)
            if mode != "allreduce" and summ.get("versions_lost", 0) > bound:
                why.append(f"{summ['versions_lost']} versions lost > {bound}")
            if mode == "allreduce" and abs(acc - rsumm["test_accuracy"]) > 0.005:
                why.append("accuracy off by more than 0.5 points")
        row = {"run": i, "mode": mode, "victims": "+".join(victims),
               "when": f"@{when}s" if isinstance(when, float) else f"step {when}",
               "killed": killed, "restarts": restarts, "rc": rc, "seconds": round(took, 2),
               "time_lost_s": round(took - rt, 2),
               "steps_redone": summ.get("steps_redone", 0) if summ else "",
               "versions_lost": summ.get("versions_lost", 0) if summ else "",
               "test_accuracy": acc,
               "identical": ("yes" if prm == rprm else "no") if mode == "sync" else "",
               "outcome": "ok" if not why else "FAIL: " + "; ".join(why)}
        rows.append(row)
        print(f"run {i:3d} {mode:9s} kill {row['victims']:14s} {row['when']:>10s}: "
              f"{row['outcome']} ({took:.1f} s, {restarts} restarts, redone "
              f"{row['steps_redone']}, lost {row['versions_lost']}, acc {acc:.4f})", flush=True)
    with open(os.path.join(out, "chaos.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0].keys()) if rows else ["run"])
        w.writeheader()
        w.writerows(rows)
    bad = [r for r in rows if r["outcome"] != "ok"]
    kills = sum(r["killed"] for r in rows)
    totals = {"runs": len(rows), "kills": kills, "failed": len(bad),
              "runs_without_kill": sum(1 for r in rows if not r["killed"]),
              "hangs": sum(1 for r in rows if r["rc"] == "hang"),
              "sync_identical": sum(1 for r in rows if r["identical"] == "yes"),
              "sync_runs": sum(1 for r in rows if r["mode"] == "sync"),
              "max_time_ratio": max((r["seconds"] / ref[r["mode"]][0] for r in rows), default=0),
              "max_time_lost_s": max((r["time_lost_s"] for r in rows), default=0),
              "max_versions_lost": max((r["versions_lost"] or 0 for r in rows), default=0),
              "load_start": load, "load_end": os.getloadavg()[0],
              "reference_seconds": {m: round(ref[m][0], 2) for m in ref}}
    json.dump(totals, open(os.path.join(out, "chaos.json"), "w"), indent=1)
    print("\n| mode | runs (with a kill) | kills | restarts | failed | hangs | sync bit-identical "
          "| steps redone, max | updates lost, max | accuracy (reference) | time lost, max (s) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for m in args.modes:
        rs = [r for r in rows if r["mode"] == m]
        accs = [r["test_accuracy"] for r in rs if r["rc"] == 0]
        print(f"| {m} | {len(rs)} ({sum(1 for r in rs if r['killed'])}) | "
              f"{sum(r['killed'] for r in rs)} | {sum(r['restarts'] for r in rs)} | "
              f"{sum(1 for r in rs if r['outcome'] != 'ok')} | "
              f"{sum(1 for r in rs if r['rc'] == 'hang')} | "
              + (f"{sum(1 for r in rs if r['identical'] == 'yes')}/{len(rs)}" if m == "sync"
                 else "-")
              + f" | {max((r['steps_redone'] or 0 for r in rs), default=0)}"
              f" | {max((r['versions_lost'] or 0 for r in rs), default=0) if m == 'async' else 0}"
              + (f" | {min(accs):.4f}-{max(accs):.4f} ({ref[m][1]['test_accuracy']:.4f})"
                 if accs else " | -")
              + f" | {max((r['time_lost_s'] for r in rs), default=0):.1f} |")
    print(f"\nchaos: {len(rows)} runs, {kills} kills, {len(bad)} failed, {totals['hangs']} hung; "
          f"longest run {totals['max_time_ratio']:.2f}x its reference; load average "
          f"{load:.2f} -> {totals['load_end']:.2f}")
    for r in bad:
        print(f"  run {r['run']}: {r['mode']} kill {r['victims']} at {r['when']}: "
              f"{r['outcome']} (log: {out}/run{r['run']:03d}.log)")
    if not args.out and not bad:
        shutil.rmtree(out, ignore_errors=True)  # kept, with every log, when a run failed
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
