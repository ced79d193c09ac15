#!/usr/bin/env python3
"""Start a local training cluster on 127.0.0.1 and supervise it.

  launch.py [--mode ps|local] [--ps N] [--workers N] [--evaluator] [--bin-dir DIR]
            [--timeout S] [--verbose] [pstrain options...]

PS mode starts N psserver processes and N pstrain workers, each with its own
TF_CONFIG (worker 0 is the chief). Ports are picked free; if a PS finds its
port taken meanwhile (exit status 3) the whole cluster is restarted on new
ports. When any process fails, the launcher names it, stops the others by PID
and exits non-zero; it never leaves a process behind. Options it does not
know go to pstrain (and the model options --layers / --min-partition-bytes
to psserver too).
"""
import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import time

PORT_TAKEN = 3  # psserver's exit status when it cannot bind


def free_ports(n):
    """n distinct ports that were free a moment ago."""
    socks, ports = [], []
    try:
        while len(ports) < n:
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
            ports.append(s.getsockname()[1])
    finally:
        for s in socks:
            s.close()
    return ports


def say(msg):
    print(f"launcher: {msg}", file=sys.stderr, flush=True)


class Cluster:
    def __init__(self, args, extra):
        self.args, self.extra = args, extra
        self.procs = []  # (name, Popen)

    def start(self):
        a = self.args
        ports = free_ports(a.ps + a.workers)
        ps = [f"127.0.0.1:{p}" for p in ports[: a.ps]]
        workers = [f"127.0.0.1:{p}" for p in ports[a.ps:]]
        cluster = {"ps": ps, "worker": workers}
        model_args = []
        it = iter(self.extra)
        for x in it:  # pass model options to the PS too
            key = x.split("=")[0]
            if key in ("--layers", "--min-partition-bytes"):
                model_args += [x] if "=" in x else [x, next(it, "")]
        for i in range(a.ps):
            self.spawn(f"ps {i}", [os.path.join(a.bin_dir, "psserver")] + model_args,
                       {"cluster": cluster, "task": {"type": "ps", "index": i}})
        # A PS that cannot bind exits at once: give them a moment to say so.
        deadline = time.monotonic() + 1.0
        while time.monotonic() < deadline:
            if any(p.poll() is not None for _, p in self.procs):
                break
            time.sleep(0.05)
        for name, p in self.procs:
            if p.poll() == PORT_TAKEN:
                return False
        if a.evaluator:
            self.spawn("evaluator", [os.path.join(a.bin_dir, "pstrain"), "--mode", "ps"]
                       + self.extra, {"cluster": cluster, "task": {"type": "evaluator",
                                                                   "index": 0}})
        for i in range(a.workers):
            wargs = ["--mode", "ps"] + self.extra
            if i > 0 and not a.verbose:
                wargs.append("--quiet")
            self.spawn(f"worker {i}", [os.path.join(a.bin_dir, "pstrain")] + wargs,
                       {"cluster": cluster, "task": {"type": "worker", "index": i}})
        return True

    def spawn(self, name, argv, tf_config):
        env = dict(os.environ, TF_CONFIG=json.dumps(tf_config))
        self.procs.append((name, subprocess.Popen(argv, env=env)))

    def stop(self, grace=5.0):
        for _, p in self.procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + grace
        for _, p in self.procs:
            try:
                p.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        self.procs = []

    def supervise(self, timeout):
        """0 when every process exits 0; 1 when one fails or time runs out."""
        start = time.monotonic()
        chief_done = None
        while True:
            running = 0
            for name, p in self.procs:
                rc = p.poll()
                if rc is None:
                    running += 1
                elif rc != 0:
                    what = f"signal {-rc}" if rc < 0 else f"status {rc}"
                    say(f"{name} (pid {p.pid}) exited with {what}; stopping the cluster")
                    self.stop()
                    return 1
                elif name == "worker 0" and chief_done is None:
                    chief_done = time.monotonic()
            if running == 0:
                return 0
            now = time.monotonic()
            if now - start > timeout:
                say(f"the run exceeded --timeout {timeout:.0f} s; stopping the cluster")
                self.stop()
                return 1
            if chief_done is not None and now - chief_done > 60:
                left = [n for n, p in self.procs if p.poll() is None]
                say(f"the chief finished but {', '.join(left)} did not exit within 60 s; "
                    "stopping them")
                self.stop()
                return 1
            time.sleep(0.05)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0], add_help=False)
    ap.add_argument("--mode", default="ps", choices=["ps", "local"])
    ap.add_argument("--ps", type=int, default=2)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--bin-dir", default=os.path.join(os.path.dirname(__file__), "..", "build",
                                                      "bin"))
    ap.add_argument("--timeout", type=float, default=3600.0)
    ap.add_argument("--verbose", action="store_true", help="progress lines from every worker")
    ap.add_argument("--evaluator", action="store_true",
                    help="also start an evaluator task (pulls and evaluates, never pushes)")
    ap.add_argument("--launcher-help", action="store_true")
    args, extra = ap.parse_known_args()
    if args.launcher_help:
        print(__doc__)
        return 0
    if "-h" in extra or "--help" in extra:
        print(__doc__)
        print("pstrain options:\n")
        sys.stdout.flush()
        return subprocess.call([os.path.join(args.bin_dir, "pstrain"), "--help"])
    if args.mode == "local":
        return subprocess.call([os.path.join(args.bin_dir, "pstrain"), "--mode", "local"] + extra)
    if args.ps < 1 or args.workers < 1:
        ap.error("--ps and --workers must be >= 1")
    cluster = Cluster(args, extra)

    def on_signal(sig, frame):
        say(f"got signal {sig}; stopping the cluster")
        cluster.stop()
        sys.exit(128 + sig)

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    for attempt in range(5):
        if cluster.start():
            break
        say("a PS port was taken meanwhile; restarting on new ports")
        cluster.stop()
    else:
        say("could not bind the PS ports after 5 attempts")
        return 1
    say(f"started {args.ps} PS and {args.workers} workers on 127.0.0.1 (pids "
        + ", ".join(f"{n}: {p.pid}" for n, p in cluster.procs) + ")")
    return cluster.supervise(args.timeout)


if __name__ == "__main__":
    sys.exit(main())
