#!/usr/bin/env python3
"""The Debian package, built with CPack from a build tree and checked.

  package_check.py BUILD_DIR

Runs `cpack -G DEB` into a temporary directory (what scripts/package-deb.sh
does after its Release build), then checks the package: its name and version,
that its dependencies are Debian runtime packages found by dpkg-shlibdeps
(gRPC, protobuf-c, LevelDB among them), and its file list: the three programs,
the shared and static client library, the one public header and the pkg-config
file under /usr, nothing else. The programs, unpacked, answer --help. Exit 77
without cpack or dpkg-deb.
"""
import os
import re
import shutil
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from itest import check  # noqa: E402

WANT = {"usr/bin/psserver", "usr/bin/pstrain", "usr/bin/psctl", "usr/lib/libpstrain.a",
        "usr/lib/libpstrain.so", "usr/include/pstrain/pstrain.h",
        "usr/lib/pkgconfig/pstrain.pc"}


def main():
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    build = os.path.abspath(sys.argv[1])
    if not shutil.which("cpack") or not shutil.which("dpkg-deb"):
        print("skipped: no cpack or dpkg-deb")
        sys.exit(77)
    with tempfile.TemporaryDirectory(prefix="deb.") as tmp:
        p = subprocess.run(["cpack", "-G", "DEB", "-B", tmp], cwd=build, capture_output=True,
                           text=True, timeout=300)
        debs = [f for f in os.listdir(tmp) if f.endswith(".deb")]
        check(p.returncode == 0 and len(debs) == 1, f"cpack -G DEB made one package ({debs})"
              + ("" if p.returncode == 0 else f":\n{p.stdout}{p.stderr}"))
        deb = os.path.join(tmp, debs[0])
        info = subprocess.run(["dpkg-deb", "-f", deb, "Package", "Version", "Depends"],
                              capture_output=True, text=True, check=True).stdout
        fields = dict(re.findall(r"^(\w+): (.*)$", info, re.M))
        deps = [d.strip().split()[0] for d in fields.get("Depends", "").split(",") if d.strip()]
        check(fields.get("Package") == "pstrain" and re.match(r"^\d+\.\d+\.\d+$",
                                                              fields.get("Version", "")),
              f"package pstrain, version {fields.get('Version')}")
        check(any(d.startswith("libgrpc") for d in deps) and "libprotobuf-c1" in deps and
              any(d.startswith("libleveldb") for d in deps),
              f"depends on Debian's runtime packages ({', '.join(deps)})")
        listing = subprocess.run(["dpkg-deb", "-c", deb], capture_output=True, text=True,
                                 check=True).stdout.splitlines()
        files = {ln.split()[5].lstrip("./") for ln in listing if not ln.startswith("d")}
        extra = {f for f in files - WANT if not re.match(r"^usr/lib/libpstrain\.so\.\d", f)}
        check(WANT <= files and not extra,
              f"its files: {', '.join(sorted(files))}"
              + (f"; missing {sorted(WANT - files)}" if not WANT <= files else "")
              + (f"; unexpected {sorted(extra)}" if extra else ""))
        root = os.path.join(tmp, "root")
        subprocess.run(["dpkg-deb", "-x", deb, root], check=True)
        for prog in ("psserver", "pstrain", "psctl"):
            r = subprocess.run([os.path.join(root, "usr", "bin", prog), "--help"],
                               capture_output=True, text=True, timeout=30)
            check(r.returncode == 0 and "usage" in (r.stdout + r.stderr).lower(),
                  f"the packaged {prog} runs (--help)")
    print("PASS")


if __name__ == "__main__":
    main()
