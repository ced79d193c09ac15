#!/usr/bin/env python3
"""A PS that faces a network: a real psserver, probed as an attacker would.

  security_mode.py BIN_DIR PROBE auth     tokens: unauthenticated and worker-token
                                          administrative calls refused, nothing changes
  security_mode.py BIN_DIR PROBE tls      TLS and mutual TLS with a throwaway CA
                                          (openssl), and a training run over them
  security_mode.py BIN_DIR PROBE bounds   parked pulls capped and released when the
                                          client goes away; gzip, decoder bombs and
                                          unreachable versions refused cheaply
  security_mode.py BIN_DIR PROBE values   NaN/inf pushes refused (or skipped), an
                                          Initialize over the memory limit refused
  security_mode.py BIN_DIR PROBE psctl    psctl health (no token: the gRPC health
                                          service; NOT_SERVING while a restarted shard
                                          waits for its rollback), stats and checkpoints
                                          (with the token) against a live shard

PROBE is tests/tools/ps_probe (one call, one JSON line).
"""
import importlib.util
import json
import os
import signal
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from itest import LAUNCH, check, free_ports  # noqa: E402

_spec = importlib.util.spec_from_file_location("launch", LAUNCH)
_launch = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_launch)
token_file = _launch.write_token  # a new random token, mode 0600

DEADLINE = 60  # seconds for anything one step of a scenario waits for


