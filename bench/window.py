#!/usr/bin/env python3
"""window.py - what else ran on the machine while a benchmark did.

As a module (bench/peers.py): Window, a context manager that records the load average
and the CPU time other processes took during a benchmark's window: the machine's busy time
from /proc/stat minus the benchmark's own processes (this process's children, from their
rusage, which covers every process they reaped in turn), less what the clock ticks of
/proc/stat cannot resolve (a tick a core at each end). A window where others used more
than BUSY_CORES cores is flagged busy and left out of the medians.

As a command (bench/allreduce.sh):

    bench/window.py CMD [ARG...]

runs CMD, passes its output on, and adds to each of its JSON lines (those that start with
'{') the window's fields: "load1_start", "load1_end", "others_cores" and "busy". Its output
is held until CMD ends (the fields are known only then). Exits with CMD's status.
"""
import os
import resource
import subprocess
import sys
import time

BUSY_CORES = 0.2


def cpu_busy_s():
    """Seconds of CPU time the whole machine spent busy (all cores), from /proc/stat."""
    with open("/proc/stat") as f:
        fields = f.readline().split()[1:]
    v = [int(x) for x in fields]
    idle = v[3] + (v[4] if len(v) > 4 else 0)
    return (sum(v[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def children_cpu_s():
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


class Window:
    """Wall time, load and the CPU others took while the benchmark ran."""

    def __enter__(self):
        self.load0 = os.getloadavg()[0]
        self.t0, self.busy0, self.kids0 = time.monotonic(), cpu_busy_s(), children_cpu_s()
        return self

    def __exit__(self, *exc):
        self.wall = time.monotonic() - self.t0
        own = children_cpu_s() - self.kids0
        # /proc/stat counts clock ticks: each reading may miss up to a tick a core.
        res = 2 * (os.cpu_count() or 1) / os.sysconf("SC_CLK_TCK")
        self.others_cores = max(0.0, (cpu_busy_s() - self.busy0 - own - res) / self.wall)
        self.load1 = os.getloadavg()[0]
        return False

    def fields(self):
        return {"load1_start": round(self.load0, 2), "load1_end": round(self.load1, 2),
                "others_cores": round(self.others_cores, 3),
                "busy": self.others_cores > BUSY_CORES}


def main(argv):
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__.strip(), file=sys.stderr)
        return 2
    with Window() as w:
        p = subprocess.run(argv, stdout=subprocess.PIPE, text=True)
    f = w.fields()
    extra = ('"load1_start":%s,"load1_end":%s,"others_cores":%s,"busy":%s,'
             % (f["load1_start"], f["load1_end"], f["others_cores"],
                "true" if f["busy"] else "false"))
    for line in p.stdout.splitlines():
        print("{" + extra + line[1:] if line.startswith("{") else line)
    sys.stdout.flush()
    return p.returncode


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
