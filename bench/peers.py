#!/usr/bin/env python3
"""peers.py - the PS against ps-lite, live, in the same window.

    bench/peers.py --pslite-src DIR [--build-dir build] [--rounds 6]
                   [--shapes 1x1,2x2] [--sizes 4K,1M,16M] [--mode sync]
                   [--op push-then-pull,push-pull] [--spin-us N] [--out FILE]

DIR is a source tree of ps-lite (github.com/dmlc/ps-lite; measured with commit 15b8adf):
its Makefile and include/ps/ps.h. It is copied into BUILD/peers/ps-lite and built there
with its own Makefile against Debian's libzmq3-dev and libprotobuf-dev/protobuf-compiler
(installed by scripts/install-deps.sh when missing; `make ps DEPS_PATH=/usr`), unmodified; bench/peers/pslite_bench_dense.cc (psbench's dense
push-then-pull workload on ps-lite's KVWorker/KVServer) is linked against it. Without
DIR (or PSLITE_SRC) this prints why and exits 0: the project builds and tests without it.

--op: push-then-pull (a push, then a pull, each waited for: the default) and/or push-pull
(one request that pushes and pulls back: ZPushPull on ps-lite, ps_client_push_pull on the PS,
what pstrain's sync steps use; both count a request as a push and a pull, and its bytes
both ways).

--spin-us N: the PS client's spin before it sleeps in a wait (psbench --spin-us,
pstrain --client-spin-us; default 0: none). ps-lite is run as it is.

Every round runs, for each op, shape and size, psbench (the PS and plain TCP: one run) and
ps-lite's cluster (1 scheduler, S servers, W workers on 127.0.0.1, ZeroMQ's TCP van), in
alternating order from round to round. Iterations are psbench's: 4 KiB 3000 timed + 300
warm-up, up to 4 MiB 300 + 30, beyond 40 + 5. Each window records the load average and the
CPU time other processes took during it (bench/window.py: the machine's busy time from
/proc/stat minus the benchmark's own processes, from their rusage): a window where others
used more than 0.2 cores is flagged and left out of the medians. Output: one JSON line per run, then one
summary line per configuration: medians of GB/s for the PS, plain TCP and ps-lite, the
ratios as medians of the per-round ratios (the two runs of a round are seconds apart), and
each system's spread ((max - min) / median; flagged when over 20 %, i.e. beyond +-10 %).
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
from window import Window  # noqa: E402  (bench/window.py)
sys.path.insert(0, os.path.join(HERE, "..", "scripts"))
from launch import free_ports  # noqa: E402  (outside the ephemeral range)


def say(msg):
    print(f"peers.py: {msg}", file=sys.stderr, flush=True)


def size_of(text):
    t = text.strip().upper().rstrip("B").rstrip("I")
    mult = 1 << 20 if t.endswith("M") else 1 << 10 if t.endswith("K") else 1
    return int(t.rstrip("MK")) * mult


def iters_for(nbytes):
    """psbench's iteration counts (timed, warm-up)."""
    if nbytes <= 64 << 10:
        return 3000, 300
    if nbytes <= 4 << 20:
        return 300, 30
    return 40, 5


def build_pslite(src, build_dir):
    """BUILD/peers/bench_dense (ps-lite built once, the program again when its source
    changed); None (with a message) if it cannot be."""
    out = os.path.join(build_dir, "peers")
    exe = os.path.join(out, "bench_dense")
    prog = os.path.join(HERE, "peers", "pslite_bench_dense.cc")
    tree = os.path.join(out, "ps-lite")
    lib = os.path.join(tree, "build", "libps.a")
    if os.path.exists(exe) and os.path.getmtime(exe) >= os.path.getmtime(prog):
        return exe
    if os.path.exists(lib):
        link_bench(tree, prog, exe)
        return exe
    needs = (("/usr/include/zmq.h", "libzmq3-dev"), ("/usr/bin/protoc", "protobuf-compiler"),
             ("/usr/include/google/protobuf/message.h", "libprotobuf-dev"))
    if any(not os.path.exists(f) for f, _ in needs):
        # As bench/allreduce.sh does for Open MPI: the project's installer, given names.
        subprocess.run([os.path.join(ROOT, "scripts", "install-deps.sh"), *(p for _, p in needs)])
    for f, what in needs:
        if not os.path.exists(f):
            say(f"skipped: ps-lite needs {what}, which could not be installed")
            return None
    if os.path.exists(tree):
        shutil.rmtree(tree)
    shutil.copytree(src, tree)
    say(f"building ps-lite from {src} in {tree} (its Makefile, DEPS_PATH=/usr)")
    subprocess.run(["make", "ps", "DEPS_PATH=/usr", "-j2"], cwd=tree, check=True,
                   stdout=subprocess.DEVNULL)
    link_bench(tree, prog, exe)
    return exe


