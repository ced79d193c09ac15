#!/usr/bin/env python3
"""The deployment files, checked offline (no cluster, no systemd running).

  deploy_check.py SOURCE_DIR BIN_DIR

Kubernetes (deploy/k8s/*.yaml, parsed with PyYAML): every object's fields
against a schema of the fields these manifests may use (so a misspelt or
misplaced key fails, as the API server's strict validation would), types and
ranges; then what ties the objects together: Services select the pods they
name and are headless (the PS one also publishes pods that are not ready, or
the chief could not reach a shard that waits for its rollback); ports named
by probes and Services exist; mounts have volumes; the StatefulSet's replicas
and the Job's completions match the PS and worker lists every pod is given;
the TFJob's PS list is the same. The container scripts are run with a fake
psserver/pstrain that records its arguments and TF_CONFIG: shard i gets
--task-index i, worker i a TF_CONFIG naming the same cluster with task index
i, and only worker 0 the admin token. Then the core objects against Kubernetes'
own JSON schemas (v1.37, strict; tests/data/k8s, validated with python3-jsonschema).

systemd (deploy/systemd/*.service): `systemd-analyze verify` on instance 0 of
each template (the programs pointed at BIN_DIR's), which must print nothing.
Parts whose tool is missing are reported as skipped; all missing: exit 77.
"""
import functools
import glob
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from itest import check  # noqa: E402

ANY = object()
INT, STR, BOOL = int, str, bool
# Schemas: a dict maps keys to schemas (other keys are errors), a list [S] is a
# list of S, a tuple of types is a scalar of those types, ANY anything.
PORT = {"name": STR, "port": INT, "targetPort": (STR, INT), "containerPort": INT,
        "protocol": STR}
PROBE = {"grpc": {"port": INT, "service": STR}, "tcpSocket": {"port": (STR, INT)},
         "httpGet": {"path": STR, "port": (STR, INT)}, "initialDelaySeconds": INT,
         "periodSeconds": INT, "timeoutSeconds": INT, "failureThreshold": INT}
QUANTITIES = {"cpu": (STR, INT), "memory": (STR, INT), "storage": STR}
CONTAINER = {"name": STR, "image": STR, "imagePullPolicy": STR, "command": [STR],
             "args": [STR], "env": [{"name": STR, "value": STR}], "ports": [PORT],
             "readinessProbe": PROBE, "livenessProbe": PROBE,
             "resources": {"requests": QUANTITIES, "limits": QUANTITIES},
             "volumeMounts": [{"name": STR, "mountPath": STR, "readOnly": BOOL}]}
LABELS = {"labels": ANY, "annotations": ANY, "name": STR}
POD_SPEC = {"containers": [CONTAINER], "restartPolicy": STR, "subdomain": STR,
            "terminationGracePeriodSeconds": INT,
            "securityContext": {"runAsUser": INT, "runAsGroup": INT, "fsGroup": INT},
            "volumes": [{"name": STR, "secret": {"secretName": STR, "defaultMode": INT,
                                                 "items": [{"key": STR, "path": STR}]}}]}
