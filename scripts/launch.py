#!/usr/bin/env python3
"""Start a local training cluster on 127.0.0.1 and supervise it.

  launch.py [--mode ps|allreduce|local] [--ps N] [--workers N] [--evaluator] [--bin-dir DIR]
            [--checkpoint-dir DIR] [--checkpoint-every K] [--max-ps-restarts N]
            [--max-worker-restarts N] [--ps-memory-mb X] [--ps-arg ARG]...
            [--chaos-kill-ps STEP | --chaos-kill-worker STEP [--chaos-seed S]
             | --chaos-kill WHEN:WHO[,WHO...]]
            [--timeout S] [--verbose] [--no-auth | --auth-token-file F
            [--admin-token-file F]] [pstrain options...]

PS mode starts N psserver processes and N pstrain workers, each with its own
TF_CONFIG (worker 0 is the chief). Ports are picked free, below the kernel's
ephemeral range; if a PS, or the allreduce chief before anything ran, finds
its port taken meanwhile (exit status 3) the whole cluster is restarted on new
ports. The PS processes checkpoint every K versions into DIR/shard-<i> (a
temporary directory when --checkpoint-dir is not given: removed at the end of
a run that succeeds, kept and named, to resume from, when one fails). A PS
that dies (a signal, or an exit status of 128 or more: retryable) is started
again on the same port and directory (up to --max-ps-restarts times each);
one that exits 1-127 (bad configuration, a failure a restart would repeat) is
not, and the run stops naming why. A restarted PS restores its newest checkpoint, the chief
rolls every shard back to the newest version they all have, and training
goes on. In PS mode a worker that dies the same way (the chief included) is
started again too (up to --max-worker-restarts times each): it rejoins at the
shards' version (sync; async: after its own last step the shards have) and
its place in the data (with pstrain's --sync backup, a worker not started
again is left out: the shards close the steps without it). In allreduce mode a dead worker is started again the
same way: the survivors form the ring again with it (pstrain's
--worker-timeout and --min-workers say how long they wait for it and whether
they may go on without it), and it takes their parameters. When a process fails for good, the launcher names it,
stops the others by PID and exits non-zero; it never leaves a process behind.
--chaos-kill-ps STEP kills one PS (chosen by --chaos-seed) with SIGKILL once
the chief has logged step STEP, to test exactly that; --chaos-kill-worker STEP
a worker (one other than the chief once it has also logged a step of its own);
--chaos-kill WHEN:WHO,... the named processes together (WHO: ps<i> or
worker<i>, worker0 being the chief; WHEN: a step of the chief's, or @SECONDS
after the start, e.g. 40:ps1,worker1 or @0.5:worker0). Options it does not
know go to pstrain (psserver needs none: the chief's Initialize tells every
shard the model); --log FILE gives worker i > 0 FILE.worker<i>.

Every run is authenticated: the launcher makes two random tokens (files of
mode 0600 in a private temporary directory, removed at the end), gives the
PS both, the chief both, and the other workers and the evaluator the
workers' token only, so that no process but the chief can initialise, roll
back or shut down a shard (--auth-token-file/--admin-token-file: use these
instead; --no-auth: none, as before).
"""
import argparse
import json
import os
import random
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

# Exit statuses (common/cm_status.h, docs/ARCHITECTURE.md "Exit statuses"): 1-127 are
# permanent (a restart as is fails again), 128 and up retryable (signals: 128 + N, which
# Python reports as -N). psserver exits 3 when it cannot bind its port.
PORT_TAKEN = 3
REROLL = "reroll"  # supervise(): the chief's port was taken before anything ran
EXIT_MEANING = {1: "the run failed", 2: "bad arguments or configuration",
                3: "its port is taken", 138: "an I/O failure while running"}


def retryable(rc):
    """Whether a process that exited with rc may succeed if started again."""
    return rc < 0 or rc >= 128


def ephemeral_range():
    """The kernel's range for the source ports of outgoing connections."""
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            lo, hi = (int(x) for x in f.read().split())
            return lo, hi
    except (OSError, ValueError):
        return 32768, 60999


