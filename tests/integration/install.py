#!/usr/bin/env python3
"""cmake --install, then your own program against the installed client library.

  install.py SOURCE_DIR BUILD_DIR

Installs BUILD_DIR into a staging prefix, checks what is there (the programs,
libpstrain.so and libpstrain.a exporting only pst_*, the one public header, a
pkg-config file), builds examples/train_loop.c with `pkg-config --cflags --libs
pstrain` only, and again against libpstrain.a (`pkg-config --static`), and runs
the two as two workers against the installed psserver (then
examples/embedding_loop.c, a model with embedding tables, likewise): both must train
the planted linear model (loss below a hundredth of its start) and every
process must exit 0. Servers listen on 127.0.0.1 and are stopped by PID.
"""
import os
import re
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from itest import check, free_ports  # noqa: E402

TIMEOUT = 120


def sanitizer_flags(lib):
    """A program linking a library built with ASan (the sanitizer build's) must
    be built with it too: the runtime has to come first."""
    needed = subprocess.run(["readelf", "-d", lib], capture_output=True, text=True).stdout
    return ["-fsanitize=address,undefined"] if "libasan" in needed else []


def main():
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    src, build = sys.argv[1], sys.argv[2]
    with tempfile.TemporaryDirectory(prefix="install.") as tmp:
        stage = os.path.join(tmp, "stage")
        subprocess.run(["cmake", "--install", build, "--prefix", stage], check=True,
                       capture_output=True, timeout=TIMEOUT)
        files = sorted(os.path.relpath(os.path.join(d, f), stage)
                       for d, _, fs in os.walk(stage) for f in fs)
        for want in ("bin/psserver", "bin/pstrain", "bin/psctl", "include/pstrain/pstrain.h",
                     "lib/pkgconfig/pstrain.pc"):
            check(want in files, f"installed {want}")
        check([f for f in files if f.startswith("include/")] == ["include/pstrain/pstrain.h"],
              "the one public header, no internal ones")
        libs = [f for f in files if re.match(r"lib/libpstrain\.so", f)]
        check(len(libs) >= 1, f"the shared client library ({', '.join(libs)})")
        syms = subprocess.run(["nm", "-D", "--defined-only", os.path.join(stage, "lib",
                                                                          "libpstrain.so")],
                              capture_output=True, text=True, check=True).stdout.split()
        exported = sorted({s.split("@")[0] for s in syms if re.match(r"^[a-z_]+@", s)})
        check(exported and all(s.startswith("pst_") for s in exported),
              f"it exports the pst_* API only ({len(exported)} functions)")
        static = os.path.join(stage, "lib", "libpstrain.a")
        check(os.path.exists(static), "the static client library lib/libpstrain.a")
        syms = subprocess.run(["nm", "-g", "--defined-only", static], capture_output=True,
                              text=True, check=True).stdout.split("\n")
        glob_ = sorted({ln.split()[-1] for ln in syms if len(ln.split()) == 3})
        check(glob_ and all(s.startswith("pst_") for s in glob_),
              f"libpstrain.a defines the pst_* API only ({len(glob_)} global symbols)")
        env = dict(os.environ, PKG_CONFIG_PATH=os.path.join(stage, "lib", "pkgconfig"))
        flags = subprocess.run(["pkg-config", "--cflags", "--libs", "pstrain"], env=env,
                               capture_output=True, text=True, check=True).stdout.split()
        san = sanitizer_flags(os.path.join(stage, "lib", "libpstrain.so"))

        def build(example, out, link):
            """examples/EXAMPLE.c against the install; CompletedProcess."""
            return subprocess.run([os.environ.get("CC", "cc"), "-std=c11", "-Wall", "-Wextra",
                                   "-Werror", *san, os.path.join(src, "examples", example + ".c"),
                                   *link, "-lm", "-o", out], capture_output=True, text=True,
                                  timeout=TIMEOUT)

        prog = os.path.join(tmp, "train_loop")
        cc = build("train_loop", prog, flags)
        check(cc.returncode == 0, "examples/train_loop.c builds with pkg-config's flags only"
              + ("" if cc.returncode == 0 else f":\n{cc.stderr}"))
        # The same program linked with libpstrain.a (pkg-config --static for what it needs):
        # it runs as the second worker, so the static library is exercised too.
        cflags = subprocess.run(["pkg-config", "--cflags", "pstrain"], env=env,
                                capture_output=True, text=True, check=True).stdout.split()
        slibs = subprocess.run(["pkg-config", "--static", "--libs-only-l", "pstrain"], env=env,
                               capture_output=True, text=True, check=True).stdout.split()
        prog_static = os.path.join(tmp, "train_loop_static")
        cc = build("train_loop", prog_static,
                   [*cflags, static, *[f for f in slibs if f != "-lpstrain"]])
        needed = subprocess.run(["readelf", "-d", prog_static], capture_output=True,
                                text=True).stdout if cc.returncode == 0 else ""
        check(cc.returncode == 0 and "libpstrain" not in needed,
              "examples/train_loop.c links libpstrain.a with pkg-config --static's libraries"
              + ("" if cc.returncode == 0 else f":\n{cc.stderr}"))
        env["LD_LIBRARY_PATH"] = os.path.join(stage, "lib")
        two_workers(stage, tmp, env, prog, prog_static, "train_loop")
        # A model with embedding tables (pst_step_rows, pst_pull_rows), built the same way.
        prog_emb = os.path.join(tmp, "embedding_loop")
        cc = build("embedding_loop", prog_emb, flags)
        check(cc.returncode == 0, "examples/embedding_loop.c builds with pkg-config's flags only"
              + ("" if cc.returncode == 0 else f":\n{cc.stderr}"))
        two_workers(stage, tmp, env, prog_emb, prog_emb, "embedding_loop")
    print("PASS")


