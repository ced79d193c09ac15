#!/usr/bin/env python3
"""Integration scenarios of the click-through models (DeepFM, LR) on embedding tables.

  ctr_mode.py BIN_DIR equivalence  sync PS DeepFM (2 PS, 2 workers) and allreduce
                                   DeepFM (2 workers) == local DeepFM on the same
                                   global batch, dense parameters and every table
                                   row, with a negative control that must fail
  ctr_mode.py BIN_DIR learns       DeepFM and LR learn the planted data in every
                                   mode (AUC well above chance, DeepFM above LR)
  ctr_mode.py BIN_DIR recovery     a PS SIGKILLed during a DeepFM run comes back from
                                   its checkpoint (rows included) and the run ends
                                   bit-identical to an undisturbed one; in allreduce mode
                                   a worker killed and started again takes the others'
                                   tables, and the run ends bit-identical too
  ctr_mode.py BIN_DIR export       an exported DeepFM evaluates to the same AUC with
                                   --eval-only, in local and PS mode
  ctr_mode.py BIN_DIR beyond-memory  each PS keeps at most 0.2 MiB of rows in memory
                                   (--ps-memory-mb), a tenth of what it holds, the rest
                                   in its row store on disk: the run ends bit-identical
                                   to one with every row in memory (AUC, dense
                                   parameters, every exported row), also with a PS
                                   SIGKILLed mid-run; and with row admission and
                                   expiry, fewer rows that still learn
  ctr_mode.py BIN_DIR bad-input    bad lines (counted, skipped, then a clear failure
                                   past --max-bad-lines), a missing data directory,
                                   options that do not fit a click model
Data: a small planted data set made by ctrgen (the generator of scripts/make-ctr-data)
in the scenario's temporary directory. Every process listens on 127.0.0.1, runs
under a timeout, and is stopped by PID.
"""
import json
import os
import re
import struct

from itest import check, free_ports, launch, params, rel_diff, run

GEN = ["--train-rows", "24000", "--test-rows", "6000", "--seed", "3"]
# Small enough for seconds on 2 cores, large enough that steps touch shared rows.
MODEL = ["--model", "deepfm", "--emb-dim", "4", "--hidden", "16,8", "--threads", "1"]


def make_data(bin_dir, tmp, name="data", extra=()):
    d = os.path.join(tmp, name)
    run([os.path.join(bin_dir, "ctrgen"), "--out", d, *GEN, *extra])
    return d


def read_export(path):
    """(header, dense floats, {table: {id: values}}) of a pstrain model file."""
    raw = open(path, "rb").read()
    version, hlen = struct.unpack("<II", raw[8:16])
    header = json.loads(raw[16:16 + hlen])
    off = (16 + hlen + 63) // 64 * 64
    n = header["numel"]
    dense = struct.unpack(f"<{n}f", raw[off:off + 4 * n])
    at, tables = off + 4 * n, {}
    for t, tab in enumerate(header.get("tables", [])):
        dim, rows = tab["dim"], {}
        for _ in range(tab["rows"]):
            (rid,) = struct.unpack("<Q", raw[at:at + 8])
            rows[rid] = struct.unpack(f"<{dim}f", raw[at + 8:at + 8 + 4 * dim])
            at += 8 + 4 * dim
        tables[t] = rows
    check(at == len(raw) - 8, f"{os.path.basename(path)}: the rows end at the checksum")
    return header, dense, tables


def rows_rel_diff(a, b):
    """max over tables of |a - b| / |b| over every row of b (a row missing in a counts as
    zeros), and whether both hold the same rows."""
    worst, same_keys = 0.0, True
    for t in b:
        same_keys &= set(a[t]) == set(b[t])
        num = den = 0.0
        for rid, vb in b[t].items():
            va = a[t].get(rid, [0.0] * len(vb))
            num += sum((x - y) ** 2 for x, y in zip(va, vb))
            den += sum(y * y for y in vb)
        worst = max(worst, (num / den) ** 0.5 if den else 0.0)
    return worst, same_keys


