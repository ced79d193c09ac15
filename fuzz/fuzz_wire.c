/* fuzz_wire.c - the tensor framing and the model spec (ps/ps_wire.c), the
 * decoders every PS request and every pull reply go through.
 * SPDX-License-Identifier: MIT
 *
 * Byte 0 (mod 3) picks what the rest is:
 *  0  a PushRequest (ps_wire_decode_rows, tensors field 3, rows field 4;
 *     then the ids of its rows and wants, ps_wire_ids);
 *  1  a PullReply (tensors field 2, rows field 3), as ps_client reads it;
 *  2  a ModelSpec (ps_wire_spec_model, then a placement on 1 to 4 PS and
 *     the identity).
 * Each message is also decoded cut into pieces (ps_wire_decode_pieces, as
 * the PS reads pushes and the client pull replies) and must decode to the
 * same. Round trips are checked: a decoded message written again with the
 * writer (ps_wire_put_message/put_tensor, zero-copy segments) decodes to
 * the same tensors and rows, and a spec written back from the model it
 * gave (ps_wire_spec_init) gives a model of the same fingerprint.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common/cm_status.h"
#include "fuzz/fz_util.h"
#include "ps/ps_wire.h"


FZ_INITIALIZE_LOGS_ONLY

static void fail(const char *what) {
    fprintf(stderr, "fuzz_wire: %s\n", what);
    abort();
}

static int releases;
static void release(void *ud) {
    (void)ud;
    releases++;
}

/* Write m again (its small fields, then its tensors and rows as zero-copy
 * segments into the input), flatten, decode, and compare. */
static void round_trip(const ProtobufCMessageDescriptor *d, uint32_t tf, uint32_t rf,
                       const ps_wire_msg *m) {
    ps_wire_writer w;
    ps_wire_writer_init(&w);
    releases = 0;
    ps_wire_put_message(&w, m->msg);
    for (int i = 0; i < m->ntensors; i++)
        ps_wire_put_tensor(&w, tf, m->tensors[i].meta, m->tensors[i].data, m->tensors[i].len,
                           release, NULL);
    for (int i = 0; i < m->nrows; i++)
        ps_wire_put_tensor(&w, rf, (const Psrpc__Tensor *)(const void *)m->rows[i].meta,
                           m->rows[i].data, m->rows[i].len, release, NULL);
    int nsegs;
    const rpc_seg *segs = ps_wire_segs(&w, &nsegs);
    size_t n = ps_wire_size(&w);
    uint8_t *flat = malloc(n ? n : 1), *p = flat;
    for (int i = 0; i < nsegs; i++) {
        if (segs[i].len) memcpy(p, segs[i].data, segs[i].len);
        p += segs[i].len;
    }
    ps_wire_writer_free(&w, 1);
    if (releases != m->ntensors + m->nrows) fail("a zero-copy segment not released once");
    ps_wire_msg m2;
    char err[256];
    if (ps_wire_decode_rows(d, tf, rf, flat, n, &m2, err, sizeof err) != CM_OK)
        fail("what the writer wrote does not decode");
    if (m2.ntensors != m->ntensors || m2.nrows != m->nrows) fail("round trip: counts differ");
    for (int i = 0; i < m->ntensors; i++)
        if (m2.tensors[i].len != m->tensors[i].len ||
            m2.tensors[i].meta->part != m->tensors[i].meta->part ||
            (m->tensors[i].len &&
             memcmp(m2.tensors[i].data, m->tensors[i].data, m->tensors[i].len) != 0))
            fail("round trip: a tensor differs");
    for (int i = 0; i < m->nrows; i++)
        if (m2.rows[i].len != m->rows[i].len || m2.rows[i].meta->table != m->rows[i].meta->table ||
            m2.rows[i].meta->ids.len != m->rows[i].meta->ids.len ||
            (m->rows[i].len && memcmp(m2.rows[i].data, m->rows[i].data, m->rows[i].len) != 0))
            fail("round trip: rows differ");
    ps_wire_msg_free(&m2);
    free(flat);
}