def free_ports(n):
    """n distinct ports of 127.0.0.1, free a moment ago, outside the ephemeral range.

    A port the kernel hands out for bind(0) comes from the range it also uses for the
    source port of every outgoing connection, so between this check and the server's
    own bind any process's connect() may take it (seen in CI: "address in use" with
    tests running side by side). Ports below that range are only ever taken by an
    explicit bind, so the window is closed to everything but another explicit pick."""
    lo, hi = ephemeral_range()
    span = (10000, lo) if lo - 10000 >= 4 * n + 1000 else (hi + 1, 65536)
    if span[1] - span[0] < 4 * n + 100:  # no room outside: the kernel's choice
        span = None
    rng = random.SystemRandom()
    socks, ports = [], []  # the picked ones stay bound until all n are found
    try:
        for _ in range(1000 * max(n, 1)):
            if len(ports) == n:
                break
            port = rng.randrange(*span) if span else 0
            if port in ports:
                continue
            s = socket.socket()
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                s.close()
                continue
            socks.append(s)
            ports.append(s.getsockname()[1])
    finally:
        for s in socks:
            s.close()
    if len(ports) < n:
        raise RuntimeError(f"found only {len(ports)} of {n} free ports")
    return ports


def own_log(extra, i):
    """pstrain options for worker i: its own --log file (FILE.worker<i>)."""
    out = list(extra)
    for k, x in enumerate(out):
        if i == 0:
            break
        if x == "--log" and k + 1 < len(out):
            out[k + 1] += f".worker{i}"
        elif x.startswith("--log="):
            out[k] = f"{x}.worker{i}"
    return out


def say(msg):
    print(f"launcher: {msg}", file=sys.stderr, flush=True)