def summary(path):
    return json.load(open(path))


def equivalence(bin_dir, tmp):
    data = make_data(bin_dir, tmp)
    common = [*MODEL, "--data-dir", data, "--optimizer", "sgd", "--lr", "0.1", "--table-lr",
              "0.1", "--max-steps", "8", "--seed", "5", "--quiet"]
    init, ref, ref_model = (os.path.join(tmp, x) for x in ("init.bin", "local.bin", "local.pst"))
    run([os.path.join(bin_dir, "pstrain"), "--mode", "local", "--batch-size", "256", *common,
         "--init-out", init, "--params-out", ref, "--export", ref_model])
    p0, pref = params(init), params(ref)
    _, _, rref = read_export(ref_model)
    check(sum(len(r) for r in rref.values()) > 1000, "the local run created table rows")
    for mode, extra, bound in (("ps", ["--ps", "2"], 1e-4), ("allreduce", [], 1e-4)):
        out, model = os.path.join(tmp, f"{mode}.bin"), os.path.join(tmp, f"{mode}.pst")
        launch(bin_dir, "--mode", mode, *extra, "--workers", "2", "--batch-size", "128",
               *common, "--params-out", out, "--export", model)
        d = rel_diff(p0, params(out), pref)
        check(d <= bound, f"{mode}: 8 steps of 2 workers x 128 move the dense parameters as 8 "
              f"local steps of 256 do: |d-dref|/|dref| = {d:.2e} <= {bound}")
        rd, same = rows_rel_diff(read_export(model)[2], rref)
        check(same, f"{mode}: the tables hold exactly the local run's rows")
        check(rd <= bound, f"{mode}: and their values agree: {rd:.2e} <= {bound}")
    # Negative control: worker 1 pushes zeros; the bounds above must fail.
    bad, bad_model = os.path.join(tmp, "bad.bin"), os.path.join(tmp, "bad.pst")
    launch(bin_dir, "--ps", "2", "--workers", "2", "--batch-size", "128", *common,
           "--params-out", bad, "--export", bad_model, "--fault", "zero-gradient",
           "--fault-rank", "1")
    d = rel_diff(p0, params(bad), pref)
    rd, _ = rows_rel_diff(read_export(bad_model)[2], rref)
    check(d > 1e-2 and rd > 1e-3,
          f"negative control: a worker pushing zero gradients is caught (dense {d:.2e}, rows "
          f"{rd:.2e})")


def learns(bin_dir, tmp):
    # Strong planted interactions over small vocabularies, so that 24k rows
    # are enough for the factorization machine to show (Bayes AUC ~0.97, the
    # first-order part alone ~0.60).
    data = make_data(bin_dir, tmp, extra=["--vocab-max", "1000", "--sigma-v", "0.3",
                                          "--rank-scale", "50", "--tail-decay", "1"])
    meta = json.load(open(os.path.join(data, "meta.json")))
    common = ["--data-dir", data, "--epochs", "3", "--table-lr", "0.2", "--threads", "1",
              "--quiet"]
    auc = {}
    for name, mode, extra in (("local deepfm", "local", MODEL),
                              ("local lr", "local", ["--model", "lr"]),
                              ("ps deepfm", "ps", MODEL),
                              ("ps async deepfm", "ps", MODEL + ["--sync", "async"]),
                              ("allreduce deepfm", "allreduce", MODEL)):
        s_path = os.path.join(tmp, name.replace(" ", "_") + ".json")
        # The same global batch, 128, in every mode.
        args = ["--mode", mode, *extra, *common, "--batch-size", "128" if mode == "local" else
                "64", "--summary", s_path]
        if mode == "local":
            run([os.path.join(bin_dir, "pstrain"), *args])
        else:
            launch(bin_dir, "--workers", "2", *args)
        s = summary(s_path)
        auc[name] = s["auc"]
        check(s["bayes_auc"] == meta["bayes_auc"] and s["unique_ids_per_batch"] > 0 and
              s["rows_pulled_per_sec"] > 0 and 0 < s["logloss"] < 0.69,
              f"{name}: the summary has auc {s['auc']:.4f}, logloss {s['logloss']:.4f}, "
              f"bayes_auc, {s['unique_ids_per_batch']:.0f} unique rows a batch, "
              f"{s['rows_pulled_per_sec']:.0f} rows pulled/s")
        check(s["auc"] > 0.72, f"{name} learns: test AUC {s['auc']:.4f} > 0.72 (Bayes "
              f"{meta['bayes_auc']:.4f})")
    for name in ("ps deepfm", "ps async deepfm", "allreduce deepfm"):
        check(auc[name] > auc["local lr"] + 0.03,
              f"{name} learns the interactions too: {auc[name]:.4f}")
    check(auc["local deepfm"] > auc["local lr"] + 0.03,
          f"DeepFM beats logistic regression on the planted interactions: "
          f"{auc['local deepfm']:.4f} vs {auc['local lr']:.4f}")


