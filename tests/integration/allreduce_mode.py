#!/usr/bin/env python3
"""Integration scenarios of collective mode (--mode allreduce): real pstrain processes.

  allreduce_mode.py BIN_DIR equivalence  3 workers: allreduce and sync PS change the parameters
                                         alike over k steps (and as local mode with the same
                                         global batch; so do 4 workers with halving-doubling),
                                         every replica ends bit-identical; a
                                         negative control (worker 1 reduces zeros) must fail
  allreduce_mode.py BIN_DIR learns       a short run learns; a run stopped and started again
                                         on the chief's checkpoint directory resumes and ends
                                         where an uninterrupted run does
  allreduce_mode.py BIN_DIR elastic      a worker killed mid-run (the chief, another one): the
                                         launcher starts it again, the ring forms again with
                                         it and the run ends as an undisturbed one does (test
                                         accuracy within 0.5 points, replicas identical); the
                                         chief killed after the last step, before its outputs
                                         (the others wait at the last barrier); not restarted,
                                         with --min-workers 2 the survivors go on in a ring of 2,
                                         and take the worker back when it returns
  allreduce_mode.py BIN_DIR bad-input    a worker that never joins, a worker killed mid-run
                                         and not replaced: the others fail with a clear error
                                         naming it in bounded time; a chief whose address is
                                         taken exits 3 and the launcher picks new ports
Every process listens on 127.0.0.1, runs under a timeout, and is stopped by PID.
"""
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time

from itest import LAUNCH, TIMEOUT, check, free_ports, launch, lines_in, main, params, rel_diff, run


def checksums(out):
    return dict(re.findall(r"replica of rank (\d+): parameters checksum ([0-9a-f]{16})", out))


COMMON = ["--optimizer", "sgd", "--lr", "0.1", "--max-steps", "6", "--train-limit", "3000",
          "--test-limit", "500", "--seed", "5", "--threads", "1", "--quiet"]


def equivalence(bin_dir, tmp):
    f = lambda name: os.path.join(tmp, name)
    p = launch(bin_dir, "--mode", "allreduce", "--workers", "3", "--batch-size", "64", *COMMON,
               "--init-out", f("init.bin"), "--params-out", f("ar.bin"))
    sums = checksums(p.stdout)
    check(len(sums) == 3 and len(set(sums.values())) == 1,
          f"all 3 replicas hold bit-identical parameters: {sums}")
    launch(bin_dir, "--mode", "ps", "--ps", "2", "--workers", "3", "--batch-size", "64", *COMMON,
           "--params-out", f("ps.bin"))
    subprocess.run([os.path.join(bin_dir, "pstrain"), "--mode", "local", "--batch-size", "192",
                    *COMMON, "--params-out", f("local.bin")], check=True, timeout=TIMEOUT,
                   capture_output=True)
    p0, ar, ps, local = (params(f(n)) for n in ("init.bin", "ar.bin", "ps.bin", "local.bin"))
    d = rel_diff(p0, ar, ps)
    check(d <= 1e-4, f"6 allreduce steps (3 workers x 64) change the parameters as 6 sync PS "
          f"steps do: |d-dref|/|dref| = {d:.2e} <= 1e-4")
    d = rel_diff(p0, ar, local)
    check(d <= 1e-4, f"...and as 6 local steps of 192: {d:.2e} <= 1e-4")
    # Four workers over TCP: halving-doubling instead of the ring, the same steps.
    p = launch(bin_dir, "--mode", "allreduce", "--workers", "4", "--batch-size", "48", *COMMON,
               "--ring-transport", "tcp", "--ring-algorithm", "hd", "--init-out", f("init4.bin"),
               "--params-out", f("hd.bin"))
    sums = checksums(p.stdout)
    check(len(sums) == 4 and len(set(sums.values())) == 1,
          f"halving-doubling: all 4 replicas hold bit-identical parameters: {sums}")
    check("tcp, halving-doubling" in p.stdout + p.stderr,
          "the workers say the ring runs halving-doubling")
    d = rel_diff(params(f("init4.bin")), params(f("hd.bin")), local)
    check(d <= 1e-4, f"6 halving-doubling steps (4 workers x 48) change the parameters as 6 "
          f"local steps of 192: {d:.2e} <= 1e-4")
    launch(bin_dir, "--mode", "allreduce", "--workers", "3", "--batch-size", "64", *COMMON,
           "--params-out", f("bad.bin"), "--fault", "zero-gradient", "--fault-rank", "1")
    d = rel_diff(p0, params(f("bad.bin")), ps)
    check(d > 1e-4, f"negative control: without worker 1's gradient the bound fails "
          f"({d:.2e} > 1e-4)")


