/* st_store.h - durable, versioned checkpoints of one PS shard on LevelDB.
 * SPDX-License-Identifier: MIT
 *
 * One store is one LevelDB directory holding one shard's checkpoints. A
 * checkpoint ("generation") is the shard's partitions and optimizer slots at
 * one version, plus an opaque extra record, and it counts only once its
 * commit record is durable. Several generations may be kept so that all
 * shards can agree on a common version after a crash (st_newest_common).
 *
 * Conventions (as leveldb/c.h states its own):
 *  - Fallible functions return CM_OK or a negative CM_E* from
 *    common/cm_status.h and take (char *err, size_t errlen) last: on failure
 *    a one-line message goes there (err may be NULL). They do not log the
 *    errors they return.
 *  - Objects come back through an out-parameter that is NULL on failure.
 *    st_store_close(NULL) is a no-op.
 *  - Pointer arguments are borrowed; bytes travel as (const void *, size_t).
 *    Returned memory names its release function.
 *  - Versions are >= 0; a negative version is CM_EINVAL.
 *  - A store may be called from several threads: calls are serialised by a
 *    lock inside it. Only one store per directory may be open in a process,
 *    and LevelDB's lock keeps other processes out (CM_EIO).
 *
 * Layout on disk (all integers big-endian, so keys sort by version):
 *   "m" "identity"                  who the directory belongs to
 *   'g' ver64 part32 kind32 chunk32 one chunk (<= 1 MiB) of one blob
 *   'c' ver64                       the commit record of a generation
 *   'r' name                        a named record (st_store_put_record)
 * The commit record lists every blob with its length and a 64-bit hash
 * (XXH64) of its bytes, holds the extra record, and ends with a hash of
 * itself. Blob chunks are written first, in synced WriteBatches of about
 * 1 MiB, then the commit record with a synced write: a crash at any point
 * leaves either the complete new generation or none of it, and never
 * touches older ones.
 */
#ifndef ST_STORE_H
#define ST_STORE_H
#include <stddef.h>
#include <stdint.h>

#include "common/cm_status.h"

typedef struct st_store st_store;

/* Blob kinds: 0 holds a partition's parameters; k >= 1 its optimizer slot
 * k (e.g. Adam's m and v as 1 and 2). */
enum { ST_KIND_PARAMS = 0 };

/* The largest extra record a checkpoint may carry. */
#define ST_EXTRA_MAX (1u << 20)

/* Tuning and test seams. A NULL st_options, or a zero field, means the
 * default. */
typedef struct st_options {
    size_t write_buffer_size; /* LevelDB memtable (default 64 MiB). */
    size_t max_file_size;     /* LevelDB table files (default 64 MiB). */
    size_t batch_bytes;       /* Synced WriteBatch target (default 1 MiB). */
    /* Tests only: called by st_store_checkpoint after every blob batch is
     * durable and just before the commit record is written, to inject a
     * crash there (e.g. raise(SIGKILL) in a child process). */
    void (*before_commit)(void *ud);
    void *hook_ud;
} st_options;

/* Who a directory belongs to. The fingerprint covers the model and the
 * cluster shape (cm_placement.fingerprint does); the description is for
 * people, e.g. "mlp 784,256,128,10 on 2 PS (min partition 262144 B)". */
typedef struct st_identity {
    uint64_t fingerprint;
    const char *description;
    int shard;
} st_identity;

/* One blob of a checkpoint: partition 'part', kind 'kind' (ST_KIND_PARAMS
 * or an optimizer slot), and its bytes. */
typedef struct st_blob {
    uint32_t part;
    uint32_t kind;
    const void *data;
    size_t len;
} st_blob;