def recovery(bin_dir, tmp):
    data = make_data(bin_dir, tmp)
    common = ["--ps", "2", "--workers", "2", *MODEL, "--data-dir", data, "--batch-size", "64",
              "--epochs", "2", "--checkpoint-every", "10", "--quiet"]
    ref_p, ref_m = os.path.join(tmp, "ref.bin"), os.path.join(tmp, "ref.pst")
    launch(bin_dir, *common, "--params-out", ref_p, "--export", ref_m)
    _, _, rr = read_export(ref_m)
    # Killed at step 150, and at 175: then the chief mostly notices the rollback in its
    # evaluation at the end of epoch 1 (step 187), whose path used to keep the batch it
    # held for step 187 across the restart of the input and fail the run (7 of 8 runs).
    for at in ("150", "175"):
        out_p, out_m = (os.path.join(tmp, f"kill{at}.{x}") for x in ("bin", "pst"))
        p = launch(bin_dir, *common, "--chaos-kill-ps", at, "--chaos-seed", "2", "--summary",
                   os.path.join(tmp, "kill.json"), "--params-out", out_p, "--export", out_m)
        s = summary(os.path.join(tmp, "kill.json"))
        seen = re.findall(r"step (\d+): the cluster rolled back", p.stderr)
        check("SIGKILL" in p.stderr and s["rollbacks"] >= 1,
              f"kill at {at}: a PS was killed mid-run and the cluster rolled back "
              f"({s['rollbacks']} rollback seen at step {', '.join(sorted(set(seen)))}, "
              f"{s['steps_redone']} steps redone)")
        check(params(out_p) == params(ref_p),
              "the dense parameters end bit-identical to an undisturbed run's")
        _, _, rk = read_export(out_m)
        check(rk == rr, f"so do all {sum(len(r) for r in rr.values())} table rows (restored "
              f"from the checkpoint, the later steps redone)")
    # Allreduce mode (elastic ring): worker 1 killed and started again takes the
    # survivors' dense parameters, optimizer state and whole tables; the ring of 3
    # goes on and ends bit-identical to an undisturbed run.
    ar = ["--mode", "allreduce", "--workers", "3", *MODEL, "--data-dir", data, "--batch-size",
          "64", "--epochs", "2", "--quiet"]
    f = lambda name: os.path.join(tmp, name)
    launch(bin_dir, *ar, "--params-out", f("ar.bin"), "--export", f("ar.pst"))
    p = launch(bin_dir, *ar, "--chaos-kill-worker", "100", "--chaos-seed", "0", "--params-out",
               f("ark.bin"), "--export", f("ark.pst"))
    check("chaos: killed worker 1" in p.stderr and "the ring formed again" in p.stderr and
          "resuming where the others stand" in p.stderr,
          "allreduce: worker 1 killed mid-run rejoined the ring and took the others' state")
    _, _, a_rows = read_export(f("ar.pst"))
    _, _, k_rows = read_export(f("ark.pst"))
    check(params(f("ark.bin")) == params(f("ar.bin")) and k_rows == a_rows,
          f"and the run ends bit-identical to an undisturbed one: dense parameters and all "
          f"{sum(len(r) for r in a_rows.values())} table rows")


