#!/usr/bin/env python3
"""scripts/experiments/costmodel.py against hand-computed cases."""
import os
import sys
import unittest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..",
                                "scripts", "experiments"))
import costmodel as cm  # noqa: E402

MB100 = 100e6
GBE = cm.rate_bytes("1gbit")  # 125e6 bytes/s


class Rates(unittest.TestCase):
    def test_rates(self):
        self.assertEqual(cm.rate_bits("100mbit"), 1e8)
        self.assertEqual(cm.rate_bits("10g"), 1e10)
        self.assertEqual(cm.rate_bytes("1gbit"), 125e6)
        self.assertEqual(cm.rate_bits("2500"), 2500)
        with self.assertRaises(ValueError):
            cm.rate_bits("fast")


class PsSync(unittest.TestCase):
    def test_one_worker_one_ps(self):
        # 100 MB at 125 MB/s: 0.8 s each way ("about a second on 1 GbE").
        r = cm.step("ps_sync", 1, MB100, GBE)
        self.assertAlmostEqual(r["transfer"], 1.6)
        self.assertAlmostEqual(r["step"], 1.6)

    def test_one_ps_is_the_bottleneck(self):
        # 4 workers into 1 PS: its NIC takes 400 MB per phase.
        self.assertAlmostEqual(cm.step("ps_sync", 4, MB100, GBE, ps=1)["step"], 6.4)
        # 4 PS: each takes 100 MB, as much as a worker sends.
        self.assertAlmostEqual(cm.step("ps_sync", 4, MB100, GBE, ps=4)["step"], 1.6)

    def test_colocated(self):
        # PS on every node: a node sends 3/4 of its gradient, receives 3 x 1/4.
        r = cm.step("ps_sync", 4, MB100, GBE, ps=4, layout="colocated")
        self.assertAlmostEqual(r["step"], 2 * 0.75 * 0.8)
        # 2 PS on 4 nodes: a shard node receives 3 x 1/2 of a model.
        r = cm.step("ps_sync", 4, MB100, GBE, ps=2, layout="colocated")
        self.assertAlmostEqual(r["step"], 2 * 1.5 * 0.8)
        with self.assertRaises(ValueError):
            cm.step("ps_sync", 2, MB100, GBE, ps=3, layout="colocated")

    def test_pipelined_overlap(self):
        # Two workers, 50 MB each, one PS: P = Q = 0.8 s on the PS's NIC. Compute 0.3 s:
        # forward 0.1, backward 0.2. Link-bound: max(0.2, 0.8) + max(0.4 * 0.8,
        # 0.4 * 0.1) + 0.6 * 0.1 = 1.18 (serial: 1.9).
        r = cm.step("ps_sync", 2, MB100 / 2, GBE, compute_s=0.3, pipeline_first=0.4)
        self.assertAlmostEqual(r["step"], 0.8 + 0.32 + 0.06)
        # Compute-bound: 3 s of compute (forward 1, backward 2) hides the 0.8 s push, and
        # the first layer's pull (0.32 s) hides in its share of the forward (0.4 s):
        # 2 + max(0.32, 0.4) + 0.6 = 3.0, the compute alone.
        r = cm.step("ps_sync", 2, MB100 / 2, GBE, compute_s=3.0, pipeline_first=0.4)
        self.assertAlmostEqual(r["step"], 3.0)
        # One worker, 100 MB: its first layer's partitions come back as they go out.
        # The other layers' pushes take 0.6 x 0.8 = 0.48 s (past the 0.2 s backward), the
        # first layer's 0.32 with its forward alongside, then one 256 KiB partition's
        # pull and the rest of the forward: 0.48 + 0.32 + 0.0021 + 0.06 (not 1.18).
        part = 262144 / 125e6
        r = cm.step("ps_sync", 1, MB100, GBE, compute_s=0.3, pipeline_first=0.4)
        self.assertAlmostEqual(r["step"], 0.48 + 0.32 + part + 0.06)
        # Compute-bound, one worker: the backward (2 s), the first layer's forward
        # (0.4 s, longer than its push), a partition, the rest (0.6 s).
        r = cm.step("ps_sync", 1, MB100, GBE, compute_s=3.0, pipeline_first=0.4)
        self.assertAlmostEqual(r["step"], 3.0 + part)
        r = cm.step("ps_sync", 1, MB100, GBE, compute_s=0.3, pipeline_first=0.4,
                    partition_bytes=4e6)
        self.assertAlmostEqual(r["step"], 0.48 + 0.32 + 4e6 / 125e6 + 0.06)
        # Never below the compute, never above the serial step.
        for c in (0.01, 0.3, 1.0, 5.0):
            for f0 in (0.1, 0.5, 1.0):
                s = cm.step("ps_sync", 2, MB100, GBE, compute_s=c, pipeline_first=f0)["step"]
                self.assertGreaterEqual(s, c - 1e-12)
                self.assertLessEqual(s, cm.step("ps_sync", 2, MB100, GBE, compute_s=c)["step"])
        with self.assertRaises(ValueError):
            cm.step("ps_sync", 1, MB100, GBE, devices=2, intra_Bps=1e9, pipeline_first=0.4)

    def test_split_calls(self):
        # Two workers, 50 MB each, one PS, in 4 calls: the pushes take the PS's
        # ingress 0.8 s, the pulls its egress 0.8 s; call k's pull goes while calls
        # k+1.. are pushed: 0.8 + one call's pull (0.2), not 1.6.
        r = cm.step("ps_sync", 2, MB100 / 2, GBE, compute_s=0.3, calls=4)
        self.assertAlmostEqual(r["transfer"], 0.8 + 0.2)
        self.assertAlmostEqual(r["step"], 0.3 + 1.0)
        # bf16 pushes (0.4 s) behind fp32 pulls (0.8 s): the first call's push, then
        # the pulls: 0.1 + 0.8.
        r = cm.step("ps_sync", 2, MB100 / 2, GBE, wire=0.5, calls=4)
        self.assertAlmostEqual(r["step"], 0.9)
        # One call: the serial term.
        self.assertAlmostEqual(cm.step("ps_sync", 2, MB100 / 2, GBE, calls=1)["step"], 1.6)
        with self.assertRaises(ValueError):
            cm.step("ps_sync", 2, MB100, GBE, calls=4, pipeline_first=0.4)
        with self.assertRaises(ValueError):
            cm.step("ps_sync", 2, MB100, GBE, calls=0)

    def test_latency_rows_wire_overlap(self):
        r = cm.step("ps_sync", 1, MB100, GBE, latency_s=0.001)
        self.assertAlmostEqual(r["latency"], 0.004)
        self.assertAlmostEqual(r["step"], 1.604)
        # bf16 halves the gradient pushed, not the parameters pulled; rows
        # go both ways as they are.
        r = cm.step("ps_sync", 1, MB100, GBE, wire=0.5, rows_bytes=25e6)
        self.assertAlmostEqual(r["step"], (75e6 + 125e6) / 125e6)
        r = cm.step("ps_async", 2, MB100, GBE, wire=0.5, compute_s=1.0)
        self.assertAlmostEqual(r["transfer"], 150e6 / 125e6)
        self.assertAlmostEqual(r["shard_bound"], 2 * 100e6 / 125e6)
        # The ring sends fp32 whatever the PS wire says.
        self.assertAlmostEqual(cm.step("allreduce", 2, MB100, GBE, wire=0.5)["transfer"], 0.8)
        r = cm.step("ps_sync", 1, MB100, GBE, compute_s=1.0, overlap=0.5)
        self.assertAlmostEqual(r["step"], 1.0 + 0.8)


