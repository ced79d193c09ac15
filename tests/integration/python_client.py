#!/usr/bin/env python3
"""The Python package (python/pstrain) against a real psserver.

  python_client.py SOURCE_DIR BIN_DIR LIB

LIB is the build's libpstrain.so. Runs with a Python that has numpy: this one, or
Debian's /usr/bin/python3 with python3-numpy (scripts/install-deps.sh installs it);
neither is a failure. The package is installed with pip from a copy of the source tree
into a venv (offline: --no-build-isolation --no-index, Debian's setuptools), and the first
checks import it from there. Checks: errors raise pstrain.Error with the library's message,
wrong arrays raise ValueError, step() writes into the array given (no copy) and pull()
says the version; a model with embedding tables pulls rows by id (created once) and
step_rows applies their gradients exactly (SGD, lr 1); then examples/numpy_loop.py trains as two workers with tokens, and
every process exits 0. With a sanitizer build the ASan runtime is preloaded.
"""
import os
import shutil
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from itest import check, free_ports  # noqa: E402

TIMEOUT = 120
CHECKS = r'''
import sys, numpy as np, pstrain
ps = sys.argv[1]
try:
    pstrain.Client("no-port-list,", [("w", 4)])
    sys.exit("a bad host list was taken")
except pstrain.Error as e:
    assert "ps_hosts" in str(e) and e.code < 0, e
c = pstrain.Client(ps, [("w", 5), ("b", 2)], num_workers=1, lr=0.5,
                   auth_token_file=sys.argv[2], admin_token_file=sys.argv[3])
assert c.numel == 7
c.init(np.arange(7, dtype=np.float32))
p, v = c.pull(0)
assert v == 0 and np.array_equal(p, np.arange(7, dtype=np.float32)), (v, p)
out = np.zeros(7, np.float32)
r = c.step(0, np.ones(7, np.float32), out=out)
assert r is out and np.allclose(out, np.arange(7) - 0.5), out  # sgd: w - lr * g, in place
for bad in (np.ones(6, np.float32), ):
    try:
        c.step(1, bad)
        sys.exit("a gradient of the wrong size was taken")
    except ValueError:
        pass
try:
    c.step(1, np.ones(7, np.float32), out=np.zeros(7, np.float64))
    sys.exit("a float64 output array was taken")
except ValueError:
    pass
p = c.step(1, np.ones(7))  # float64 gradient: converted once, then sent
_, v = c.pull(2)
assert v == 2, v
c.shutdown()
c.close()
print("checks ok")
'''
TABLE_CHECKS = r'''
import sys, numpy as np, pstrain
c = pstrain.Client(sys.argv[1], [("b", 2)], num_workers=1, lr=0.5, tables=[("e", 3), ("f", 1)],
                   table_optimizer="sgd", table_lr=1.0, auth_token_file=sys.argv[2],
                   admin_token_file=sys.argv[3])
assert c.numel == 2 and c.row_width == 3 and c.ntables == 2, (c.numel, c.row_width)
c.init()
rows = [np.array([5, 9], np.uint64), np.array([5], np.uint64)]
v0 = c.pull_rows(rows)
assert v0.shape == (3, 3) and np.all(np.abs(v0[:, :1]) <= 0.05) and np.any(v0 != 0), v0
again = c.pull_rows(rows, train=False)
assert np.array_equal(again, v0), (again, v0)  # the same rows, created once
p0 = c.pull(0)[0].copy()
g = np.arange(9, dtype=np.float32).reshape(3, 3)
params, nxt = c.step_rows(0, np.ones(2, np.float32), rows, g, next_rows=rows)
assert np.allclose(params, p0 - 0.5), (params, p0)  # the dense part: sgd, lr 0.5
want = v0 - g  # sgd, lr 1, one worker
want[2, 1:] = v0[2, 1:]  # table f has dim 1: the rest of its slot is not its
assert np.allclose(nxt[:, :1], want[:, :1]) and np.allclose(nxt[:2], want[:2]), (nxt, want)
for bad in ([rows[0]], ):  # one id array for two tables
    try:
        c.pull_rows(bad)
        sys.exit("one id array for two tables was taken")
    except ValueError:
        pass
try:
    c.step_rows(1, np.ones(2, np.float32), rows, np.ones((2, 3), np.float32))
    sys.exit("row gradients of the wrong shape were taken")
except ValueError:
    pass
dense = pstrain.Client(sys.argv[1], [("b", 2)], num_workers=1, auth_token_file=sys.argv[2])
try:
    dense.pull_rows(rows)
    sys.exit("rows of a model without tables were taken")
except ValueError:
    pass
dense.close()
c.shutdown()
c.close()
print("table checks ok")
'''


def python_with_numpy():
    for exe in (sys.executable, "/usr/bin/python3"):
        if exe and os.path.exists(exe) and subprocess.run(
                [exe, "-c", "import numpy"], capture_output=True).returncode == 0:
            return exe
    sys.exit("FAIL: no Python with numpy (scripts/install-deps.sh installs python3-numpy)")