ROW_CACHE = re.compile(r"ps (\d) info: row cache at exit: (\d+) rows, (\d+) in memory \(([\d.]+) of "
                       r"([\d.]+) MiB\), (\d+) in the row store; hit rate ([\d.]+) %.*?(\d+) "
                       r"evicted.*peak RSS ([\d.]+) MiB \(anonymous: ([\d.]+) MiB")
ADMISSION = re.compile(r"ps (\d) info: row cache at exit: (\d+) rows.*; (\d+) reads not admitted, "
                       r"(\d+) updates dropped, (\d+) rows expired")


# A shard's anonymous memory without its rows, for this test's small model: gRPC and its
# threads, the dense state, both LevelDBs' memtables and caches (about 9 MiB measured; the
# bound for the DeepFM main job is in docs/bench-log.md, "Embedding rows beyond memory").
ANON_BASE_MIB = 16


def beyond_memory(bin_dir, tmp):
    data = make_data(bin_dir, tmp)
    with open(os.path.join(bin_dir, "psserver"), "rb") as f:
        sanitized = b"libasan" in f.read()
    common = ["--ps", "2", "--workers", "2", *MODEL, "--data-dir", data, "--batch-size", "64",
              "--epochs", "1", "--checkpoint-every", "40"]
    runs = {}
    for name, extra in (("in memory", []), ("budget", ["--ps-memory-mb", "0.2"]),
                        ("budget, PS killed", ["--ps-memory-mb", "0.2", "--chaos-kill-ps",
                                               "120", "--chaos-seed", "1"])):
        tag = name.split(",")[0].replace(" ", "_") + ("_kill" if "killed" in name else "")
        out = {k: os.path.join(tmp, f"{tag}.{k}") for k in ("json", "bin", "pst")}
        p = launch(bin_dir, *common, *extra, "--summary", out["json"], "--params-out",
                   out["bin"], "--export", out["pst"])
        caches = ROW_CACHE.findall(p.stderr)
        runs[name] = (summary(out["json"]), params(out["bin"]), read_export(out["pst"])[2],
                      caches, p.stderr)
    ref_s, ref_p, ref_rows, ref_caches, _ = runs["in memory"]
    check(len(ref_caches) == 2 and all(int(c[7]) == 0 and c[1] == c[2] for c in ref_caches),
          f"without --ps-memory-mb every row stays in memory (the row store holds the "
          f"checkpoints' rows): {[(c[1], c[2], c[7]) for c in ref_caches]} (rows, in memory, "
          f"evicted)")
    s, p, rows, caches, _ = runs["budget"]
    check(len(caches) == 2, f"each PS reports its row cache at exit ({len(caches)} lines)")
    for ps, total, resident, used_mib, budget_mib, stored, hit, evicted, rss, anon in caches:
        total = int(total)
        check(float(used_mib) <= float(budget_mib) == 0.2 and int(evicted) > 0 and
              total >= 10 * int(resident),
              f"PS {ps}: {resident} rows in memory ({used_mib} of {budget_mib} MiB), "
              f"{total} rows in all ({total / int(resident):.0f}x), hit rate {hit} %, "
              f"{evicted} evictions, peak RSS {rss} MiB, anonymous {anon} MiB")
        # The bound (docs/bench-log.md, "Embedding rows beyond memory"): budget + 2 x budget (rows, the checkpoint's copy)
        # + the process without rows: gRPC, dense state, LevelDB's memtables and caches.
        # Not under AddressSanitizer, whose shadow memory and quarantine are anonymous too.
        if not sanitized:
            check(float(anon) <= 3 * float(budget_mib) + ANON_BASE_MIB,
                  f"PS {ps}: anonymous RSS {anon} MiB <= 3 x budget + {ANON_BASE_MIB} MiB")
    pr = s["ps_rows"]
    check(abs(pr["budget_mb"] - 0.4) < 1e-6 and pr["rows"] == sum(int(c[1]) for c in caches) and
          pr["in_row_stores"] > 10 * pr["in_memory"] and 0 < pr["hit_rate"] < 1 and
          pr["evictions"] > 0 and ref_s["ps_rows"]["budget_mb"] == 0,
          f"the chief's summary reports the shards' rows: {pr}")
    check(abs(s["auc"] - ref_s["auc"]) <= 0.002 and p == ref_p,
          f"the same run with every row in memory: AUC {s['auc']:.4f} vs {ref_s['auc']:.4f}, "
          f"dense parameters bit-identical")
    check(rows == ref_rows, f"so are all {sum(len(r) for r in ref_rows.values())} exported "
          f"table rows (read back from the row stores)")
    s, p, rows, caches, err = runs["budget, PS killed"]
    check("SIGKILL" in err and s["rollbacks"] >= 1,
          f"with the budget, a PS killed mid-run comes back ({s['rollbacks']} rollback, its "
          f"rows restored through the row cache)")
    check(p == ref_p and rows == ref_rows and s["auc"] == ref_s["auc"],
          "and that run too ends bit-identical to the one in memory")
    # A row store that cannot be made: psserver stops at once, naming it.
    blocker = os.path.join(tmp, "a-file")
    open(blocker, "w").close()
    ports = free_ports(2)
    p = run([os.path.join(bin_dir, "psserver"), "--ps-hosts", f"127.0.0.1:{ports[0]}",
             "--worker-hosts", f"127.0.0.1:{ports[1]}", "--task-index", "0", "--memory-mb", "1",
             "--rows-dir", os.path.join(blocker, "rows")], expect_ok=False)
    check(p.returncode != 0 and os.path.join(blocker, "rows") in p.stderr and
          "Not a directory" in p.stderr,
          f"an impossible --rows-dir stops psserver with a message naming it: "
          f"{p.stderr.strip().splitlines()[-1]}")
    for flags, name in ((["--admit-after", "300"], "--admit-after"),
                        (["--memory-mb", "-1"], "--memory-mb"),
                        (["--rows-dir", tmp], "--rows-dir needs --memory-mb or --data-dir")):
        p = run([os.path.join(bin_dir, "psserver"), *flags], expect_ok=False)
        check(p.returncode == 2 and name in p.stderr,
              f"psserver {' '.join(flags)} is refused naming the flag: {p.stderr.strip()}")
    # Admission after 2 sightings and expiry after 60 versions (of 187), with the budget.
    out = os.path.join(tmp, "admit.json")
    p = launch(bin_dir, *common, "--ps-memory-mb", "0.2", "--ps-arg=--admit-after",
               "--ps-arg=2", "--ps-arg=--expire-after-steps", "--ps-arg=60", "--summary", out)
    s, lines = summary(out), ADMISSION.findall(p.stderr)
    ref_total = sum(len(r) for r in ref_rows.values())
    total = sum(int(x[1]) for x in lines)
    check(len(lines) == 2 and all(int(x[2]) > 0 and int(x[3]) > 0 and int(x[4]) > 0
                                  for x in lines),
          f"admission and expiry at work: {[x[2:] for x in lines]} (reads not admitted, "
          f"updates dropped, rows expired per PS)")
    check(total < ref_total // 2 and s["auc"] > ref_s["auc"] - 0.05,
          f"{total} rows instead of {ref_total}, AUC {s['auc']:.4f} (all rows: "
          f"{ref_s['auc']:.4f})")