TEMPLATE = {"metadata": LABELS, "spec": POD_SPEC}
REPLICA = {"replicas": INT, "restartPolicy": STR, "template": TEMPLATE}
SCHEMAS = {
    ("v1", "Service"): {"spec": {"clusterIP": STR, "publishNotReadyAddresses": BOOL,
                                 "selector": ANY, "ports": [PORT]}},
    ("apps/v1", "StatefulSet"): {"spec": {
        "serviceName": STR, "replicas": INT, "podManagementPolicy": STR,
        "selector": {"matchLabels": ANY}, "template": TEMPLATE,
        "volumeClaimTemplates": [{"metadata": LABELS, "spec": {
            "accessModes": [STR], "resources": {"requests": QUANTITIES}}}]}},
    ("batch/v1", "Job"): {"spec": {
        "completionMode": STR, "completions": INT, "parallelism": INT, "backoffLimit": INT,
        "podFailurePolicy": {"rules": [{
            "action": STR, "onExitCodes": {"containerName": STR, "operator": STR,
                                           "values": [INT]},
            "onPodConditions": [{"type": STR}]}]},
        "template": TEMPLATE}},
    ("kubeflow.org/v1", "TFJob"): {"spec": {
        "runPolicy": {"cleanPodPolicy": STR, "backoffLimit": INT},
        "tfReplicaSpecs": {"Chief": REPLICA, "Worker": REPLICA, "PS": REPLICA}}},
}
ENUMS = {"restartPolicy": {"Always", "OnFailure", "Never", "ExitCode"},
         "imagePullPolicy": {"Always", "IfNotPresent", "Never"},
         "podManagementPolicy": {"OrderedReady", "Parallel"},
         "completionMode": {"NonIndexed", "Indexed"},
         "action": {"FailJob", "FailIndex", "Ignore", "Count"},
         "operator": {"In", "NotIn"}, "cleanPodPolicy": {"None", "Running", "All"},
         "accessModes": {"ReadWriteOnce", "ReadOnlyMany", "ReadWriteMany",
                         "ReadWriteOncePod"}}
DNS1123 = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")


def conform(value, schema, path, errors):
    if schema is ANY:
        return
    if isinstance(schema, dict):
        if not isinstance(value, dict):
            errors.append(f"{path}: a mapping expected")
            return
        for k, v in value.items():
            if k not in schema:
                errors.append(f"{path}.{k}: not a field here")
            else:
                conform(v, schema[k], f"{path}.{k}", errors)
    elif isinstance(schema, list):
        if not isinstance(value, list) or not value:
            errors.append(f"{path}: a non-empty list expected")
            return
        for i, v in enumerate(value):
            conform(v, schema[0], f"{path}[{i}]", errors)
    else:
        types = schema if isinstance(schema, tuple) else (schema,)
        if isinstance(value, bool) and BOOL not in types or not isinstance(value, types):
            errors.append(f"{path}: {type(value).__name__} where {types} expected")
        key = path.rsplit(".", 1)[-1].split("[")[0]
        if key in ENUMS and value not in ENUMS[key]:
            errors.append(f"{path}: {value!r} is not one of {sorted(ENUMS[key])}")
        if key in ("port", "containerPort") and isinstance(value, int) and \
                not 0 < value < 65536:
            errors.append(f"{path}: port {value} out of range")


def containers_of(obj):
    """(where, pod template) of every pod template in obj."""
    spec = obj["spec"]
    if obj["kind"] == "TFJob":
        return [(f"TFJob {r}", rs["template"]) for r, rs in spec["tfReplicaSpecs"].items()]
    return [(f"{obj['kind']} {obj['metadata']['name']}", spec["template"])]


def check_pod(where, tmpl, extra_volumes, errors):
    spec = tmpl["spec"]
    volumes = {v["name"] for v in spec.get("volumes", [])} | set(extra_volumes)
    for c in spec["containers"]:
        ports = {p.get("name"): p["containerPort"] for p in c.get("ports", [])}
        for name in ports:
            if name is not None and not (len(name) <= 15 and re.match(r"^[a-z0-9-]+$", name)):
                errors.append(f"{where}: port name {name!r} is not an IANA_SVC_NAME")
        for probe in ("readinessProbe", "livenessProbe"):
            for kind, body in c.get(probe, {}).items():
                if not isinstance(body, dict):
                    continue
                port = body.get("port")
                if isinstance(port, str) and port not in ports or \
                        isinstance(port, int) and port not in ports.values():
                    errors.append(f"{where}: {probe}.{kind} port {port} is not a container port")
        for m in c.get("volumeMounts", []):
            if m["name"] not in volumes:
                errors.append(f"{where}: mount {m['name']} has no volume")
    return spec