class Cluster:
    def __init__(self, args, extra):
        self.args, self.extra = args, extra
        self.procs = []  # (name, Popen)
        self.spec = {}  # name -> (argv, tf_config), to start a PS again
        self.restarts = {}  # PS name -> times started again
        self.chief_log = None
        self.chaos_done = False
        self.started = time.monotonic()
        self.excused = set()  # died after the chief finished: the run's result stands

    def start(self):
        a = self.args
        self.started = time.monotonic()
        # A fresh start (also after new ports): nothing carried from an attempt before.
        self.spec, self.restarts, self.excused, self.chaos_done = {}, {}, set(), False
        if a.mode == "allreduce":
            a.ps = 0  # no PS: the workers reduce among themselves
        ports = free_ports(a.ps + a.workers)
        ps = [f"127.0.0.1:{p}" for p in ports[: a.ps]]
        workers = [f"127.0.0.1:{p}" for p in ports[a.ps:]]
        cluster = {"ps": ps, "worker": workers} if ps else {"worker": workers}
        ps_args = ["--data-dir", a.checkpoint_dir, "--checkpoint-every", str(a.checkpoint_every)]
        ps_args += a.auth_ps
        if a.ps_memory_mb:
            ps_args += ["--memory-mb", str(a.ps_memory_mb)]
        ps_args += a.ps_arg
        base_extra = a.auth_worker + list(self.extra)
        for i in range(a.ps):
            self.spawn(f"ps {i}", [os.path.join(a.bin_dir, "psserver")] + ps_args,
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
                       + base_extra, {"cluster": cluster, "task": {"type": "evaluator",
                                                                   "index": 0}})
        log = None
        extra = list(base_extra)
        for k, x in enumerate(extra):
            if x == "--log" and k + 1 < len(extra):
                log = extra[k + 1]
            elif x.startswith("--log="):
                log = x.split("=", 1)[1]
        if log is None and (a.chaos_kill_ps is not None or a.chaos_kill_worker is not None
                            or a.chaos_kill is not None):
            log = os.path.join(a.checkpoint_dir, "chief-log.jsonl")
            extra += ["--log", log]
        self.chief_log = log
        if a.mode == "allreduce" and a.user_checkpoint_dir:
            # The chief checkpoints its replica; a run started again resumes.
            extra += ["--checkpoint-dir", os.path.join(a.checkpoint_dir, "allreduce-chief"),
                      "--checkpoint-every", str(a.checkpoint_every)]
        for i in range(a.workers):
            wargs = ["--mode", a.mode] + (a.auth_chief if i == 0 else []) + own_log(extra, i)
            if i > 0 and not a.verbose:
                wargs.append("--quiet")
            self.spawn(f"worker {i}", [os.path.join(a.bin_dir, "pstrain")] + wargs,
                       {"cluster": cluster, "task": {"type": "worker", "index": i}})
        return True

    def spawn(self, name, argv, tf_config):
        env = dict(os.environ, TF_CONFIG=json.dumps(tf_config))
        self.spec[name] = (argv, tf_config)
        self.procs.append((name, subprocess.Popen(argv, env=env)))

    def respawn(self, k):
        """Start process k (a PS or a worker that died) again, same port, directory, TF_CONFIG."""
        name, old = self.procs[k]
        argv, tf_config = self.spec[name]
        env = dict(os.environ, TF_CONFIG=json.dumps(tf_config))
        for attempt in range(20):  # its port may take a moment to be free
            p = subprocess.Popen(argv, env=env)
            try:
                rc = p.wait(timeout=0.3)
            except subprocess.TimeoutExpired:
                rc = None
            if rc != PORT_TAKEN:
                break
            time.sleep(0.25)
        self.procs[k] = (name, p)
        return p

    def metrics_port(self):
        """Whether the workers were given --metrics-listen (a port of the user's)."""
        return any(a == "--metrics-listen" or a.startswith("--metrics-listen=")
                   for a in self.extra)

    def backup_sync(self):
        """Whether the workers run --sync backup (a dead worker need not stop the run)."""
        x = self.extra
        return self.args.mode == "ps" and any(
            a == "--sync=backup" or (a == "--sync" and k + 1 < len(x) and x[k + 1] == "backup")
            for k, a in enumerate(x))

    def logged_step(self, log):
        """The last step logged in a worker's --log file, or -1."""
        try:
            with open(log, "rb") as f:
                f.seek(0, os.SEEK_END)
                f.seek(max(0, f.tell() - 4096))
                lines = f.read().decode(errors="replace").strip().splitlines()
            for line in reversed(lines):
                try:
                    return int(json.loads(line)["step"])
                except (ValueError, KeyError):
                    continue
        except OSError:
            pass
        return -1

    def chaos_pending(self):
        """Whether a --chaos-kill* is still to come."""
        a = self.args
        return not self.chaos_done and (a.chaos_kill is not None or a.chaos_kill_ps is not None
                                        or a.chaos_kill_worker is not None)

    def chaos(self):
        a = self.args
        if self.chaos_done:
            return
        if a.chaos_kill is not None:
            when, victims = a.chaos_kill
        else:
            when = a.chaos_kill_ps if a.chaos_kill_ps is not None else a.chaos_kill_worker
            if when is None:
                return
            if a.chaos_kill_ps is not None:
                victims = [f"ps {random.Random(a.chaos_seed).randrange(a.ps)}"]
            else:  # Any worker, the chief (worker 0) included.
                victims = [f"worker {random.Random(a.chaos_seed).randrange(a.workers)}"]
        if isinstance(when, float):  # @SECONDS after the start
            if time.monotonic() - self.started < when:
                return
            what = f"{time.monotonic() - self.started:.2f} s after the start"
        else:
            step = self.logged_step(self.chief_log)
            if step < when:
                return
            # A worker victim must have logged a step of its own too, so that the
            # shards hold some of its work (async: the chief may run ahead of a
            # worker that has pushed nothing yet, whose restart then has nothing
            # to rejoin from).
            for v in victims:
                i = int(v.split()[1]) if v.startswith("worker ") else 0
                if i > 0 and self.logged_step(f"{self.chief_log}.worker{i}") < 1:
                    return
            what = f"after the chief's step {step}"
        for name, p in self.procs:
            if name in victims and p.poll() is None:
                os.kill(p.pid, signal.SIGKILL)
                say(f"chaos: killed {name} (pid {p.pid}) with SIGKILL {what}")
        self.chaos_done = True

    def retire(self, name, p, why):
        """Stop one process started again that has nothing left to do (by PID)."""
        say(f"{name} (pid {p.pid}) {why}; stopping it")
        stop_process(p)
        self.excused.add(name)

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

    def supervise(self, timeout, start=None):
        """0 when every process exits 0; 1 when one fails or time runs out (timeout
        seconds from start, by default now); REROLL when the cluster should start again
        on new ports."""
        start = time.monotonic() if start is None else start
        chief_done = None
        while True:
            running = 0
            self.chaos()
            # PS mode: a shard exits 0 only on the chief's "training finished",
            # which the chief sends after writing its outputs. Allreduce mode: a
            # worker exits 0 only after the ring's last barrier, which the chief
            # enters after writing its outputs.
            shut_down = any(q.poll() == 0 and (n.startswith("ps ") if self.args.mode == "ps"
                                               else self.args.mode == "allreduce" and
                                               n.startswith("worker ") and n != "worker 0")
                            for n, q in self.procs)
            for k, (name, p) in enumerate(self.procs):
                rc = p.poll()
                if rc is None and shut_down and self.restarts.get(name) and \
                        name not in self.excused and name != "worker 0":
                    # Started again just before the run turned out complete (its
                    # peers finished): nothing left for it to do. (Not the chief:
                    # a chief started again is the one that ended the run, and
                    # exits by itself once its end is done.)
                    self.retire(name, p, "was started again, but the run is complete")
                elif rc is None:
                    running += 1
                elif name in self.excused:
                    pass
                elif shut_down and retryable(rc) and chief_done is None:
                    # Killed after the chief had shut the PS down (before it
                    # exited, or before this shard did): the run is complete; a
                    # process started again would find no one to work with.
                    what = f"signal {-rc}" if rc < 0 else f"status {rc}"
                    say(f"{name} (pid {p.pid}) exited with {what} after the chief had "
                        + ("shut the PS down" if self.args.mode == "ps" else
                           "passed the ring's last barrier")
                        + ": its outputs were written; the run is complete"
                        + (" (that shard's final checkpoint may be missing)"
                           if name.startswith("ps ") else ""))
                    self.excused.add(name)
                elif chief_done is not None and rc != 0 and name != "worker 0" and (
                        retryable(rc) or name.startswith("worker ")):
                    # The chief finished (it exited 0, its summary is written): a
                    # process that dies now (shutting down), or a worker that came up
                    # after the end (a finished run started again: the chief shut
                    # the PS down before it arrived), does not undo that.
                    what = f"signal {-rc}" if rc < 0 else f"status {rc}"
                    say(f"{name} (pid {p.pid}) exited with {what} after the chief finished; "
                        "the run's result stands" + (" (that shard's final checkpoint may be "
                                                     "missing)" if name.startswith("ps ") else ""))
                    self.excused.add(name)
                elif (name == "worker 0" and retryable(rc) and
                      all(q.poll() == 0 for n, q in self.procs if n != name)):
                    # Only a chief without peers gets here now (local mode, or
                    # allreduce with one worker): with peers, their exit 0 already
                    # said the run is complete (shut_down, above).
                    what = f"signal {-rc}" if rc < 0 else f"status {rc}"
                    say(f"the chief (pid {p.pid}) exited with {what} after every other worker "
                        "had finished: the training is complete, but the chief's final outputs "
                        "(summary, --params-out, --export, its last checkpoint) may be missing; "
                        "not restarted")
                    self.stop()
                    return 1
                elif (retryable(rc) and chief_done is None
                      and (name.startswith("ps ") or
                           (name.startswith("worker ") and self.args.mode != "local"))
                      and self.restarts.get(name, 0) < (self.args.max_ps_restarts
                                                        if name.startswith("ps ")
                                                        else self.args.max_worker_restarts)):
                    what = f"signal {-rc}" if rc < 0 else f"status {rc}"
                    self.restarts[name] = self.restarts.get(name, 0) + 1
                    p = self.respawn(k)
                    most = (self.args.max_ps_restarts if name.startswith("ps ")
                            else self.args.max_worker_restarts)
                    say(f"{name} exited with {what}; started it again (pid {p.pid}, restart "
                        f"{self.restarts[name]} of {most})")
                    running += 1
                elif (rc != 0 and self.backup_sync() and name.startswith("worker ")
                      and name != "worker 0"):
                    # Backup sync: the shards close the steps without it.
                    what = f"signal {-rc}" if rc < 0 else f"status {rc}"
                    say(f"{name} (pid {p.pid}) exited with {what} and is not started again; "
                        "the others go on without it (--sync backup)")
                    self.excused.add(name)
                elif (rc == PORT_TAKEN and name == "worker 0" and chief_done is None
                      and self.args.mode == "allreduce" and not self.metrics_port()
                      and not self.restarts and not self.chaos_done):
                    # Its address (the ring's rendezvous, the one port of ours
                    # it binds) was taken between the pick and its bind:
                    # nothing has run yet, so new ports do. (Not with
                    # --metrics-listen: that port is the user's.)
                    say("the chief could not bind its address (taken meanwhile); "
                        "restarting the cluster on new ports")
                    self.stop()
                    return REROLL
                elif rc != 0:
                    what = f"signal {-rc}" if rc < 0 else f"status {rc}"
                    if name.startswith("ps ") and not retryable(rc) and rc != PORT_TAKEN:
                        what += f" ({EXIT_MEANING.get(rc, 'a permanent failure')}: not restarted)"
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
            if chief_done is not None and now - chief_done > 2:
                # A worker started again just as the run ended (it died after its
                # last step) has nothing to do: its peers are gone. Nor has any
                # worker once every PS is gone too (one waiting for a shard that
                # was killed as it shut down would retry it for its connect
                # timeout). Stop it.
                ps_gone = self.args.mode == "ps" and all(
                    q.poll() is not None for n, q in self.procs if n.startswith("ps "))
                for name, p in self.procs:
                    if (name.startswith("worker ") and (self.restarts.get(name) or ps_gone) and
                            name not in self.excused and p.poll() is None):
                        self.retire(name, p, "was started again as the run ended: nothing "
                                    "left for it to do" if self.restarts.get(name) else
                                    "still runs, but the chief and every PS have finished: "
                                    "nothing left for it to do")
            if chief_done is not None and now - chief_done > 60:
                left = [n for n, p in self.procs if p.poll() is None]
                say(f"the chief finished but {', '.join(left)} did not exit within 60 s; "
                    "stopping them")
                self.stop()
                return 1
            # A kill due at a step is watched closely: an async run does a step in ~1 ms.
            time.sleep(0.005 if self.chaos_pending() else 0.05)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0], add_help=False)
    ap.add_argument("--mode", default="ps", choices=["ps", "allreduce", "local"])
    ap.add_argument("--ps", type=int, default=2)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--bin-dir", default=os.path.join(os.path.dirname(__file__), "..", "build",
                                                      "bin"))
    ap.add_argument("--timeout", type=float, default=3600.0)
    ap.add_argument("--verbose", action="store_true", help="progress lines from every worker")
    ap.add_argument("--evaluator", action="store_true",
                    help="also start an evaluator task (pulls and evaluates, never pushes)")
    ap.add_argument("--checkpoint-dir", help="PS checkpoints (default: a temporary directory)")
    ap.add_argument("--checkpoint-every", type=int, default=100,
                    help="PS versions between checkpoints (default 100)")
    ap.add_argument("--max-ps-restarts", type=int, default=3,
                    help="times a dead PS is started again (default 3)")
    ap.add_argument("--max-worker-restarts", type=int, default=3,
                    help="PS mode: times a dead worker is started again; it rejoins at the "
                         "shards' version (default 3; 0: a dead worker ends the run)")
    ap.add_argument("--chaos-kill-ps", type=int, metavar="STEP",
                    help="SIGKILL one PS once the chief has logged this step")
    ap.add_argument("--chaos-kill-worker", type=int, metavar="STEP",
                    help="SIGKILL one worker (chosen by --chaos-seed; worker 0 is the chief) "
                         "once the chief has logged this step")
    ap.add_argument("--chaos-seed", type=int, default=1, help="which PS --chaos-kill-ps kills")
    ap.add_argument("--chaos-kill", type=parse_chaos, metavar="WHEN:WHO[,WHO...]",
                    help="SIGKILL the named processes together (ps<i>, worker<i>) once the chief "
                         "has logged step WHEN, or WHEN=@SECONDS after the start")
    ap.add_argument("--no-auth", action="store_true",
                    help="no tokens: anyone who reaches the ports may call the PS")
    ap.add_argument("--auth-token-file", help="the workers' token (default: a new one)")
    ap.add_argument("--admin-token-file", help="the chief's token (default: a new one)")
    ap.add_argument("--ps-memory-mb", type=float, metavar="X",
                    help="each PS keeps at most X MiB of embedding rows in memory, the rest "
                         "in a row store on disk (psserver --memory-mb)")
    ap.add_argument("--ps-arg", action="append", default=[], metavar="ARG",
                    help="pass ARG to every psserver (repeat for more, e.g. --ps-arg=--admit-after "
                         "--ps-arg=2)")
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
    if args.checkpoint_every < 1:
        ap.error("--checkpoint-every must be >= 1")
    tmp = None
    args.user_checkpoint_dir = args.checkpoint_dir is not None
    if args.checkpoint_dir is None:
        tmp = args.checkpoint_dir = tempfile.mkdtemp(prefix="pstrain-ps-")
    secret_dir = None
    rc = 1
    try:
        if args.no_auth and (args.auth_token_file or args.admin_token_file):
            ap.error("--no-auth and a token file do not go together")
        if args.no_auth:
            auth, admin = None, None
        elif args.auth_token_file:
            auth, admin = args.auth_token_file, args.admin_token_file or args.auth_token_file
        else:
            secret_dir = tempfile.mkdtemp(prefix="pstrain-secrets-")  # mode 0700
            auth, admin = (write_token(secret_dir, n) for n in ("worker.token", "admin.token"))
        args.auth_ps, args.auth_worker, args.auth_chief = [], [], []
        if auth:
            args.auth_ps = ["--auth-token-file", auth, "--admin-token-file", admin]
            args.auth_worker = ["--auth-token-file", auth]
            args.auth_chief = ["--admin-token-file", admin]
        rc = run(args, extra)
        return rc
    finally:
        if tmp and rc != 0 and has_checkpoints(tmp):
            # A failed run's checkpoints are consistent: keep them to resume from.
            say(f"the checkpoints of this failed run are kept in {tmp}: run the same command "
                f"with --checkpoint-dir {tmp} to resume from them (or remove it)")
        elif tmp:
            shutil.rmtree(tmp, ignore_errors=True)
        if secret_dir:
            shutil.rmtree(secret_dir, ignore_errors=True)


