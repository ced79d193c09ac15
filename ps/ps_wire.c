/* ps_wire.c - protobuf framing of tensor messages without copying the data.
 * SPDX-License-Identifier: MIT
 */
#include "ps/ps_wire.h"

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common/cm_mem.h"
#include "common/cm_simd.h"
#include "common/cm_status.h"

enum { WT_VARINT = 0, WT_I64 = 1, WT_LEN = 2, WT_I32 = 5 };
#define DATA_FIELD 15 /* Tensor.data */

static size_t put_varint(uint8_t *p, uint64_t v) {
    size_t n = 0;
    while (v >= 0x80) {
        p[n++] = (uint8_t)(v | 0x80);
        v >>= 7;
    }
    p[n++] = (uint8_t)v;
    return n;
}

/* ------------------------------------------------------------ writing */

void ps_wire_writer_init(ps_wire_writer *w) { memset(w, 0, sizeof *w); }

/* Room for n more bytes of small fields. Also allocates when n is 0 and
 * nothing is there yet: an empty message (a PullReply of version 0) must
 * not compute NULL + 0, which is undefined (clang's UBSan reports it). */
static uint8_t *small_reserve(ps_wire_writer *w, size_t n) {
    if (!w->small || w->small_len + n > w->small_cap) {
        size_t cap = w->small_cap ? w->small_cap : 256;
        while (cap < w->small_len + n) cap *= 2;
        uint8_t *s = realloc(w->small, cap);
        if (!s) abort();
        w->small = s;
        w->small_cap = cap;
    }
    return w->small + w->small_len;
}

static void add_seg(ps_wire_writer *w, size_t small_off, const void *data, size_t len,
                    void (*release)(void *), void *ud) {
    /* Merge consecutive small pieces into one segment. */
    if (small_off != SIZE_MAX && w->nsegs > 0 && w->small_off[w->nsegs - 1] != SIZE_MAX &&
        w->small_off[w->nsegs - 1] + w->segs[w->nsegs - 1].len == small_off) {
        w->segs[w->nsegs - 1].len += len;
        return;
    }
    if (w->nsegs == w->cap) {
        w->cap = w->cap ? 2 * w->cap : 8;
        w->segs = realloc(w->segs, (size_t)w->cap * sizeof *w->segs);
        w->small_off = realloc(w->small_off, (size_t)w->cap * sizeof *w->small_off);
        if (!w->segs || !w->small_off) abort();
    }
    w->segs[w->nsegs] = (rpc_seg){.data = data, .len = len, .release = release, .ud = ud};
    w->small_off[w->nsegs] = small_off;
    w->nsegs++;
}

void ps_wire_put_message(ps_wire_writer *w, const ProtobufCMessage *m) {
    size_t n = protobuf_c_message_get_packed_size(m);
    uint8_t *p = small_reserve(w, n);
    protobuf_c_message_pack(m, p);
    size_t off = w->small_len;
    w->small_len += n;
    add_seg(w, off, NULL, n, NULL, NULL);
}

void ps_wire_put_tensor(ps_wire_writer *w, uint32_t field, const Psrpc__Tensor *meta,
                        const void *data, size_t len, void (*release)(void *), void *ud) {
    size_t meta_len = protobuf_c_message_get_packed_size(&meta->base);
    uint8_t hdr[12];
    size_t hdr_len = put_varint(hdr, (DATA_FIELD << 3) | WT_LEN);
    hdr_len += put_varint(hdr + hdr_len, len);
    uint64_t inner = meta_len + hdr_len + len;
    uint8_t *p = small_reserve(w, 24 + meta_len + hdr_len);
    size_t n = put_varint(p, ((uint64_t)field << 3) | WT_LEN);
    n += put_varint(p + n, inner);
    protobuf_c_message_pack(&meta->base, p + n);
    n += meta_len;
    memcpy(p + n, hdr, hdr_len);
    n += hdr_len;
    size_t off = w->small_len;
    w->small_len += n;
    add_seg(w, off, NULL, n, NULL, NULL);
    if (len > 0)
        add_seg(w, SIZE_MAX, data, len, release, ud);
    else if (release)
        release(ud);
}

