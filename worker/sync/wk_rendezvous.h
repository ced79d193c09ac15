/* wk_rendezvous.h - how the ranks of collective mode find each other.
 * SPDX-License-Identifier: MIT
 *
 * Over the project's gRPC layer (proto/ps.proto, service Rendezvous): the
 * chief serves Join at its task address; every rank, the chief included,
 * calls Join with its ring listener's address, and every call is answered
 * once all ranks have joined, with every rank's address (the ring order is
 * rank order), the job id the ring's handshakes check, and the step the run
 * starts at. A rank that joins for another model or number of workers is
 * refused (FAILED_PRECONDITION naming both); a rank that never comes makes
 * the others' Join fail at its deadline, naming how many joined.
 *
 * Elastic rings: the server lives as long as the chief and forms one ring
 * after another (generations). After a rank dies the survivors Join again,
 * saying which step their state is for (wk_rdv_state); a restarted rank
 * joins without state. A ring forms when every rank has joined or, once
 * wk_rdv_server_set_elastic allowed it, when a survivor has waited
 * wait_ms and at least min_ranks ranks (the chief among them) are in. Its
 * members learn the members, their addresses (ring order is rank order
 * among the members), a new job id, and the root: the member whose state
 * is the newest (the largest step among ranks with state; ties go to the
 * lowest rank), which every member then takes.
 */
#ifndef WK_RENDEZVOUS_H
#define WK_RENDEZVOUS_H
#include <stddef.h>
#include <stdint.h>

typedef struct wk_rdv_server wk_rdv_server;
struct cm_security;

#define WK_RDV_NCCL_ID_MAX 128 /* WK_NCCL_ID_BYTES */

/* What every rank learns. */
typedef struct wk_rdv_result {
    char **ring_addrs; /* nranks "host:port", owned: wk_rdv_result_free. */
    int nranks;        /* Members of this ring (all ranks unless one is gone). */
    int *members;      /* nranks original ranks, ascending (owned). */
    int position;      /* This rank's place among them: its ring rank. */
    int root;          /* The position whose state every member takes. */
    uint32_t generation; /* Rings this chief formed, this one included. */
    uint64_t job_id;
    int64_t start_step;
    uint8_t nccl_id[WK_RDV_NCCL_ID_MAX]; /* The chief's NCCL unique id, */
    size_t nccl_id_len;                  /* or 0 bytes when it sent none. */
} wk_rdv_result;

/* The chief: serve Join on listen_addr ("host:port") for nranks ranks of a
 * job whose fingerprint/description are given; nccl_id (nccl_id_len <=
 * WK_RDV_NCCL_ID_MAX bytes, copied; NULL/0 for none) goes to every rank.
 * sec (NULL: none): the workers' token every Join must carry, and the
 * chief's TLS certificate and key (with a CA: clients must show theirs).
 * Returns CM_EBUSY if the
 * address cannot be bound. Release with wk_rdv_server_destroy (which fails
 * calls still waiting). */
int wk_rdv_server_start(const char *listen_addr, int nranks, uint64_t fingerprint,
                        const char *description, uint64_t job_id, int64_t start_step,
                        const uint8_t *nccl_id, size_t nccl_id_len,
                        const struct cm_security *sec, wk_rdv_server **out, char *err,
                        size_t errlen);
void wk_rdv_server_destroy(wk_rdv_server *s);

/* Allow rings of at least min_ranks ranks (1..nranks; nranks, the default,
 * means only whole rings) once a survivor has waited wait_ms for the
 * missing ones. */
void wk_rdv_server_set_elastic(wk_rdv_server *s, int min_ranks, int64_t wait_ms);

/* The chief, when training ended at 'step': Joins waiting or still to
 * come are answered OUT_OF_RANGE "the run ended" (wk_rdv_join returns
 * CM_ESHUTDOWN), so a replacement that came too late stops at once. */
void wk_rdv_server_end(wk_rdv_server *s, int64_t step);

/* 1 when a rank waits to join the next ring (e.g. a restarted rank, while
 * a smaller ring trains): the chief tells the ring to form again. */
int wk_rdv_server_waiting(wk_rdv_server *s);

/* "k of n workers joined; missing ranks ..." into buf; returns k. */
int wk_rdv_server_describe(wk_rdv_server *s, char *buf, size_t len);

/* Any rank: join at chief_addr (retried until it is up) and wait, at most
 * timeout_ms in all, until every rank has joined; with sec's token and TLS
 * (NULL: none). */
int wk_rdv_join(const char *chief_addr, int rank, int nranks, uint64_t fingerprint,
                const char *description, const char *ring_addr, int64_t timeout_ms,
                const struct cm_security *sec, wk_rdv_result *out, char *err,
                size_t errlen);

/* What a joining rank holds (wk_rdv_join_state). */
typedef struct wk_rdv_state {
    int has_state; /* Parameters and optimizer slots... */
    int64_t step;  /* ...for this step. */
    int rejoin;    /* A survivor of an earlier ring of this run. */
} wk_rdv_state;

/* wk_rdv_join with what this rank holds (wk_rdv_join: none). */
int wk_rdv_join_state(const char *chief_addr, int rank, int nranks, uint64_t fingerprint,
                      const char *description, const char *ring_addr,
                      const wk_rdv_state *st, int64_t timeout_ms,
                      const struct cm_security *sec, wk_rdv_result *out, char *err,
                      size_t errlen);
void wk_rdv_result_free(wk_rdv_result *r);

#endif /* WK_RENDEZVOUS_H */
