/* wk_ring_int.h - wk_ring's wire format, shared by wk_ring.c and its tests
 * (which play a misbehaving peer with raw bytes).
 * SPDX-License-Identifier: MIT
 *
 * All integers little-endian (the project targets little-endian hosts, as
 * the float payloads do).
 *
 * Hello, 24 bytes, sent by both ends of a new connection (connector first):
 *   u32 magic "WRH1" | u32 version | u64 job_id | u32 nranks | u32 rank
 * Version 3 (1 before the chunk rule of 6 Dec 2026): TCP only. Version 4
 * (2 before it): after both hellos of both connections,
 * each link negotiates its transport on its connection: the sender offers
 *   u32 magic "WRS1" | u32 want (0/1) | u64 host (boot id and /dev/shm) |
 *   u64 cookie | u64 slot bytes | u32 slots | u32 0 | char name[32]
 * (a POSIX shared-memory object it created, WK_RING__SHM_* layout), and the
 * receiver answers
 *   u32 magic "WRA1" | u32 use (0/1)
 * having mapped the object and found the cookie in it (use = 1), or not.
 * On use the sender unlinks the name (both have it mapped) and chunks go
 * through the slots, the header as below then the payload at offset 64;
 * else they go over the connection as in version 3.
 *
 * Chunk header, 40 bytes, before every chunk's payload:
 *   u32 magic "WRC1" | u16 op | u16 ring step k | i64 step |
 *   u64 count (floats in the whole buffer) | u64 offset (first float) |
 *   u32 length (payload bytes) | u32 arg (allreduce: average 0/1;
 *   broadcast: the root)
 */
#ifndef WK_RING_INT_H
#define WK_RING_INT_H
#include <stddef.h>
#include <stdint.h>

#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "wk_ring's wire format assumes a little-endian host"
#endif

#define WK_RING__HELLO_MAGIC 0x31485257u /* "WRH1" */
#define WK_RING__CHUNK_MAGIC 0x31435257u /* "WRC1" */
/* 3 and 4 are 1 and 2 with the chunk rule of 6 Dec 2026 (ring segments
 * between half a chunk and two go in half chunks, wk_ring_chunk_bytes): a
 * rank of an older build is refused at the handshake instead of failing
 * the first collective of 2-3 MiB with a wrong chunk length. */
#define WK_RING__VERSION 3u
#define WK_RING__VERSION_NEGOTIATE 4u
#define WK_RING__HELLO_BYTES 24
#define WK_RING__HDR_BYTES 40
#define WK_RING__OFFER_MAGIC 0x31535257u /* "WRS1" */
#define WK_RING__ANSWER_MAGIC 0x31415257u /* "WRA1" */
#define WK_RING__OFFER_BYTES 72
#define WK_RING__ANSWER_BYTES 8
#define WK_RING__SHM_NAME 32
#define WK_RING__SLOT_PAYLOAD 64 /* Offset of a slot's payload. */

enum { WK_RING__OP_ALLREDUCE = 1, WK_RING__OP_BROADCAST = 2 };

typedef struct wk_ring__hello {
    uint32_t magic, version;
    uint64_t job_id;
    uint32_t nranks, rank;
} wk_ring__hello;

typedef struct wk_ring__hdr {
    uint32_t magic;
    uint16_t op, k;
    int64_t step;
    uint64_t count, offset;
    uint32_t len, arg;
} wk_ring__hdr;

void wk_ring__hello_pack(const wk_ring__hello *h, unsigned char out[WK_RING__HELLO_BYTES]);
void wk_ring__hello_unpack(const unsigned char in[WK_RING__HELLO_BYTES], wk_ring__hello *h);
/* The shared-memory offer (version 2's negotiation); name is NUL-terminated
 * (unpack terminates it whatever came). */
typedef struct wk_ring__offer {
    uint32_t magic, want;
    uint64_t host, cookie, slot_bytes;
    uint32_t nslots;
    char name[WK_RING__SHM_NAME];
} wk_ring__offer;

void wk_ring__offer_pack(const wk_ring__offer *o, unsigned char out[WK_RING__OFFER_BYTES]);
void wk_ring__offer_unpack(const unsigned char in[WK_RING__OFFER_BYTES], wk_ring__offer *o);
void wk_ring__hdr_pack(const wk_ring__hdr *h, unsigned char out[WK_RING__HDR_BYTES]);
void wk_ring__hdr_unpack(const unsigned char in[WK_RING__HDR_BYTES], wk_ring__hdr *h);

#endif /* WK_RING_INT_H */