void ps_wire_part_meta(const cm_model *m, const cm_placement *pl, uint32_t part,
                       uint64_t shape[CM_VAR_MAX_DIMS], Psrpc__Tensor *t) {
    const cm_partition *p = &pl->parts[part];
    const cm_var *v = &m->vars[p->var];
    shape[0] = p->row_end - p->row_begin;
    for (int d = 1; d < v->ndims; d++) shape[d] = (uint64_t)v->dims[d];
    *t = (Psrpc__Tensor)PSRPC__TENSOR__INIT;
    t->part = part;
    t->dtype = PSRPC__DTYPE__DTYPE_FLOAT32;
    t->n_shape = (size_t)v->ndims;
    t->shape = shape;
}

/* Partition 'part' as a Tensor of 'dtype', 'vsize' bytes a value. */
static void put_part_as(ps_wire_writer *w, uint32_t field, const cm_model *m,
                        const cm_placement *pl, uint32_t part, Psrpc__DType dtype,
                        const void *data, size_t vsize, void (*release)(void *), void *ud) {
    uint64_t shape[CM_VAR_MAX_DIMS];
    Psrpc__Tensor t;
    ps_wire_part_meta(m, pl, part, shape, &t);
    t.dtype = dtype;
    ps_wire_put_tensor(w, field, &t, data, pl->parts[part].count * vsize, release, ud);
}

void ps_wire_put_part(ps_wire_writer *w, uint32_t field, const cm_model *m,
                      const cm_placement *pl, uint32_t part, const float *data,
                      void (*release)(void *), void *ud) {
    put_part_as(w, field, m, pl, part, PSRPC__DTYPE__DTYPE_FLOAT32, data, sizeof(float), release,
                ud);
}

void ps_wire_put_part_bf16(ps_wire_writer *w, uint32_t field, const cm_model *m,
                           const cm_placement *pl, uint32_t part, const uint16_t *data,
                           void (*release)(void *), void *ud) {
    put_part_as(w, field, m, pl, part, PSRPC__DTYPE__DTYPE_BFLOAT16, data, sizeof(uint16_t),
                release, ud);
}

void ps_wire_put_rows(ps_wire_writer *w, uint32_t field, uint32_t table, const uint64_t *ids,
                      size_t n, Psrpc__DType dtype, const void *data, size_t len,
                      void (*release)(void *), void *ud) {
    /* Rows and Tensor both carry their values as field 15, last: the same
     * framing, another message inside. */
    Psrpc__Rows r = PSRPC__ROWS__INIT;
    r.table = table;
    r.ids.data = (uint8_t *)ids;
    r.ids.len = n * sizeof *ids;
    r.dtype = dtype;
    ps_wire_put_tensor(w, field, (const Psrpc__Tensor *)(const void *)&r, data, len, release, ud);
}

const rpc_seg *ps_wire_segs(ps_wire_writer *w, int *nsegs) {
    for (int i = 0; i < w->nsegs; i++)
        if (w->small_off[i] != SIZE_MAX) w->segs[i].data = w->small + w->small_off[i];
    *nsegs = w->nsegs;
    return w->segs;
}

size_t ps_wire_size(const ps_wire_writer *w) {
    size_t n = 0;
    for (int i = 0; i < w->nsegs; i++) n += w->segs[i].len;
    return n;
}

void ps_wire_writer_free(ps_wire_writer *w, int run_releases) {
    if (run_releases)
        for (int i = 0; i < w->nsegs; i++)
            if (w->segs[i].release) w->segs[i].release(w->segs[i].ud);
    free(w->segs);
    free(w->small_off);
    free(w->small);
    memset(w, 0, sizeof *w);
}

/* ------------------------------------------------------------ reading */

typedef struct buf {
    uint8_t *p;
    size_t len, cap;
} buf;

static void buf_append(buf *b, const uint8_t *src, size_t n) {
    if (b->len + n > b->cap) {
        size_t cap = b->cap ? b->cap : 256;
        while (cap < b->len + n) cap *= 2;
        uint8_t *q = realloc(b->p, cap);
        if (!q) abort();
        b->p = q;
        b->cap = cap;
    }
    memcpy(b->p + b->len, src, n);
    b->len += n;
}

