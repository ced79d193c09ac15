#!/usr/bin/env python3
"""Regenerate schemas-v1.37.json: the Kubernetes JSON schemas of the kinds deploy/k8s uses.

  prune_schemas.py SCHEMA_DIR > schemas-v1.37.json

SCHEMA_DIR is a "-local-strict" directory of yannh/kubernetes-json-schema, e.g. the one in the
kubernetes-validate wheel (pip download kubernetes-validate; unzip; kubernetes_validate/
kubernetes-json-schema/v1.37.0-local-strict). It keeps the root schemas of StatefulSet, Service
and Job and every definition they reach, drops the descriptions, and makes the references
local, so that tests/integration/deploy_check.py validates offline with python3-jsonschema.
The schemas are generated from Kubernetes' OpenAPI specification (Apache-2.0).
"""
import json
import os
import sys

ROOTS = {"StatefulSet": "statefulset-apps-v1.json", "Service": "service-v1.json",
         "Job": "job-batch-v1.json"}


def refs(o):
    if isinstance(o, dict):
        for k, v in o.items():
            if k == "$ref":
                yield v
            else:
                yield from refs(v)
    elif isinstance(o, list):
        for v in o:
            yield from refs(v)


def strip(o):
    if isinstance(o, dict):
        return {k: strip(v) for k, v in o.items() if k != "description"}
    if isinstance(o, list):
        return [strip(v) for v in o]
    if isinstance(o, str) and o.startswith("/api/_definitions.json#/$defs/"):
        return "#/$defs/" + o.split("/")[-1]
    return o


def main():
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    d = sys.argv[1]
    top = json.load(open(os.path.join(d, "_definitions.json")))
    defs, need, stack, roots = top["$defs"], set(), [], {}
    for kind, f in ROOTS.items():
        roots[kind] = json.load(open(os.path.join(d, f)))
        stack += [r.split("/")[-1] for r in refs(roots[kind])]
    while stack:
        n = stack.pop()
        if n not in need:
            need.add(n)
            stack += [r.split("/")[-1] for r in refs(defs[n])]
    out = {n: strip(defs[n]) for n in sorted(need)}
    for kind, doc in roots.items():
        doc = strip(doc)
        doc.pop("$schema", None)
        doc.pop("$id", None)
        out["pstrain.root." + kind] = doc
    json.dump({"$schema": top["$schema"],
               "$comment": "Kubernetes v1.37.0 OpenAPI schemas (local-strict: unknown fields "
                           "refused) of StatefulSet, Service and Job and the definitions they "
                           "reach, descriptions removed; from the kubernetes-validate 1.37.0 wheel "
                           "(yannh/kubernetes-json-schema, generated from Kubernetes' OpenAPI; "
                           "Apache-2.0). Regenerate with tests/data/k8s/prune_schemas.py.",
               "$defs": out}, sys.stdout, separators=(",", ":"), sort_keys=True)


if __name__ == "__main__":
    main()
