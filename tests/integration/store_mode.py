#!/usr/bin/env python3
"""A shard's checkpoint store never loses a generation: real psserver and pstrain processes.

  store_mode.py BIN_DIR current-lost  a PS checkpoints while a worker trains; with the
                                      store's CURRENT file removed, psserver refuses to
                                      start (exit 1, naming CURRENT and the remedy) and
                                      leaves every file as it was; `psserver --repair`
                                      rebuilds the store, and psserver then restores its
                                      newest checkpoint
  store_mode.py BIN_DIR flipped-bit   one bit flipped in a blob of the newest generation,
                                      inside the LevelDB table file: psserver restores
                                      the generation before it and names the damaged one
Every process listens on 127.0.0.1, runs under a timeout, and is stopped by PID.
"""
import hashlib
import os
import signal
import struct
import subprocess
import time

from itest import check, free_ports, main, run


class Shard:
    """One PS (shard 0 of 1) on a data directory, and the worker that trains it."""

    def __init__(self, bin_dir, tmp):
        self.pstrain = os.path.join(bin_dir, "pstrain")
        self.psserver = os.path.join(bin_dir, "psserver")
        self.data = os.path.join(tmp, "ckpt")
        self.dir = os.path.join(self.data, "shard-0")
        ps_port, worker_port = free_ports(2)
        self.hosts = ["--ps-hosts", f"127.0.0.1:{ps_port}", "--worker-hosts",
                      f"127.0.0.1:{worker_port}", "--task-index", "0"]
        self.tmp = tmp
        self.runs = 0

    def start(self):
        """A psserver on the directory, its stderr in a log file: (process, log path)."""
        self.runs += 1
        log = os.path.join(self.tmp, f"ps{self.runs}.log")
        with open(log, "w") as f:
            proc = subprocess.Popen([self.psserver, *self.hosts, "--data-dir", self.data,
                                     "--checkpoint-every", "5"], stderr=f)
        return proc, log

    def train(self, steps=20):
        """Train up to step 'steps' with a checkpoint every 5: the versions committed,
        oldest first, and what the worker said."""
        proc, log = self.start()
        try:
            p = run([self.pstrain, *self.hosts, "--max-steps", str(steps), "--train-limit",
                     "3000", "--test-limit", "500", "--threads", "1", "--quiet",
                     "--connect-timeout-ms", "20000"], timeout=120)
            proc.wait(timeout=30)
        finally:
            halt(proc)
        out = open(log).read()
        check(proc.returncode == 0, f"the PS trained to step {steps} and exited 0" +
              ("" if proc.returncode == 0 else f":\n{out}"))
        done = [int(l.split("checkpoint of version ")[1].split()[0]) for l in out.splitlines()
                if "checkpoint of version " in l and "committed" in l]
        check(len(done) >= 1 and done[-1] == steps, f"checkpoints committed: {done}")
        return done, p.stderr

    def restore(self, want=None):
        """Start psserver, wait for its restore, stop it: the line that says what it
        restored (None if it exited first), and its whole log."""
        proc, log = self.start()
        line = None
        try:
            deadline = time.monotonic() + 60
            while line is None and proc.poll() is None and time.monotonic() < deadline:
                line = next((l for l in open(log).read().splitlines()
                             if "restored version" in l), None)
                time.sleep(0.1)
        finally:
            halt(proc)
        out = open(log).read()
        if want is not None:
            check(line is not None and f"restored version {want} from {self.dir}" in line,
                  f"psserver restores version {want}: {line or out.strip()[-600:]}")
            check(proc.returncode == 0, "and exits 0 on SIGTERM")
        return line, out