void ps_wire_msg_free(ps_wire_msg *m) {
    if (!m) return;
    if (m->msg) protobuf_c_message_free_unpacked(m->msg, NULL);
    for (int i = 0; i < m->ntensors; i++)
        if (m->tensors[i].meta) psrpc__tensor__free_unpacked(m->tensors[i].meta, NULL);
    for (int i = 0; i < m->nrows; i++) {
        if (m->rows[i].meta) psrpc__rows__free_unpacked(m->rows[i].meta, NULL);
        free(m->rows[i].own);
    }
    free(m->tensors);
    free(m->rows);
    free(m->pieces);
    memset(m, 0, sizeof *m);
}

void ps_wire_tensor_copy(void *dst, const ps_wire_tensor *t) {
    uint8_t *d = dst;
    for (int i = 0; i < t->npieces; i++) {
        memcpy(d, t->pieces[i].p, t->pieces[i].len);
        d += t->pieces[i].len;
    }
}

/* A reader over pieces: piece i at offset off, absolute position pos, which
 * must not pass end (a field's or the message's). A copy of a reader is a
 * saved position. */
typedef struct rd {
    const rpc_piece *pc;
    int n, i;
    size_t off;
    uint64_t pos, end;
} rd;

static void rd_settle(rd *r) {
    while (r->i < r->n && r->off == r->pc[r->i].len) {
        r->i++;
        r->off = 0;
    }
}

static int rd_varint(rd *r, uint64_t *v) {
    uint64_t x = 0;
    for (int shift = 0; shift < 64; shift += 7) {
        if (r->pos >= r->end) return -1;
        rd_settle(r);
        uint8_t b = r->pc[r->i].p[r->off++];
        r->pos++;
        x |= (uint64_t)(b & 0x7f) << shift;
        if (!(b & 0x80)) {
            *v = x;
            return 0;
        }
    }
    return -1;
}

/* Pieces of the data fields, grown as they are found. */
typedef struct piece_store {
    rpc_piece *p;
    size_t n, cap;
} piece_store;

/* Advance n bytes (-1 past end); with 'ps' append them as pieces, with
 * 'copy' append their bytes. */
static int rd_take(rd *r, uint64_t n, piece_store *ps, buf *copy) {
    if (n > r->end - r->pos) return -1;
    r->pos += n;
    while (n) {
        rd_settle(r);
        size_t k = r->pc[r->i].len - r->off;
        if (k > n) k = (size_t)n;
        const uint8_t *p = r->pc[r->i].p + r->off;
        if (ps) {
            if (ps->n == ps->cap) {
                ps->cap = ps->cap ? 2 * ps->cap : 16;
                ps->p = realloc(ps->p, ps->cap * sizeof *ps->p);
                if (!ps->p) abort();
            }
            ps->p[ps->n++] = (rpc_piece){p, k};
        }
        if (copy) buf_append(copy, p, k);
        r->off += k;
        n -= k;
    }
    return 0;
}

/* Read one field's key and skip its payload; for a length-delimited field
 * *payload is a reader of just the payload. 0, or -1 if malformed. */
static int rd_field(rd *r, uint64_t *key, rd *payload) {
    uint64_t v;
    if (rd_varint(r, key) || (*key >> 3) == 0) return -1;
    switch ((int)(*key & 7)) {
    case WT_VARINT: return rd_varint(r, &v);
    case WT_I64: return rd_take(r, 8, NULL, NULL);
    case WT_I32: return rd_take(r, 4, NULL, NULL);
    case WT_LEN:
        if (rd_varint(r, &v) || v > r->end - r->pos) return -1;
        *payload = *r;
        payload->end = r->pos + v;
        return rd_take(r, v, NULL, NULL);
    }
    return -1;
}

/* Split one embedded message (the reader r) into its data field (15: its
 * pieces appended to ps from *first on, *dlen bytes; the last one wins)
 * and the rest, which goes to 'meta'. Returns 0, or -1 if malformed. */