class PS:
    """One psserver on 127.0.0.1, stopped by PID."""

    def __init__(self, bin_dir, tmp, *flags, name="ps"):
        self.port = free_ports(1)[0]
        self.addr = f"127.0.0.1:{self.port}"
        self.log = os.path.join(tmp, f"{name}.log")
        self.proc = subprocess.Popen(
            [os.path.join(bin_dir, "psserver"), "--ps-hosts", self.addr, "--task-index", "0",
             *flags], stdout=subprocess.DEVNULL, stderr=open(self.log, "w"))
        t0 = time.monotonic()
        while "serving shard" not in self.text():
            if self.proc.poll() is not None:
                sys.exit(f"psserver exited ({self.proc.returncode}):\n{self.text()}")
            if time.monotonic() - t0 > DEADLINE:
                self.stop()
                sys.exit("psserver did not start")
            time.sleep(0.05)

    def text(self):
        with open(self.log) as f:
            return f.read()

    def rss_kb(self):
        with open(f"/proc/{self.proc.pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
        return 0

    def alive(self):
        return self.proc.poll() is None

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


class Probe:
    def __init__(self, probe, addr):
        self.probe, self.addr = probe, addr

    def argv(self, creds, *cmd):
        return [self.probe, "--addr", self.addr, *creds, *[str(c) for c in cmd]]

    def __call__(self, creds, *cmd, timeout=DEADLINE):
        p = subprocess.run(self.argv(creds, *cmd), capture_output=True, text=True,
                           timeout=timeout)
        if p.returncode != 0 or not p.stdout.strip():
            sys.exit(f"ps_probe {' '.join(map(str, cmd))} failed ({p.returncode}):\n"
                     f"{p.stdout}\n{p.stderr}")
        return json.loads(p.stdout.strip().splitlines()[-1])


def refused(r, code):
    return r["ok"] == 0 and code in r["msg"]


def auth(bin_dir, probe, tmp):
    wtok, atok = token_file(tmp, "worker.token"), token_file(tmp, "admin.token")
    wrong = token_file(tmp, "wrong.token")
    data = os.path.join(tmp, "data")
    ps = PS(bin_dir, tmp, "--auth-token-file", wtok, "--admin-token-file", atok,
            "--data-dir", data, "--checkpoint-every", "1")
    try:
        P = Probe(probe, ps.addr)
        none, worker = [], ["--token-file", wtok]
        admin = ["--token-file", wtok, "--admin-token-file", atok]
        bad = ["--token-file", wrong, "--admin-token-file", wrong]
        r = P(none, "init")
        check(refused(r, "UNAUTHENTICATED"), "an Initialize without a token is refused")
        check("mlp" not in r["msg"] and "cluster" not in r["msg"] and "shard 0" not in r["msg"],
              f"...and learns nothing about the cluster ({r['msg']!r})")
        check(refused(P(bad, "init"), "UNAUTHENTICATED"), "a wrong token is refused likewise")
        check(refused(P(worker, "init"), "PERMISSION_DENIED"),
              "the workers' token cannot Initialize (the admin's call)")
        check(P(admin, "init")["ok"] == 1, "the admin's token initialises the shard")
        check(P(worker, "push", 0, 1.0)["ok"] == 1, "a worker pushes with its token")
        before = P(worker, "pull")
        check(before["ok"] == 1 and before["version"] == 1, "...and pulls version 1")
        # (Committed by the shard's writer thread, which the push does not wait for.)
        ckpt = wait_for("version 1 to be committed", lambda: (
            lambda c: c if c["ok"] == 1 and c["committed"] else None)(
                P(worker, "checkpoints", -1)), timeout=30)
        check(ckpt["committed"] == [1], f"version 1 is committed ({ckpt['committed']})")
        # Every attack, without a token, with a wrong one, and the
        # administrative ones with the workers' token.
        attacks = [
            (none, ("push", 1, 5.0), "UNAUTHENTICATED"),
            (bad, ("push", 1, 5.0), "UNAUTHENTICATED"),
            (none, ("shutdown",), "UNAUTHENTICATED"),
            (bad, ("shutdown",), "UNAUTHENTICATED"),
            (worker, ("shutdown",), "PERMISSION_DENIED"),
            (none, ("rollback", 0, 99), "UNAUTHENTICATED"),
            (worker, ("rollback", 0, 99), "PERMISSION_DENIED"),
            (none, ("init", 7), "UNAUTHENTICATED"),
            (worker, ("init", 7), "PERMISSION_DENIED"),
            (worker, ("checkpoints", 1), "PERMISSION_DENIED"),
            (none, ("stats",), "UNAUTHENTICATED"),
        ]
        for creds, cmd, code in attacks:
            who = "no token" if not creds else "a wrong token" if creds is bad else "the workers' token"
            check(refused(P(creds, *cmd), code), f"{cmd[0]} with {who}: {code}")
        check(ps.alive(), "the shard is still up")
        after = P(worker, "pull")
        check(after["version"] == 1 and after["sum"] == before["sum"],
              "nothing changed: same version, same parameters")
        check(P(worker, "checkpoints", -1)["committed"] == [1], "...and the same checkpoints")
        st = P(worker, "stats")
        n_unauth = sum(1 for c, _, k in attacks if k == "UNAUTHENTICATED")
        n_denied = sum(1 for c, _, k in attacks if k == "PERMISSION_DENIED")
        # A refused probe may make one more call first (its Checkpoints, to
        # learn the epoch), refused as well.
        check(st["refused_unauthenticated"] >= n_unauth + 2 and
              st["refused_denied"] == n_denied + 1,
              f"refusals counted: {st['refused_unauthenticated']} unauthenticated, "
              f"{st['refused_denied']} denied")
        log = ps.text()
        check("refused /psrpc.Ps/Shutdown from ipv4:127.0.0.1:" in log,
              "refusals logged with the peer's address")
        check(P(admin, "shutdown")["ok"] == 1, "the admin's token shuts the shard down")
        ps.proc.wait(DEADLINE)
        check(ps.proc.returncode == 0, "psserver exited 0")
    finally:
        ps.stop()
    # Bad token files are refused with a message, by both programs.
    short = os.path.join(tmp, "short.token")
    with open(short, "w") as f:
        f.write("tooshort\n")
    os.chmod(short, 0o600)
    p = subprocess.run([os.path.join(bin_dir, "psserver"), "--ps-hosts", "127.0.0.1:1",
                        "--task-index", "0", "--auth-token-file", short],
                       capture_output=True, text=True, timeout=DEADLINE)
    check(p.returncode == 2 and "8 bytes" in p.stderr,
          "psserver refuses a short token (exit 2: configuration)")
    p = subprocess.run([os.path.join(bin_dir, "pstrain"), "--auth-token-file",
                        os.path.join(tmp, "missing")], capture_output=True, text=True,
                       timeout=DEADLINE)
    check(p.returncode == 2 and "cannot read token file" in p.stderr,
          "pstrain refuses a missing token file")


def openssl(*args, cwd):
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=DEADLINE)


