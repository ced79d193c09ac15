#!/usr/bin/env python3
"""The emulated cluster (scripts/experiments/netcluster.py): shaping that holds, nothing left.

  netns_cluster.py BIN_DIR shaping   2 nodes at 100 Mbit/s: a psserver in one, ps_probe
                                     in the other pushing and pulling a 10 MB model (3
                                     steps); each transfer within 20 % of bytes / rate,
                                     and the namespaces gone afterwards
  netns_cluster.py BIN_DIR train     `netcluster.py run`: 1 PS and 2 workers on 3 nodes
                                     at 1 Gbit/s train the MLP to its accuracy line; a
                                     run whose chief fails reports its status; nothing
                                     left behind either way

Exits 77 (ctest: skipped, with the reason printed) where network namespaces
cannot be made (not root, or not permitted).
"""
import json
import os
import subprocess
import sys
import time

from itest import check, main, run

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "..", "scripts", "experiments"))
import netcluster  # noqa: E402

NETCLUSTER = os.path.join(HERE, "..", "..", "scripts", "experiments", "netcluster.py")
LAYERS = "1000,2620"  # an MLP of 1000 x 2620 + 2620 floats: 10,490,480 bytes
MODEL_BYTES = (1000 * 2620 + 2620) * 4
# What tbf counts beyond the payload: Ethernet, IP and TCP headers (1514 bytes on
# the wire per 1448 of payload with timestamps), and gRPC/HTTP2 framing (< 0.1 %).
WIRE = 1514 / 1448


def skip(why):
    print(f"SKIP: {why}", flush=True)
    sys.exit(77)


def namespaces_of(prefix):
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    return [line.split()[0] for line in out.splitlines() if line.startswith(prefix)]


def shaping(bin_dir, tmp):
    probe = os.path.join(bin_dir, "ps_probe")
    try:
        c = netcluster.NetCluster(2, "100mbit").__enter__()
    except netcluster.Unsupported as e:
        skip(f"cannot make network namespaces here: {e}")
    try:
        addr = f"{c.addr(0)}:{netcluster.PORT}"
        tf = {"cluster": {"ps": [addr], "worker": [f"{c.addr(1)}:{netcluster.PORT}"]},
              "task": {"type": "ps", "index": 0}}
        log = open(os.path.join(tmp, "ps.log"), "w")
        ps = c.popen(0, [os.path.join(bin_dir, "psserver")], stdout=log, stderr=subprocess.STDOUT,
                     env=dict(os.environ, TF_CONFIG=json.dumps(tf)))
        base = [probe, "--addr", addr, "--layers", LAYERS, "--deadline-ms", "20000"]
        deadline = time.monotonic() + 20
        while True:  # until the PS listens
            p = c.run(1, base + ["init", "1"], capture_output=True, text=True)
            if p.returncode == 0 or time.monotonic() > deadline or ps.poll() is not None:
                break
            time.sleep(0.2)
        check(p.returncode == 0, f"ps_probe init over the shaped link: {p.stdout.strip()}")
        want = MODEL_BYTES * WIRE * 8 / c.rate_bps
        for step in range(3):
            for what, argv in (("push", ["push", str(step), "0.001"]),
                               ("pull", ["pull", str(step + 1)])):
                p = c.run(1, base + argv, capture_output=True, text=True)
                check(p.returncode == 0 and '"ok":1' in p.stdout, f"step {step} {what}: "
                      f"{p.stdout.strip()} {p.stderr.strip()}")
                # The call's own time, as the probe measured it (the process's start,
                # slow under ASan, is not the link's).
                secs = json.loads(p.stdout.strip().splitlines()[-1])["ms"] / 1e3
                check(abs(secs / want - 1) <= 0.20,
                      f"step {step}: {what} of {MODEL_BYTES} bytes at 100 Mbit/s took "
                      f"{secs * 1e3:.0f} ms, bytes / rate {want * 1e3:.0f} ms "
                      f"(ratio {secs / want:.3f}; within 20 %)")
        ps.terminate()
        ps.wait(timeout=10)
        log.close()
    finally:
        c.close()
    check(not namespaces_of(c.tag + "-"), f"the namespaces are gone ({c.tag}-*)")


def train(bin_dir, tmp):
    base = [sys.executable, NETCLUSTER, "run", "--rate", "1gbit", "--ps", "1", "--workers", "2",
            "--bin-dir", bin_dir, "--timeout", "120"]
    args = ["--", "--epochs", "1", "--train-limit", "6000", "--test-limit", "1000"]
    p = run(base + args, expect_ok=False)
    if p.returncode == 77:
        skip(p.stderr.strip())
    check(p.returncode == 0 and "test accuracy" in p.stdout,
          f"1 PS + 2 workers on 3 namespaces at 1 Gbit/s: "
          f"{[x for x in p.stdout.splitlines() if 'test accuracy' in x]}")
    acc = float(p.stdout.split("test accuracy ")[1].split()[0])
    check(acc > 0.6, f"it learns (accuracy {acc:.4f} after one short epoch)")
    check("3 nodes at 1gbit" in p.stderr, "it says what it emulated")
    # A run whose chief fails (a bad flag): its status comes back, nothing is left.
    p = run(base + ["--", "--epochs", "0"], expect_ok=False)
    check(p.returncode not in (0, 77, 124), f"a failing chief's status is reported "
          f"({p.returncode})")
    left = [n for n in namespaces_of("psnc")
            if not netcluster._alive(int(n[4:].split("-")[0]))]
    check(not left, f"no namespace of a finished run is left ({left})")


if __name__ == "__main__":
    main(__doc__, {"shaping": shaping, "train": train}, "pstrain-netns-")