static int split_data(rd r, buf *meta, piece_store *ps, size_t *first, size_t *dlen) {
    meta->len = 0;
    *first = ps->n;
    *dlen = 0;
    while (r.pos < r.end) {
        rd fs = r, payload = {0};
        uint64_t key;
        if (rd_field(&r, &key, &payload)) return -1;
        if ((key >> 3) == DATA_FIELD && (key & 7) == WT_LEN) {
            ps->n = *first;
            *dlen = payload.end - payload.pos;
            rd_take(&payload, *dlen, ps, NULL);
        } else {
            rd_take(&fs, r.pos - fs.pos, NULL, meta);
        }
    }
    return 0;
}

int ps_wire_decode(const ProtobufCMessageDescriptor *desc, uint32_t tensor_field,
                   const uint8_t *in, size_t len, ps_wire_msg *out, char *err, size_t errlen) {
    return ps_wire_decode_rows(desc, tensor_field, 0, in, len, out, err, errlen);
}

int ps_wire_decode_rows(const ProtobufCMessageDescriptor *desc, uint32_t tensor_field,
                        uint32_t rows_field, const uint8_t *in, size_t len, ps_wire_msg *out,
                        char *err, size_t errlen) {
    rpc_piece one = {in, len};
    return ps_wire_decode_pieces(desc, tensor_field, rows_field, &one, len ? 1 : 0, 0, out,
                                 err, errlen);
}

/* Bytes an element of packed type t takes when fixed, else 0 (varints). */
static int fixed_width(ProtobufCType t) {
    switch (t) {
    case PROTOBUF_C_TYPE_SFIXED32:
    case PROTOBUF_C_TYPE_FIXED32:
    case PROTOBUF_C_TYPE_FLOAT: return 4;
    case PROTOBUF_C_TYPE_SFIXED64:
    case PROTOBUF_C_TYPE_FIXED64:
    case PROTOBUF_C_TYPE_DOUBLE: return 8;
    default: return 0;
    }
}

/* Elements of a packed repeated scalar field of type t: the payload r. */
static uint64_t rd_packed_count(ProtobufCType t, rd r) {
    if (fixed_width(t)) return (r.end - r.pos) / (uint64_t)fixed_width(t);
    uint64_t n = 0; /* Varints: one per byte without the continuation bit. */
    while (r.pos < r.end) {
        rd_settle(&r);
        size_t k = r.pc[r.i].len - r.off;
        if (k > r.end - r.pos) k = (size_t)(r.end - r.pos);
        const uint8_t *p = r.pc[r.i].p + r.off;
        for (size_t j = 0; j < k; j++) n += !(p[j] & 0x80);
        r.off += k;
        r.pos += k;
    }
    return n;
}

/* The element budget (ps_wire_check_elems, and ps_wire_decode_pieces before
 * it decodes anything): every field occurrence and every packed element,
 * into embedded messages (0 within max, 1 beyond, -1 malformed). */
static int rd_count_elems(const ProtobufCMessageDescriptor *d, rd r, int depth, uint64_t max,
                          uint64_t *count) {
    if (depth > 8) return -1; /* Our messages nest 3 deep. */
    while (r.pos < r.end) {
        uint64_t key;
        rd payload = {0};
        if (rd_field(&r, &key, &payload) || (key >> 3) > UINT32_MAX) return -1;
        /* Every occurrence may cost an allocation (a repeated element, an
         * unknown field kept, a string replaced). */
        if (++*count > max) return 1;
        const ProtobufCFieldDescriptor *f =
            protobuf_c_message_descriptor_get_field(d, (unsigned)(key >> 3));
        if (!f || (key & 7) != WT_LEN) continue;
        if (f->type == PROTOBUF_C_TYPE_MESSAGE) {
            int rc = rd_count_elems(f->descriptor, payload, depth + 1, max, count);
            if (rc) return rc;
        } else if (f->label == PROTOBUF_C_LABEL_REPEATED && f->type != PROTOBUF_C_TYPE_STRING &&
                   f->type != PROTOBUF_C_TYPE_BYTES) {
            *count += rd_packed_count(f->type, payload);
            if (*count > max) return 1;
        }
    }
    return 0;
}

