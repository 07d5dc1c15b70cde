/*
 * The layout of one XLogRecord's bytes (headers, block references, images, data, main data),
 * as PostgreSQL 15's DecodeXLogRecord (src/backend/access/transam/xlogreader.c) reads it;
 * the record format is src/include/access/xlogrecord.h. Shared by the C decoder
 * (pg15/_walscan.c, which turns it into pg15.records NamedTuples) and the fused C ingest
 * (pageserver/ingest/_walingest.c, which makes no Python object for the records it takes),
 * so both accept exactly the same records. Anything it does not accept goes to the Python
 * decoder (pg15/records.py, the reference), which raises the typed error if the record is bad.
 */
#ifndef PG_NEON_WALRECORD_H
#define PG_NEON_WALRECORD_H

#include <stdint.h>

#define WR_RECORD_HEADER 24 /* SizeOfXLogRecord */
#define WR_BLCKSZ 8192
#define XLR_MAX_BLOCK_ID 32
#define XLR_BLOCK_ID_DATA_SHORT 255
#define XLR_BLOCK_ID_DATA_LONG 254
#define XLR_BLOCK_ID_ORIGIN 253
#define XLR_BLOCK_ID_TOPLEVEL_XID 252
#define BKPBLOCK_FORK_MASK 0x0F
#define BKPBLOCK_HAS_IMAGE 0x10
#define BKPBLOCK_HAS_DATA 0x20
#define BKPBLOCK_SAME_REL 0x80
#define BKPIMAGE_HAS_HOLE 0x01
#define BKPIMAGE_COMPRESSED (0x04 | 0x08 | 0x10) /* PGLZ | LZ4 | ZSTD */

typedef struct {
    int block_id, fork_flags;
    uint32_t data_len;
    int has_image;
    uint32_t bimg_len, hole_offset, hole_length, bimg_info;
    uint32_t spc, db, rel, blkno;
    uint64_t image_off, data_off; /* where the image and the data are in the record */
} BlockHead;

typedef struct {
    BlockHead heads[XLR_MAX_BLOCK_ID + 1];
    int nheads;
    int has_origin, has_toplevel;
    uint32_t origin, toplevel;
    uint64_t main_off, main_len;
} RecordLayout;

static inline uint32_t
wr_le16(const uint8_t *p)
{
    return (uint32_t)p[0] | ((uint32_t)p[1] << 8);
}

static inline uint32_t
wr_le32(const uint8_t *p)
{
    return (uint32_t)p[0] | ((uint32_t)p[1] << 8) | ((uint32_t)p[2] << 16) | ((uint32_t)p[3] << 24);
}

/* The image-header cross-checks of xlogreader (and of the Python decoder). */
static inline int
wr_image_ok(uint32_t bimg_len, uint32_t hole_offset, uint32_t hole_length, uint32_t bimg_info)
{
    int has_hole = bimg_info & BKPIMAGE_HAS_HOLE, compressed = bimg_info & BKPIMAGE_COMPRESSED;
    if (has_hole && (hole_offset == 0 || hole_length == 0 || bimg_len == WR_BLCKSZ))
        return 0;
    if (!has_hole && (hole_offset != 0 || hole_length != 0))
        return 0;
    if (compressed && bimg_len == WR_BLCKSZ)
        return 0;
    if (!has_hole && !compressed && bimg_len != WR_BLCKSZ)
        return 0;
    if (hole_offset + hole_length > WR_BLCKSZ)
        return 0;
    return 1;
}

/*
 * The layout of the record `data[:n]` (its XLogRecord header included; xl_tot_len must be
 * n): 1, or 0 for anything the Python decoder must look at (it raises where the record is
 * bad). Block ids ascend, BKPBLOCK_HAS_DATA agrees with the data length, SAME_REL follows a
 * relation, the image headers pass xlogreader's checks and the headers' lengths add up to
 * exactly the record's payload.
 */