def fake_bin(tmp):
    """psserver and pstrain that print their arguments and TF_CONFIG as JSON."""
    d = os.path.join(tmp, "fakebin")
    os.makedirs(d, exist_ok=True)
    for prog in ("psserver", "pstrain"):
        path = os.path.join(d, prog)
        with open(path, "w") as f:
            f.write("#!/usr/bin/env python3\nimport json, os, sys\n"
                    f"print(json.dumps({{'prog': '{prog}', 'argv': sys.argv[1:], "
                    "'tf_config': os.environ.get('TF_CONFIG')}))\n")
        os.chmod(path, 0o755)
    return d


def run_script(container, env, fakebin):
    """The container's command as the pod would run it, with the fake programs."""
    argv = container.get("command", []) + container.get("args", [])
    e = {"PATH": fakebin + os.pathsep + os.environ["PATH"]}
    e.update({v["name"]: v["value"] for v in container.get("env", [])})
    e.update(env)
    p = subprocess.run(argv, capture_output=True, text=True, env=e, timeout=30)
    if p.returncode != 0:
        return None, p.stderr
    return json.loads(p.stdout), p.stderr


def flag(argv, name):
    return argv[argv.index(name) + 1] if name in argv else None


@functools.lru_cache(maxsize=None)
def known_flags(bin_dir, prog):
    """The --flags the real program's --help lists (run once a program)."""
    text = subprocess.run([os.path.join(bin_dir, prog), "--help"], capture_output=True,
                          text=True, timeout=30)
    return frozenset(re.findall(r"--[a-z][a-z0-9-]*", text.stdout + text.stderr))


def unknown_flags(bin_dir, prog, argv):
    """The --flags of argv that the real program's --help does not list."""
    known = known_flags(bin_dir, prog)
    return [a for a in argv if a.startswith("--") and a.split("=")[0] not in known]


