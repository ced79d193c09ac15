#!/usr/bin/env python3
"""scripts/experiments/scaling.py --plan quick: the whole pipeline, small.

  scaling_check.py BIN_DIR

Three points (PS sync, PS async, allreduce; 2 nodes at 100 Mbit/s, simulated
devices, a 2 MB model) run in network namespaces; the CSV and the table are
written, every point ran, and each measured step is within a factor 2 of the cost
model's (a sanity bound: the benchmark, not this test, reports the 20 % figure;
this catches e.g. a ring that bypassed the shaped links). Nothing is left behind.
Exits 77 (skipped) where namespaces cannot be made.
"""
import csv
import os
import subprocess
import sys
import tempfile
import shutil

from itest import check

HERE = os.path.dirname(os.path.abspath(__file__))
SCALING = os.path.join(HERE, "..", "..", "scripts", "experiments", "scaling.py")


def main():
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    out = tempfile.mkdtemp(prefix="pstest-scaling-")
    try:
        p = subprocess.run([sys.executable, SCALING, "--plan", "quick", "--bin-dir", sys.argv[1],
                            "--out", out, "--no-plot"], capture_output=True, text=True,
                           timeout=240)
        if p.returncode == 77:
            print("SKIP:", p.stderr.strip())
            sys.exit(77)
        check(p.returncode == 0, f"scaling.py --plan quick ran ({p.returncode}): "
                                 f"{p.stdout[-2000:]} {p.stderr[-2000:]}")
        rows = list(csv.DictReader(open(os.path.join(out, "scaling.csv"))))
        check(len(rows) == 3 and all(r["status"] == "ok" for r in rows),
              f"3 points ran: {[(r['name'], r['status']) for r in rows]}")
        check(os.path.getsize(os.path.join(out, "scaling.md")) > 0, "the table is written")
        for r in rows:
            ratio = float(r["ratio"])
            check(0.5 <= ratio <= 2.0, f"{r['name']}: measured {r['measured_ms']} ms, model "
                                       f"{r['predicted_ms']} ms (x{ratio}; within a factor 2)")
        # The links' own record: queue drops and TCP's retransmissions and timeouts
        # are read for every point.
        check(all(r[k].isdigit() for r in rows
                  for k in ("link_drops", "tcp_retrans", "tcp_timeouts")) and
              all(r["cpu_busy"] not in ("", "None") for r in rows),
              "every point records the links' drops, retransmissions and timeouts and the "
              f"CPU: {[(r['link_drops'], r['tcp_retrans'], r['tcp_timeouts']) for r in rows]}")
        ns = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
        mine = [line for line in ns.splitlines() if line.startswith("psnc")]
        check(not any(int(m[4:].split("-")[0]) == p.pid for m in mine),
              "no namespace of the run is left")
    finally:
        shutil.rmtree(out, ignore_errors=True)
    print("PASS")


if __name__ == "__main__":
    main()