static inline int
wr_record_layout(const uint8_t *data, int64_t n, RecordLayout *out)
{
    if (n < WR_RECORD_HEADER || wr_le32(data) != (uint64_t)n)
        return 0;
    int64_t pos = WR_RECORD_HEADER;
    uint64_t payload = 0;
    int have_rel = 0, max_block_id = -1;
    uint32_t last_spc = 0, last_db = 0, last_rel = 0;
    out->nheads = 0;
    out->has_origin = out->has_toplevel = 0;
    out->main_len = 0;

    while ((uint64_t)(n - pos) > payload) {
        int block_id = data[pos];
        if (block_id <= XLR_MAX_BLOCK_ID) {
            if (block_id <= max_block_id || n - pos < 4)
                return 0;
            max_block_id = block_id;
            BlockHead *h = &out->heads[out->nheads++];
            h->block_id = block_id;
            h->fork_flags = data[pos + 1];
            h->data_len = wr_le16(data + pos + 2);
            if ((h->fork_flags & BKPBLOCK_HAS_DATA) ? h->data_len == 0 : h->data_len != 0)
                return 0;
            pos += 4;
            payload += h->data_len;
            h->has_image = (h->fork_flags & BKPBLOCK_HAS_IMAGE) != 0;
            h->bimg_len = h->hole_offset = h->hole_length = h->bimg_info = 0;
            if (h->has_image) {
                if (n - pos < 5)
                    return 0;
                h->bimg_len = wr_le16(data + pos);
                h->hole_offset = wr_le16(data + pos + 2);
                h->bimg_info = data[pos + 4];
                pos += 5;
                if (h->bimg_info & BKPIMAGE_COMPRESSED) {
                    if (h->bimg_info & BKPIMAGE_HAS_HOLE) {
                        if (n - pos < 2)
                            return 0;
                        h->hole_length = wr_le16(data + pos);
                        pos += 2;
                    }
                    else
                        h->hole_length = 0;
                }
                else if (h->bimg_len <= WR_BLCKSZ)
                    h->hole_length = WR_BLCKSZ - h->bimg_len;
                else
                    return 0; /* Python would compute a negative hole and reject it */
                if (!wr_image_ok(h->bimg_len, h->hole_offset, h->hole_length, h->bimg_info))
                    return 0;
                payload += h->bimg_len;
            }
            if (h->fork_flags & BKPBLOCK_SAME_REL) {
                if (!have_rel || n - pos < 4)
                    return 0;
                h->blkno = wr_le32(data + pos);
                pos += 4;
            }
            else {
                if (n - pos < 16)
                    return 0;
                last_spc = wr_le32(data + pos);
                last_db = wr_le32(data + pos + 4);
                last_rel = wr_le32(data + pos + 8);
                h->blkno = wr_le32(data + pos + 12);
                have_rel = 1;
                pos += 16;
            }
            h->spc = last_spc;
            h->db = last_db;
            h->rel = last_rel;
            continue;
        }
        if (block_id == XLR_BLOCK_ID_DATA_SHORT) {
            if (n - pos < 2)
                return 0;
            out->main_len = data[pos + 1];
            pos += 2;
            payload += out->main_len;
            break;
        }
        if (block_id == XLR_BLOCK_ID_DATA_LONG) {
            if (n - pos < 5)
                return 0;
            out->main_len = wr_le32(data + pos + 1);
            pos += 5;
            payload += out->main_len;
            break;
        }
        if (block_id == XLR_BLOCK_ID_ORIGIN) {
            if (n - pos < 3)
                return 0;
            out->origin = wr_le16(data + pos + 1);
            out->has_origin = 1;
            pos += 3;
            continue;
        }
        if (block_id == XLR_BLOCK_ID_TOPLEVEL_XID) {
            if (n - pos < 5)
                return 0;
            out->toplevel = wr_le32(data + pos + 1);
            out->has_toplevel = 1;
            pos += 5;
            continue;
        }
        return 0;
    }
    if (pos > n || (uint64_t)(n - pos) != payload)
        return 0;
    /* the payload: each block's image then its data, in block order, then the main data */
    uint64_t at = (uint64_t)pos;
    for (int i = 0; i < out->nheads; i++) {
        BlockHead *h = &out->heads[i];
        h->image_off = at;
        at += h->bimg_len;
        h->data_off = at;
        at += h->data_len;
    }
    out->main_off = at;
    return 1;
}

#endif
