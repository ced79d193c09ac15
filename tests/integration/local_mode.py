#!/usr/bin/env python3
"""Integration scenarios of local mode, run against the real pstrain binary.

  local_mode.py BIN learns      a short run on a 10k subset learns
  local_mode.py BIN devices     D=1 and D=3 replicas train to the same weights
  local_mode.py BIN bad-input   bad options and broken data give clear errors
  local_mode.py BIN export      --export, then --eval-only and --init-from use the file
  local_mode.py BIN staged      CPU devices driven as GPUs are (--devices staged: uploads,
                                downloads, host reduce) train to the same weights, bit for bit
  local_mode.py BIN sim         --devices sim: steps take the simulated time, the gradients
                                are deterministic and of the model's size, the summary says
                                simulated; --model-mb, --sim-input-ms and --no-prefetch
Each scenario is bounded in time and exits non-zero on failure.
"""
import gzip
import json
import math
import os
import shutil
import struct
import subprocess
import sys
import tempfile

TIMEOUT = 240
DATA_DIR = os.environ.get("PS_DATA_DIR", "/usr/share/datasets/fashion-mnist")


def run(bin_, *args, expect_ok=True):
    p = subprocess.run([bin_, *args], capture_output=True, text=True, timeout=TIMEOUT)
    if expect_ok and p.returncode != 0:
        sys.exit(f"pstrain {' '.join(args)} failed ({p.returncode}):\n{p.stdout}\n{p.stderr}")
    return p


def check(cond, msg):
    if not cond:
        sys.exit("FAIL: " + msg)
    print("ok:", msg)