def k8s(src, bin_dir, tmp):
    try:
        import yaml
    except ImportError:
        print("skipped: Kubernetes manifests (no PyYAML: apt-get install python3-yaml)")
        return False
    files = sorted(glob.glob(os.path.join(src, "deploy", "k8s", "*.yaml")))
    check(len(files) >= 3, f"deploy/k8s holds the manifests ({len(files)} files)")
    objs, errors = [], []
    for f in files:
        with open(f) as fh:
            for doc in yaml.safe_load_all(fh):
                if doc is None:
                    continue
                key = (doc.get("apiVersion"), doc.get("kind"))
                where = f"{os.path.basename(f)}: {key[1]} {doc.get('metadata', {}).get('name')}"
                if key not in SCHEMAS:
                    errors.append(f"{where}: unknown apiVersion/kind {key}")
                    continue
                if not DNS1123.match(doc["metadata"].get("name", "")):
                    errors.append(f"{where}: metadata.name is not a DNS-1123 label")
                body = {k: v for k, v in doc.items() if k not in ("apiVersion", "kind")}
                conform(body, dict(SCHEMAS[key], metadata=LABELS), where, errors)
                objs.append(doc)
    check(not errors, "every object conforms to the schema of its kind"
          + ("" if not errors else ":\n  " + "\n  ".join(errors)))
    by = {}
    for o in objs:
        by.setdefault(o["kind"], {})[o["metadata"]["name"]] = o
    check(set(by) >= {"Service", "StatefulSet", "Job", "TFJob"},
          f"a Service, StatefulSet, Job and TFJob are there ({sorted(by)})")

    errors = []
    sts = by["StatefulSet"]["pstrain-ps"]
    job = by["Job"]["pstrain-train"]
    tfjob = by["TFJob"]["pstrain"]
    claims = [c["metadata"]["name"] for c in sts["spec"].get("volumeClaimTemplates", [])]
    for o in (sts, job, tfjob):
        for where, tmpl in containers_of(o):
            check_pod(where, tmpl, claims if o is sts else [], errors)
    # Services: headless, selecting pods of their component, ports that exist.
    pods = {"StatefulSet": sts["spec"]["template"], "Job": job["spec"]["template"]}
    for name, svc in by["Service"].items():
        sel = svc["spec"]["selector"]
        targets = [t for t in pods.values()
                   if all(t["metadata"]["labels"].get(k) == v for k, v in sel.items())]
        if len(targets) != 1:
            errors.append(f"Service {name} selects {len(targets)} pod templates, not 1")
            continue
        cports = {p["name"] for c in targets[0]["spec"]["containers"] for p in c.get("ports", [])}
        for p in svc["spec"]["ports"]:
            if p["targetPort"] not in cports:
                errors.append(f"Service {name}: targetPort {p['targetPort']} is not a pod port")
        if svc["spec"].get("clusterIP") != "None" or \
                svc["spec"].get("publishNotReadyAddresses") is not True:
            errors.append(f"Service {name}: not headless with publishNotReadyAddresses")
    if sts["spec"]["serviceName"] not in by["Service"]:
        errors.append("StatefulSet: serviceName names no Service")
    if not all(sts["spec"]["template"]["metadata"]["labels"].get(k) == v
               for k, v in sts["spec"]["selector"]["matchLabels"].items()):
        errors.append("StatefulSet: the selector does not match the template's labels")
    js = job["spec"]
    if js.get("completionMode") != "Indexed" or js["completions"] != js["parallelism"]:
        errors.append("Job: not Indexed with every index running at once")
    if js["template"]["spec"].get("subdomain") not in by["Service"]:
        errors.append("Job: subdomain names no Service")
    if "podFailurePolicy" in js and js["template"]["spec"].get("restartPolicy") != "Never":
        errors.append("Job: a podFailurePolicy needs restartPolicy Never")
    cnames = {c["name"] for c in js["template"]["spec"]["containers"]}
    for r in js.get("podFailurePolicy", {}).get("rules", []):
        if "onExitCodes" in r and r["onExitCodes"]["containerName"] not in cnames:
            errors.append("Job: podFailurePolicy names no container")
        if r.get("action") == "FailJob" and any(c >= 128 for c in
                                                r.get("onExitCodes", {}).get("values", [])):
            errors.append("Job: a retryable status (128+) fails the Job")
    for rname, rs in tfjob["spec"]["tfReplicaSpecs"].items():
        cs = rs["template"]["spec"]["containers"]
        if cs[0]["name"] != "tensorflow" or \
                "tfjob-port" not in {p["name"] for p in cs[0].get("ports", [])}:
            errors.append(f"TFJob {rname}: the operator needs container tensorflow, port "
                          "tfjob-port")
        if rs.get("restartPolicy") != "ExitCode":
            errors.append(f"TFJob {rname}: restartPolicy is not ExitCode")
    check(not errors, "the objects fit together (selectors, ports, probes, mounts, policies)"
          + ("" if not errors else ":\n  " + "\n  ".join(errors)))

    # The cluster every pod is given, against the objects that make it.
    fb = fake_bin(tmp)
    ps_c = sts["spec"]["template"]["spec"]["containers"][0]
    svc_ps = sts["spec"]["serviceName"]
    grpc = next(p["containerPort"] for p in ps_c["ports"] if p["name"] == "grpc")
    want_ps = [f"{sts['metadata']['name']}-{i}.{svc_ps}:{grpc}"
               for i in range(sts["spec"]["replicas"])]
    w_c = js["template"]["spec"]["containers"][0]
    ring = next(p["containerPort"] for p in w_c["ports"] if p["name"] == "ring")
    want_w = [f"{job['metadata']['name']}-{i}.{js['template']['spec']['subdomain']}:{ring}"
              for i in range(js["completions"])]
    for i in range(sts["spec"]["replicas"]):
        out, err = run_script(ps_c, {"HOSTNAME": f"{sts['metadata']['name']}-{i}"}, fb)
        check(out is not None and out["prog"] == "psserver" and
              flag(out["argv"], "--task-index") == str(i) and
              flag(out["argv"], "--ps-hosts") == ",".join(want_ps) and
              flag(out["argv"], "--worker-hosts") == ",".join(want_w) and
              flag(out["argv"], "--data-dir") in [m["mountPath"] for m in ps_c["volumeMounts"]]
              and not unknown_flags(bin_dir, "psserver", out["argv"]),
              f"PS pod {i}: psserver --task-index {i}, the PS and worker lists of the objects, "
              f"its volume as --data-dir, only flags psserver knows"
              + ("" if out else f": {err}"))
    for i in range(js["completions"]):
        out, err = run_script(w_c, {"JOB_COMPLETION_INDEX": str(i)}, fb)
        tf = json.loads(out["tf_config"]) if out and out["tf_config"] else {}
        check(out is not None and tf.get("cluster") == {"ps": want_ps, "worker": want_w} and
              tf.get("task") == {"type": "worker", "index": i} and
              ("--admin-token-file" in out["argv"]) == (i == 0) and
              not unknown_flags(bin_dir, "pstrain", out["argv"]),
              f"worker pod {i}: TF_CONFIG names the cluster with task index {i}; "
              f"{'only it' if i == 0 else 'no'} admin token; only flags pstrain knows"
              + ("" if out else f": {err}"))
    for rname, rs in tfjob["spec"]["tfReplicaSpecs"].items():
        argv = rs["template"]["spec"]["containers"][0]["args"]
        check(flag(argv, "--ps-hosts") == ",".join(want_ps) and
              ("--admin-token-file" in argv) == (rname == "Chief") and
              not unknown_flags(bin_dir, "pstrain", argv),
              f"TFJob {rname}: the same PS list; "
              f"{'the' if rname == 'Chief' else 'no'} admin token")
    # Kubernetes' own schemas (v1.37, strict: unknown fields refused), for the core kinds.
    try:
        import jsonschema
    except ImportError:
        print("skipped: the core objects against Kubernetes' schemas (no python3-jsonschema)")
        return True
    with open(os.path.join(src, "tests", "data", "k8s", "schemas-v1.37.json")) as f:
        schemas = json.load(f)
    errors, n = [], 0
    for o in objs:
        root = "pstrain.root." + o["kind"]
        if root not in schemas["$defs"]:
            continue  # TFJob: a CRD, checked by the schema above only
        v = jsonschema.Draft202012Validator({"$ref": "#/$defs/" + root, "$defs": schemas["$defs"]})
        for e in v.iter_errors(o):
            errors.append(f"{o['kind']} {o['metadata']['name']}: {'.'.join(map(str, e.path))}: "
                          f"{e.message[:200]}")
        n += 1
    check(n >= 4 and not errors, f"the {n} core objects validate against Kubernetes v1.37's "
          "schemas (strict)" + ("" if not errors else ":\n  " + "\n  ".join(errors)))
    return True