class PsAsync(unittest.TestCase):
    def test_mva(self):
        # One worker: no one to share with: compute + push + pull.
        r = cm.step("ps_async", 1, MB100, GBE, ps=1, compute_s=1.0)
        self.assertAlmostEqual(r["step"], 2.6)
        # Two workers, one PS (MVA by hand): alone, each queue holds 0.8 / 2.6 of a
        # worker; the second worker finds that many ahead: 0.8 x (1 + 0.8 / 2.6)
        # at each of the two queues.
        r = cm.step("ps_async", 2, MB100, GBE, ps=1, compute_s=1.0)
        self.assertAlmostEqual(r["step"], 1.0 + 2 * 0.8 * (1 + 0.8 / 2.6))
        # Between workers never in step (each alone: 2.6 s) and always (every
        # transfer shared by both: 1 + 2 x 1.6 s).
        self.assertAlmostEqual(r["async_low"], 2.6)
        self.assertAlmostEqual(r["async_high"], 4.2)
        self.assertTrue(r["async_low"] < r["step"] < r["async_high"])
        # Many workers on one PS: the shard's NIC is the bound, approached from above.
        r = cm.step("ps_async", 16, MB100, GBE, ps=1, compute_s=1.0)
        self.assertAlmostEqual(r["shard_bound"], 16 * 0.8)
        self.assertGreater(r["step"], r["shard_bound"])
        self.assertLess(r["step"], r["shard_bound"] * 1.1)
        # Two PS: four queues of half the demand.
        self.assertAlmostEqual(cm.mva_cycle(1, 1.0, [0.4] * 4), 2.6)
        r = cm.step("ps_async", 4, MB100, GBE, ps=2, compute_s=1.0)
        self.assertAlmostEqual(r["step"], cm.mva_cycle(4, 1.0, [0.4] * 4))
        self.assertLess(r["step"], cm.step("ps_async", 4, MB100, GBE, ps=1,
                                           compute_s=1.0)["step"])
        # Never in step with two PS: shard 0's pull may come in while the worker
        # still pushes to shard 1: 0.8 + 0.4 s at least, not 1.6; or the two shards'
        # saturation (4 x 0.8 / 2) if that is more.
        self.assertAlmostEqual(r["async_low"], 1.0 + 0.8 + 0.4)
        r = cm.step("ps_async", 8, MB100, GBE, ps=2, compute_s=1.0)
        self.assertAlmostEqual(r["async_low"], 8 * 0.8 / 2)
        # As many PS as workers: each shard takes, in step, what one worker sends
        # (4 x 100 MB / 4), so the workers' own NICs are the bound: 1 + 0.8 + 0.8.
        # MVA, queueing a worker's four visits one after the other at the full
        # link's speed, puts contention on top that the network has not.
        r = cm.step("ps_async", 4, MB100, GBE, ps=4, compute_s=1.0)
        self.assertAlmostEqual(r["async_high"], 2.6)
        self.assertGreater(cm.mva_cycle(4, 1.0, [0.2] * 8), 2.6)
        self.assertAlmostEqual(r["step"], 2.6)
        self.assertAlmostEqual(r["async_low"], 1.0 + 0.8 + 0.2)
        # Fewer workers than PS: in step, each worker still sends its whole 0.8 s
        # each way (not 2 x 1.6 / 4).
        r = cm.step("ps_async", 2, MB100, GBE, ps=4, compute_s=1.0)
        self.assertAlmostEqual(r["async_high"], 2.6)
        self.assertLessEqual(r["step"], 2.6)
        # Colocated: a shard node carries its own 1/2 out plus 3 x 1/2 to the others.
        r = cm.step("ps_async", 4, MB100, GBE, ps=2, layout="colocated", compute_s=1.0)
        self.assertAlmostEqual(r["shard_bound"], 2.0 * 0.8)