int ps_wire_decode_pieces(const ProtobufCMessageDescriptor *desc, uint32_t tensor_field,
                          uint32_t rows_field, const rpc_piece *in, int nin, uint64_t max_elems,
                          ps_wire_msg *out, char *err, size_t errlen) {
    memset(out, 0, sizeof *out);
    buf rest = {0}, meta = {0};
    piece_store ps = {0};
    size_t *first = NULL; /* Per tensor: its first piece in ps. */
    int cap = 0, rcap = 0, rc = CM_EINVAL;
    uint64_t total = 0, count = 0;
    for (int i = 0; i < nin; i++) total += in[i].len;
    rd r = {.pc = in, .n = nin, .end = total};
    const char *why = NULL;
    /* The budget first, as ps_wire_check_elems: nothing is allocated for a
     * message refused for its size. */
    if (max_elems && rd_count_elems(desc, r, 0, max_elems, &count) > 0) goto over;
    while (r.pos < r.end) {
        rd start = r, payload = {0};
        uint64_t key;
        if (rd_varint(&r, &key)) {
            why = "bad field key";
            goto fail;
        }
        r = start;
        if (rd_field(&r, &key, &payload)) {
            why = "truncated or malformed field";
            goto fail;
        }
        int wt = (int)(key & 7);
        uint64_t num = key >> 3;
        if (rows_field && num == rows_field) {
            if (wt != WT_LEN) {
                why = "rows field with the wrong wire type";
                goto fail;
            }
            if (out->nrows == rcap) {
                rcap = rcap ? 2 * rcap : 8;
                out->rows = realloc(out->rows, (size_t)rcap * sizeof *out->rows);
                if (!out->rows) abort();
            }
            ps_wire_rows *w = &out->rows[out->nrows++];
            memset(w, 0, sizeof *w);
            size_t at, n0 = ps.n;
            if (split_data(payload, &meta, &ps, &at, &w->len)) {
                why = "malformed rows";
                goto fail;
            }
            static const uint8_t no_values[1];
            if (ps.n - at == 0) { /* Ids only: an empty range, not NULL. */
                w->data = no_values;
            } else if (ps.n - at == 1) {
                w->data = ps.p[at].p;
            } else { /* Rows are read in place: gather them. */
                w->own = cm_malloc(w->len);
                size_t off = 0;
                for (size_t k = at; k < ps.n; k++) {
                    memcpy(w->own + off, ps.p[k].p, ps.p[k].len);
                    off += ps.p[k].len;
                }
                w->data = w->own;
            }
            ps.n = n0;
            w->meta = psrpc__rows__unpack(NULL, meta.len, meta.p ? meta.p : (const uint8_t *)"");
            if (!w->meta) {
                why = "rows fields do not parse";
                goto fail;
            }
            continue;
        }
        if (num != tensor_field) { /* The whole field, key included, into 'rest'. */
            rd_take(&start, r.pos - start.pos, NULL, &rest);
            continue;
        }
        if (wt != WT_LEN) {
            why = "tensor field with the wrong wire type";
            goto fail;
        }
        if (out->ntensors == cap) {
            cap = cap ? 2 * cap : 8;
            out->tensors = realloc(out->tensors, (size_t)cap * sizeof *out->tensors);
            first = realloc(first, (size_t)cap * sizeof *first);
            if (!out->tensors || !first) abort();
        }
        ps_wire_tensor *t = &out->tensors[out->ntensors++];
        memset(t, 0, sizeof *t);
        size_t at;
        if (split_data(payload, &meta, &ps, &at, &t->len)) {
            why = "malformed tensor";
            goto fail;
        }
        first[out->ntensors - 1] = at;
        t->npieces = (int)(ps.n - at);
        t->meta = psrpc__tensor__unpack(NULL, meta.len, meta.p ? meta.p : (const uint8_t *)"");
        if (!t->meta) {
            why = "tensor fields do not parse";
            goto fail;
        }
    }
    out->msg = protobuf_c_message_unpack(desc, NULL, rest.len,
                                         rest.p ? rest.p : (const uint8_t *)"");
    if (!out->msg) {
        why = "message fields do not parse";
        goto fail;
    }
    out->pieces = ps.p;
    ps.p = NULL;
    for (int i = 0; i < out->ntensors; i++) {
        ps_wire_tensor *t = &out->tensors[i];
        t->pieces = t->npieces ? out->pieces + first[i] : NULL;
        t->data = t->npieces == 1 ? t->pieces[0].p : NULL;
    }
    free(first);
    free(rest.p);
    free(meta.p);
    return CM_OK;
over:
    cm_seterr(err, errlen, "%s with more than %llu fields and elements: refused before decoding",
              desc->short_name, (unsigned long long)max_elems);
    rc = CM_ENOMEM;
    goto out;
fail:
    cm_seterr(err, errlen, "malformed %s: %s", desc->short_name, why);
out:
    free(first);
    free(ps.p);
    free(rest.p);
    free(meta.p);
    ps_wire_msg_free(out);
    return rc;
}