/* Open the store in 'dir'. A missing or empty directory (empty but for
 * LevelDB's LOCK, LOG and LOG.old, which hold no data) becomes a new store
 * (LevelDB creates the last path component only), which records 'id'. A
 * directory with other files is opened only as the LevelDB database they
 * must be: without a CURRENT file, or one that LevelDB refuses (e.g. a
 * CURRENT naming a lost MANIFEST, or missing table files), it is
 * CM_ECORRUPT with a message naming what is missing and the remedy
 * (st_store_repair, `psserver --repair DIR`), and nothing is created over
 * it. Without CURRENT its files are left exactly as they were; LevelDB
 * itself rotates LOG to LOG.old and may create LOCK when it gets to
 * refuse. An existing store must have been created with the same
 * fingerprint and shard, else CM_EINVAL with a message naming what the
 * directory holds and what was asked for. CM_EIO for other LevelDB errors
 * (e.g. the directory is in use by another process), CM_ECORRUPT for a
 * database that is not a store. On success *out owns the store; release
 * with st_store_close(). */
int st_store_open(const st_options *o, const char *dir, const st_identity *id, st_store **out,
                  char *err, size_t errlen);
void st_store_close(st_store *s);

/* A named record of the store's own, outside the generations (e.g. the
 * model a PS shard serves): written with a synced put, replacing any
 * earlier one, its bytes checked by a hash when read. Names up to 64
 * bytes. get: *data is a copy to free() (CM_ENOTFOUND if there is no such
 * record, CM_ECORRUPT if its hash fails). */
int st_store_put_record(st_store *s, const char *name, const void *data, size_t len, char *err,
                        size_t errlen);
int st_store_get_record(st_store *s, const char *name, void **data, size_t *len, char *err,
                        size_t errlen);

/* Write generation 'version': every blob, then the commit record, durably
 * (both synced). Blobs may come in any order but each (part, kind) at most
 * once (else CM_EINVAL); 'extra' (up to ST_EXTRA_MAX bytes, may be NULL
 * when extra_len is 0) is stored as is and returned by st_store_load.
 * If 'version' is already committed that generation is replaced: its commit
 * record is removed first, so a crash part-way leaves it uncommitted, never
 * mixed. Older generations are never touched. CM_EIO on write errors; the
 * new generation is then not committed. */
int st_store_checkpoint(st_store *s, int64_t version, const st_blob *blobs, int nblobs,
                        const void *extra, size_t extra_len, char *err, size_t errlen);

/* The committed versions, newest first: up to 'max' are written to
 * 'versions' (which may be NULL when max is 0). Returns how many there are
 * in all (which may exceed max), or a negative CM_E*. A commit record that
 * fails its own checksum or lists a (part, kind) twice is not counted, nor
 * is a generation this store has found damaged (st_store_damaged), so that
 * a shard never offers a version it cannot load. */
int st_store_committed(st_store *s, int64_t *versions, int max, char *err, size_t errlen);

/* The newest committed version in *version, or CM_ENOTFOUND if none. It
 * reads the commit records only: its blobs may still turn out damaged when
 * loaded (see st_store_newest_intact). */
int st_store_latest(st_store *s, int64_t *version, char *err, size_t errlen);

/* Called once per blob by st_store_load, in (part, kind) order. 'data' is
 * 64-byte aligned and valid only during the call. Return CM_OK to go on,
 * or a negative CM_E* to stop the load, which then returns that code. */
typedef int (*st_blob_fn)(void *ud, uint32_t part, uint32_t kind, const void *data, size_t len);

/* Read committed generation 'version': call 'fn' for every blob, and if
 * 'extra' is not NULL set *extra to a copy of the extra record (release
 * with free(); NULL when it is empty) and *extra_len to its length.
 * Every blob is checked against its hash before 'fn' sees it.
 * Returns CM_ENOTFOUND if 'version' is not committed; CM_ECORRUPT if its
 * commit record fails its checksum or lists a (part, kind) twice, or a
 * blob has a chunk missing, of the wrong length or one too many, or fails
 * its hash (the generation is then remembered as damaged, see
 * st_store_damaged); CM_ENOMEM, CM_EIO. On error 'fn' may already have
 * run for earlier blobs: the caller must discard what it received, and
 * *extra is NULL. */
int st_store_load(st_store *s, int64_t version, st_blob_fn fn, void *ud, void **extra,
                  size_t *extra_len, char *err, size_t errlen);