def systemd(src, bin_dir, tmp):
    tool = shutil.which("systemd-analyze")
    if not tool:
        print("skipped: systemd units (no systemd-analyze)")
        return False
    units = sorted(glob.glob(os.path.join(src, "deploy", "systemd", "*@.service")))
    check(len(units) >= 2, f"deploy/systemd holds the PS and worker units ({len(units)})")
    d = os.path.join(tmp, "units")
    os.makedirs(d)
    inst = []
    for u in units:
        text = open(u).read()
        for prog in ("psserver", "pstrain"):
            text = text.replace(f"/usr/bin/{prog}", os.path.join(os.path.abspath(bin_dir), prog))
        name = os.path.basename(u).replace("@.service", "@0.service")
        with open(os.path.join(d, name), "w") as f:
            f.write(text)
        inst.append(os.path.join(d, name))
    p = subprocess.run([tool, "verify", "--man=no", *inst], capture_output=True, text=True,
                       timeout=60)
    said = (p.stdout + p.stderr).strip()
    check(p.returncode == 0 and not said,
          f"systemd-analyze verify: {', '.join(os.path.basename(i) for i in inst)} clean"
          + ("" if not said else f":\n{said}"))
    return True


def main():
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    src, bin_dir = sys.argv[1], sys.argv[2]
    with tempfile.TemporaryDirectory(prefix="deploy.") as tmp:
        done = [k8s(src, bin_dir, tmp), systemd(src, bin_dir, tmp)]
    if not any(done):
        sys.exit(77)


if __name__ == "__main__":
    main()
