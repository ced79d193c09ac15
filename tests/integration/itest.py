"""Helpers shared by the integration scenarios (real processes, bounded in time)."""
import math
import os
import struct
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
LAUNCH = os.path.join(HERE, "..", "..", "scripts", "launch.py")
sys.path.insert(0, os.path.dirname(LAUNCH))
from launch import free_ports, stop_process  # noqa: E402,F401  (ports; stop a child by PID)
TIMEOUT = 240


def check(cond, msg):
    if not cond:
        sys.exit("FAIL: " + msg)
    print("ok:", msg, flush=True)


def run(argv, env=None, expect_ok=True, timeout=TIMEOUT):
    p = subprocess.run(argv, capture_output=True, text=True, timeout=timeout,
                       env=dict(os.environ, **(env or {})))
    if expect_ok and p.returncode != 0:
        sys.exit(f"{' '.join(argv)} failed ({p.returncode}):\n{p.stdout}\n{p.stderr}")
    return p


def launch(bin_dir, *args, expect_ok=True):
    """scripts/launch.py with BIN_DIR's binaries."""
    return run([sys.executable, LAUNCH, "--bin-dir", bin_dir, "--timeout", "200", *args],
               expect_ok=expect_ok)


def params(path):
    """Raw little-endian float32 parameters (--params-out, --init-out)."""
    data = open(path, "rb").read()
    return struct.unpack(f"<{len(data) // 4}f", data)


def rel_diff(p0, a, b):
    """|(a - p0) - (b - p0)| / |b - p0|: how differently two runs moved from p0."""
    da = [x - y for x, y in zip(a, p0)]
    db = [x - y for x, y in zip(b, p0)]
    num = math.sqrt(sum((x - y) ** 2 for x, y in zip(da, db)))
    return num / math.sqrt(sum(x * x for x in db))


def lines_in(path):
    """Lines in a file (a step log being written), 0 while it does not exist."""
    try:
        with open(path) as f:
            return sum(1 for _ in f)
    except OSError:
        return 0


def main(doc, scenarios, prefix):
    """Run the scenario named by argv[2] with (argv[1], a temporary directory)."""
    import shutil
    if len(sys.argv) != 3 or sys.argv[2] not in scenarios:
        sys.exit(doc)
    tmp = tempfile.mkdtemp(prefix=prefix)
    try:
        scenarios[sys.argv[2]](sys.argv[1], tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print("PASS")