def learns(bin_dir, tmp):
    f = lambda name: os.path.join(tmp, name)
    args = ["--mode", "allreduce", "--workers", "2", "--train-limit", "10000", "--epochs", "1",
            "--batch-size", "64", "--threads", "1", "--test-limit", "2000", "--seed", "3"]
    p = launch(bin_dir, *args, "--summary", f("s.json"), "--params-out", f("ref.bin"))
    check("after the chief finished" not in p.stderr,
          "workers that exit 0 after the chief are not reported as failures")
    j = json.load(open(f("s.json")))
    check(j["mode"] == "allreduce" and j["workers"] == 2 and j["steps"] == 10000 // 128,
          f"the summary names allreduce, 2 workers, {j['steps']} steps")
    check(j["test_accuracy"] > 0.6, f"learns: test accuracy {j['test_accuracy']:.4f} > 0.6")
    ck = f("ckpt")
    launch(bin_dir, *args, "--checkpoint-dir", ck, "--checkpoint-every", "10", "--max-steps",
           "35")
    p = launch(bin_dir, *args, "--checkpoint-dir", ck, "--checkpoint-every", "10",
               "--params-out", f("resumed.bin"))
    out = p.stdout + p.stderr
    check("resuming at step 35" in out, "started again on the chief's checkpoint, it resumes "
          "at step 35 (the final checkpoint of the first run)")
    check(open(f("resumed.bin"), "rb").read() == open(f("ref.bin"), "rb").read(),
          "and ends with the parameters of the uninterrupted run, bit for bit")