class AllReduce(unittest.TestCase):
    def test_ring(self):
        # 2(n-1)/n of the model over each link, 2(n-1) latency hops.
        r = cm.step("allreduce", 4, MB100, GBE, latency_s=0.001)
        self.assertAlmostEqual(r["transfer"], 1.5 * 0.8)
        self.assertAlmostEqual(r["latency"], 0.006)
        self.assertEqual(cm.step("allreduce", 1, MB100, GBE)["transfer"], 0.0)
        # Rows: each node's go round to every other: (n - 1) R more.
        r = cm.step("allreduce", 4, MB100, GBE, rows_bytes=10e6)
        self.assertAlmostEqual(r["transfer"], 1.5 * 0.8 + 3 * 10e6 / 125e6)
        # The ring's volume per node is bounded by 2 M whatever n; the PS's grows.
        r8 = cm.step("allreduce", 8, MB100, GBE)["transfer"]
        self.assertAlmostEqual(r8, 2 * 7 / 8 * 0.8)

    def test_halving_doubling(self):
        # The same bytes in 2 log2(n) steps: 6 latency hops at 8 nodes, not 14.
        r = cm.step("allreduce", 8, MB100, GBE, latency_s=0.001, algorithm="hd")
        self.assertEqual(r["algorithm"], "halving-doubling")
        self.assertAlmostEqual(r["transfer"], 2 * 7 / 8 * 0.8)
        self.assertAlmostEqual(r["latency"], 0.006)
        # auto: as pstrain's, for 4, 8, ... nodes and models up to 4 MiB.
        small = 4 << 20
        self.assertEqual(cm.step("allreduce", 4, small, GBE)["algorithm"], "halving-doubling")
        self.assertAlmostEqual(cm.step("allreduce", 4, small, GBE, latency_s=0.001)["latency"],
                               0.004)
        self.assertEqual(cm.step("allreduce", 4, small + 1, GBE)["algorithm"], "ring")
        self.assertEqual(cm.step("allreduce", 6, small, GBE)["algorithm"], "ring")
        self.assertEqual(cm.step("allreduce", 2, small, GBE)["algorithm"], "ring")
        self.assertEqual(cm.step("allreduce", 4, small, GBE, algorithm="ring")["algorithm"],
                         "ring")
        with self.assertRaises(ValueError):
            cm.step("allreduce", 6, MB100, GBE, algorithm="hd")