def link_bench(tree, prog, exe):
    subprocess.run(["g++", "-std=c++11", "-O3", "-msse2", "-pthread", "-I",
                    os.path.join(tree, "include"), prog, os.path.join(tree, "build", "libps.a"),
                    "-lzmq", "-lprotobuf", "-o", exe], check=True)


def run_pslite(exe, ns, nw, nbytes, iters, warmup, mode, op, timeout):
    """One ps-lite cluster; its result dict (ok False with a reason on failure)."""
    port = free_ports(1)[0]
    env = dict(os.environ, DMLC_NUM_SERVER=str(ns), DMLC_NUM_WORKER=str(nw),
               DMLC_PS_ROOT_URI="127.0.0.1", DMLC_PS_ROOT_PORT=str(port),
               DMLC_NODE_HOST="127.0.0.1")
    args = [exe, str(nbytes), str(iters), str(warmup), mode, "1", op]
    procs = []
    for role, n in (("scheduler", 1), ("server", ns), ("worker", nw)):
        for _ in range(n):
            procs.append((role, subprocess.Popen(args, env=dict(env, DMLC_ROLE=role),
                                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                                 text=True)))
    deadline = time.monotonic() + timeout
    outs, failed = [], None
    for role, p in procs:
        try:
            out, err = p.communicate(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            failed = f"{role} still running after {timeout} s"
            break
        if p.returncode != 0 and failed is None:
            failed = f"{role} exited {p.returncode}: {err.strip().splitlines()[-1:] }"
        outs.append(out)
    for _, p in procs:  # By PID, never by name.
        if p.poll() is None:
            p.kill()
            p.wait()
    rs = []
    for out in outs:
        for line in out.splitlines():
            if line.startswith("RESULT"):
                rs.append(dict(kv.split("=", 1) for kv in line.split()[1:]))
    res = {"system": "ps-lite", "servers": ns, "workers": nw, "mode": mode, "op": op,
           "bytes": nbytes, "iters": iters, "warmup": warmup}
    if failed or len(rs) != nw or any(int(r["verify_bad"]) for r in rs):
        res.update(ok=False, why=failed or f"{len(rs)} of {nw} workers reported, or verify failed")
        return res
    t = max(float(r["elapsed_s"]) for r in rs)
    res.update(ok=True, gbps=nw * iters * 2 * nbytes / t / 1e9, ops_per_sec=nw * iters * 2 / t,
               push_ms=sum(float(r["push_s"]) for r in rs) / nw / iters * 1e3,
               pull_ms=sum(float(r["pull_s"]) for r in rs) / nw / iters * 1e3)
    return res


def run_psbench(psbench, ns, nw, nbytes, mode, op, spin_us, timeout):
    p = subprocess.run([psbench, "--shapes", f"{ns}x{nw}", "--modes", mode, "--sizes",
                        str(nbytes), "--repeats", "1", "--timeout", str(timeout), "--op", op,
                        "--spin-us", str(spin_us)],
                       capture_output=True, text=True, timeout=timeout + 30)
    lines = [json.loads(l) for l in p.stdout.splitlines() if l.startswith("{")]
    res = {"system": "psbench", "servers": ns, "workers": nw, "mode": mode, "op": op,
           "spin_us": spin_us, "bytes": nbytes}
    if p.returncode != 0 or len(lines) != 1 or lines[0].get("check") != "ok":
        res.update(ok=False, why=(lines[0].get("check") if lines else p.stderr.strip()[-300:]))
        return res
    r = lines[0]
    res.update(ok=True, gbps=r["gbps"], ops_per_sec=r["ops_per_sec"], push_ms=r["push_ms"],
               pull_ms=r["pull_ms"], tcp_gbps=r["tcp_gbps"], iters=r["iters"],
               warmup=r["warmup"])
    return res


def median(v):
    v = sorted(v)
    n = len(v)
    return None if n == 0 else v[n // 2] if n % 2 else (v[n // 2 - 1] + v[n // 2]) / 2


def spread(v):
    m = median(v)
    return None if not v or not m else (max(v) - min(v)) / m


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pslite-src", default=os.environ.get("PSLITE_SRC"),
                    help="a ps-lite source tree (or PSLITE_SRC)")
    ap.add_argument("--build-dir", default=os.path.join(ROOT, "build"))
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--shapes", default="1x1,2x2")
    ap.add_argument("--sizes", default="4K,1M,16M")
    ap.add_argument("--mode", choices=("sync", "async"), default="sync")
    ap.add_argument("--spin-us", type=int, default=0,
                    help="the PS client's spin before sleeping in a wait (psbench --spin-us)")
    ap.add_argument("--op", default="push-then-pull",
                    help="push-then-pull, push-pull, or both (comma-separated)")
    ap.add_argument("--timeout", type=int, default=300, help="bound on one run, seconds")
    ap.add_argument("--out", help="also write the JSON lines here")
    a = ap.parse_args()
    src = a.pslite_src
    if not src or not os.path.exists(os.path.join(src, "include", "ps", "ps.h")):
        say("skipped: no ps-lite source tree (give --pslite-src DIR or PSLITE_SRC: a checkout "
            "of github.com/dmlc/ps-lite with its Makefile and include/ps/ps.h)")
        return 0
    psbench = os.path.join(a.build_dir, "bench", "psbench")
    if not os.access(psbench, os.X_OK):
        say(f"no {psbench}: build the project first (scripts/build.sh {a.build_dir})")
        return 1
    exe = build_pslite(os.path.abspath(src), a.build_dir)
    if not exe:
        return 0
    ops = a.op.split(",")
    if any(o not in ("push-then-pull", "push-pull") for o in ops):
        say(f"--op: push-then-pull and/or push-pull, not {a.op}")
        return 2
    shapes = [tuple(int(x) for x in s.split("x")) for s in a.shapes.split(",")]
    sizes = [size_of(s) for s in a.sizes.split(",")]
    out = open(a.out, "w") if a.out else None

    def emit(d):
        line = json.dumps(d)
        print(line, flush=True)
        if out:
            out.write(line + "\n")
            out.flush()

    runs = {}
    failed = 0
    for rnd in range(a.rounds):
        for op in ops:
            for ns, nw in shapes:
                for nbytes in sizes:
                    iters, warmup = iters_for(nbytes)
                    order = ("psbench", "ps-lite") if rnd % 2 == 0 else ("ps-lite", "psbench")
                    for system in order:
                        with Window() as w:
                            if system == "psbench":
                                r = run_psbench(psbench, ns, nw, nbytes, a.mode, op, a.spin_us,
                                                a.timeout)
                            else:
                                r = run_pslite(exe, ns, nw, nbytes, iters, warmup, a.mode, op,
                                               a.timeout)
                        r.update(round=rnd, **w.fields())
                        failed += not r["ok"]
                        emit(r)
                        runs.setdefault((op, ns, nw, nbytes), {}).setdefault(rnd, {})[system] = r
    for (op, ns, nw, nbytes), by_round in runs.items():
        keep = [rd for rd in by_round.values()
                if all(s in rd and rd[s]["ok"] and not rd[s]["busy"] for s in ("psbench", "ps-lite"))]
        ps = [rd["psbench"]["gbps"] for rd in keep]
        tcp = [rd["psbench"]["tcp_gbps"] for rd in keep]
        pl = [rd["ps-lite"]["gbps"] for rd in keep]
        pl_ops = [rd["ps-lite"]["ops_per_sec"] for rd in keep]
        ps_ops = [rd["psbench"]["ops_per_sec"] for rd in keep]
        sp = {k: spread(v) for k, v in (("psbench", ps), ("tcp", tcp), ("ps-lite", pl))}
        cpus = len(os.sched_getaffinity(0))
        emit({"summary": True, "op": op, "spin_us": a.spin_us, "servers": ns, "workers": nw,
              "mode": a.mode, "cpus": cpus, "oversubscribed": ns + nw > cpus,
              "bytes": nbytes,
              "rounds": len(by_round), "rounds_kept": len(keep),
              "ps_gbps": median(ps), "tcp_gbps": median(tcp), "pslite_gbps": median(pl),
              "ps_ops_per_sec": median(ps_ops), "pslite_ops_per_sec": median(pl_ops),
              "ps_to_pslite": median([p / q for p, q in zip(ps, pl)]),
              "ps_to_tcp": median([p / q for p, q in zip(ps, tcp)]),
              "pslite_to_tcp": median([p / q for p, q in zip(pl, tcp)]),
              "spread": {k: None if v is None else round(v, 3) for k, v in sp.items()},
              "spread_over_20pct": sorted(k for k, v in sp.items() if v is not None and v > 0.2)})
    if out:
        out.close()
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