def make_pki(d):
    """A CA, a server certificate for 127.0.0.1 and localhost, a client
    certificate, and a client certificate from another CA."""
    ext = os.path.join(d, "server.ext")
    with open(ext, "w") as f:
        f.write("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    for ca in ("ca", "rogue"):
        openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj",
                f"/CN=test {ca}", "-keyout", f"{ca}.key", "-out", f"{ca}.pem", cwd=d)
    for name, ca, extra in (("server", "ca", ["-extfile", ext]), ("client", "ca", []),
                            ("intruder", "rogue", [])):
        openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={name}", "-keyout",
                f"{name}.key", "-out", f"{name}.csr", cwd=d)
        openssl("x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.pem", "-CAkey", f"{ca}.key",
                "-CAcreateserial", "-days", "2", "-out", f"{name}.pem", *extra, cwd=d)
    return {k: os.path.join(d, f"{k}.pem") for k in ("ca", "rogue", "server", "client",
                                                      "intruder")}, \
        {k: os.path.join(d, f"{k}.key") for k in ("server", "client", "intruder")}


def tls(bin_dir, probe, tmp):
    pem, key = make_pki(tmp)
    wtok, atok = token_file(tmp, "worker.token"), token_file(tmp, "admin.token")
    toks = ["--token-file", wtok, "--admin-token-file", atok]
    # Server-side TLS only.
    ps = PS(bin_dir, tmp, "--auth-token-file", wtok, "--admin-token-file", atok,
            "--tls-cert", pem["server"], "--tls-key", key["server"], name="tls")
    try:
        P = Probe(probe, ps.addr)
        check(P(toks + ["--tls-ca", pem["ca"]], "init")["ok"] == 1,
              "TLS: a client trusting the CA initialises the shard")
        r = P(toks, "stats")
        check(r["ok"] == 0, f"TLS: a plaintext client gets nothing ({r['msg'][:60]}...)")
        r = P(toks + ["--tls-ca", pem["rogue"]], "stats")
        check(r["ok"] == 0, "TLS: a client trusting another CA does not talk to the shard")
        check(P(toks + ["--tls-ca", pem["ca"]], "shutdown")["ok"] == 1, "TLS: shut down")
    finally:
        ps.stop()
    # Mutual TLS: clients must show a certificate from the CA.
    mtls = ["--tls-cert", pem["server"], "--tls-key", key["server"], "--tls-ca", pem["ca"]]
    ps = PS(bin_dir, tmp, "--auth-token-file", wtok, "--admin-token-file", atok, *mtls,
            name="mtls")
    try:
        P = Probe(probe, ps.addr)
        ca = toks + ["--tls-ca", pem["ca"]]
        mine = ca + ["--tls-cert", pem["client"], "--tls-key", key["client"]]
        check(P(mine, "init")["ok"] == 1, "mTLS: a client with a certificate from the CA "
              "initialises the shard")
        r = P(ca, "stats")
        check(r["ok"] == 0, f"mTLS: a client without a certificate is refused ({r['msg'][:60]}...)")
        r = P(ca + ["--tls-cert", pem["intruder"], "--tls-key", key["intruder"]], "stats")
        check(r["ok"] == 0, "mTLS: a certificate from another CA is refused")
        r = P(mine, "stats")
        check(r["ok"] == 1 and r["version"] == 0, "mTLS: the client's certificate is accepted")
        check(P(mine, "shutdown")["ok"] == 1, "mTLS: shut down")
    finally:
        ps.stop()
    # A real training run over mutual TLS with tokens; the chief ends it.
    ps = PS(bin_dir, tmp, "--auth-token-file", wtok, "--admin-token-file", atok, *mtls,
            name="train")
    try:
        worker = f"127.0.0.1:{free_ports(1)[0]}"
        env = dict(os.environ, TF_CONFIG=json.dumps(
            {"cluster": {"ps": [ps.addr], "worker": [worker]},
             "task": {"type": "worker", "index": 0}}))
        t = subprocess.run([os.path.join(bin_dir, "pstrain"), "--epochs", "1", "--train-limit",
                            "3000", "--test-limit", "2000", "--quiet",
                            "--auth-token-file", wtok, "--admin-token-file", atok,
                            "--tls-ca", pem["ca"], "--tls-cert", pem["client"],
                            "--tls-key", key["client"]],
                           capture_output=True, text=True, env=env, timeout=240)
        check(t.returncode == 0 and "test accuracy" in t.stdout,
              f"pstrain trains over mutual TLS: {t.stdout.strip()[-90:]}" if t.returncode == 0
              else f"pstrain over mutual TLS failed:\n{t.stderr[-2000:]}")
        ps.proc.wait(DEADLINE)
        check(ps.proc.returncode == 0, "...and its chief shut the shard down")
    finally:
        ps.stop()