/* Check committed generation 'version' as st_store_load would, without
 * handing its blobs to anyone: every blob is read and hashed (about as
 * long as a load; no buffer of a blob's size is needed). CM_OK if it is
 * intact; CM_ECORRUPT with a message naming the version and the blob
 * (which is then remembered as damaged); CM_ENOTFOUND if it is not
 * committed; CM_EIO. */
int st_store_verify(st_store *s, int64_t version, char *err, size_t errlen);

/* The fallback on start: the newest committed generation whose commit
 * record and every blob verify (st_store_verify), in *version. The newer
 * ones that fail are skipped: each is logged once as a warning (its version
 * and why), remembered as damaged (st_store_damaged; st_store_committed
 * and st_store_latest then leave it out) and left on disk, never deleted
 * here. Returns CM_ENOTFOUND if nothing is committed, CM_ECORRUPT if there
 * are committed generations but none is intact (the message names the
 * newest and why), CM_EIO. Costs a read of every generation it tries, so
 * a restore that loads *version afterwards reads that one twice. */
int st_store_newest_intact(st_store *s, int64_t *version, char *err, size_t errlen);

/* A generation found damaged by st_store_verify, st_store_newest_intact or
 * st_store_load since the store was opened (it is not recorded on disk). */
typedef struct st_damage {
    int64_t version;
    char why[384]; /* The error message of the check that failed. */
} st_damage;

/* The generations found damaged, newest first: up to 'max' are written to
 * 'out' (which may be NULL when max is 0). Returns how many there are.
 * A damaged generation stops being listed once it is replaced
 * (st_store_checkpoint) or dropped. */
int st_store_damaged(st_store *s, st_damage *out, int max);

/* Garbage collection, once every shard has committed 'keep_from' or newer:
 * delete the generations (committed or not) older than 'keep_from', and the
 * uncommitted leftovers of crashed checkpoints below the newest committed
 * version. Refuses (CM_EINVAL, nothing deleted) if 'keep_from' is newer than
 * the newest committed version not known to be damaged, which would leave
 * no intact generation; with no such generation it does nothing. A
 * damaged generation is deleted only for being older than 'keep_from'.
 * Commit records are removed first (synced), so a crash part-way leaves only
 * uncommitted leftovers that the next call removes. */
int st_store_drop_older(st_store *s, int64_t keep_from, char *err, size_t errlen);

/* Rollback: delete every generation (committed or not) newer than
 * 'version', so that a generation from an abandoned history can never be
 * mistaken for one of the new history. Commit records go first (synced). */
int st_store_drop_newer(st_store *s, int64_t version, char *err, size_t errlen);

/* Rebuild the LevelDB database in 'dir' from whatever of its files can be
 * read (leveldb_repair_db): for a directory st_store_open refuses, e.g. one
 * whose CURRENT file was lost. LevelDB keeps every record of the readable
 * table and log files (a deleted key stays deleted, unless the file with
 * its deletion is the unreadable one), writes a new MANIFEST and CURRENT,
 * and moves what it cannot read (and the old MANIFESTs) to 'dir'/lost; its
 * LOG file says what it did. Every generation whose records survive comes
 * back committed; one that lost records is then refused when loaded
 * (CM_ECORRUPT) and skipped by st_store_newest_intact. The directory's
 * lock is taken first (LevelDB's repair takes none): a store open in
 * another process is CM_EIO, untouched; one open in this process is not
 * detected and must not be. Returns the number of committed generations
 * the repaired store holds (>= 0); CM_ENOTFOUND if 'dir' is missing or
 * holds no LevelDB file (a data directory rather than one of its shard
 * directories, say); CM_ECORRUPT if the repaired database has no identity
 * record, so st_store_open would still refuse it; CM_EIO. */
int st_store_repair(const char *dir, char *err, size_t errlen);

/* The rollback rule. versions[i] lists shard i's committed versions
 * (counts[i] of them, in any order, e.g. from st_store_committed). Returns
 * the newest version that every shard has committed, or -1 if there is
 * none (or nshards < 1). Pure; no I/O. */
int64_t st_newest_common(const int64_t *const *versions, const int *counts, int nshards);

#endif /* ST_STORE_H */
