#!/usr/bin/env python3
"""psserver --metrics-listen: Prometheus metrics over HTTP.

  metrics_check.py BIN_DIR endpoint     a shard pushed to 3 times by ps_probe: /metrics
                                        counts them (pushes, version, the push-time
                                        histogram), 404 and 405 elsewhere; a bad or taken
                                        address is refused at start (status 2, 3)
  metrics_check.py BIN_DIR worker       pstrain --metrics-listen: a simulated run's steps,
                                        examples, step-time histogram and compute time as
                                        they happen
  metrics_check.py BIN_DIR prometheus   `promtool check metrics` passes on a scrape, and
                                        Debian's real prometheus scrapes a shard and answers
                                        a query for its pushes through its HTTP API (exits
                                        77, skipped, without promtool and prometheus)
"""
import json
import os
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request

from itest import check, free_ports, main, stop_process

PROMETHEUS = shutil.which("prometheus") or "/usr/bin/prometheus"
PROMTOOL = shutil.which("promtool") or "/usr/bin/promtool"


def get(url, method="GET"):
    req = urllib.request.Request(url, method=method)
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, r.headers.get("Content-Type", ""), r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, "", e.read().decode()


def samples(text):
    """name{labels} -> value, from the text format."""
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            k, v = line.rsplit(" ", 1)
            out[k] = float(v)
    return out


class Shard:
    def __init__(self, bin_dir, tmp, extra=()):
        self.port, self.mport = free_ports(2)
        tf = {"cluster": {"ps": [f"127.0.0.1:{self.port}"], "worker": ["127.0.0.1:1"]},
              "task": {"type": "ps", "index": 0}}
        self.log = open(os.path.join(tmp, "ps.log"), "w")
        self.p = subprocess.Popen([os.path.join(bin_dir, "psserver"), "--metrics-listen",
                                   f"127.0.0.1:{self.mport}", *extra],
                                  env=dict(os.environ, TF_CONFIG=json.dumps(tf)),
                                  stdout=self.log, stderr=subprocess.STDOUT)
        self.probe = [os.path.join(bin_dir, "ps_probe"), "--addr", f"127.0.0.1:{self.port}"]
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and self.p.poll() is None:
            r = subprocess.run(self.probe + ["init", "1"], capture_output=True, text=True)
            if r.returncode == 0:
                break
            time.sleep(0.1)
        check(self.p.poll() is None, "psserver with --metrics-listen serves")

    def url(self, path="/metrics"):
        return f"http://127.0.0.1:{self.mport}{path}"

    def push(self, n):
        for step in range(n):
            r = subprocess.run(self.probe + ["push", str(step), "0.01"], capture_output=True,
                               text=True)
            check(r.returncode == 0, f"push {step}: {r.stdout.strip()}")

    def stop(self):
        self.p.terminate()
        self.p.wait(timeout=20)
        self.log.close()


def endpoint(bin_dir, tmp):
    sh = Shard(bin_dir, tmp)
    try:
        code, ctype, body = get(sh.url())
        before = samples(body)
        check(code == 200 and "version=0.0.4" in ctype and
              before.get('pstrain_ps_up{shard="0"}') == 1.0,
              f"GET /metrics: {code} {ctype}, the shard up")
        sh.push(3)
        m = samples(get(sh.url())[2])
        lb = '{shard="0"}'
        check(m["pstrain_ps_pushes_total" + lb] == 3 and m["pstrain_ps_version" + lb] == 3,
              f"3 pushes counted, version 3 ({m['pstrain_ps_pushes_total' + lb]:g}, "
              f"{m['pstrain_ps_version' + lb]:g})")
        check(m["pstrain_ps_push_seconds_count" + lb] == 3 and
              m['pstrain_ps_push_seconds_bucket{shard="0",le="+Inf"}'] == 3 and
              m["pstrain_ps_push_seconds_sum" + lb] > 0,
              "the push-time histogram has the 3 pushes (count, +Inf bucket, sum > 0)")
        buckets = [v for k, v in m.items() if k.startswith("pstrain_ps_push_seconds_bucket")]
        check(buckets == sorted(buckets), "its buckets are cumulative")
        pulls0 = m.get("pstrain_ps_pull_seconds_count" + lb, -1)
        for _ in range(2):
            r = subprocess.run(sh.probe + ["pull", "3"], capture_output=True, text=True)
            check(r.returncode == 0, f"pull: {r.stdout.strip()}")
        m = samples(get(sh.url())[2])
        check(pulls0 >= 0 and m["pstrain_ps_pull_seconds_count" + lb] == pulls0 + 2 and
              m['pstrain_ps_pull_seconds_bucket{shard="0",le="+Inf"}'] == pulls0 + 2,
              f"the pull-time histogram counts the 2 pulls made ({pulls0:g} before)")
        check(m["pstrain_ps_received_bytes_total" + lb] >= 3 * 60 and
              m["pstrain_ps_sent_bytes_total" + lb] >= 2 * 60,
              f"bytes received ({m['pstrain_ps_received_bytes_total' + lb]:g}: 3 pushes of 60 "
              f"bytes and more) and sent ({m['pstrain_ps_sent_bytes_total' + lb]:g}: 2 pulls of "
              "60 and more)")
        check(m["pstrain_ps_parameter_bytes" + lb] == (4 * 3 + 3) * 4,
              "the shard's parameter bytes (ps_probe's 4,3 MLP: 60)")
        check(get(sh.url("/nope"))[0] == 404 and get(sh.url(), "POST")[0] == 405,
              "404 for another path, 405 for another method")
    finally:
        sh.stop()
    # A bad address and a taken one are refused at start.
    port, busy = free_ports(2)
    tf = json.dumps({"cluster": {"ps": [f"127.0.0.1:{port}"], "worker": ["127.0.0.1:1"]},
                     "task": {"type": "ps", "index": 0}})
    ps = os.path.join(bin_dir, "psserver")
    r = subprocess.run([ps, "--metrics-listen", "nohost"], env=dict(os.environ, TF_CONFIG=tf),
                       capture_output=True, text=True, timeout=30)
    check(r.returncode == 2 and "--metrics-listen" in r.stderr, "a bad address: status 2")
    import socket
    s = socket.socket()
    s.bind(("127.0.0.1", busy))
    s.listen(1)
    try:
        r = subprocess.run([ps, "--metrics-listen", f"127.0.0.1:{busy}"],
                           env=dict(os.environ, TF_CONFIG=tf), capture_output=True, text=True,
                           timeout=30)
    finally:
        s.close()
    check(r.returncode == 3 and "--metrics-listen" in r.stderr, "a taken port: status 3")


