#!/usr/bin/env bash
# Ring AllReduce (bench/allreduce, wk_ring over TCP and over shared memory)
# against Open MPI's MPI_Allreduce on the same machine in the same run: MPI
# over TCP on loopback (the reference for our TCP ring) and over its default
# shared-memory transport (vader; the reference for our shm ring). Prints
# every measurement as a JSON line, then one line per (n, size) with the
# ratios, then a summary line for the targets (n = 2 and 4, >= 1 MiB: our TCP
# ring >= MPI TCP; every n, >= 1 MiB: our shm ring >= MPI shm), with the load
# average before and after.
#
#   bench/allreduce.sh [BUILD_DIR] [--ranks 2,3,4] [--sizes 4K,...,64M]
#                      [--repeats 3] [--launches 3] [--chunk-bytes B] [--sock-buf B]
#                      [--algorithm auto|ring|hd]
#
# --algorithm goes to the TCP runs only (halving-doubling runs over TCP; the
# shared-memory ring is always a ring).
#
# Each launch runs, for every n, ours and MPI over TCP back to back, then
# ours and MPI over shared memory, ours first in odd launches and MPI first
# in even ones; each program reports the median of --repeats timed windows.
# Each compare line gives two ratios: the median of each system over
# --launches, one over the other (ratio_vs_mpi_tcp), and the median of the
# launch-by-launch ratios of the pairs (ratio_vs_mpi_tcp_paired, with every
# pair's in paired_tcp). The paired one resists the machine's slow phases,
# which last seconds and slow both systems alike: a phase that took two of
# three launches of one system and none of the other would set the first
# ratio alone. The summary checks the targets both ways.
#
# Every program runs under bench/window.py, which adds to its lines the load
# average and the cores other processes used meanwhile; a run where others
# used more than 0.2 cores is flagged ("busy": true) and left out of the
# medians and the pairs (busy_runs counts them), unless every launch of it
# was.
#
# Installs openmpi-bin and libopenmpi-dev if missing (apt-get, as root or
# with sudo), builds the MPI reference with mpicc into BUILD_DIR/bench (the
# CMake build never needs MPI) and bench/allreduce with cmake.
set -euo pipefail
cd "$(dirname "$0")/.."
build=build
if [ $# -gt 0 ] && [ "${1#--}" = "$1" ]; then build=$1; shift; fi
ranks=2,3,4
sizes=4K,16K,64K,256K,1M,4M,16M,64M
repeats=3
launches=3
ring_args=()
tcp_args=()
while [ $# -gt 0 ]; do
  case $1 in
    --ranks) ranks=$2; shift 2 ;;
    --sizes) sizes=$2; shift 2 ;;
    --repeats) repeats=$2; shift 2 ;;
    --launches) launches=$2; shift 2 ;;
    --chunk-bytes|--sock-buf) ring_args+=("$1" "$2"); shift 2 ;;
    --algorithm) tcp_args+=("$1" "$2"); shift 2 ;;
    *) echo "usage: $0 [BUILD_DIR] [--ranks L] [--sizes L] [--repeats N] [--launches N]" \
            "[--chunk-bytes B] [--sock-buf B] [--algorithm auto|ring|hd]" >&2; exit 2 ;;
  esac
done

# Open MPI from Debian, only if missing.
./scripts/install-deps.sh openmpi-bin libopenmpi-dev

[ -f "$build/CMakeCache.txt" ] || ./scripts/build.sh "$build" -DCMAKE_BUILD_TYPE=Release
cmake --build "$build" -j 2 --target allreduce >/dev/null
mkdir -p "$build/bench"
# The same optimisation as the CMake Release build (-O3, no -march=native).
mpicc -O3 -DNDEBUG -std=c11 -D_GNU_SOURCE -Wall -Wextra -I. bench/allreduce_mpi.c \
      -o "$build/bench/allreduce_mpi"