/* The elementwise kernels are static with AVX2 clones (common/cm_simd.h),
 * behind plain exported functions: clang 14 emits no ifunc for an exported
 * function with clones that its own file never calls. */
CM_SIMD_CLONES static void load_add_k(float *dst, const uint8_t *src, size_t n) {
    for (size_t i = 0; i < n; i++) {
        float v;
        memcpy(&v, src + 4 * i, sizeof v);
        dst[i] += v;
    }
}

void ps_wire_load_add(float *dst, const uint8_t *src, size_t n) {
    load_add_k(dst, src, n);
}

CM_SIMD_CLONES static void bf16_from_f32_k(uint16_t *restrict dst, const float *restrict src,
                                           size_t n) {
    for (size_t i = 0; i < n; i++) {
        uint32_t u;
        memcpy(&u, &src[i], sizeof u);
        /* Adding 0x7fff plus the lowest kept bit carries into the kept bits
         * exactly when the dropped half is above 0x8000, or equal to it and
         * the kept value is odd. No finite value or infinity overflows 32
         * bits; NaNs are taken apart instead (they could become inf). */
        uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
        uint32_t quiet_nan = (u >> 16) | 0x40u;
        dst[i] = (uint16_t)((u & 0x7fffffffu) > 0x7f800000u ? quiet_nan : rounded);
    }
}

void ps_wire_bf16_from_f32(uint16_t *restrict dst, const float *restrict src, size_t n) {
    bf16_from_f32_k(dst, src, n);
}

CM_SIMD_CLONES static void load_bf16_k(float *restrict dst, const uint8_t *restrict src, size_t n) {
    for (size_t i = 0; i < n; i++) {
        uint16_t h;
        memcpy(&h, src + 2 * i, sizeof h);
        uint32_t u = (uint32_t)h << 16;
        memcpy(&dst[i], &u, sizeof u);
    }
}

void ps_wire_load_bf16(float *restrict dst, const uint8_t *restrict src, size_t n) {
    load_bf16_k(dst, src, n);
}

CM_SIMD_CLONES static void load_add_bf16_k(float *restrict dst, const uint8_t *restrict src,
                                           size_t n) {
    for (size_t i = 0; i < n; i++) {
        uint16_t h;
        memcpy(&h, src + 2 * i, sizeof h);
        uint32_t u = (uint32_t)h << 16;
        float v;
        memcpy(&v, &u, sizeof v);
        dst[i] += v;
    }
}

void ps_wire_load_add_bf16(float *restrict dst, const uint8_t *restrict src, size_t n) {
    load_add_bf16_k(dst, src, n);
}

int ps_wire_ids(const Psrpc__Rows *r, uint64_t **ids, size_t *n, char *err, size_t errlen) {
    *ids = NULL;
    *n = 0;
    if (r->ids.len % sizeof(uint64_t)) {
        cm_seterr(err, errlen, "rows of table %u: %zu id bytes, not a multiple of 8", r->table,
                  r->ids.len);
        return CM_EINVAL;
    }
    *n = r->ids.len / sizeof(uint64_t);
    if (*n == 0) return CM_OK;
    /* Little-endian on the wire and (static check below) in memory. */
    *ids = cm_alloc_aligned(*n * sizeof **ids);
    if (!*ids) abort();
    memcpy(*ids, r->ids.data, r->ids.len);
    return CM_OK;
}
_Static_assert(__BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__, "the wire format is little-endian");