def learns(bin_, tmp):
    summary, log = os.path.join(tmp, "s.json"), os.path.join(tmp, "l.jsonl")
    p = run(bin_, "--train-limit", "10000", "--epochs", "1", "--batch-size", "128",
            "--threads", "1", "--seed", "3", "--summary", summary, "--log", log)
    s = json.load(open(summary))
    for key in ("test_accuracy", "steps", "examples_per_sec", "seconds", "mode",
                "workers", "ps"):
        check(key in s, f"summary has {key}")
    check(s["mode"] == "local" and s["workers"] == 1 and s["ps"] == 0, "summary names local mode")
    # The BLAS kernels set the last bits of every result: the summary and the
    # first log line name them ("OpenBLAS 0.3.21, Haswell kernels").
    blas = s.get("blas", "")
    check(blas.startswith("OpenBLAS ") and blas.endswith(" kernels") and len(blas) > 18,
          f"summary names the BLAS kernels: {blas!r}")
    check(f"({blas})" in p.stderr + p.stdout, "the first log line names the BLAS kernels")
    check(s["steps"] == 10000 // 128, f"steps = 10000 // 128 (remainder dropped): {s['steps']}")
    check(s["test_accuracy"] > 0.6, f"learns: test accuracy {s['test_accuracy']:.4f} > 0.6 "
          "(chance is 0.1)")
    check("test accuracy" in p.stdout, "prints the final test accuracy")
    lines = [json.loads(l) for l in open(log)]
    check(len(lines) == s["steps"], f"one log line per step ({len(lines)})")
    for key in ("data_wait_ms", "compute_ms", "local_reduce_ms", "comm_ms", "apply_ms"):
        check(all(key in l and l[key] >= 0 for l in lines), f"log lines have {key}")
    check(lines[-1]["loss"] < lines[0]["loss"], "loss falls over the run")


def read_params(path):
    data = open(path, "rb").read()
    return struct.unpack(f"<{len(data) // 4}f", data)


def devices(bin_, tmp):
    init = os.path.join(tmp, "p0.bin")
    common = ["--train-limit", "2000", "--test-limit", "500", "--optimizer", "sgd", "--lr",
              "0.1", "--batch-size", "100", "--threads", "1", "--quiet"]
    outs = {}
    for d in (1, 3):
        outs[d] = os.path.join(tmp, f"p{d}.bin")
        run(bin_, *common, "--max-steps", "5", "--local-devices", str(d),
            "--params-out", outs[d], "--init-out", init)
    p0, p1, p3 = read_params(init), read_params(outs[1]), read_params(outs[3])
    d1 = [b - a for a, b in zip(p0, p1)]
    d3 = [b - a for a, b in zip(p0, p3)]
    num = math.sqrt(sum((x - y) ** 2 for x, y in zip(d1, d3)))
    den = math.sqrt(sum(x * x for x in d1))
    check(den > 0, "the parameters moved")
    check(num <= 1e-5 * den, f"D=3 and D=1 change the parameters alike: "
          f"|d3-d1|/|d1| = {num / den:.2e} <= 1e-5")


def staged(bin_, tmp):
    common = ["--train-limit", "2000", "--test-limit", "500", "--optimizer", "sgd", "--lr",
              "0.1", "--batch-size", "100", "--threads", "1", "--quiet", "--max-steps", "5"]
    init = os.path.join(tmp, "p0.bin")
    for d in (1, 2):
        out = {}
        acc = {}
        for dev in ("cpu", "staged"):
            out[dev] = os.path.join(tmp, f"{dev}{d}.bin")
            summary = os.path.join(tmp, f"{dev}{d}.json")
            run(bin_, *common, "--local-devices", str(d), "--devices", dev, "--params-out",
                out[dev], "--init-out", init, "--summary", summary)
            acc[dev] = json.load(open(summary))["test_accuracy"]
        p0, pc, ps = read_params(init), read_params(out["cpu"]), read_params(out["staged"])
        check(pc != p0, f"D={d}: the parameters moved")
        check(pc == ps, f"D={d}: staged devices (uploads, downloads, host reduce) give the "
              "CPU replicas' parameters bit for bit")
        check(acc["cpu"] == acc["staged"], f"D={d}: and the same test accuracy "
              f"({acc['staged']:.4f})")


def bad_input(bin_, tmp):
    p = run(bin_, "--data-dir", os.path.join(tmp, "nowhere"), expect_ok=False)
    check(p.returncode != 0 and "dataset-fashion-mnist" in p.stderr,
          "a missing data directory is an error that names the package")
    broken = os.path.join(tmp, "broken")
    os.mkdir(broken)
    for name in os.listdir(DATA_DIR):
        shutil.copy(os.path.join(DATA_DIR, name), broken)
    raw = gzip.open(os.path.join(DATA_DIR, "train-images-idx3-ubyte.gz")).read()
    with gzip.open(os.path.join(broken, "train-images-idx3-ubyte.gz"), "wb") as f:
        f.write(raw[: len(raw) // 2])
    p = run(bin_, "--data-dir", broken, expect_ok=False)
    check(p.returncode != 0 and "truncated" in p.stderr, "a truncated image file is refused")
    with open(os.path.join(broken, "train-images-idx3-ubyte.gz"), "wb") as f:
        f.write(b"\x00\x00\x09\x03" + raw[4:64])
    p = run(bin_, "--data-dir", broken, expect_ok=False)
    check(p.returncode != 0 and "train-images" in p.stderr, "a file with a bad magic is refused")
    for args, what in ((["--epochs", "0"], "--epochs 0"), (["--optimizer", "rmsprop"], "an unknown optimizer"),
                       (["--batch-size", "x"], "a non-numeric batch size"), (["--bogus"], "an unknown flag"),
                       (["--layers", "784"], "a one-layer model"),
                       (["--layers", "100,10"], "a model whose input does not match the data")):
        p = run(bin_, *args, "--train-limit", "1000", "--test-limit", "100", expect_ok=False)
        check(p.returncode != 0 and p.stderr.strip(), f"{what} is refused with a message")
    small = ["--train-limit", "1000", "--test-limit", "100"]
    p = run(bin_, "--devices", "999", *small, expect_ok=False)
    check(p.returncode != 0 and "cuda device 999" in p.stderr,
          "a GPU that is not there is refused with a message naming it")
    p = run(bin_, "--devices", "cpu", "--precision", "bf16", *small, expect_ok=False)
    check(p.returncode != 0 and "bf16 needs GPU" in p.stderr, "bf16 on the CPU is refused")
    for bad in ("cpu,1", "-1", "0,0", "gpu"):
        p = run(bin_, "--devices", bad, *small, expect_ok=False)
        check(p.returncode != 0 and "--devices" in p.stderr, f"--devices {bad} is refused")
    p = run(bin_, "--help")
    check("--local-devices" in p.stdout and "--devices" in p.stdout and "--precision" in p.stdout,
          "--help lists the options")


def export(bin_, tmp):
    model, summary = os.path.join(tmp, "m.pst"), os.path.join(tmp, "s.json")
    final = os.path.join(tmp, "final.bin")
    common = ["--train-limit", "3000", "--test-limit", "1000", "--batch-size", "100",
              "--threads", "1", "--quiet"]
    p = run(bin_, *common, "--epochs", "1", "--seed", "5", "--export", model,
            "--summary", summary, "--params-out", final)
    check(model in p.stderr, "the chief logs the export path")
    raw = open(model, "rb").read()
    check(raw[:8] == b"PSTMODEL" and struct.unpack("<I", raw[8:12])[0] == 1,
          "the file starts with the magic and format version 1")
    hlen = struct.unpack("<I", raw[12:16])[0]
    header = json.loads(raw[16:16 + hlen])
    off = (16 + hlen + 63) // 64 * 64
    s = json.load(open(summary))
    check(header["sizes"] == [784, 256, 128, 10] and header["numel"] == 235146 and
          header["steps"] == s["steps"] and header["mode"] == "local",
          f"the header describes the model and the run: {header}")
    data = raw[off:-8]
    check(data == open(final, "rb").read(), "the file holds the final parameters (= --params-out)")
    check(not os.path.exists(model + ".tmp"), "no temporary file is left")

    ev = os.path.join(tmp, "e.json")
    p = run(bin_, "--eval-only", "--init-from", model, "--test-limit", "1000",
            "--batch-size", "100", "--summary", ev)
    e = json.load(open(ev))
    check(e["mode"] == "eval" and e["test_accuracy"] == s["test_accuracy"],
          f"--eval-only reproduces the run's test accuracy {s['test_accuracy']:.4f}")
    check(abs(e["test_loss"] - s["test_loss"]) <= 1e-6 * abs(s["test_loss"]),
          "and its test loss")
    check("test accuracy" in p.stdout, "--eval-only prints the test accuracy")

    init = os.path.join(tmp, "init.bin")
    run(bin_, *common, "--max-steps", "1", "--init-from", model, "--init-out", init)
    check(open(init, "rb").read() == data, "--init-from starts from the file's parameters")
    log = os.path.join(tmp, "l.jsonl")
    first = {}
    for name, extra in (("fresh", []), ("from file", ["--init-from", model])):
        run(bin_, *common, "--max-steps", "1", "--log", log, *extra)
        first[name] = json.loads(open(log).readline())["loss"]
    check(first["from file"] < 0.5 * first["fresh"],
          f"training from the file goes on from the trained loss: {first}")

    p = run(bin_, *common, "--max-steps", "1", "--layers", "784,64,10", "--init-from", model,
            expect_ok=False)
    check(p.returncode != 0 and "784,256,128,10" in p.stderr and "784,64,10" in p.stderr,
          "a file of another model is refused with a message naming both")
    bad = os.path.join(tmp, "bad.pst")
    with open(bad, "wb") as f:
        f.write(raw[:-9] + bytes([raw[-9] ^ 1]) + raw[-8:])
    p = run(bin_, "--eval-only", "--init-from", bad, expect_ok=False)
    check(p.returncode != 0 and "checksum" in p.stderr, "a corrupt file is refused")
    with open(bad, "wb") as f:
        f.write(raw[: len(raw) // 2])
    p = run(bin_, *common, "--init-from", bad, expect_ok=False)
    check(p.returncode != 0 and "truncated" in p.stderr, "a truncated file is refused")
    p = run(bin_, "--eval-only", expect_ok=False)
    check(p.returncode != 0 and "--init-from" in p.stderr, "--eval-only needs --init-from")


def sim(bin_, tmp):
    base = ["--devices", "sim", "--epochs", "1", "--train-limit", "2560", "--test-limit", "200",
            "--max-steps", "10", "--quiet"]
    out = []
    for k in range(2):
        s, pout = os.path.join(tmp, f"s{k}.json"), os.path.join(tmp, f"p{k}.bin")
        run(bin_, *base, "--sim-step-ms", "30", "--summary", s, "--params-out", pout,
            "--init-out", os.path.join(tmp, "init.bin"))
        out.append((json.load(open(s)), open(pout, "rb").read()))
    sm = out[0][0]
    check(sm["simulated"] is True and sm["device"] == "sim" and sm["devices"] == 1,
          f"the summary says simulated ({sm['device']}, {sm['devices']} device)")
    check(sm["steps"] == 10 and sm["seconds"] >= 10 * 0.030,
          f"10 steps of 30 ms took {sm['seconds']:.3f} s (at least 0.3)")
    init = open(os.path.join(tmp, "init.bin"), "rb").read()
    check(out[0][1] == out[1][1] and out[0][1] != init and len(init) == 4 * sm["numel"],
          "two runs end bit-identical, moved from the initial weights (deterministic, "
          f"{sm['numel']} parameters' gradients)")
    # Steps of 30 ms +- 50 %: the same gradients, so the same parameters; the summary
    # says so.
    s, pout = os.path.join(tmp, "jit.json"), os.path.join(tmp, "jit.bin")
    run(bin_, *base, "--sim-step-ms", "30", "--sim-jitter", "0.5", "--summary", s,
        "--params-out", pout)
    sj = json.load(open(s))
    check(open(pout, "rb").read() == out[0][1] and sj["sim"]["jitter"] == 0.5 and
          sj["seconds"] >= 10 * 0.015,
          f"--sim-jitter 0.5: the same parameters, {sj['seconds']:.3f} s for 10 steps")
    # A 10 MB MLP: about 2.5 M floats.
    s = os.path.join(tmp, "mb.json")
    run(bin_, *base, "--sim-tflops", "10", "--sim-intra-gbps", "50", "--model-mb", "10",
        "--summary", s)
    mb = json.load(open(s))
    check(abs(mb["numel"] * 4 / 10e6 - 1) < 0.01 and mb["sim"]["tflops"] == 10,
          f"--model-mb 10: {mb['numel']} parameters ({mb['numel'] * 4 / 1e6:.2f} MB)")
    # Input costs 40 ms a batch, a step 40 ms: read ahead they overlap, not without.
    secs = {}
    for flag in ([], ["--no-prefetch"]):
        s = os.path.join(tmp, "in.json")
        run(bin_, *base, "--sim-step-ms", "40", "--sim-input-ms", "40", "--summary", s, *flag)
        secs[bool(flag)] = json.load(open(s))["seconds"]
    check(secs[True] >= 10 * 0.070 and secs[False] < 0.8 * secs[True],
          f"--sim-input-ms 40 with steps of 40 ms: {secs[False]:.2f} s prefetched, "
          f"{secs[True]:.2f} s with --no-prefetch (10 x 80 ms in series)")
    p = run(bin_, *base, expect_ok=False)
    check(p.returncode == 2 and "--sim-tflops" in p.stderr,
          "--devices sim without a speed is refused, naming the flags")
    p = run(bin_, "--sim-step-ms", "5", "--max-steps", "1", expect_ok=False)
    check(p.returncode == 2 and "--devices sim" in p.stderr,
          "--sim-step-ms without --devices sim is refused")
    p = run(bin_, "--sim-jitter", "0.1", "--max-steps", "1", expect_ok=False)
    check(p.returncode == 2 and "--devices sim" in p.stderr,
          "--sim-jitter without --devices sim is refused")
    p = run(bin_, *base, "--sim-step-ms", "5", "--sim-jitter", "1", expect_ok=False)
    check(p.returncode == 2 and "--sim-jitter" in p.stderr, "--sim-jitter 1 is refused")
    p = run(bin_, *base, "--sim-step-ms", "5", "--devices", "sim:0", expect_ok=False)
    check(p.returncode == 2 and "sim:N" in p.stderr, "--devices sim:0 is refused")


def main():
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    bin_, scenario = sys.argv[1], sys.argv[2]
    tmp = tempfile.mkdtemp(prefix="pstest-")
    try:
        {"learns": learns, "devices": devices, "bad-input": bad_input,
         "export": export, "staged": staged, "sim": sim}[scenario](bin_, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print("PASS", scenario)


if __name__ == "__main__":
    main()