def start_workers(bin_dir, n, ranks, extra, log=None):
    """Ranks of an n-worker ring; with log, rank r's step log is log.<r>."""
    hosts = ",".join(f"127.0.0.1:{p}" for p in free_ports(n))
    procs = []
    for r in ranks:
        procs.append(subprocess.Popen(
            [os.path.join(bin_dir, "pstrain"), "--mode", "allreduce", "--worker-hosts", hosts,
             "--task-index", str(r), *extra, *(["--log", f"{log}.{r}"] if log else [])],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    return procs


def finish(procs, timeout):
    outs = []
    for p in procs:
        try:
            out, err = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            p.kill()
            out, err = p.communicate()
        outs.append((p.returncode, (out or "") + (err or "")))
    return outs


def bad_input(bin_dir, tmp):
    # Rank 2 of 3 never starts: the rendezvous fails in bounded time, saying so.
    t0 = time.monotonic()
    procs = start_workers(bin_dir, 3, [0, 1], ["--connect-timeout-ms", "3000", "--max-steps",
                                               "5", "--train-limit", "1000", "--quiet"])
    outs = finish(procs, 60)
    took = time.monotonic() - t0
    check(all(rc != 0 for rc, _ in outs) and all("rendezvous" in o for _, o in outs),
          f"a worker that never joins: the others fail, naming the rendezvous ({took:.1f} s)")
    check(all("not every worker joined" in o for _, o in outs),
          "...and saying not every worker joined" + "".join(f"\n{o}" for _, o in outs
                                                             if "joined" not in o))
    # The chief's address taken: it exits 3 (CM_EXIT_PORT), naming it.
    holder = socket.socket()
    holder.bind(("127.0.0.1", free_ports(1)[0]))
    holder.listen(1)
    busy = holder.getsockname()[1]
    hosts = f"127.0.0.1:{busy},127.0.0.1:{free_ports(1)[0]}"
    p = run([os.path.join(bin_dir, "pstrain"), "--mode", "allreduce", "--worker-hosts", hosts,
             "--task-index", "0", "--max-steps", "5", "--train-limit", "1000", "--quiet"],
            expect_ok=False, timeout=60)
    holder.close()
    check(p.returncode == 3 and f"cannot listen on 127.0.0.1:{busy}" in p.stderr,
          f"a chief whose address is taken exits 3, naming it ({p.returncode})"
          + ("" if p.returncode == 3 else "\n" + p.stderr[-2000:]))
    # The launcher answers that with new ports: its pstrain here exits 3 the
    # first time it starts as the chief (as if the port had been taken).
    fake = os.path.join(tmp, "bin")
    os.makedirs(fake)
    mark = os.path.join(tmp, "taken.mark")
    with open(os.path.join(fake, "pstrain"), "w") as w:
        w.write(f"""#!/bin/sh
case "$TF_CONFIG" in
*'"index": 0'*) [ -e '{mark}' ] || {{ : > '{mark}'; echo 'fake: port taken' >&2; exit 3; }} ;;
esac
exec '{os.path.join(os.path.abspath(bin_dir), "pstrain")}' "$@"
""")
    os.chmod(os.path.join(fake, "pstrain"), 0o755)
    os.symlink(os.path.join(os.path.abspath(bin_dir), "psserver"), os.path.join(fake, "psserver"))
    p = run([sys.executable, LAUNCH, "--bin-dir", fake, "--timeout", "120", "--mode", "allreduce",
             "--workers", "2", "--max-steps", "5", "--train-limit", "1000", "--quiet"],
            expect_ok=False)
    check(p.returncode == 0 and os.path.exists(mark) and
          "restarting the cluster on new ports" in p.stderr,
          f"the launcher restarts the cluster on new ports when the chief's was taken "
          f"({p.returncode})" + ("" if p.returncode == 0 else "\n" + p.stderr[-2000:]))
    # Rank 2 is killed mid-run and nobody starts it again: the others wait
    # --worker-timeout for it, then fail naming it.
    # (Killed once rank 0 has logged 20 steps, of a run far too long to end
    # first: a fixed sleep raced the end of the run on a quiet machine.)
    log = os.path.join(tmp, "killed")
    procs = start_workers(bin_dir, 3, [0, 1, 2], ["--rpc-timeout-ms", "3000", "--epochs", "5000",
                                                  "--train-limit", "3000", "--quiet",
                                                  "--worker-timeout", "2"], log=log)
    t0 = time.monotonic()
    while lines_in(f"{log}.0") < 20 and time.monotonic() - t0 < 60 and \
            all(p.poll() is None for p in procs):
        time.sleep(0.01)
    alive = procs[2].poll() is None
    procs[2].send_signal(signal.SIGKILL)
    t0 = time.monotonic()
    outs = finish(procs[:2], 60)
    procs[2].wait()
    took = time.monotonic() - t0
    check(alive and all(rc != 0 for rc, _ in outs),
          f"a worker killed mid-run: the others exit non-zero ({took:.1f} s after the kill)"
          + ("" if alive and all(rc != 0 for rc, _ in outs) else
             f"\nrank 2 alive at the kill: {alive}" + "".join(f"\nexit {rc}:\n{o[-3000:]}"
                                                                for rc, o in outs)))
    check(took < 30, "...within a bounded time")
    check(all("ranks 2 to join again" in o for _, o in outs) and
          all("failed" in o for _, o in outs), "...with an error naming the missing rank"
          + "".join(f"\n{o}" for _, o in outs))


ELASTIC = ["--epochs", "4", "--train-limit", "6000", "--test-limit", "2000", "--batch-size", "32",
           "--threads", "1", "--seed", "7"]


def summary(path):
    with open(path) as f:
        return json.load(f)


def elastic(bin_dir, tmp):
    f = lambda name: os.path.join(tmp, name)
    launch(bin_dir, "--mode", "allreduce", "--workers", "3", *ELASTIC, "--summary", f("ref.json"))
    ref = summary(f("ref.json"))["test_accuracy"]
    # --chaos-seed 0 picks worker 1, 1 the chief (worker 0); the launcher starts it again.
    for who, seed in (("worker 1", 0), ("worker 0", 1)):
        p = launch(bin_dir, "--mode", "allreduce", "--workers", "3", *ELASTIC, "--chaos-kill-worker",
                   "40", "--chaos-seed", str(seed), "--summary", f(f"s{seed}.json"))
        out = p.stdout + p.stderr
        check(f"chaos: killed {who}" in out and f"{who} exited with signal 9; started it again"
              in out, f"the launcher killed {who} mid-run and started it again")
        check("the ring formed again" in out and "resuming where the others stand" in out,
              "the survivors formed the ring again with it, and it took their state")
        sums = checksums(out)
        check(len(set(sums.values())) == 1 and len(sums) == 3,
              f"every replica, the restarted one's too, ends identical: {sums}")
        acc = summary(f(f"s{seed}.json"))["test_accuracy"]
        check(abs(acc - ref) <= 0.005, f"test accuracy {acc:.4f} is within 0.5 points of the "
              f"undisturbed run's {ref:.4f}")
    # The chief dies after the last step, before any output: the others hold the
    # final state at the ring's last barrier, the chief started again takes it,
    # evaluates and writes the outputs, and everyone exits 0.
    mark = f("die.mark")
    p = run([sys.executable, LAUNCH, "--bin-dir", bin_dir, "--timeout", "200", "--mode",
             "allreduce", "--workers", "3", *ELASTIC, "--summary", f("die.json")],
            env={"PSTRAIN_TEST_DIE_BEFORE_OUTPUTS": mark})
    out = p.stdout + p.stderr
    sums = checksums(out)
    acc = summary(f("die.json"))["test_accuracy"]
    check("the chief dies before its outputs" in out and "nothing to train" in out and
          len(sums) == 3 and len(set(sums.values())) == 1 and abs(acc - ref) <= 1e-9,
          f"the chief killed after the last step, before its outputs: started again, it took "
          f"the others' final state and wrote them (accuracy {acc:.4f}, the reference's)")
    # Not restarted: with --min-workers 2 the survivors go on in a ring of 2
    # after --worker-timeout, with the same global batch; the worker started
    # again later is taken back into a ring of 3.
    for back in (False, True):
        ports = free_ports(3)
        hosts = ",".join(f"127.0.0.1:{p}" for p in ports)
        logs = [f(f"b{int(back)}-{r}.jsonl") for r in range(3)]

        outf = [f(f"b{int(back)}-{r}.out") for r in range(3)]

        def start(r):  # Output to files: nobody reads a pipe while the run goes on.
            with open(outf[r], "a") as o:
                return subprocess.Popen(
                    [os.path.join(bin_dir, "pstrain"), "--mode", "allreduce", "--worker-hosts",
                     hosts, "--task-index", str(r), *ELASTIC,
                     # Long enough for rank 2 to come back (0.4 s to load its data)
                     # before the end, also on a loaded machine.
                     *(["--epochs", "12"] if back else []), "--min-workers", "2",
                     "--worker-timeout", "0.5", "--log", logs[r], "--summary",
                     f(f"b{int(back)}-{r}.json")], stdout=o, stderr=subprocess.STDOUT)
        procs = [start(r) for r in range(3)]
        t0 = time.monotonic()
        while lines_in(logs[0]) < 40 and time.monotonic() - t0 < 60:
            time.sleep(0.01)
        procs[2].send_signal(signal.SIGKILL)
        procs[2].wait()
        if back:  # Once the ring of 2 trains, rank 2 comes back.
            while ("ring 2: 2 of 3" not in open(outf[0]).read() and
                   time.monotonic() - t0 < 120):
                time.sleep(0.01)
            procs[2] = start(2)
        outs = finish(procs if back else procs[:2], 120)
        outs = [(rc, open(outf[r]).read()) for r, (rc, _) in enumerate(outs)]
        text = "".join(o for _, o in outs)
        check(all(rc == 0 for rc, _ in outs),
              "a ring that lost rank 2 " + ("and took it back " if back else "") +
              "finishes: " + str([rc for rc, _ in outs]) +
              "".join(f"\n{o}" for rc, o in outs if rc))
        check("ring 2: 2 of 3 workers (ranks 0,1)" in text,
              "the survivors went on in a ring of 2 (ranks 0 and 1)")
        if back:
            check("a worker waits to join" in text and "ring 3: 3 of 3 workers" in text,
                  "rank 2, started again, was taken back into a ring of 3"
                  + ("" if "ring 3: 3 of 3" in text else "\n" + text[-3000:]))
        sums = checksums(text)
        check(len(set(sums.values())) == 1 and len(sums) == (3 if back else 2),
              f"the replicas end identical: {sums}")
        if not back:  # (the other ran 12 epochs)
            acc = summary(f(f"b{int(back)}-0.json"))["test_accuracy"]
            check(abs(acc - ref) <= 0.005, f"test accuracy {acc:.4f} is within 0.5 points of "
                  f"the undisturbed run's {ref:.4f}")


if __name__ == "__main__":
    main(__doc__, {"equivalence": equivalence, "learns": learns, "bad-input": bad_input,
                   "elastic": elastic},
         "allreduce_mode.")