def worker(bin_dir, tmp):
    """pstrain --metrics-listen: a simulated run's steps as they happen."""
    mport = free_ports(1)[0]
    p = subprocess.Popen([os.path.join(bin_dir, "pstrain"), "--metrics-listen",
                          f"127.0.0.1:{mport}", "--devices", "sim", "--sim-step-ms", "30",
                          "--max-steps", "60", "--epochs", "1", "--train-limit", "12800",
                          "--test-limit", "200", "--quiet"], stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True)
    try:
        m, deadline = {}, time.monotonic() + 60
        while time.monotonic() < deadline and p.poll() is None:
            try:
                m = samples(get(f"http://127.0.0.1:{mport}/metrics")[2])
            except (urllib.error.URLError, ConnectionError):
                m = {}
            if m.get('pstrain_worker_steps_total{rank="0"}', 0) >= 10:
                text = get(f"http://127.0.0.1:{mport}/metrics")[2]
                break
            time.sleep(0.1)
        lb = '{rank="0"}'
        steps = m.get("pstrain_worker_steps_total" + lb, 0)
        check(10 <= steps < 60, f"a running worker's steps are counted ({steps:g})")
        check(m["pstrain_worker_examples_total" + lb] >= 128 * steps and
              m["pstrain_worker_step_seconds_count" + lb] >= steps and
              m["pstrain_worker_compute_seconds_total" + lb] >= 0.9 * 0.030 * steps,
              "examples (128 a step), the step-time histogram and the compute time (30 ms "
              "simulated a step) follow the steps")
        if os.access(PROMTOOL, os.X_OK):
            r = subprocess.run([PROMTOOL, "check", "metrics"], input=text, capture_output=True,
                               text=True, timeout=60)
            check(r.returncode == 0, f"promtool check metrics passes on a worker's: "
                                     f"{r.stdout.strip()} {r.stderr.strip()}")
    finally:
        out = p.communicate(timeout=60)[0]
    check(p.returncode == 0 and "60 steps" in out, "the run finishes")


def prometheus(bin_dir, tmp):
    if not (os.access(PROMETHEUS, os.X_OK) and os.access(PROMTOOL, os.X_OK)):
        print("SKIP: no prometheus/promtool (Debian's prometheus package; "
              "scripts/install-deps.sh installs it)")
        sys.exit(77)
    sh = Shard(bin_dir, tmp)
    prom = None
    try:
        sh.push(5)
        body = get(sh.url())[2]
        r = subprocess.run([PROMTOOL, "check", "metrics"], input=body, capture_output=True,
                           text=True, timeout=60)
        check(r.returncode == 0, f"promtool check metrics passes: {r.stdout.strip()} "
                                 f"{r.stderr.strip()}")
        pport = free_ports(1)[0]
        cfg = os.path.join(tmp, "prometheus.yml")
        with open(cfg, "w") as f:
            f.write("global:\n  scrape_interval: 1s\nscrape_configs:\n"
                    "  - job_name: pstrain\n    static_configs:\n"
                    f"      - targets: ['127.0.0.1:{sh.mport}']\n")
        plog = open(os.path.join(tmp, "prometheus.log"), "w")
        prom = subprocess.Popen([PROMETHEUS, f"--config.file={cfg}",
                                 f"--storage.tsdb.path={os.path.join(tmp, 'tsdb')}",
                                 f"--web.listen-address=127.0.0.1:{pport}"],
                                stdout=plog, stderr=subprocess.STDOUT)
        q = (f"http://127.0.0.1:{pport}/api/v1/query?query="
             "pstrain_ps_pushes_total%7Bjob%3D%22pstrain%22%7D")
        got, deadline = None, time.monotonic() + 60
        while time.monotonic() < deadline and prom.poll() is None:
            try:
                with urllib.request.urlopen(q, timeout=5) as resp:
                    res = json.loads(resp.read())["data"]["result"]
                if res:
                    got = res[0]
                    break
            except (urllib.error.URLError, ConnectionError, KeyError, ValueError):
                pass
            time.sleep(0.5)
        check(got is not None and got["value"][1] == "5" and got["metric"]["shard"] == "0",
              f"prometheus scraped the shard and answers pstrain_ps_pushes_total = 5 "
              f"({got})")
    finally:
        if prom:
            stop_process(prom, 20)
        sh.stop()


if __name__ == "__main__":
    main(__doc__, {"endpoint": endpoint, "worker": worker, "prometheus": prometheus},
         "pstrain-metrics-")