def export(bin_dir, tmp):
    data = make_data(bin_dir, tmp)
    common = [*MODEL, "--data-dir", data, "--epochs", "1", "--batch-size", "128", "--quiet"]
    pstrain = os.path.join(bin_dir, "pstrain")
    for mode in ("local", "ps"):
        model, s_path = os.path.join(tmp, f"{mode}.pst"), os.path.join(tmp, f"{mode}.json")
        args = ["--mode", mode, *common, "--export", model, "--summary", s_path]
        if mode == "local":
            run([pstrain, *args])
        else:
            launch(bin_dir, "--ps", "2", "--workers", "2", *args)
        trained = summary(s_path)["auc"]
        e_path = os.path.join(tmp, f"{mode}-eval.json")
        p = run([pstrain, "--eval-only", "--init-from", model, "--data-dir", data, "--summary",
                 e_path])
        ev = summary(e_path)
        check(ev["mode"] == "eval" and abs(ev["auc"] - trained) < 1e-6,
              f"{mode}: the exported DeepFM evaluates to the trained run's AUC "
              f"({ev['auc']:.6f} vs {trained:.6f})")
        check("test auc" in p.stdout, "--eval-only prints the AUC")
    p = run([pstrain, "--mode", "local", *common, "--init-from", model], expect_ok=False)
    check(p.returncode != 0 and "not supported yet" in p.stderr,
          "--init-from of a model with tables is refused with a clear message")


