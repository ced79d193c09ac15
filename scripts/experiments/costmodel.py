#!/usr/bin/env python3
"""A cost model of one training step: PS (sync, async) and ring AllReduce.

  costmodel.py --mode ps_sync|ps_async|allreduce --nodes N [--devices G]
               [--ps S] [--layout separate|colocated] --model-mb M [--rows-mb R]
               [--wire fp32|bf16] --rate RATE [--latency-ms L] [--compute-ms C]
               [--input-ms I] [--prefetch] [--intra-gbps B] [--overlap F]
               [--pipeline-first F0] [--partition-bytes P] [--calls K]
               [--batch-per-device E]

prints one JSON object: the step's parts (s), its time, examples/s, and the
speedup and scaling efficiency against one device with no communication.

The parameters are the run's flags, never fitted to measurements:

  M   the dense model, in MB (10^6 bytes) of fp32; --wire bf16 halves what a
      PS worker pushes (pstrain --wire-dtype bf16: gradients only; pulls stay
      fp32, and so does the ring); R the embedding rows a node pushes, and
      pulls, per step (in wire bytes); an allreduce replica moves M.
  B   each node's NIC, bytes/s each way (full duplex), from --rate.
  L   one-way latency between two nodes.
  C   a device's compute per step; I the input per step (a node's pipeline);
      with --prefetch input overlaps compute (max(C, I)), else C + I.
  G   devices per node: their gradients are reduced inside the node first
      (ring reduce + broadcast over --intra-gbps, NVLink-like: 2(G-1)/G M / B_in),
      then one push (or one ring rank) per node: the hierarchical case.
  F   the fraction of communication hidden behind compute (0: none).
  F0  ps_sync as pstrain runs it by default (overlap: each partition pushed
      as the backward pass makes its gradient; the pipelined pull: the next
      forward pass waits only for the first layer's pieces), with F0 the first
      layer's share of the model's bytes (see ps_sync below). Not for
      several devices a node (their reduce comes after the whole backward).

Per mode, with N worker nodes and S PS:
  ps_sync    push then pull, each bound by its busiest NIC: separate layout
             (PS on nodes of their own) max(X, N X/S) / B for X = wire M + R
             pushed, then X = M + R pulled; colocated (PS i on worker node i)
             the shard nodes' traffic max(X(S-1)/S, (N-1) X/S), and X for a
             node with no shard; plus 4L (two request/reply exchanges).
             With --pipeline-first F0 (the simulated device's schedule: the
             forward pass C/3, the backward 2C/3 making the gradients last
             layer first, so the first layer's comes last and is what the
             next forward needs first): the pushes drain as the backward
             makes them, max(2C/3, P); the first layer's pull follows, F0 Q,
             overlapped with its share of the forward, F0 C/3; then the rest
             of the forward: step = max(2C/3, P) + max(F0 Q, F0 C/3) +
             (1 - F0) C/3 + 4L (P, Q: the push and pull phases above).
             One worker: nothing else gates a partition, so each of the first
             layer's partitions is pulled as soon as it is pushed (the other
             direction of the NIC) and the tail after the last push is one
             partition's pull (--partition-bytes, the PS's 262144): the first
             layer's pushes start at max(2C/3, (1 - F0) P), take
             max(F0 P, F0 C/3) with its forward alongside, then one partition
             and the rest of the forward: step = max(2C/3, (1 - F0) P) +
             max(F0 P, F0 C/3) + part / B + (1 - F0) C/3 + 4L.
             With --calls K (pstrain's split calls, --call-bytes: a shard's
             share goes as K calls at once, and the shard answers a call's
             pull once every worker's push of it is in): a two-stage flow
             shop of K equal jobs, the pushes on one direction of every NIC,
             the pulls on the other, the calls sent in order: max(P, Q) +
             min(P, Q) / K + 4L after the work.
  ps_async   a closed queueing network solved by mean value analysis: each of
             the N workers cycles through compute (a delay: work + 4L), then
             its push through each shard's ingress and its pull through each
             shard's egress, 2S queues of demand X/(S B) each (X pushed or
             pulled; the S pieces go out at once, so a worker's own NIC, X/B,
             is their sum); the workers' transfers share a shard's NIC. MVA is
             exact for product-form networks and assumes the workers' phases
             random: devices of exactly equal step times keep whatever offset
             they start with (nearly in step), which puts a cycle anywhere
             between the bounds below (scaling.py's async points therefore
             vary the simulated steps by +-20 %, --sim-jitter); async_low and
             async_high bound it: workers never in step (max(a worker's cycle
             alone, the shard's bound)) and always in step (each phase at its
             busiest NIC: work + (max(X_push, N X_push / S) + max(X_pull, N
             X_pull / S)) / B); alone, a worker's S shard calls overlap on its
             full-duplex NIC (shard i's pull while pushing to the others), so
             its cycle alone is at least work + max(X_push + X_pull / S,
             X_push / S + X_pull) / B. The estimate is MVA's cycle, at most
             async_high: MVA lets a worker's visit to one shard have the whole
             link and queues its S visits one after the other, where its S
             pieces really go at once, each at most B / S on its own NIC; with
             S >= N no shard has more to take than a worker sends, and MVA's
             queueing there is contention the network does not have.
             Colocated layout: the bound max(a worker's cycle alone, a shard
             node's bytes / B).
  allreduce  ring over the N nodes: 2(N-1)/N M / B + 2(N-1) L; embedding rows
             (every replica keeps the whole tables) go round as an all-gather
             of each node's R: (N-1) R / B more. Halving-doubling (pstrain's
             --ring-algorithm; auto takes it for N = 4, 8, ... and M up to
             4 MiB, WK_RING_HD_MAX) moves the same bytes in 2 log2(N) steps:
             2 log2(N) L.
step = compute part + intra-node reduce + (1 - F) communication (async: the
larger of a worker's cycle and the shards' bound).
"""
import argparse
import json
import re
import sys