/* ------------------------------------------------------------ the model */

void ps_wire_spec_init(ps_wire_spec *sp, const cm_model *m, size_t min_part_bytes) {
    memset(sp, 0, sizeof *sp);
    int nv = m->nvars;
    sp->vars = cm_calloc((size_t)nv, sizeof *sp->vars);
    sp->ptrs = cm_calloc((size_t)nv, sizeof *sp->ptrs);
    sp->shapes = cm_calloc((size_t)nv * CM_VAR_MAX_DIMS, sizeof *sp->shapes);
    for (int i = 0; i < nv; i++) {
        const cm_var *v = &m->vars[i];
        Psrpc__Variable *x = &sp->vars[i];
        psrpc__variable__init(x);
        x->name = (char *)v->name;
        x->kind = v->kind == CM_VAR_TABLE ? PSRPC__VAR_KIND__VAR_TABLE
                                          : PSRPC__VAR_KIND__VAR_DENSE;
        if (v->kind == CM_VAR_TABLE) {
            x->dim = (uint32_t)v->dim;
        } else {
            uint64_t *shape = sp->shapes + (size_t)i * CM_VAR_MAX_DIMS;
            for (int d = 0; d < v->ndims; d++) shape[d] = (uint64_t)v->dims[d];
            x->n_shape = (size_t)v->ndims;
            x->shape = shape;
        }
        x->init = (uint32_t)v->init;
        x->init_scale = v->init_scale;
        x->fan_in = (uint64_t)v->fan_in;
        x->fan_out = (uint64_t)v->fan_out;
        sp->ptrs[i] = x;
    }
    psrpc__model_spec__init(&sp->spec);
    sp->spec.kind = (char *)m->kind;
    ps_wire_describe(m, sp->desc, sizeof sp->desc);
    sp->spec.description = sp->desc;
    sp->spec.n_vars = (size_t)nv;
    sp->spec.vars = sp->ptrs;
    sp->spec.min_part_bytes = min_part_bytes;
    for (int i = 0; i < m->nsizes && i < CM_MLP_MAX_SIZES; i++) sp->sizes[i] = (uint32_t)m->sizes[i];
    sp->spec.n_sizes = (size_t)(m->nsizes < CM_MLP_MAX_SIZES ? m->nsizes : CM_MLP_MAX_SIZES);
    sp->spec.sizes = sp->sizes;
}

void ps_wire_spec_free(ps_wire_spec *sp) {
    free(sp->vars);
    free(sp->ptrs);
    free(sp->shapes);
    memset(sp, 0, sizeof *sp);
}