def bad_input(bin_dir, tmp):
    pstrain = os.path.join(bin_dir, "pstrain")
    data = make_data(bin_dir, tmp)
    # A copy with bad lines of every kind spliced in.
    bad = os.path.join(tmp, "bad")
    os.makedirs(bad)
    lines = open(os.path.join(data, "train.txt")).read().splitlines(True)
    junk = ["1\t2\t3\n",                                   # too few fields
            "2" + lines[0][1:],                              # label 2
            lines[1].replace("\t", "\tzz", 1).replace("\tzz", "\t12a", 1),  # integer 12a
            "\t".join(lines[2].split("\t")[:14] + ["xyz!"] + lines[2].split("\t")[15:])]
    out = lines[:100] + junk + lines[100:]
    open(os.path.join(bad, "train.txt"), "w").writelines(out)
    os.link(os.path.join(data, "test.txt"), os.path.join(bad, "test.txt"))
    common = [*MODEL, "--data-dir", bad, "--max-steps", "3", "--batch-size", "64"]
    p = run([pstrain, "--mode", "local", *common])
    check(p.returncode == 0 and "train.txt:101" in p.stderr and "skipped 4 bad training" in
          p.stderr, "bad lines are skipped with a warning naming the file and line, and counted")
    p = run([pstrain, "--mode", "local", *common, "--max-bad-lines", "2"], expect_ok=False)
    check(p.returncode != 0 and "2" in p.stderr and "train.txt" in p.stderr and
          "bad" in p.stderr, f"past --max-bad-lines the run fails, naming the threshold and the "
          f"file: {p.stderr.strip().splitlines()[-2:]}")
    p = run([pstrain, "--mode", "local", "--model", "deepfm", "--data-dir",
             os.path.join(tmp, "none")], expect_ok=False)
    check(p.returncode != 0 and "make-ctr-data" in p.stderr,
          "a missing data directory is an error that says how to make one")
    p = run([pstrain, "--model", "deepfm", "--hidden", "400,x"], expect_ok=False)
    check(p.returncode == 2 and "--hidden" in p.stderr, "a bad --hidden is refused")
    p = run([pstrain, "--model", "fm"], expect_ok=False)
    check(p.returncode == 2 and "--model" in p.stderr, "an unknown model is refused")
    p = launch(bin_dir, "--mode", "allreduce", "--workers", "2", *common,
               "--checkpoint-dir", os.path.join(tmp, "ar"), expect_ok=False)
    check(p.returncode != 0 and "checkpoints of tables" in p.stderr,
          "allreduce mode says why it cannot checkpoint tables")


if __name__ == "__main__":
    from itest import main
    main(__doc__, {"equivalence": equivalence, "learns": learns, "recovery": recovery,
                   "export": export, "bad-input": bad_input, "beyond-memory": beyond_memory},
         "ctr_mode.")