MODES = ("ps_sync", "ps_async", "allreduce")
ALGORITHMS = ("auto", "ring", "hd")
HD_MAX_BYTES = 4 << 20  # WK_RING_HD_MAX: auto's halving-doubling limit


PRESETS = {"100m": "100mbit", "1g": "1gbit", "10g": "10gbit"}


def rate_bits(rate):
    """tc's rate ('100mbit', '1gbit', '10gbit', '500kbit', presets 1g/10g, or bits/s): bit/s."""
    rate = PRESETS.get(str(rate), str(rate))
    m = re.fullmatch(r"(\d+(?:\.\d+)?)\s*(bit|kbit|mbit|gbit)?", rate.strip().lower())
    if not m:
        raise ValueError(f"bad rate {rate!r}: want e.g. 100mbit, 1gbit or 10gbit")
    return float(m.group(1)) * {"bit": 1, None: 1, "kbit": 1e3, "mbit": 1e6,
                                "gbit": 1e9}[m.group(2)]


def rate_bytes(rate):
    return rate_bits(rate) / 8


def ps_phase_bytes(n, s, mw, layout):
    """Bytes over the busiest NIC, one direction, in one push (or pull) phase of a sync step."""
    if layout == "separate":
        return max(mw, n * mw / s)
    if s > n:
        raise ValueError("colocated: at most one PS per worker node")
    shard_node = max(mw * (s - 1) / s, (n - 1) * mw / s)
    return shard_node if s == n else max(shard_node, mw)


def mva_cycle(n, think, demands):
    """Mean value analysis of a closed network: n customers, a delay of 'think' seconds and
    queues of the given service demands (seconds a visit); the mean cycle time."""
    q = [0.0] * len(demands)
    cycle = think + sum(demands)
    for k in range(1, n + 1):
        r = [d * (1 + qi) for d, qi in zip(demands, q)]
        cycle = think + sum(r)
        q = [k / cycle * ri for ri in r]
    return cycle