class Node(unittest.TestCase):
    def test_prefetch(self):
        self.assertAlmostEqual(cm.step("allreduce", 1, 0, GBE, compute_s=0.010,
                                       input_s=0.006)["step"], 0.016)
        self.assertAlmostEqual(cm.step("allreduce", 1, 0, GBE, compute_s=0.010, input_s=0.006,
                                       prefetch=True)["step"], 0.010)

    def test_intra_node_reduce(self):
        # 8 devices, 100 MB over 100 GB/s: 2 x 7/8 x 1 ms.
        r = cm.step("allreduce", 1, MB100, GBE, devices=8, intra_Bps=100e9)
        self.assertAlmostEqual(r["intra"], 1.75e-3)
        with self.assertRaises(ValueError):
            cm.step("allreduce", 1, MB100, GBE, devices=8)

    def test_speedup(self):
        # Nothing to send: linear.
        r = cm.step("allreduce", 8, 0, GBE, compute_s=1.0, batch_per_device=64)
        self.assertAlmostEqual(r["speedup"], 8.0)
        self.assertAlmostEqual(r["efficiency"], 1.0)
        self.assertAlmostEqual(r["examples_per_s"], 8 * 64)
        # 8 nodes x 8 devices, 1 s compute, 1.4 s ring + 1.75 ms in the node.
        r = cm.step("allreduce", 8, MB100, GBE, devices=8, intra_Bps=100e9, compute_s=1.0)
        self.assertAlmostEqual(r["speedup"], 64 * 1.0 / (1.0 + 1.75e-3 + 1.4))


if __name__ == "__main__":
    unittest.main(verbosity=2)
