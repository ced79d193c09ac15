/* wk_nccl_world.h - one NCCL communicator across the GPUs of all workers.
 * SPDX-License-Identifier: MIT
 *
 * The GPU data plane of collective mode: rank r of W processes, one GPU
 * each, joined by a unique id that the chief makes (wk_nccl_world_id) and
 * hands out (the rendezvous's JoinReply.nccl_id). NCCL picks the transport
 * and the hierarchy (NVLink, PCIe, shared memory inside a node; sockets or
 * InfiniBand between nodes).
 *
 * Nothing here can hang: the communicator is created non-blocking
 * (ncclConfig_t.blocking = 0), and every wait (creation, a collective,
 * finalisation) is a watchdog loop polling ncclCommGetAsyncError and
 * cudaStreamQuery. Past timeout_ms, or on an asynchronous NCCL error (a
 * peer's connection broke), the communicator is aborted (ncclCommAbort) and
 * the call fails with CM_ETIMEDOUT or CM_EIO and a message naming the step;
 * every later call then fails at once with CM_EIO. A dead peer is thus an
 * error in bounded time on every other rank.
 *
 * NCCL refuses two ranks on one GPU: W ranks need W distinct GPUs (on one
 * machine: give each worker its own --devices). On a one-GPU machine only
 * nranks = 1 runs. Built when CMake finds NCCL (WK_HAVE_NCCL); otherwise a
 * stub (wk_nccl_world_none.c) whose calls return CM_EUNSUPPORTED and
 * wk_nccl_world_available() is 0. Not thread-safe: one thread drives it.
 */
#ifndef WK_NCCL_WORLD_H
#define WK_NCCL_WORLD_H
#include <stddef.h>
#include <stdint.h>

#define WK_NCCL_ID_BYTES 128 /* NCCL_UNIQUE_ID_BYTES */

typedef struct wk_nccl_world wk_nccl_world;

/* 1 if this build has NCCL (the functions below work, given a GPU). */
int wk_nccl_world_available(void);

/* A fresh unique id (ncclGetUniqueId: it also opens the bootstrap listener
 * of rank 0 in this process, so the chief, which is rank 0, makes it).
 * CM_OK, or CM_EIO / CM_EUNSUPPORTED with the reason in err. */
int wk_nccl_world_id(uint8_t out[WK_NCCL_ID_BYTES], char *err, size_t errlen);

/* Join the communicator of 'nranks' ranks named by id as 'rank', on CUDA
 * device 'device' (ordinal), with a stream of its own. Waits until every
 * rank has joined, at most timeout_ms (which also bounds the later waits
 * unless wk_nccl_world_set_timeout changes it; <= 0: 60000). CM_OK, CM_ETIMEDOUT (not every rank came; the
 * communicator is aborted), CM_EINVAL, CM_EIO (NCCL or CUDA failed, e.g. two
 * ranks on one GPU), CM_EUNSUPPORTED (no NCCL); *out is NULL on error and
 * err says why. Release with wk_nccl_world_destroy (NULL is a no-op). */
int wk_nccl_world_create(const uint8_t id[WK_NCCL_ID_BYTES], int nranks, int rank, int device,
                         int timeout_ms, wk_nccl_world **out, char *err, size_t errlen);

/* In place on devbuf (n floats on the world's device): the sum over the
 * ranks, or with average != 0 the mean (ncclAvg). Queued on 'stream' (a
 * cudaStream_t, as void *; NULL: the world's own stream), so it is ordered
 * after the work already queued there; returns once it has completed on
 * this rank, under the watchdog. 'step' only names the collective in
 * errors ("NCCL allreduce of step S: no progress for T ms (a peer died?)").
 * CM_OK, CM_ETIMEDOUT or CM_EIO (see wk_nccl_world_error). */
int wk_nccl_world_allreduce(wk_nccl_world *w, float *devbuf, size_t n, int average, void *stream,
                            int64_t step);

/* The same for host memory: upload into the world's device buffer (grown
 * as needed), allreduce on its stream, download back into host. */
int wk_nccl_world_allreduce_host(wk_nccl_world *w, float *host, size_t n, int average,
                                 int64_t step);

/* Bound later waits (collectives, finalisation) by timeout_ms instead of
 * the creation's (<= 0: 60000). */
void wk_nccl_world_set_timeout(wk_nccl_world *w, int timeout_ms);

/* The message of the last failure ("" if none). */
const char *wk_nccl_world_error(const wk_nccl_world *w);

/* 1 once the communicator was aborted (after a timeout or an error). */
int wk_nccl_world_aborted(const wk_nccl_world *w);

/* Test hook for the watchdog on one rank: queue a kernel that spins for
 * spin_ms on the world's stream and wait for the stream under the
 * watchdog. With spin_ms > timeout_ms this must return CM_ETIMEDOUT after
 * about timeout_ms (plus the abort, which may wait for the spinning kernel)
 * and leave the world aborted. */
int wk_nccl_world_test_stall(wk_nccl_world *w, int spin_ms);

/* Abort the communicator now (a run that failed: its peers may be gone, so
 * there is nothing to finalise with). Later calls fail with CM_EIO. */
void wk_nccl_world_abort(wk_nccl_world *w);

/* ncclCommFinalize (bounded by timeout_ms) and ncclCommDestroy, or
 * ncclCommAbort when the communicator failed or does not finalise in time. */
void wk_nccl_world_destroy(wk_nccl_world *w);

#endif /* WK_NCCL_WORLD_H */