static void ids_of(const Psrpc__Rows *r) {
    uint64_t *ids;
    size_t n;
    char err[256];
    if (ps_wire_ids(r, &ids, &n, err, sizeof err) == CM_OK) {
        if (n * 8 != r->ids.len) fail("ps_wire_ids: wrong count");
        for (size_t i = 0; i < n; i++)
            if (memcmp(&ids[i], r->ids.data + 8 * i, 8) != 0) fail("ps_wire_ids: wrong id");
        free(ids);
    } else if (!err[0]) {
        fail("ps_wire_ids: an error without a message");
    }
}

static void spec(const uint8_t *b, size_t n, int nshards) {
    Psrpc__ModelSpec *sp = psrpc__model_spec__unpack(NULL, n, b);
    if (!sp) return;
    cm_model *m = NULL, *m2 = NULL;
    size_t min_part = 0, min_part2 = 0;
    char err[512];
    if (ps_wire_spec_model(sp, &m, &min_part, err, sizeof err) == CM_OK) {
        char desc[256];
        ps_wire_describe(m, desc, sizeof desc);
        if (m->numel <= (1u << 16)) {
            cm_placement *pl = NULL;
            if (cm_placement_create(m, nshards, min_part, &pl) != CM_OK) fail("no placement");
            (void)ps_wire_identity(m, pl, desc, sizeof desc);
            cm_placement_destroy(pl);
        }
        /* The spec the PS keeps in its store, read back. */
        ps_wire_spec w;
        ps_wire_spec_init(&w, m, min_part);
        size_t len = protobuf_c_message_get_packed_size(&w.spec.base);
        uint8_t *buf = malloc(len ? len : 1);
        protobuf_c_message_pack(&w.spec.base, buf);
        ps_wire_spec_free(&w);
        Psrpc__ModelSpec *sp2 = psrpc__model_spec__unpack(NULL, len, buf);
        if (!sp2 || ps_wire_spec_model(sp2, &m2, &min_part2, err, sizeof err) != CM_OK ||
            min_part2 != min_part || cm_model_fingerprint(m2) != cm_model_fingerprint(m))
            fail("a model spec does not survive ps_wire_spec_init");
        psrpc__model_spec__free_unpacked(sp2, NULL);
        free(buf);
    } else if (m || !err[0]) {
        fail("ps_wire_spec_model: an error without a message, or a model");
    }
    cm_model_destroy(m);
    cm_model_destroy(m2);
    psrpc__model_spec__free_unpacked(sp, NULL);
}

/* The same bytes cut into pieces (each its own heap block of exactly its
 * size, so ASan sees a read across a piece's end; sizes of 1 to 'most'
 * bytes drawn from the bytes themselves) must decode as the flat buffer
 * did: the same outcome and error, the same fields, tensors and rows. */