def halt(proc):
    """SIGTERM a process started here (SIGKILL after 20 s); nothing if it has exited."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def listing(d):
    """Every entry below d with a hash of its bytes: equal iff nothing changed."""
    out = {}
    for root, dirs, files in os.walk(d):
        for name in dirs:
            out[os.path.relpath(os.path.join(root, name), d) + "/"] = ""
        for name in files:
            path = os.path.join(root, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, d)] = hashlib.sha256(f.read()).hexdigest()
    return out


def current_lost(bin_dir, tmp):
    shard = Shard(bin_dir, tmp)
    done, _ = shard.train()
    # Started again, LevelDB writes what its log holds into a table file: the
    # files a new database would delete (a log it would replay).
    shard.restore(want=done[-1])
    check(any(n.endswith(".ldb") for n in os.listdir(shard.dir)), "the store has a table file")
    os.remove(os.path.join(shard.dir, "CURRENT"))
    before = listing(shard.dir)
    proc, log = shard.start()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        pass  # Serving: it took the directory for a new store.
    finally:
        halt(proc)
    err = open(log).read().strip()
    check(proc.returncode == 1 and "no LevelDB CURRENT file" in err and
          f"psserver --repair {shard.dir}" in err,
          f"psserver refuses the store without CURRENT, naming the remedy: {err[-400:]}")
    check(listing(shard.dir) == before,
          f"and leaves its {len(before)} files as they were (names and bytes)")
    p = run([shard.psserver, "--repair", shard.data], expect_ok=False)
    check(p.returncode == 1 and "shard-<i>" in p.stderr,
          f"--repair on the data directory points at its shards: {p.stderr.strip()}")
    p = run([shard.psserver, "--repair", shard.dir])
    kept = int(p.stdout.split(": ")[2].split()[0]) if "repaired" in p.stdout else -1
    check(1 <= kept <= len(done), f"psserver --repair rebuilds it: {p.stdout.strip()}")
    shard.restore(want=done[-1])


def newest_blob_entry(shard_dir, version):
    """In the store's table files, a chunk of generation 'version' as LevelDB lays it
    out in a data block: shared-prefix length 0, key length 29 (the 21-byte key and
    LevelDB's 8-byte sequence), the value's length (a varint), the key, then the value
    itself, raw (no compression). Returns (path, offset of the value, its length, part,
    kind) of the first one of at least 64 KiB (so not an index entry), or None."""
    prefix = b"g" + struct.pack(">q", version)
    for name in sorted(os.listdir(shard_dir)):
        if not name.endswith(".ldb"):
            continue
        path = os.path.join(shard_dir, name)
        data = open(path, "rb").read()
        at = data.find(prefix)
        while at >= 0:
            for n in range(2, 6):  # the value length's varint: n bytes before the key
                if at - n - 2 < 0:
                    continue
                raw = data[at - n:at]
                if any(b < 0x80 for b in raw[:-1]) or raw[-1] >= 0x80:
                    continue
                length = sum((b & 0x7f) << (7 * i) for i, b in enumerate(raw))
                if (data[at - n - 2:at - n] == b"\x00\x1d" and length >= 65536 and
                        at + 29 + length <= len(data)):
                    part, kind = struct.unpack(">II", data[at + 9:at + 17])
                    return path, at + 29, length, part, kind
            at = data.find(prefix, at + 1)
    return None


def flipped_bit(bin_dir, tmp):
    shard = Shard(bin_dir, tmp)
    done, _ = shard.train()
    check(len(done) >= 2, "at least two generations (the first and the final one)")
    newest = done[-1]
    shard.restore(want=newest)  # The log into a table file, as above.
    entry = newest_blob_entry(shard.dir, newest)
    check(entry is not None, f"a chunk of version {newest} found in a table file: {entry}")
    path, off, length, part, kind = entry
    with open(path, "r+b") as f:
        f.seek(off + length // 2)
        b = f.read(1)[0]
        f.seek(off + length // 2)
        f.write(bytes([b ^ 0x10]))
    line, out = shard.restore()
    damaged = f"version {newest}, part {part} kind {kind}"
    check(damaged in out and "fails its checksum" in out,
          f"psserver names the damaged generation: "
          f"{next((l for l in out.splitlines() if damaged in l), out.strip()[-600:])}")
    check(line is not None, "psserver falls back instead of refusing to start (its open_store "
          "must restore st_store_newest_intact's version)" +
          ("" if line is not None else f":\n{out.strip()[-600:]}"))
    older = int(line.split("restored version ")[1].split()[0])
    check(older in done and older < newest,
          f"it restored version {older}, the newest intact one before {newest}: {line}")
    # The shard does not offer the damaged generation: the chief rolls the
    # cluster back to the restored one and training goes on from there.
    _, said = shard.train(newest + 5)
    check(f"rolling the cluster back to version {older}" in said and
          f"resuming at step {older}" in said,
          f"a worker started on it resumes at step {older} and trains to {newest + 5}")


def full_disk(bin_dir, tmp):
    """D4 (issue 14): a checkpoint that cannot be written (a full disk; here a file size limit,
    so LevelDB's writes fail with EFBIG) stops the PS with the retryable status 138 and a
    message naming the store, instead of training on and exiting 0 with nothing committed."""
    import resource

    def limit():
        resource.setrlimit(resource.RLIMIT_FSIZE, (512 << 10, 512 << 10))
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # Kept ignored across exec.

    shard = Shard(bin_dir, tmp)
    log = os.path.join(tmp, "full.log")
    with open(log, "w") as f:
        proc = subprocess.Popen([shard.psserver, *shard.hosts, "--data-dir", shard.data,
                                 "--checkpoint-every", "5"], stderr=f, preexec_fn=limit)
    try:
        p = run([shard.pstrain, *shard.hosts, "--max-steps", "20", "--train-limit", "3000",
                 "--test-limit", "500", "--threads", "1", "--quiet", "--connect-timeout-ms",
                 "6000"], expect_ok=False, timeout=120)
        proc.wait(timeout=60)
    finally:
        halt(proc)
    out = open(log).read()
    check(proc.returncode == 138 and "fatal: checkpoint of version 5 failed" in out and
          shard.dir in out, f"the PS stops with status 138 naming the store: "
          f"{out.strip().splitlines()[-1] if out.strip() else '(no output)'}")
    check(p.returncode != 0, "and the worker does not finish as if all were well")


if __name__ == "__main__":
    main(__doc__, {"current-lost": current_lost, "flipped-bit": flipped_bit,
                   "full-disk": full_disk}, "store_mode.")