def wait_for(what, fn, timeout=DEADLINE):
    t0 = time.monotonic()
    while True:
        v = fn()
        if v:
            return v
        if time.monotonic() - t0 > timeout:
            sys.exit(f"FAIL: timed out waiting for {what}")
        time.sleep(0.2)


def bounds(bin_dir, probe, tmp):
    wtok, atok = token_file(tmp, "worker.token"), token_file(tmp, "admin.token")
    worker = ["--token-file", wtok]
    admin = worker + ["--admin-token-file", atok]
    # Defaults: one connection's streams are capped at 256.
    ps = PS(bin_dir, tmp, "--auth-token-file", wtok, "--admin-token-file", atok, name="dflt")
    try:
        P = Probe(probe, ps.addr)
        check(P(admin, "init")["ok"] == 1, "initialised")
        rss0 = ps.rss_kb()
        flood = subprocess.Popen(P.argv(worker + ["--deadline-ms", "120000"], "flood", 50000,
                                        1000, 120), stdout=subprocess.PIPE, text=True)
        try:
            st = wait_for("parked pulls", lambda: (lambda s: s if s["parked_pulls"] >= 256
                                                   else None)(P(worker, "stats")))
            time.sleep(1.0)
            st = P(worker, "stats")
            grown = (ps.rss_kb() - rss0) / 1024
            check(st["parked_pulls"] == 256,
                  f"50,000 pulls on one connection: {st['parked_pulls']} parked (256 streams a "
                  f"connection)")
            check(grown < 64, f"...the shard's RSS grew {grown:.1f} MB (bound: 64 MB)")
            check(st["ok"] == 1, "...and honest calls are still answered")
        finally:
            flood.kill()  # The socket closes with the process.
            flood.wait()
        st = wait_for("release", lambda: (lambda s: s if s["parked_pulls"] == 0 else None)(
            P(worker, "stats")))
        check(st["cancelled_pulls"] >= 256,
              f"...released when the socket closed ({st['cancelled_pulls']} cancelled)")
        # Versions that can never come, compression, decoder bombs.
        r = P(worker, "pull", 1 << 40)
        check(refused(r, "OUT_OF_RANGE"), "a pull of a version beyond reach is refused")
        rss0 = ps.rss_kb()
        r = P(worker, "gzip")
        check(r["ok"] == 0 and r["ms"] < 5000,
              f"a gzip-compressed request is refused in {r['ms']:.0f} ms ({r['msg']})")
        for method, field, what in (("Push", 3, "empty tensors"), ("Initialize", 8, "empty values")):
            t0 = time.monotonic()
            r = P(admin, "bomb", method, field, 30_000_000)
            dt = time.monotonic() - t0
            check(r["ok"] == 0 and r["code"] == 8 and "before decoding" in r["msg"] and dt < 10,
                  f"a 60 MB {method} of 30 M {what} is refused before decoding, in {dt:.1f} s")
        grown = (ps.rss_kb() - rss0) / 1024
        check(grown < 256, f"...the shard's RSS grew {grown:.0f} MB over those (bound: 256 MB)")
        st = P(worker, "stats")
        check(st["ok"] == 1 and st["version"] == 0 and ps.alive(), "the shard serves on, unchanged")
    finally:
        ps.stop()
    # The shard's own cap, with the per-connection one raised.
    ps = PS(bin_dir, tmp, "--auth-token-file", wtok, "--admin-token-file", atok,
            "--max-streams", "100000", "--max-parked-pulls", "1000", name="cap")
    try:
        P = Probe(probe, ps.addr)
        check(P(admin, "init")["ok"] == 1, "initialised (--max-parked-pulls 1000)")
        flood = subprocess.Popen(P.argv(worker + ["--deadline-ms", "120000"], "flood", 5000,
                                        1000, 120), stdout=subprocess.PIPE, text=True)
        try:
            st = wait_for("refusals", lambda: (lambda s: s if s["refused_exhausted"] >= 4000
                                               else None)(P(worker, "stats")))
            check(st["parked_pulls"] == 1000 and st["refused_exhausted"] == 4000,
                  f"5,000 pulls: {st['parked_pulls']} parked, {st['refused_exhausted']} "
                  f"RESOURCE_EXHAUSTED")
            check(P(worker, "pull")["ok"] == 1, "...a pull of a version that exists is answered")
        finally:
            flood.kill()
            flood.wait()
        st = wait_for("release", lambda: (lambda s: s if s["parked_pulls"] == 0 else None)(
            P(worker, "stats")))
        check(st["cancelled_pulls"] == 1000, "...all released when the client went away")
    finally:
        ps.stop()