def main():
    if len(sys.argv) != 4:
        sys.exit(__doc__)
    src, bin_dir, lib = (os.path.abspath(a) for a in sys.argv[1:])
    py = python_with_numpy()
    env = dict(os.environ, PSTRAIN_LIB=lib, PYTHONPATH=os.path.join(src, "python"))
    needed = subprocess.run(["readelf", "-d", lib], capture_output=True, text=True).stdout
    if "libasan" in needed:  # The ASan runtime must come first.
        asan = subprocess.run(["gcc", "-print-file-name=libasan.so"], capture_output=True,
                              text=True).stdout.strip()
        env.update(LD_PRELOAD=asan, ASAN_OPTIONS="detect_leaks=0")
    sys.path.insert(0, os.path.join(src, "scripts"))
    with tempfile.TemporaryDirectory(prefix="pyclient.") as tmp:
        # pip install from the source tree (a copy: setuptools builds in place), offline,
        # into a venv that sees the system's numpy; the first checks run from there.
        venv = os.path.join(tmp, "venv")
        r = subprocess.run([py, "-m", "venv", "--system-site-packages", venv],
                           capture_output=True, text=True, timeout=TIMEOUT)
        pkg = os.path.join(tmp, "python-src")
        shutil.copytree(os.path.join(src, "python"), pkg)
        if r.returncode == 0:
            r = subprocess.run([os.path.join(venv, "bin", "python"), "-m", "pip", "install",
                                "--no-build-isolation", "--no-index", "--no-deps", pkg],
                               capture_output=True, text=True, timeout=TIMEOUT)
        check(r.returncode == 0, "pip installs the package from the source tree (offline, "
              "into a venv)" + ("" if r.returncode == 0 else f":\n{r.stdout}{r.stderr}"))
        venv_py = os.path.join(venv, "bin", "python")
        venv_env = {k: v for k, v in env.items() if k != "PYTHONPATH"}
        toks = []
        for name in ("worker.token", "admin.token"):
            path = os.path.join(tmp, name)
            with open(os.open(path, os.O_WRONLY | os.O_CREAT, 0o600), "w") as f:
                f.write(os.urandom(24).hex() + "\n")
            toks.append(path)
        for workers, script in ((1, None), (1, "tables"),
                                (2, os.path.join(src, "examples", "numpy_loop.py"))):
            ps_port, *wports = free_ports(1 + workers)
            addr = f"127.0.0.1:{ps_port}"
            log = open(os.path.join(tmp, f"ps{workers}.log"), "w")
            ps = subprocess.Popen([os.path.join(bin_dir, "psserver"), "--ps-hosts", addr,
                                   "--worker-hosts", ",".join(f"127.0.0.1:{p}" for p in wports),
                                   "--task-index", "0", "--auth-token-file", toks[0],
                                   "--admin-token-file", toks[1]], stderr=log)
            procs = []
            try:
                if script is None:
                    r = subprocess.run([venv_py, "-c", CHECKS, addr, *toks], env=venv_env,
                                       capture_output=True, text=True, timeout=TIMEOUT, cwd=tmp)
                    check(r.returncode == 0 and "checks ok" in r.stdout,
                          "pstrain.Client: errors, array checks, in-place step, pull's version"
                          + ("" if r.returncode == 0 else f":\n{r.stdout}\n{r.stderr}"))
                elif script == "tables":
                    r = subprocess.run([py, "-c", TABLE_CHECKS, addr, *toks], env=env,
                                       capture_output=True, text=True, timeout=TIMEOUT)
                    check(r.returncode == 0 and "table checks ok" in r.stdout,
                          "embedding tables: rows created once and pulled by id, step_rows "
                          "applies the row gradients (sgd: exactly), shapes checked"
                          + ("" if r.returncode == 0 else f":\n{r.stdout}\n{r.stderr}"))
                else:
                    args = [py, script, "--ps-hosts", addr, "--workers", "2", "--token-file",
                            toks[0]]
                    procs.append(subprocess.Popen([*args, "--rank", "1"], env=env, text=True,
                                                  stdout=subprocess.PIPE,
                                                  stderr=subprocess.STDOUT))
                    r = subprocess.run([*args, "--rank", "0", "--admin-token-file", toks[1]],
                                       env=env, capture_output=True, text=True,
                                       timeout=TIMEOUT)
                    out1, _ = procs[0].communicate(timeout=TIMEOUT)
                    last = [x for x in r.stdout.splitlines() if "after" in x]
                    check(r.returncode == 0 and procs[0].returncode == 0,
                          "examples/numpy_loop.py trained as two workers: "
                          + (last[-1] if last else "")
                          + ("" if r.returncode == 0 and procs[0].returncode == 0 else
                             f"\n{r.stdout}\n{r.stderr}\n{out1}"))
                if r.returncode == 0:
                    ps.wait(timeout=30)
            finally:
                for p in (*procs, ps):
                    if p.poll() is None:
                        p.kill()
                        p.wait()
                log.close()
            check(ps.returncode == 0, "psserver exited 0 on the chief's shutdown")
    print("PASS")


if __name__ == "__main__":
    main()