int ps_wire_spec_model(const Psrpc__ModelSpec *spec, cm_model **out, size_t *min_part_bytes,
                       char *err, size_t errlen) {
    *out = NULL;
    if (!spec || spec->n_vars < 1 || spec->n_vars > (1u << 16)) {
        cm_seterr(err, errlen, "the model has %zu variables (1 to 65536)",
                  spec ? spec->n_vars : (size_t)0);
        return CM_EINVAL;
    }
    if (spec->min_part_bytes < 4 || spec->min_part_bytes > ((uint64_t)1 << 40)) {
        cm_seterr(err, errlen, "minimum partition of %llu bytes is out of range",
                  (unsigned long long)spec->min_part_bytes);
        return CM_EINVAL;
    }
    cm_var *vars = cm_calloc(spec->n_vars, sizeof *vars);
    int rc = CM_OK;
    for (size_t i = 0; i < spec->n_vars && rc == CM_OK; i++) {
        const Psrpc__Variable *x = spec->vars[i];
        cm_var *v = &vars[i];
        if (!x->name || strlen(x->name) >= sizeof v->name) {
            cm_seterr(err, errlen, "variable %zu: name missing or longer than %zu bytes", i,
                      sizeof v->name - 1);
            rc = CM_EINVAL;
            break;
        }
        snprintf(v->name, sizeof v->name, "%s", x->name);
        v->init = (int)(x->init > 100 ? 100 : x->init);
        v->init_scale = x->init_scale;
        v->fan_in = x->fan_in > (1ULL << 40) ? -1 : (int64_t)x->fan_in;
        v->fan_out = x->fan_out > (1ULL << 40) ? -1 : (int64_t)x->fan_out;
        if (x->kind == PSRPC__VAR_KIND__VAR_TABLE) {
            v->kind = CM_VAR_TABLE;
            v->dim = x->dim > 65536 ? -1 : (int)x->dim;
        } else if (x->kind == PSRPC__VAR_KIND__VAR_DENSE) {
            if (x->n_shape > CM_VAR_MAX_DIMS) {
                cm_seterr(err, errlen, "variable %s: %zu dimensions (at most %d)", v->name,
                          x->n_shape, CM_VAR_MAX_DIMS);
                rc = CM_EINVAL;
                break;
            }
            v->ndims = (int)x->n_shape;
            for (int d = 0; d < v->ndims; d++)
                v->dims[d] = x->shape[d] > (1ULL << 40) ? -1 : (int64_t)x->shape[d];
        } else {
            v->kind = -1;
        }
    }
    if (rc == CM_OK)
        rc = cm_model_create_from_vars(spec->kind ? spec->kind : "", vars, (int)spec->n_vars,
                                       out, err, errlen);
    free(vars);
    if (rc == CM_OK) {
        *min_part_bytes = (size_t)spec->min_part_bytes;
        /* For descriptions only (the fingerprint covers the variables). */
        cm_model *m = *out;
        for (size_t i = 0; i < spec->n_sizes && i < CM_MLP_MAX_SIZES; i++)
            m->sizes[m->nsizes++] = spec->sizes[i] > (1u << 24) ? 0 : (int)spec->sizes[i];
    }
    return rc;
}

void ps_wire_describe(const cm_model *m, char *desc, size_t len) {
    int n = snprintf(desc, len, "%s ", m->kind);
    if (m->ntables > 0 && n > 0 && (size_t)n < len)
        n += snprintf(desc + n, len - (size_t)n, "%d tables of %d, %zu dense%s", m->ntables,
                      cm_model_max_dim(m), m->numel, m->nsizes ? " " : "");
    if (!strcmp(m->kind, "vector"))
        n += snprintf(desc + n, len - (size_t)n, "%zu", m->numel);
    else if (!m->nsizes && !m->ntables && n > 0 && (size_t)n < len) /* A user's own model. */
        n += snprintf(desc + n, len - (size_t)n, "%d variables, %zu floats", m->nvars, m->numel);
    else
        for (int i = 0; i < m->nsizes && n > 0 && (size_t)n < len; i++)
            n += snprintf(desc + n, len - (size_t)n, "%s%d", i ? "," : "", m->sizes[i]);
}

uint64_t ps_wire_identity(const cm_model *m, const cm_placement *pl, char *desc, size_t len) {
    ps_wire_describe(m, desc, len);
    int n = (int)strlen(desc);
    if ((size_t)n < len)
        snprintf(desc + n, len - (size_t)n, " on %d PS (min partition %zu B)", pl->nshards,
                 pl->min_part_bytes);
    return pl->fingerprint;
}

/* ------------------------------------------------------------ element budget */

int ps_wire_check_elems(const ProtobufCMessageDescriptor *desc, const uint8_t *in, size_t len,
                        uint64_t max, char *err, size_t errlen) {
    uint64_t count = 0;
    rpc_piece one = {in, len};
    rd r = {.pc = &one, .n = len ? 1 : 0, .end = len};
    int rc = rd_count_elems(desc, r, 0, max, &count);
    if (rc < 0) {
        cm_seterr(err, errlen, "malformed %s", desc->short_name);
        return CM_EINVAL;
    }
    if (rc > 0) {
        cm_seterr(err, errlen, "%s with more than %llu fields and elements: refused before "
                  "decoding", desc->short_name, (unsigned long long)max);
        return CM_ENOMEM;
    }
    return CM_OK;
}