def step(mode, nodes, model_bytes, link_Bps, ps=1, layout="separate", devices=1, rows_bytes=0.0,
         wire=1.0, latency_s=0.0, compute_s=0.0, input_s=0.0, prefetch=False, intra_Bps=None,
         overlap=0.0, batch_per_device=128, pipeline_first=None, partition_bytes=262144,
         calls=1, algorithm="auto"):
    """The model's step: a dict of its parts (seconds) and throughput."""
    if mode not in MODES:
        raise ValueError(f"mode: one of {MODES}")
    if nodes < 1 or devices < 1 or ps < 1 or calls < 1 or not 0 <= overlap <= 1:
        raise ValueError("nodes, devices, ps, calls >= 1; overlap in [0, 1]")
    n, g, m = nodes, devices, model_bytes
    work = max(compute_s, input_s) if prefetch else compute_s + input_s
    intra = 0.0
    if g > 1:
        if not intra_Bps:
            raise ValueError("devices > 1 needs the intra-node bandwidth")
        intra = 2 * (g - 1) / g * m / intra_Bps
    out = {"mode": mode, "nodes": n, "devices": g, "compute": compute_s, "input": input_s,
           "work": work, "intra": intra}
    if mode == "allreduce":
        if algorithm not in ALGORITHMS:
            raise ValueError(f"algorithm: one of {ALGORITHMS}")
        pow2 = n >= 4 and n & (n - 1) == 0
        if algorithm == "hd" and not pow2:
            raise ValueError("halving-doubling needs 4, 8, 16, ... nodes")
        hd = algorithm == "hd" or (algorithm == "auto" and pow2 and m <= HD_MAX_BYTES)
        comm = (2 * (n - 1) / n * m + (n - 1) * rows_bytes) / link_Bps if n > 1 else 0.0
        lat = 2 * (n.bit_length() - 1 if hd else n - 1) * latency_s
        out["algorithm"] = "halving-doubling" if hd else "ring"
        out.update(transfer=comm, latency=lat, step=work + intra + (1 - overlap) * (comm + lat))
    else:
        push = model_bytes * wire + rows_bytes
        pull = model_bytes + rows_bytes
        lat = 4 * latency_s
        if mode == "ps_sync":
            p_push = ps_phase_bytes(n, ps, push, layout) / link_Bps
            q_pull = ps_phase_bytes(n, ps, pull, layout) / link_Bps
            comm = p_push + q_pull
            if calls > 1:
                if pipeline_first is not None:
                    raise ValueError("calls: the serial term's (not with pipeline_first)")
                comm = max(p_push, q_pull) + min(p_push, q_pull) / calls
            out.update(transfer=comm, latency=lat,
                       step=work + intra + (1 - overlap) * (comm + lat))
            if pipeline_first is not None:
                if g > 1 or not 0 < pipeline_first <= 1:
                    raise ValueError("pipeline_first: one device a node, 0 < F0 <= 1")
                f0, tf = pipeline_first, compute_s / 3
                tb = compute_s - tf
                if n == 1:
                    piped = (max(tb, (1 - f0) * p_push) + max(f0 * p_push, f0 * tf) +
                             partition_bytes / link_Bps + (1 - f0) * tf + lat)
                else:
                    piped = max(tb, p_push) + max(f0 * q_pull, f0 * tf) + (1 - f0) * tf + lat
                # Input: beside it with prefetching, else before it.
                out["step"] = max(piped, input_s) if prefetch else piped + input_s
        else:
            own = (push + pull) / link_Bps
            if layout == "separate":
                cycle = mva_cycle(n, work + intra + lat, [push / (ps * link_Bps)] * ps +
                                  [pull / (ps * link_Bps)] * ps)
                bound = n * max(push, pull) / (ps * link_Bps)
            else:
                if ps > n:
                    raise ValueError("colocated: at most one PS per worker node")
                x = max(push, pull)
                bound = (x * (ps - 1) / ps + (n - 1) * x / ps) / link_Bps
                cycle = max(work + intra + (1 - overlap) * (own + lat), bound)
            # Bounds: workers never in step (each alone on the wire, or the shard
            # saturated) and always in step (every transfer shared by all N). Alone,
            # a worker's push to one shard may be answered while it still pushes to
            # the others (its NIC is full duplex): at least its pushes, then one
            # shard's share of the pull, or one shard's share of the push, then its
            # pulls.
            alone = own
            if layout == "separate":
                alone = max(push + pull / ps, push / ps + pull) / link_Bps
            low = max(work + intra + lat + alone, bound)
            high = max(work + intra + lat + (max(push, n * push / ps) +
                                             max(pull, n * pull / ps)) / link_Bps, low)
            if layout == "separate":
                cycle = min(cycle, high)
            out.update(transfer=own, latency=lat, shard_bound=bound, step=cycle, async_low=low,
                       async_high=high)
    base = work  # one device, nothing to send
    out["examples_per_s"] = n * g * batch_per_device / out["step"] if out["step"] > 0 else 0.0
    out["speedup"] = n * g * base / out["step"] if out["step"] > 0 else float(n * g)
    out["efficiency"] = out["speedup"] / (n * g)
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog=__doc__.split("\n\n", 1)[1])
    ap.add_argument("--mode", choices=MODES, required=True)
    ap.add_argument("--nodes", type=int, required=True)
    ap.add_argument("--devices", type=int, default=1)
    ap.add_argument("--ps", type=int, default=1)
    ap.add_argument("--layout", choices=["separate", "colocated"], default="separate")
    ap.add_argument("--model-mb", type=float, required=True)
    ap.add_argument("--rows-mb", type=float, default=0.0)
    ap.add_argument("--wire", choices=["fp32", "bf16"], default="fp32")
    ap.add_argument("--rate", required=True, help="each node's NIC: 100mbit, 1gbit, 10gbit")
    ap.add_argument("--latency-ms", type=float, default=0.0)
    ap.add_argument("--compute-ms", type=float, default=0.0)
    ap.add_argument("--input-ms", type=float, default=0.0)
    ap.add_argument("--prefetch", action="store_true")
    ap.add_argument("--intra-gbps", type=float, default=0.0, help="GB/s between a node's devices")
    ap.add_argument("--overlap", type=float, default=0.0)
    ap.add_argument("--pipeline-first", type=float, default=None)
    ap.add_argument("--partition-bytes", type=float, default=262144)
    ap.add_argument("--calls", type=int, default=1,
                    help="ps_sync: calls a shard's share goes in (pstrain --call-bytes)")
    ap.add_argument("--batch-per-device", type=int, default=128)
    ap.add_argument("--algorithm", choices=ALGORITHMS, default="auto",
                    help="allreduce: pstrain --ring-algorithm")
    a = ap.parse_args()
    try:
        r = step(a.mode, a.nodes, a.model_mb * 1e6, rate_bytes(a.rate), ps=a.ps, layout=a.layout,
                 devices=a.devices, rows_bytes=a.rows_mb * 1e6,
                 wire=0.5 if a.wire == "bf16" else 1.0, latency_s=a.latency_ms / 1e3,
                 compute_s=a.compute_ms / 1e3, input_s=a.input_ms / 1e3, prefetch=a.prefetch,
                 intra_Bps=a.intra_gbps * 1e9 or None, overlap=a.overlap,
                 batch_per_device=a.batch_per_device, pipeline_first=a.pipeline_first,
                 partition_bytes=a.partition_bytes, calls=a.calls, algorithm=a.algorithm)
    except ValueError as e:
        ap.error(str(e))
    print(json.dumps(r))
    return 0


if __name__ == "__main__":
    sys.exit(main())