def values(bin_dir, probe, tmp):
    wtok, atok = token_file(tmp, "worker.token"), token_file(tmp, "admin.token")
    worker = ["--token-file", wtok]
    admin = worker + ["--admin-token-file", atok]
    ps = PS(bin_dir, tmp, "--auth-token-file", wtok, "--admin-token-file", atok,
            "--memory-limit-mb", "64", name="values")
    try:
        P = Probe(probe, ps.addr)
        big = ["--layers", "784,256,10"]
        r = P(admin + big, "init", 65536)
        check(refused(r, "INVALID_ARGUMENT"), f"num_workers 65536 is refused ({r['msg'][-70:]})")
        r = P(admin + big, "init", 4096)
        check(refused(r, "RESOURCE_EXHAUSTED"),
              f"an Initialize needing more than 64 MB is refused ({r['msg'][-90:]})")
        check(ps.alive(), "...and the process lives")
        check(P(admin + big, "init", 1)["ok"] == 1, "...and serves: an Initialize that fits")
        before = P(worker + big, "pull")
        for bad in ("nan", "inf"):
            r = P(worker + big, "push", 0, bad)
            check(refused(r, "INVALID_ARGUMENT") and "partition" in r["msg"],
                  f"a {bad} push is refused, naming the partition ({r['msg'][-80:]})")
        after = P(worker + big, "pull")
        check(after["version"] == 0 and after["sum"] == before["sum"],
              "...and the parameters are unchanged")
        st = P(worker + big, "stats")
        check(st["nonfinite_pushes"] == 2 and 0 < st["mem_bytes"] <= st["mem_limit"] == 64 << 20,
              f"counted: {st['nonfinite_pushes']} non-finite pushes, {st['mem_bytes']} of "
              f"{st['mem_limit']} bytes")
        check(P(worker + big, "push", 0, 0.5)["ok"] == 1 and
              P(worker + big, "pull")["version"] == 1, "an honest push still makes version 1")
    finally:
        ps.stop()
    ps = PS(bin_dir, tmp, "--auth-token-file", wtok, "--admin-token-file", atok,
            "--skip-nonfinite", name="skip")
    try:
        P = Probe(probe, ps.addr)
        check(P(admin, "init")["ok"] == 1, "--skip-nonfinite: initialised")
        before = P(worker, "pull")
        check(P(worker, "push", 0, "nan")["ok"] == 1, "a NaN push is answered OK")
        after = P(worker, "pull")
        st = P(worker, "stats")
        check(after["version"] == 1 and after["sum"] == before["sum"] and
              st["nonfinite_pushes"] == 1,
              "...counted, and its step closes without it (parameters unchanged)")
    finally:
        ps.stop()