out=$(mktemp -d)
cut -d' ' -f1 /proc/loadavg > "$out/load_start"
trap 'rm -rf "$out"' EXIT
mpi=(mpirun --allow-run-as-root --oversubscribe)
# Each line is tagged with its launch, so that ours and MPI's runs of one
# launch can be compared as a pair.
tag() { sed "s/^{/{\"launch\":$launch,/" | tee -a "$out/$1"; }
ours_tcp() {
  bench/window.py "$build/bench/allreduce" --ranks "$n" --sizes "$sizes" --repeats "$repeats" \
    ${ring_args[@]+"${ring_args[@]}"} ${tcp_args[@]+"${tcp_args[@]}"} | tag ring
}
ours_shm() {
  bench/window.py "$build/bench/allreduce" --ranks "$n" --sizes "$sizes" --repeats "$repeats" \
    --transport shm ${ring_args[@]+"${ring_args[@]}"} | tag ring_shm
}
mpi_tcp() {
  OMPI_MCA_pml=ob1 bench/window.py "${mpi[@]}" -np "$n" --mca btl tcp,self --mca btl_tcp_if_include lo \
    "$build/bench/allreduce_mpi" --transport tcp --sizes "$sizes" --repeats "$repeats" | tag mpi_tcp
}
mpi_shm() {
  bench/window.py "${mpi[@]}" -np "$n" --mca btl vader,self \
    "$build/bench/allreduce_mpi" --transport shm --sizes "$sizes" --repeats "$repeats" | tag mpi_shm
}
for launch in $(seq "$launches"); do
  for n in ${ranks//,/ }; do
    # Each pair back to back, in turn first: the machine's slow phases
    # (seconds long, docs/bench-log.md) then tend to take both of a pair.
    if [ $((launch % 2)) -eq 1 ]; then
      ours_tcp; mpi_tcp; ours_shm; mpi_shm
    else
      mpi_tcp; ours_tcp; mpi_shm; ours_shm
    fi
  done
done

cut -d' ' -f1 /proc/loadavg > "$out/load_end"
python3 - "$out" <<'EOF'
import json, sys, os
d = sys.argv[1]
busy_runs = {}
def lines(name):
    return [json.loads(l) for l in open(os.path.join(d, name)) if l.startswith("{")]
def load(name, recs):
    """Median over launches of each (n, bytes): the launch with the median busbw, among
    those that were not busy (others used more than 0.2 cores: bench/window.py), or among
    all when every one was."""
    runs = {}
    for r in recs:
        runs.setdefault((r["n"], r["bytes"]), []).append(r)
    rows = {}
    for key, rs in runs.items():
        quiet = [r for r in rs if not r.get("busy")]
        busy_runs[(name,) + key] = len(rs) - len(quiet)
        use = sorted(quiet or rs, key=lambda r: r["busbw_gbs"])
        rows[key] = dict(use[len(use) // 2], launches=len(rs), launches_used=len(use),
                         busbw_min=use[0]["busbw_gbs"], busbw_max=use[-1]["busbw_gbs"],
                         check="ok" if all(r["check"] == "ok" for r in rs) else "bad")
    return rows
def by_launch(recs):
    """busbw by (n, bytes, launch), busy runs left out (so are their pairs)."""
    return {(r["n"], r["bytes"], r["launch"]): r["busbw_gbs"] for r in recs if not r.get("busy")}
def paired(a, b, key):
    """Ours / MPI launch by launch (each pair ran back to back): their median, and all."""
    rs = sorted(round(a[k] / b[k], 3) for k in a if k[:2] == key and k in b and b[k] > 0)
    return (rs[len(rs) // 2] if rs else None), rs
recs = {f: lines(f) for f in ("ring", "ring_shm", "mpi_tcp", "mpi_shm")}
ring, ring_shm = load("ring", recs["ring"]), load("ring_shm", recs["ring_shm"])
tcp, shm = load("mpi_tcp", recs["mpi_tcp"]), load("mpi_shm", recs["mpi_shm"])
ring_l, ring_shm_l = by_launch(recs["ring"]), by_launch(recs["ring_shm"])
tcp_l, shm_l = by_launch(recs["mpi_tcp"]), by_launch(recs["mpi_shm"])
target_paired, target_shm_paired = [], []
target, target_shm = [], []
for key in sorted(ring):
    n, b = key
    r, q, t, s = ring[key], ring_shm.get(key), tcp.get(key), shm.get(key)
    row = {"compare": "allreduce", "n": n, "bytes": b, "algorithm": r.get("algorithm"),
           "ours_busbw_gbs": r["busbw_gbs"],
           "ours_shm_busbw_gbs": q and q["busbw_gbs"],
           "mpi_tcp_busbw_gbs": t and t["busbw_gbs"], "mpi_shm_busbw_gbs": s and s["busbw_gbs"],
           "ratio_vs_mpi_tcp": t and round(r["busbw_gbs"] / t["busbw_gbs"], 3),
           "ratio_shm_vs_mpi_shm": q and s and round(q["busbw_gbs"] / s["busbw_gbs"], 3),
           "ours_range": [r["busbw_min"], r["busbw_max"]],
           "ours_shm_range": q and [q["busbw_min"], q["busbw_max"]],
           "mpi_tcp_range": t and [t["busbw_min"], t["busbw_max"]],
           "mpi_shm_range": s and [s["busbw_min"], s["busbw_max"]],
           "launches": r["launches"], "oversubscribed": r["oversubscribed"],
           "busy_runs": {sys_: busy_runs.get((f,) + key, 0) for sys_, f in
                         (("ours_tcp", "ring"), ("ours_shm", "ring_shm"),
                          ("mpi_tcp", "mpi_tcp"), ("mpi_shm", "mpi_shm"))}}
    row["ratio_vs_mpi_tcp_paired"], row["paired_tcp"] = paired(ring_l, tcp_l, key)
    row["ratio_shm_vs_mpi_shm_paired"], row["paired_shm"] = paired(ring_shm_l, shm_l, key)
    print(json.dumps(row))
    if n in (2, 4) and b >= 1 << 20 and row["ratio_vs_mpi_tcp_paired"] is not None:
        target_paired.append(row["ratio_vs_mpi_tcp_paired"])
    if b >= 1 << 20 and row["ratio_shm_vs_mpi_shm_paired"] is not None:
        target_shm_paired.append(row["ratio_shm_vs_mpi_shm_paired"])
    if n in (2, 4) and b >= 1 << 20 and t:
        target.append(row["ratio_vs_mpi_tcp"])
    if b >= 1 << 20 and q and s:
        target_shm.append(row["ratio_shm_vs_mpi_shm"])
checks = [r["check"] for rows in (ring, ring_shm, tcp, shm) for r in rows.values()]
load = [open(os.path.join(d, f)).read().strip() for f in ("load_start", "load_end")]
print(json.dumps({"summary": "allreduce",
                  "target": "n=2 and 4, >= 1 MiB: ours (tcp) busbw >= MPI TCP busbw",
                  "met": bool(target) and min(target) >= 1.0,
                  "min_ratio": min(target) if target else None, "sizes_checked": len(target),
                  "target_shm": "every n, >= 1 MiB: ours (shm) busbw >= MPI shm busbw",
                  "met_shm": bool(target_shm) and min(target_shm) >= 1.0,
                  "min_ratio_shm": min(target_shm) if target_shm else None,
                  "met_paired": bool(target_paired) and min(target_paired) >= 1.0,
                  "min_ratio_paired": min(target_paired) if target_paired else None,
                  "met_shm_paired": bool(target_shm_paired) and min(target_shm_paired) >= 1.0,
                  "min_ratio_shm_paired": min(target_shm_paired) if target_shm_paired else None,
                  "load_start": load[0], "load_end": load[1],
                  "busy_runs": sum(busy_runs.values()),
                  "all_results_checked_ok": all(c == "ok" for c in checks)}))
EOF
