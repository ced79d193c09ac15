#!/usr/bin/env python3
"""An emulated cluster on one host: one network namespace per node, shaped links.

  netcluster.py run --nodes N --rate RATE [--delay-ms D] [--ps P] [--workers W]
                    [--layout separate|colocated] [--mode ps|allreduce] [--bin-dir DIR]
                    [--timeout S] [--keep-logs DIR] [-- pstrain options...]
  netcluster.py check [--rate RATE] [--mb M]    shape 2 nodes, time a transfer
  netcluster.py cleanup                          remove what dead runs left behind

Every node is a network namespace with one interface, eth0 (10.88.0.<i+1>/24),
the end of a veth pair whose other end joins a bridge in a hub namespace: a
switch with one port per node. Each node's link is shaped both ways with tbf
(the node's egress on eth0, its ingress on the hub's port towards it), so a
node sends and receives at most RATE, as a NIC of that speed does. Nothing is
made in the host's own namespace: the traffic stays inside these namespaces.

Delay: where the kernel has netem (detected at start) --delay-ms D adds D ms
to each node's egress (one way node to node: D; a round trip: 2D). Where it
has not (tc: "Specified qdisc kind is unknown"), a delay cannot be added: the
cluster runs without it, says so, and records delay_emulated = false, so the
cost model has to carry the latency.

Rates are tc's: 100mbit, 1gbit, 10gbit (presets 1g and 10g are the same).

TCP congestion control between the nodes is cubic, Linux's default, whatever
the host uses (--cc; set on each node's route, as a namespace may refuse the
sysctl): on a host running bbr, 4 flows pushing into one shaped link shared it
unevenly (the slowest at a median 0.61 of their mean rate, 50 ms windows;
cubic 0.78), which a sync step's slowest worker pays for.

`run` starts psserver and pstrain processes inside the namespaces, each with a
TF_CONFIG naming the namespaces' addresses (port 5000 in every node: each
namespace has its own ports), authenticated with fresh tokens like
scripts/launch.py, waits for the chief, and prints its result. Layout
`separate` puts every PS and every worker on a node of its own (nodes = P + W);
`colocated` puts PS i on worker i's node (nodes = W), as a PS per machine does.

Everything made (namespaces, interfaces, qdiscs, processes, token files) is
removed on exit, also on failure, SIGTERM or Ctrl-C; processes are stopped by
PID. Namespaces are named psnc<PID>-..., so `cleanup` can remove those of a
run whose process no longer exists (one killed by SIGKILL). Root is needed
(ip netns); without it, or where namespaces are not permitted, this says so
and exits with status 77 (a test then counts as skipped).
"""
import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from launch import stop_process, write_token  # noqa: E402  (as a local cluster's)
from costmodel import PRESETS, rate_bits  # noqa: E402

SUBNET = "10.88.0"
PORT = 5000
UNSUPPORTED = 77


DEFAULT_CC = "cubic"  # Linux's default (see above)


def host_cc():
    try:
        with open("/proc/sys/net/ipv4/tcp_congestion_control") as f:
            return f.read().strip()
    except OSError:
        return None


class Unsupported(Exception):
    """Namespaces cannot be made here (not root, or not permitted)."""


def _ip(*args, check=True):
    try:
        p = subprocess.run(["ip", *args], capture_output=True, text=True)
    except FileNotFoundError:
        raise Unsupported("no ip command (Debian's iproute2)")
    if check and p.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {p.stderr.strip()}")
    return p


def _tc(ns, *args, check=True):
    p = subprocess.run(["ip", "netns", "exec", ns, "tc", *args], capture_output=True, text=True)
    if check and p.returncode != 0:
        raise RuntimeError(f"tc {' '.join(args)} (in {ns}): {p.stderr.strip()}")
    return p


def _alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def cleanup_stale():
    """Remove the namespaces of netcluster runs whose process is gone. Returns their names."""
    out = _ip("netns", "list", check=False).stdout
    gone = []
    for line in out.splitlines():
        name = line.split()[0] if line.strip() else ""
        m = re.fullmatch(r"psnc(\d+)-\w+", name)
        if m and not _alive(int(m.group(1))):
            _ip("netns", "del", name, check=False)
            gone.append(name)
    return gone


