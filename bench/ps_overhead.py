#!/usr/bin/env python3
"""Distributed overhead of PS mode at batch 128, against plain TCP, in one run.

  bench/ps_overhead.py [--build DIR] [--steps N] [--repeats R] [--ps N] [--extra ARGS]

Runs, R times interleaved: local mode (1 process) and sync PS mode (1 worker,
--ps N shards) on the MLP at batch 128 with one BLAS thread, taking the median
step time of each run's per-step log (warm-up steps dropped); and psbench's
1xN push+pull of the model's bytes (940,584 B) over gRPC and over plain TCP.
--extra adds pstrain flags to the PS runs (e.g. --extra=--no-overlap).
Prints one JSON line:
  overhead_ms = PS step - local step, tcp_ms = plain-TCP push+pull of the
  model's bytes, ratio = overhead_ms / tcp_ms (target: <= 1.5) from the
  medians; ratio_per_repeat and its median: the same ratio within each repeat
  (load on a shared machine drifts over minutes: their spread shows it).
The PS checkpoints every 100 versions, the launcher's default; add
--extra="--checkpoint-every 1000000" for the service without durability.
"""
import argparse
import json
import os
import statistics as st
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
MODEL_BYTES = 235146 * 4


def median_step(log, skip=50):
    rows = [json.loads(l) for l in open(log)][skip:]
    return {k: st.median(r[k] for r in rows) for k in ("step_ms", "compute_ms", "comm_ms")}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--build", default=os.path.join(HERE, "..", "build"))
    ap.add_argument("--steps", type=int, default=800)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--ps", type=int, default=1)
    ap.add_argument("--extra", default="", help="more pstrain flags for the PS runs "
                    "(space-separated; write --extra=--no-overlap)")
    a = ap.parse_args()
    extra = a.extra.split()
    bin_dir = os.path.join(a.build, "bin")
    common = ["--batch-size", "128", "--threads", "1", "--max-steps", str(a.steps), "--quiet"]
    local, ps, tcp, grpc = [], [], [], []
    with tempfile.TemporaryDirectory() as tmp:
        log = os.path.join(tmp, "log.jsonl")
        for _ in range(a.repeats):
            subprocess.run([os.path.join(bin_dir, "pstrain"), "--mode", "local", *common, "--log",
                            log], check=True, capture_output=True, timeout=600)
            local.append(median_step(log))
            subprocess.run([sys.executable, os.path.join(HERE, "..", "scripts", "launch.py"),
                            "--bin-dir", bin_dir, "--ps", str(a.ps), "--workers", "1",
                            "--timeout", "600", *common, *extra, "--log", log],
                           check=True, capture_output=True, timeout=600)
            ps.append(median_step(log))
            out = subprocess.run([os.path.join(a.build, "bench", "psbench"), "--sizes",
                                  str(MODEL_BYTES), "--shapes", f"{a.ps}x1", "--modes", "sync"],
                                 check=True, capture_output=True, text=True, timeout=600).stdout
            row = json.loads(out.strip().splitlines()[-1])
            tcp.append(row["tcp_push_ms"] + row["tcp_pull_ms"])
            grpc.append(row["push_ms"] + row["pull_ms"])
    # Per repeat (local, PS and TCP measured minutes apart at most): these
    # machines' load drifts over minutes, so the spread says how much.
    per = [(p_["step_ms"] - l_["step_ms"]) / t_ for l_, p_, t_ in zip(local, ps, tcp)]
    loc = st.median(r["step_ms"] for r in local)
    pss = st.median(r["step_ms"] for r in ps)
    tcp_ms = st.median(tcp)
    over = pss - loc
    print(json.dumps({
        "bench": "ps_overhead", "extra": a.extra, "batch": 128, "ps": a.ps, "workers": 1, "threads": 1,
        "repeats": a.repeats, "local_step_ms": round(loc, 4), "ps_step_ms": round(pss, 4),
        "ps_compute_ms": round(st.median(r["compute_ms"] for r in ps), 4),
        "ps_comm_ms": round(st.median(r["comm_ms"] for r in ps), 4),
        "overhead_ms": round(over, 4), "model_bytes": MODEL_BYTES,
        "tcp_push_pull_ms": round(tcp_ms, 4), "grpc_vector_push_pull_ms": round(st.median(grpc), 4),
        "ratio_to_tcp": round(over / tcp_ms, 3),
        "ratio_per_repeat": [round(x, 3) for x in per],
        "ratio_median_of_repeats": round(st.median(per), 3), "target_ratio": 1.5}))


if __name__ == "__main__":
    main()