def psctl(bin_dir, probe, tmp):
    wtok, atok = token_file(tmp, "worker.token"), token_file(tmp, "admin.token")
    data = os.path.join(tmp, "data")
    flags = ["--auth-token-file", wtok, "--admin-token-file", atok, "--data-dir", data,
             "--checkpoint-every", "2"]
    worker, admin = ["--token-file", wtok], ["--token-file", wtok, "--admin-token-file", atok]

    def ctl(addr, *args):
        return subprocess.run([os.path.join(bin_dir, "psctl"), *args[:1], addr, *args[1:]],
                              capture_output=True, text=True, timeout=DEADLINE)

    ps = PS(bin_dir, tmp, *flags)
    try:
        h = ctl(ps.addr, "health")
        check(h.returncode == 0 and h.stdout.strip() == "status:SERVING",
              f"psctl health without a token: SERVING, exit 0 ({h.stdout.strip()!r})")
        r = ctl(ps.addr, "stats")
        check(r.returncode == 1 and "token" in r.stderr,
              f"psctl stats without the token is refused, exit 1 ({r.stderr.strip()!r})")
        r = ctl(ps.addr, "stats", "--auth-token-file", wtok)
        check(r.returncode == 0 and "no model yet" in r.stdout,
              "psctl stats before the chief's Initialize says so")
        P = Probe(probe, ps.addr)
        check(P(admin, "init")["ok"] == 1, "a shard initialised (ps_probe, the admin's token)")
        for step in range(5):
            check(P(worker, "push", step, 1.0)["ok"] == 1, f"push {step}")
        r = ctl(ps.addr, "stats", "--auth-token-file", wtok, "--json")
        st = json.loads(r.stdout)
        check(r.returncode == 0 and st["version"] == 5 and st["pushes"] == 5 and
              st["shard"] == 0 and "mlp 4,3" in st["identity"],
              f"psctl stats --json: version {st['version']}, {st['pushes']} pushes, "
              f"{st['identity']!r}")
        r = ctl(ps.addr, "stats", "--auth-token-file", wtok)
        check("pushes:5" in r.stdout.splitlines() and "version:5" in r.stdout.splitlines(),
              "psctl stats prints name:value lines")
        r = ctl(ps.addr, "checkpoints", "--auth-token-file", wtok, "--json")
        ck = json.loads(r.stdout)
        check(r.returncode == 0 and ck["durable"] and 4 in ck["committed"] and
              not ck["recovering"], f"psctl checkpoints: committed {ck['committed']}")
        ps.proc.kill()  # SIGKILL: the next one restores and waits for a rollback
        ps.proc.wait()
    finally:
        ps.stop()
    ps = PS(bin_dir, tmp, *flags, name="ps2")
    try:
        h = ctl(ps.addr, "health")
        check(h.returncode == 1 and h.stdout.strip() == "status:NOT_SERVING",
              f"a shard restored from its checkpoint, waiting for the chief's rollback: "
              f"NOT_SERVING, exit 1 ({h.stdout.strip()!r})")
        r = ctl(ps.addr, "checkpoints", "--auth-token-file", wtok, "--json")
        ck = json.loads(r.stdout)
        check(ck["recovering"] and ck["version"] == 4, f"...psctl checkpoints says recovering "
              f"at version {ck['version']}")
        check(P.__class__(probe, ps.addr)(admin, "rollback", 4, 1)["ok"] == 1,
              "the chief's rollback (ps_probe)")
        h = ctl(ps.addr, "health")
        check(h.returncode == 0 and h.stdout.strip() == "status:SERVING", "SERVING again")
        h = ctl(ps.addr, "health", "--service", "other.Service")
        check(h.returncode == 1 and "unknown service" in h.stderr,
              "another service name: NOT_FOUND, exit 1")
    finally:
        ps.stop()
    h = ctl(ps.addr, "health", "--timeout-ms", "300")
    check(h.returncode == 3, f"a shard that is gone: exit 3 ({h.stderr.strip()!r})")


def main():
    scenarios = {"auth": auth, "tls": tls, "bounds": bounds, "values": values, "psctl": psctl}
    if len(sys.argv) != 4 or sys.argv[3] not in scenarios:
        sys.exit(__doc__)
    with tempfile.TemporaryDirectory(prefix="security.") as tmp:
        scenarios[sys.argv[3]](sys.argv[1], sys.argv[2], tmp)
    print("PASS")


if __name__ == "__main__":
    main()
