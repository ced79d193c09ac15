#!/usr/bin/env python3
"""Your own training loop in numpy on the parameter servers, through the pstrain package.

    psserver --ps-hosts 127.0.0.1:5000 --worker-hosts 127.0.0.1:5001,127.0.0.1:5002 \\
             --task-index 0 &
    python3 examples/numpy_loop.py --ps-hosts 127.0.0.1:5000 --rank 1 --workers 2 &
    python3 examples/numpy_loop.py --ps-hosts 127.0.0.1:5000 --rank 0 --workers 2

A linear regression y = x . w + b on examples each worker draws from one planted model:
every step computes the mean squared error's gradient on a batch in numpy, pushes it and
gets the averaged step's parameters back (written into the same array). Exit status 0 when
the loss fell below a hundredth of its start.
"""
import argparse
import sys

import numpy as np

import pstrain

DIM, BATCH = 32, 64


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ps-hosts", required=True)
    ap.add_argument("--rank", type=int, default=0)
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--token-file")
    ap.add_argument("--admin-token-file")
    a = ap.parse_args()
    w_true = np.sin(1.0 + np.arange(DIM))
    b_true = 0.5
    rng = np.random.default_rng(1000 + a.rank)
    with pstrain.Client(a.ps_hosts, [("linear/w", DIM), ("linear/b", 1)], rank=a.rank,
                        num_workers=a.workers, lr=0.05, auth_token_file=a.token_file,
                        admin_token_file=a.admin_token_file) as c:
        if a.rank == 0:
            c.init()
        params, _ = c.pull(0)
        grad = np.empty_like(params)
        first = last = None
        for t in range(a.steps):
            x = rng.uniform(-1, 1, (BATCH, DIM))
            d = x @ params[:DIM] + params[DIM] - (x @ w_true + b_true)
            last = float(np.mean(d * d))
            first = last if first is None else first
            grad[:DIM] = 2.0 * (x.T @ d) / BATCH
            grad[DIM] = 2.0 * d.mean()
            c.step(t, grad, out=params)
            if t % 50 == 0 or t == a.steps - 1:
                print(f"rank {a.rank} step {t} loss {last:.6f}", flush=True)
        print(f"rank {a.rank}: loss {last:.6f} after {a.steps} steps (from {first:.6f})")
        if a.rank == 0:
            c.shutdown()
    return 0 if last < first / 100 else 1


if __name__ == "__main__":
    sys.exit(main())