static void pieces_match(const ProtobufCMessageDescriptor *d, uint32_t tf, uint32_t rf,
                         const uint8_t *b, size_t n, int flat_rc, const ps_wire_msg *flat,
                         const char *flat_err, size_t most) {
    rpc_piece *pc = malloc((n ? n : 1) * sizeof *pc);
    int np = 0;
    uint64_t x = 0x2545f4914f6cdd1dull ^ n;
    for (size_t at = 0; at < n;) {
        x ^= x << 13, x ^= x >> 7, x ^= x << 17;
        size_t k = 1 + (size_t)(x % most);
        if (k > n - at) k = n - at;
        uint8_t *p = malloc(k);
        memcpy(p, b + at, k);
        pc[np++] = (rpc_piece){p, k};
        at += k;
    }
    ps_wire_msg m;
    char err[256] = "";
    int rc = ps_wire_decode_pieces(d, tf, rf, pc, np, 0, &m, err, sizeof err);
    if ((rc == CM_OK) != (flat_rc == CM_OK)) fail("pieces: a different outcome than flat");
    if (rc != CM_OK && strcmp(err, flat_err) != 0) fail("pieces: a different error than flat");
    if (rc == CM_OK) {
        if (m.ntensors != flat->ntensors || m.nrows != flat->nrows)
            fail("pieces: counts differ");
        size_t a = protobuf_c_message_get_packed_size(m.msg),
               c = protobuf_c_message_get_packed_size(flat->msg);
        uint8_t *pa = malloc(a + 1), *pb = malloc(c + 1);
        protobuf_c_message_pack(m.msg, pa);
        protobuf_c_message_pack(flat->msg, pb);
        if (a != c || memcmp(pa, pb, a) != 0) fail("pieces: the small fields differ");
        free(pa);
        free(pb);
        for (int i = 0; i < m.ntensors; i++) {
            const ps_wire_tensor *t = &m.tensors[i], *f = &flat->tensors[i];
            size_t sum = 0;
            for (int k = 0; k < t->npieces; k++) sum += t->pieces[k].len;
            if (t->len != f->len || sum != t->len || t->meta->part != f->meta->part ||
                (t->npieces == 1) != (t->data != NULL))
                fail("pieces: a tensor's size or pieces are wrong");
            uint8_t *got = malloc(t->len + 1);
            ps_wire_tensor_copy(got, t);
            if (t->len && memcmp(got, f->data, t->len) != 0) fail("pieces: a tensor differs");
            free(got);
        }
        for (int i = 0; i < m.nrows; i++)
            if (m.rows[i].len != flat->rows[i].len ||
                (m.rows[i].len && memcmp(m.rows[i].data, flat->rows[i].data, m.rows[i].len)))
                fail("pieces: rows differ");
        ps_wire_msg_free(&m);
    }
    /* The element budget refuses (CM_ENOMEM) exactly what the flat check
     * does, before decoding. */
    uint64_t max = 1 + (x % 64);
    char e1[256], e2[256];
    int want = ps_wire_check_elems(d, b, n, max, e1, sizeof e1) == CM_ENOMEM;
    rc = ps_wire_decode_pieces(d, tf, rf, pc, np, max, &m, e2, sizeof e2);
    if ((rc == CM_ENOMEM) != want) fail("pieces: the element budget differs from the flat check");
    if (rc == CM_OK) ps_wire_msg_free(&m);
    for (int i = 0; i < np; i++) free((void *)pc[i].p);
    free(pc);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    if (size < 1) return 0;
    int mode = data[0] % 3;
    /* The message alone in a buffer of its own size (ASan sees over-reads). */
    size_t n = size - 1;
    uint8_t *b = malloc(n ? n : 1);
    if (n) memcpy(b, data + 1, n);
    char err[256];
    ps_wire_msg m;
    if (mode == 0) {
        int rc = ps_wire_decode_rows(&psrpc__push_request__descriptor, 3, 4, b, n, &m, err,
                                     sizeof err);
        pieces_match(&psrpc__push_request__descriptor, 3, 4, b, n, rc, &m, err, 1 + data[0] / 3);
        if (rc == CM_OK) {
            const Psrpc__PushRequest *r = (const Psrpc__PushRequest *)m.msg;
            for (int i = 0; i < m.nrows; i++) ids_of(m.rows[i].meta);
            for (size_t i = 0; i < r->n_want; i++) ids_of(r->want[i]);
            round_trip(&psrpc__push_request__descriptor, 3, 4, &m);
            ps_wire_msg_free(&m);
        }
    } else if (mode == 1) {
        int rc = ps_wire_decode_rows(&psrpc__pull_reply__descriptor, 2, 3, b, n, &m, err,
                                     sizeof err);
        pieces_match(&psrpc__pull_reply__descriptor, 2, 3, b, n, rc, &m, err, 1 + data[0] / 3);
        if (rc == CM_OK) {
            round_trip(&psrpc__pull_reply__descriptor, 2, 3, &m);
            ps_wire_msg_free(&m);
        }
    } else {
        spec(b, n, 1 + data[0] / 3 % FZ_MAX_SHARDS);
    }
    free(b);
    return 0;
}
