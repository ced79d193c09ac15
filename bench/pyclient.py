#!/usr/bin/env python3
"""The Python client (python/pstrain) against the C one, on the same loop, in the same run.

  bench/pyclient.py [BUILD_DIR] [--floats 4194304] [--steps 30] [--rounds 3]

Each round starts a psserver (one shard on 127.0.0.1, a free port) for each of: the C loop
(bench/pst_loop, libpstrain.so) and the same loop in Python (pstrain.Client.step with numpy
arrays), the order alternating between rounds. Every loop initialises the shard, runs 3
untimed steps, then --steps timed push-and-pull steps of --floats floats (default 16 MiB).
Prints one JSON line per run, then a summary: the median ratio Python / C of GB/s (bytes
pushed and pulled), with the load average before and after and the CPU time other processes
took during the runs (a busy machine makes the ratio meaningless: the runs are flagged).
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
SRC = os.path.dirname(HERE)
sys.path.insert(0, os.path.join(SRC, "scripts"))
from launch import free_ports  # noqa: E402  (outside the ephemeral range)
PY_LOOP = r'''
import json, sys, time, numpy as np, pstrain
hosts, n, steps, warm = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), 3
c = pstrain.Client(hosts, [("v", n)], num_workers=1)
c.init()
g, p = np.zeros(n, np.float32), np.zeros(n, np.float32)
for t in range(warm + steps):
    if t == warm:
        t0 = time.monotonic()
    c.step(t, g, out=p)
sec = (time.monotonic() - t0) / steps
print(json.dumps({"bench": "pst_loop", "impl": "python", "floats": n, "steps": steps,
                  "step_s": round(sec, 6), "gbs": round(8.0 * n / sec / 1e9, 4)}))
c.shutdown()
c.close()
'''


def busy_ticks():
    """CPU ticks of every process but this one's tree so far (user + system)."""
    mine = {os.getpid()}
    total = 0
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            if int(pid) in mine or int(fields[1]) in mine:
                continue
            total += int(fields[11]) + int(fields[12])
        except (OSError, IndexError, ValueError):
            pass
    return total


def python_with_numpy():
    for exe in (sys.executable, "/usr/bin/python3"):
        if os.path.exists(exe) and subprocess.run([exe, "-c", "import numpy"],
                                                  capture_output=True).returncode == 0:
            return exe
    sys.exit("pyclient: no Python with numpy (scripts/install-deps.sh installs python3-numpy)")


def run(impl, build, py, args):
    port = free_ports(1)[0]
    addr = f"127.0.0.1:{port}"
    ps = subprocess.Popen([os.path.join(build, "bin", "psserver"), "--ps-hosts", addr,
                           "--worker-hosts", "127.0.0.1:1", "--task-index", "0"],
                          stderr=subprocess.DEVNULL)
    try:
        env = dict(os.environ, PSTRAIN_LIB=os.path.join(build, "lib", "libpstrain.so.0"),
                   PYTHONPATH=os.path.join(SRC, "python"))
        cmd = ([os.path.join(build, "bench", "pst_loop"), "--ps-hosts", addr, "--floats",
                str(args.floats), "--steps", str(args.steps)] if impl == "c" else
               [py, "-c", PY_LOOP, addr, str(args.floats), str(args.steps)])
        r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
        if r.returncode != 0:
            sys.exit(f"pyclient: {impl} loop failed:\n{r.stdout}\n{r.stderr}")
        ps.wait(timeout=30)
        return json.loads(r.stdout.strip().splitlines()[-1])
    finally:
        if ps.poll() is None:
            ps.kill()
            ps.wait()


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("build", nargs="?", default=os.path.join(SRC, "build"))
    ap.add_argument("--floats", type=int, default=4 << 20)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    py = python_with_numpy()
    load0 = os.getloadavg()[0]
    hz = os.sysconf("SC_CLK_TCK")
    ratios, flagged = [], 0
    for rnd in range(args.rounds):
        order = ["c", "python"] if rnd % 2 == 0 else ["python", "c"]
        res = {}
        for impl in order:
            b0, t0 = busy_ticks(), time.monotonic()
            r = run(impl, args.build, py, args)
            others = (busy_ticks() - b0) / hz / (time.monotonic() - t0)
            r.update(round=rnd, others_cores=round(others, 3), busy=others > 0.2)
            flagged += r["busy"]
            print(json.dumps(r), flush=True)
            res[impl] = r
        if not (res["c"]["busy"] or res["python"]["busy"]):
            ratios.append(res["python"]["gbs"] / res["c"]["gbs"])
    print(json.dumps({"summary": "pyclient", "floats": args.floats, "bytes": 4 * args.floats,
                      "rounds_kept": len(ratios), "runs_busy": flagged,
                      "ratio_python_c": round(statistics.median(ratios), 3) if ratios else None,
                      "target": ">= 0.8", "load_start": load0,
                      "load_end": os.getloadavg()[0]}))


if __name__ == "__main__":
    main()
