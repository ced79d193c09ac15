#!/usr/bin/env python3
"""Crash recovery of PS mode, end to end (real psserver and pstrain processes).

  ps_recovery.py BIN_DIR kill     SIGKILL one PS at a seeded random step of a real run
                                  (the launcher's chaos option); the run must finish by
                                  itself, redo at most about two checkpoint intervals
                                  (see MAX_REDONE), and end with
                                  the accuracy of an undisturbed run with the same seed
                                  (sync mode is deterministic: with bit-identical
                                  parameters, in fact)
  ps_recovery.py BIN_DIR resume   a run stopped after some steps and started again on
                                  the same directories resumes at that step and data
                                  position and ends where an uninterrupted run does; a
                                  restart with another batch size or model is refused
Every process listens on 127.0.0.1, runs under a timeout, and is stopped by PID.
"""
import json
import os
import random
import re
import shutil

from itest import check, launch, main

K = 20  # checkpoint interval
# What a kill can cost: the steps since the newest checkpoint every shard
# committed. That is < K, plus K more when the kill lands while that
# checkpoint is still being written (or when it was skipped because the
# writer was busy: the writer runs at low priority and the machine may be
# loaded), plus the steps the workers run between the launcher's look at
# the log and the kill taking effect.
MAX_REDONE = 2 * K + 8
COMMON = ["--ps", "2", "--workers", "2", "--checkpoint-every", str(K), "--train-limit", "12000",
          "--test-limit", "2000", "--epochs", "1", "--batch-size", "64", "--seed", "7"]
STEPS = 12000 // 128


def summary(path):
    with open(path) as f:
        return json.load(f)


def same_bytes(a, b):
    with open(a, "rb") as fa, open(b, "rb") as fb:
        return fa.read() == fb.read()


def reference(bin_dir, tmp):
    """An undisturbed run: its summary and final parameters."""
    d = os.path.join(tmp, "ref")
    launch(bin_dir, *COMMON, "--checkpoint-dir", d, "--summary", d + ".json", "--params-out",
           d + ".params")
    return summary(d + ".json"), d + ".params"


def kill(bin_dir, tmp):
    ref, ref_params = reference(bin_dir, tmp)
    seed = int(os.environ.get("PS_CHAOS_SEED", "20261128"))
    rng = random.Random(seed)
    at = rng.randrange(K + 5, STEPS - 15)
    d = os.path.join(tmp, "chaos")
    p = launch(bin_dir, *COMMON, "--checkpoint-dir", d, "--chaos-kill-ps", str(at), "--chaos-seed",
               str(seed), "--summary", d + ".json", "--params-out", d + ".params")
    out = p.stdout + p.stderr
    check("chaos: killed ps" in out, f"the launcher killed a PS after step {at} (seed {seed})")
    check("started it again" in out and "restored version" in out,
          "the launcher started it again and it restored its checkpoint")
    s = summary(d + ".json")
    check(s["steps"] == STEPS, f"the run finished all {STEPS} steps by itself")
    check(s["rollbacks"] >= 1, f"the cluster rolled back ({s['rollbacks']} time(s))")
    check(s["steps_redone"] <= MAX_REDONE,
          f"{s['steps_redone']} steps redone (interval {K}; at most {MAX_REDONE})")
    diff = abs(s["test_accuracy"] - ref["test_accuracy"])
    check(diff <= 0.005, f"accuracy {s['test_accuracy']:.4f} vs undisturbed "
          f"{ref['test_accuracy']:.4f} (within 0.5 points)")
    check(same_bytes(d + ".params", ref_params),
          "final parameters are bit-identical to the undisturbed run's")
    check(s["versions_lost"] >= 1, f"the summary counts the versions rolled back "
          f"({s['versions_lost']})")
    # Async: each worker carries on from its own step (nothing is redone), so what a kill
    # costs shows as versions lost, which the summary now says (it said 0 redone only).
    d = os.path.join(tmp, "chaos-async")
    p = launch(bin_dir, *COMMON, "--sync", "async", "--checkpoint-dir", d, "--chaos-kill-ps",
               str(at), "--chaos-seed", str(seed), "--summary", d + ".json")
    s = summary(d + ".json")
    check("chaos: killed ps" in p.stdout + p.stderr and s["rollbacks"] >= 1 and
          s["steps"] == STEPS and s["steps_redone"] == 0 and s["versions_lost"] >= 1,
          f"async: a PS killed after step {at}: {s['rollbacks']} rollback, "
          f"{s['versions_lost']} versions (updates) lost, {s['steps_redone']} steps redone")


def resume(bin_dir, tmp):
    ref, ref_params = reference(bin_dir, tmp)
    d = os.path.join(tmp, "resume")
    stop_at = 50  # not a multiple of K: the final checkpoint at shutdown counts
    launch(bin_dir, *COMMON, "--checkpoint-dir", d, "--max-steps", str(stop_at))
    p = launch(bin_dir, *COMMON, "--checkpoint-dir", d, "--summary", d + ".json", "--params-out",
               d + ".params")
    out = p.stdout + p.stderr
    check(f"resuming at step {stop_at}" in out, f"the second run resumed at step {stop_at}")
    s = summary(d + ".json")
    check(s["steps"] == STEPS, "and ran to the end")
    check(same_bytes(d + ".params", ref_params),
          "its final parameters equal an uninterrupted run's (same data position)")
    check(abs(s["test_accuracy"] - ref["test_accuracy"]) <= 1e-9, "and so does its accuracy")
    # A run that fails without --checkpoint-dir keeps its checkpoints (a PS killed and
    # not restarted: the launcher stops the cluster) and says where; a run resumes from them.
    p = launch(bin_dir, *COMMON, "--max-ps-restarts", "0", "--chaos-kill-ps", str(K + 10),
               expect_ok=False)
    m = re.search(r"checkpoints of this failed run are kept in (\S+):", p.stderr)
    kept = m.group(1) if m else ""
    check(p.returncode != 0 and m and os.path.exists(os.path.join(kept, "shard-0", "CURRENT")),
          f"a failed run keeps its checkpoints and names them: {kept}")
    p = launch(bin_dir, *COMMON, "--checkpoint-dir", kept, "--summary", kept + ".json")
    check("resuming at step" in p.stdout + p.stderr and summary(kept + ".json")["steps"] == STEPS,
          "a run resumes from them and ends")
    shutil.rmtree(kept, ignore_errors=True)
    # The shards remember the run: another global batch is refused.
    args = [a if a != "64" else "32" for a in COMMON]
    p = launch(bin_dir, *args, "--checkpoint-dir", d, expect_ok=False)
    out = p.stdout + p.stderr
    check(p.returncode != 0 and "already initialised" in out and "global batch 128" in out,
          "a restart with another batch size is refused, naming both configs")
    p = launch(bin_dir, *COMMON, "--layers", "784,64,10", "--checkpoint-dir", d, expect_ok=False)
    out = p.stdout + p.stderr
    check(p.returncode != 0 and "cluster mismatch" in out and "784,64,10" in out,
          "a restart with another model is refused, naming what the directory holds")


if __name__ == "__main__":
    main(__doc__, {"kill": kill, "resume": resume}, "ps_recovery.")