def parse_chaos(spec):
    """'40:ps1,worker0' -> (40, ['ps 1', 'worker 0']); '@0.5:worker1' -> (0.5, [...])."""
    when, _, who = spec.partition(":")
    m = [re.fullmatch(r"(ps|worker)(\d+)", w.strip()) for w in who.split(",")]
    if not who or not all(m):
        raise argparse.ArgumentTypeError(f"'{spec}': WHEN:WHO[,WHO...], WHO ps<i> or worker<i>")
    try:
        at = float(when[1:]) if when.startswith("@") else int(when)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{spec}': WHEN is a step or @SECONDS")
    return at, [f"{x.group(1)} {x.group(2)}" for x in m]


def has_checkpoints(directory):
    """Whether a shard directory under directory holds a checkpoint store."""
    try:
        return any(os.path.exists(os.path.join(directory, d, "CURRENT"))
                   for d in os.listdir(directory) if d.startswith("shard-"))
    except OSError:
        return False


def stop_process(p, timeout=5):
    """Stop a child by its PID: SIGTERM, then SIGKILL after timeout seconds; reaped."""
    if p.poll() is None:
        p.terminate()
    try:
        p.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        p.kill()
        p.wait()


def write_token(directory, name):
    """A new random token in directory/name (mode 0600); returns the path."""
    path = os.path.join(directory, name)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(secrets.token_urlsafe(32) + "\n")
    return path


def run(args, extra):
    cluster = Cluster(args, extra)

    def on_signal(sig, frame):
        say(f"got signal {sig}; stopping the cluster")
        cluster.stop()
        sys.exit(128 + sig)

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    try:
        t0 = time.monotonic()  # --timeout covers every attempt
        for attempt in range(5):
            if not cluster.start():
                say("a PS port was taken meanwhile; restarting on new ports")
                cluster.stop()
                continue
            say(f"started {args.ps} PS and {args.workers} workers ({args.mode}) on 127.0.0.1 "
                "(pids " + ", ".join(f"{n}: {p.pid}" for n, p in cluster.procs) + ")")
            rc = cluster.supervise(args.timeout, t0)
            if rc != REROLL:
                return rc
        say("could not bind the cluster's ports after 5 attempts")
        return 1
    except BaseException:
        # Whatever went wrong here (a binary that cannot be started, an
        # interrupt), no process of the cluster outlives the launcher.
        cluster.stop()
        raise


if __name__ == "__main__":
    sys.exit(main())