class NetCluster:
    """N namespaces joined by a bridge, each node's link shaped to rate (both ways).

    Use as a context manager: everything is made on entry and removed on exit.
    addr(i) is node i's address; popen(i, argv, ...) starts a process inside node i.
    """

    def __init__(self, nodes, rate="1gbit", delay_ms=0.0, say=None, cc=DEFAULT_CC):
        if nodes < 1 or nodes > 250:
            raise ValueError("nodes: 1 to 250")
        self.nodes, self.rate, self.delay_ms = nodes, PRESETS.get(rate, rate), float(delay_ms)
        self.rate_bps = rate_bits(self.rate)
        self.tag = f"psnc{os.getpid()}"
        self.hub = f"{self.tag}-hub"
        self.names = [f"{self.tag}-n{i}" for i in range(nodes)]
        self.made = []
        self.procs = []
        self.netem = False
        self.delay_emulated = False
        self.cc = cc  # TCP congestion control on the nodes' routes (None: the host's)
        self.say = say or (lambda msg: print(f"netcluster: {msg}", file=sys.stderr, flush=True))
        self._old_handlers = {}

    # ---------------------------------------------------------------- setup
    def __enter__(self):
        if os.geteuid() != 0:
            raise Unsupported("network namespaces need root (ip netns add)")
        for sig in (signal.SIGTERM, signal.SIGHUP):
            self._old_handlers[sig] = signal.signal(sig, self._on_signal)
        try:
            self._make()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc):
        self.close()
        return False

    def _on_signal(self, signum, frame):
        raise SystemExit(128 + signum)  # __exit__ runs and removes everything

    def _make(self):
        p = _ip("netns", "add", self.hub, check=False)
        if p.returncode != 0:
            raise Unsupported(f"ip netns add: {p.stderr.strip()}")
        self.made.append(self.hub)
        _ip("-n", self.hub, "link", "set", "lo", "up")
        p = _ip("-n", self.hub, "link", "add", "br0", "type", "bridge", check=False)
        if p.returncode != 0:
            raise Unsupported(f"ip link add type bridge: {p.stderr.strip()}")
        _ip("-n", self.hub, "link", "set", "br0", "up")
        if _tc(self.hub, "qdisc", "add", "dev", "lo", "root", "tbf", "rate", "1gbit", "burst",
               "64k", "limit", "256k", check=False).returncode != 0:
            raise Unsupported("tc cannot add a tbf qdisc (sch_tbf)")
        _tc(self.hub, "qdisc", "del", "dev", "lo", "root", check=False)
        self.netem = _tc(self.hub, "qdisc", "add", "dev", "lo", "root", "netem", "delay", "1ms",
                         check=False).returncode == 0
        if self.netem:
            _tc(self.hub, "qdisc", "del", "dev", "lo", "root", check=False)
        if self.delay_ms > 0 and not self.netem:
            self.say(f"this kernel has no netem: --delay-ms {self.delay_ms:g} is not emulated "
                     "(links are rate-shaped only; the cost model carries the latency)")
        self.delay_emulated = self.delay_ms > 0 and self.netem
        for i, ns in enumerate(self.names):
            _ip("netns", "add", ns)
            self.made.append(ns)
            _ip("link", "add", "eth0", "netns", ns, "type", "veth", "peer", "name", f"h{i}",
                "netns", self.hub)
            _ip("-n", ns, "addr", "add", f"{self.addr(i)}/24", "dev", "eth0")
            _ip("-n", ns, "link", "set", "eth0", "up")
            _ip("-n", ns, "link", "set", "lo", "up")
            if self.cc:
                # On the subnet's route (per-namespace sysctls may be refused):
                # both ends of every connection between nodes then use it.
                p = _ip("-n", ns, "route", "replace", f"{SUBNET}.0/24", "dev", "eth0", "proto",
                        "kernel", "scope", "link", "src", self.addr(i), "congctl", self.cc,
                        check=False)
                if p.returncode != 0:
                    self.say(f"TCP congestion control {self.cc} refused "
                             f"({p.stderr.strip()}): the host's, {host_cc()}, instead")
                    self.cc = None
            _ip("-n", self.hub, "link", "set", f"h{i}", "master", "br0")
            _ip("-n", self.hub, "link", "set", f"h{i}", "up")
            self._shape(ns, "eth0", self.delay_emulated)
            self._shape(self.hub, f"h{i}", False)

    def _shape(self, ns, dev, delay):
        """tbf at the rate on dev's egress (under netem's delay when asked)."""
        byte_rate = self.rate_bps / 8
        # A bucket of at least 1 ms at the rate and 64 KiB (a GSO packet is
        # segmented by tbf when larger, but a small bucket costs throughput);
        # a queue of 50 ms at the rate, at least 256 KiB.
        burst = max(64 << 10, int(byte_rate * 1e-3))
        limit = max(256 << 10, int(byte_rate * 0.05))
        tbf = ["tbf", "rate", self.rate, "burst", str(burst), "limit", str(limit)]
        if delay:
            _tc(ns, "qdisc", "add", "dev", dev, "root", "handle", "1:", "netem", "delay",
                f"{self.delay_ms}ms", "limit", "100000")
            _tc(ns, "qdisc", "add", "dev", dev, "parent", "1:", "handle", "2:", *tbf)
        else:
            _tc(ns, "qdisc", "add", "dev", dev, "root", "handle", "1:", *tbf)

    # ------------------------------------------------------------------ use
    def addr(self, i):
        return f"{SUBNET}.{i + 1}"

    def popen(self, i, argv, **kw):
        """Start argv inside node i (ip netns exec execs it: the PID is the process's)."""
        p = subprocess.Popen(["ip", "netns", "exec", self.names[i], *argv], **kw)
        self.procs.append(p)
        return p

    def run(self, i, argv, timeout=120, **kw):
        p = subprocess.run(["ip", "netns", "exec", self.names[i], *argv], timeout=timeout, **kw)
        return p

    def info(self):
        return {"nodes": self.nodes, "rate": self.rate, "rate_bps": self.rate_bps,
                "delay_ms": self.delay_ms, "delay_emulated": self.delay_emulated,
                "netem": self.netem, "cc": self.cc or host_cc()}

    def link_stats(self):
        """Counters since the cluster was made: packets the shaping queues dropped
        (every tbf, both directions of every link) and, summed over the nodes, TCP's
        retransmitted segments and retransmission timeouts. A transfer that lost
        packets at a full queue waits for TCP to recover, which a cost model of ideal
        links does not have."""
        drops = 0
        for ns in [self.hub, *self.names]:
            out = _tc(ns, "-s", "qdisc", "show", check=False).stdout
            drops += sum(int(m) for m in re.findall(r"dropped (\d+)", out))
        retrans = timeouts = 0
        for i in range(self.nodes):
            p = self.run(i, ["cat", "/proc/net/snmp", "/proc/net/netstat"], timeout=10,
                         capture_output=True, text=True)
            lines = p.stdout.splitlines()
            for head, vals in zip(lines, lines[1:]):
                k, v = head.split(), vals.split()
                if not k or k[0] != v[0] or k[0] not in ("Tcp:", "TcpExt:"):
                    continue
                c = dict(zip(k[1:], v[1:]))
                retrans += int(c.get("RetransSegs", 0))
                timeouts += int(c.get("TCPTimeouts", 0))
        return {"link_drops": drops, "tcp_retrans": retrans, "tcp_timeouts": timeouts}

    # -------------------------------------------------------------- removal
    def close(self):
        for p in self.procs:
            if p.poll() is None:
                p.terminate()
        deadline = time.monotonic() + 5
        for p in self.procs:
            try:
                p.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        self.procs = []
        # Deleting a namespace removes its interfaces (and their qdiscs).
        for ns in reversed(self.made):
            _ip("netns", "del", ns, check=False)
        self.made = []
        for sig, h in self._old_handlers.items():
            signal.signal(sig, h)
        self._old_handlers = {}

    def existing(self):
        """This cluster's namespaces that exist now (none after close)."""
        out = _ip("netns", "list", check=False).stdout
        return [line.split()[0] for line in out.splitlines()
                if line.strip() and line.split()[0].startswith(self.tag + "-")]