def two_workers(stage, tmp, env, prog, prog1, name):
    """prog as the chief and prog1 as worker 1 against the installed psserver: both
    must reach their loss target and exit 0, and the PS exit 0 on the chief's shutdown."""
    ps_port, w0, w1 = free_ports(3)
    hosts = ["--ps-hosts", f"127.0.0.1:{ps_port}", "--worker-hosts",
             f"127.0.0.1:{w0},127.0.0.1:{w1}", "--task-index", "0"]
    log = open(os.path.join(tmp, f"ps-{name}.log"), "w")
    ps = subprocess.Popen([os.path.join(stage, "bin", "psserver"), *hosts], stderr=log)
    other = None
    try:
        args = ["--ps-hosts", f"127.0.0.1:{ps_port}", "--workers", "2"]
        other = subprocess.Popen([prog1, *args, "--rank", "1"], env=env, stdout=subprocess.PIPE,
                                 stderr=subprocess.STDOUT, text=True)
        chief = subprocess.run([prog, *args, "--rank", "0"], env=env, capture_output=True,
                               text=True, timeout=TIMEOUT)
        out1, _ = other.communicate(timeout=TIMEOUT)
        if chief.returncode == 0:  # It shut the PS down.
            ps.wait(timeout=30)
    finally:
        for p in (other, ps):
            if p is not None and p.poll() is None:
                p.kill()
                p.wait()
        log.close()
    last = [line for line in chief.stdout.splitlines() if "after" in line]
    check(chief.returncode == 0 and other.returncode == 0,
          f"{name}: two workers trained through the installed library: "
          f"{last[-1] if last else ''}"
          + ("" if chief.returncode == 0 and other.returncode == 0 else
             f"\n{chief.stdout}\n{chief.stderr}\n{out1}"))
    check(ps.returncode == 0, f"{name}: the installed psserver exited 0 on the chief's shutdown")


if __name__ == "__main__":
    main()