# ------------------------------------------------------------------ commands
def place(mode, nps, nworkers, layout):
    """(nodes needed, the node of each PS, the node of each worker)."""
    nps = nps if mode == "ps" else 0
    if layout == "separate":
        return nps + nworkers, list(range(nps)), list(range(nps, nps + nworkers))
    if nps > nworkers:
        raise ValueError("--layout colocated needs --ps <= --workers")
    return nworkers, list(range(nps)), list(range(nworkers))


def train(c, bin_dir, mode, nps, nworkers, layout, worker_args, logs, timeout,
          chief_args=(), ps_args=(), step_logs=False):
    """Run a PS or allreduce cluster in c's nodes until the chief exits; its status.

    Tokens are fresh (a private directory, removed after); process i's output goes to
    logs/ps<i>.log and logs/worker<i>.log (with step_logs, worker i's per-step JSON
    log to logs/steps-worker<i>.jsonl). The PS processes keep their checkpoints
    under logs/data. Returns (status, seconds): 124 when timeout passed, the first
    failing process's status when one failed first."""
    nps = nps if mode == "ps" else 0
    _, ps_node, w_node = place(mode, nps, nworkers, layout)
    secret = tempfile.mkdtemp(prefix="netcluster-")
    started = []
    try:
        auth, admin = write_token(secret, "worker.token"), write_token(secret, "admin.token")
        ps = [f"{c.addr(n)}:{PORT}" for n in ps_node]
        wk = [f"{c.addr(n)}:{PORT + 1}" for n in w_node]
        cluster = {"worker": wk, **({"ps": ps} if ps else {})}
        os.makedirs(logs, exist_ok=True)

        def start(node, argv, task, log):
            env = dict(os.environ, TF_CONFIG=json.dumps({"cluster": cluster, "task": task}))
            f = open(os.path.join(logs, log), "w")
            p = c.popen(node, argv, env=env, stdout=f, stderr=subprocess.STDOUT)
            started.append((log, p, f))
            return p

        t0 = time.monotonic()
        for i, n in enumerate(ps_node):
            start(n, [os.path.join(bin_dir, "psserver"), "--auth-token-file", auth,
                      "--admin-token-file", admin, "--data-dir", os.path.join(logs, "data"),
                      *ps_args], {"type": "ps", "index": i}, f"ps{i}.log")
        worker_args = list(worker_args)
        if mode == "allreduce" and not any(x.startswith("--ring-transport") for x in worker_args):
            # The nodes share this host: 'auto' would pick shared memory between them,
            # past the shaped links.
            worker_args += ["--ring-transport", "tcp"]
        chief = None
        for i, n in enumerate(w_node):
            argv = [os.path.join(bin_dir, "pstrain"), "--mode", mode, "--auth-token-file", auth]
            argv += (["--admin-token-file", admin, *chief_args] if i == 0 else ["--quiet"])
            if step_logs:
                argv += ["--log", os.path.join(logs, f"steps-worker{i}.jsonl")]
            p = start(n, argv + list(worker_args), {"type": "worker", "index": i},
                      f"worker{i}.log")
            chief = chief or p
        deadline = t0 + timeout
        rc = None
        while time.monotonic() < deadline:
            failed = [(log, p.returncode) for log, p, _ in started
                      if p.poll() is not None and p.returncode != 0]
            if failed:
                c.say(f"{failed[0][0]} exited with status {failed[0][1]}")
                rc = failed[0][1] if failed[0][1] > 0 else 1
                break
            if chief.poll() is not None:
                rc = chief.returncode
                break
            time.sleep(0.05)
        if rc is None:
            c.say(f"timed out after {timeout:g} s")
            rc = 124
        secs = time.monotonic() - t0
        # The PS processes exit after the chief's Shutdown; give them a moment.
        end = time.monotonic() + 10
        for _, p, _ in started:
            try:
                p.wait(timeout=max(0.1, end - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
        return rc, secs
    finally:
        for _, p, f in started:
            stop_process(p)
            f.close()
        shutil.rmtree(secret, ignore_errors=True)


def cmd_run(a, extra):
    """A PS or allreduce cluster in the namespaces; the chief's exit status."""
    try:
        need, _, _ = place(a.mode, a.ps, a.workers, a.layout)
    except ValueError as e:
        sys.exit(f"netcluster: {e}")
    nodes = a.nodes or need
    if nodes < need:
        sys.exit(f"netcluster: {a.ps} PS and {a.workers} workers ({a.layout}) need {need} nodes")
    logs = a.keep_logs or tempfile.mkdtemp(prefix="netcluster-logs-")
    try:
        with NetCluster(nodes, a.rate, a.delay_ms, cc=a.cc or None) as c:
            nps = a.ps if a.mode == "ps" else 0
            c.say(f"{nodes} nodes at {c.rate}" +
                  (f", {a.delay_ms:g} ms delay" if c.delay_emulated else "") +
                  f": {nps} PS, {a.workers} workers ({a.layout})" +
                  (f", logs in {logs}" if a.keep_logs else ""))
            rc, _ = train(c, a.bin_dir, a.mode, a.ps, a.workers, a.layout, extra, logs,
                          a.timeout, ps_args=a.ps_arg)
            with open(os.path.join(logs, "worker0.log")) as f:
                sys.stdout.write(f.read())
            return rc
    finally:
        if not a.keep_logs:
            shutil.rmtree(logs, ignore_errors=True)


def cmd_check(a):
    """Two nodes at the rate: time MB megabytes one way over TCP (Python sockets)."""
    with NetCluster(2, a.rate, cc=a.cc or None) as c:
        nbytes = int(a.mb * (1 << 20))
        server = ("import socket,sys\ns=socket.socket();s.setsockopt(socket.SOL_SOCKET,"
                  "socket.SO_REUSEADDR,1);s.bind(('%s',%d));s.listen(1);print('up',flush=True)\n"
                  "k,_=s.accept();n=0\nwhile True:\n  b=k.recv(1<<20)\n  if not b: break\n"
                  "  n+=len(b)\nk.sendall(b'x');print(n)\n" % (c.addr(1), PORT))
        srv = c.popen(1, [sys.executable, "-c", server], stdout=subprocess.PIPE, text=True)
        srv.stdout.readline()
        client = ("import socket,time\ns=socket.create_connection(('%s',%d));buf=bytes(1<<20)\n"
                  "t=time.monotonic();left=%d\nwhile left>0:\n  n=min(left,len(buf));"
                  "s.sendall(buf[:n]);left-=n\ns.shutdown(socket.SHUT_WR);s.recv(1)\n"
                  "print(time.monotonic()-t)\n" % (c.addr(1), PORT, nbytes))
        p = c.run(0, [sys.executable, "-c", client], capture_output=True, text=True)
        secs = float(p.stdout.strip())
        got = int(srv.stdout.readline())
        srv.wait(timeout=10)
        want = nbytes * 8 / c.rate_bps
        print(json.dumps({**c.info(), "bytes": got, "seconds": round(secs, 4),
                          "bytes_over_rate_s": round(want, 4), "ratio": round(secs / want, 3)}))
    return 0


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog=__doc__.split("\n\n", 1)[1])
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="a PS or allreduce training cluster in the namespaces")
    r.add_argument("--nodes", type=int, default=0, help="default: as many as the layout needs")
    r.add_argument("--rate", default="1gbit", help="each node's link: 100mbit, 1gbit, 10gbit")
    r.add_argument("--delay-ms", type=float, default=0.0, help="one-way, where netem exists")
    r.add_argument("--cc", default=DEFAULT_CC,
                   help=f"TCP congestion control between the nodes (default {DEFAULT_CC}, "
                        "Linux's; '' for the host's)")
    r.add_argument("--mode", choices=["ps", "allreduce"], default="ps")
    r.add_argument("--ps", type=int, default=1)
    r.add_argument("--workers", type=int, default=2)
    r.add_argument("--layout", choices=["separate", "colocated"], default="separate")
    r.add_argument("--bin-dir", default=os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                                     "..", "..", "build", "bin"))
    r.add_argument("--ps-arg", action="append", default=[], help="pass ARG to every psserver")
    r.add_argument("--timeout", type=float, default=600)
    r.add_argument("--keep-logs", help="write the processes' logs here (kept)")
    k = sub.add_parser("check", help="shape two nodes and time a transfer between them")
    k.add_argument("--rate", default="100mbit")
    k.add_argument("--mb", type=float, default=10)
    k.add_argument("--cc", default=DEFAULT_CC, help="as for run")
    sub.add_parser("cleanup", help="remove the namespaces of runs whose process is gone")
    argv = sys.argv[1:]
    extra = []
    if "--" in argv:
        k = argv.index("--")
        argv, extra = argv[:k], argv[k + 1:]
    a = ap.parse_args(argv)
    try:
        if a.cmd == "cleanup":
            for name in cleanup_stale():
                print(f"removed {name}")
            return 0
        if a.cmd == "check":
            return cmd_check(a)
        return cmd_run(a, extra)
    except Unsupported as e:
        print(f"netcluster: cannot emulate a cluster here: {e}", file=sys.stderr)
        return UNSUPPORTED
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
