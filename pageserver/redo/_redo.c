/*
 * Optional C fast path of native redo (pageserver/redo/__init__.py redo_block) for the hot
 * records: full-page images without compression, and the page-level redo of
 *
 *   Heap   INSERT, UPDATE, HOT_UPDATE, DELETE, LOCK, INPLACE, CONFIRM
 *   Heap2  PRUNE, VACUUM, FREEZE_PAGE, VISIBLE (the heap page), MULTI_INSERT, LOCK_UPDATED
 *   Btree  INSERT_LEAF/UPPER/META/POST, SPLIT_L/SPLIT_R, DEDUP, VACUUM, DELETE
 *
 * following PostgreSQL 15's heap_xlog_* (src/backend/access/heap/heapam.c),
 * heap_page_prune_execute (pruneheap.c), btree_xlog_* (nbtree/nbtxlog.c), _bt_swap_posting
 * (nbtdedup.c) and the page primitives of src/backend/storage/page/bufpage.c, one to one with
 * the Python modules heap.py, heap2.py, btree.py and page.py, which stay the reference.
 *
 * try_redo_block(record, block_id, page) takes the DecodedRecord itself (a tuple: fields
 * are read by position, see RECORD_FIELDS) and returns the new page as bytes, or None for
 * anything it does not handle: another rmgr or record type, a compressed image, and every case where
 * the Python code would raise (short data, a corrupt page, an item that does not fit). The
 * page is redone in a fresh bytes object, so a None leaves nothing changed and the Python
 * redo then runs (and raises its error) on the untouched page. The dispatch rules of
 * XLogReadBufferForRedoExtended (image, will-init, BLK_NOTFOUND, BLK_DONE, pd_lsn stamping)
 * are applied here too, as in the Python redo_block, so a handled block costs one call.
 * redo_block(record, block_id, page) is the whole thing: try_redo_block, else the Python
 * redo_block registered with init() (pageserver/redo/__init__.py binds it as redo_block).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>
#include <sys/mman.h>

#include "crc32c.h"    /* pg15/crc32c.h: CRC-32C, shared with pg15/_walscan.c */
#include "walrecord.h" /* pg15/walrecord.h: the record layout, shared with pg15/_walscan.c */

#define BLCKSZ 8192
#define SIZE_OF_PAGE_HEADER 24
#define ITEM_ID_SIZE 4
#define PAGESIZE_VERSION (BLCKSZ | 4)
#define MAXALIGN(n) (((size_t)(n) + 7) & ~(size_t)7)
#define MAX_LINE_POINTERS ((BLCKSZ - SIZE_OF_PAGE_HEADER) / ITEM_ID_SIZE)
#define MAX_HEAP_TUPLES_PER_PAGE ((BLCKSZ - SIZE_OF_PAGE_HEADER) / (24 + ITEM_ID_SIZE))

/* page header offsets */
#define OFF_FLAGS 10
#define OFF_LOWER 12
#define OFF_UPPER 14
#define OFF_SPECIAL 16
#define OFF_PAGESIZE_VERSION 18
#define OFF_PRUNE_XID 20

#define PD_HAS_FREE_LINES 0x0001
#define PD_ALL_VISIBLE 0x0004

#define LP_UNUSED 0
#define LP_NORMAL 1
#define LP_REDIRECT 2
#define LP_DEAD 3

#define RM_HEAP2_ID 9
#define RM_HEAP_ID 10
#define RM_BTREE_ID 11
#define RM_GIST_ID 14

#define BKPBLOCK_WILL_INIT 0x40
#define BKPIMAGE_APPLY 0x02

/* heap opcodes (info & XLOG_HEAP_OPMASK) */
#define XLOG_HEAP_OPMASK 0x70
#define XLOG_HEAP_INIT_PAGE 0x80
#define XLOG_HEAP_INSERT 0x00
#define XLOG_HEAP_DELETE 0x10
#define XLOG_HEAP_UPDATE 0x20
#define XLOG_HEAP_HOT_UPDATE 0x40
#define XLOG_HEAP_CONFIRM 0x50
#define XLOG_HEAP_LOCK 0x60
#define XLOG_HEAP_INPLACE 0x70
#define XLOG_HEAP2_PRUNE 0x10
#define XLOG_HEAP2_VACUUM 0x20
#define XLOG_HEAP2_FREEZE_PAGE 0x30
#define XLOG_HEAP2_VISIBLE 0x40
#define XLOG_HEAP2_MULTI_INSERT 0x50
#define XLOG_HEAP2_LOCK_UPDATED 0x60

/* HeapTupleHeaderData */
#define T_XMIN 0
#define T_XMAX 4
#define T_CID 8
#define T_CTID 12
#define T_INFOMASK2 18
#define T_INFOMASK 20
#define T_HOFF 22
#define SIZEOF_HEAP_TUPLE_HEADER 23
#define XL_HEAP_HEADER_SIZE 5

#define HEAP_XMAX_KEYSHR_LOCK 0x0010
#define HEAP_COMBOCID 0x0020
#define HEAP_XMAX_EXCL_LOCK 0x0040
#define HEAP_XMAX_LOCK_ONLY 0x0080
#define HEAP_XMAX_IS_MULTI 0x1000
#define HEAP_LOCK_MASK 0x0050
#define HEAP_XMAX_BITS 0x1CD0
#define HEAP_MOVED 0xC000
#define HEAP_KEYS_UPDATED 0x2000
#define HEAP_HOT_UPDATED 0x4000

#define XLHL_XMAX_IS_MULTI 0x01
#define XLHL_XMAX_LOCK_ONLY 0x02
#define XLHL_XMAX_EXCL_LOCK 0x04
#define XLHL_XMAX_KEYSHR_LOCK 0x08
#define XLHL_KEYS_UPDATED 0x10

#define XLH_INSERT_ALL_VISIBLE_CLEARED 0x01
#define XLH_INSERT_ALL_FROZEN_SET 0x20
#define XLH_UPDATE_OLD_ALL_VISIBLE_CLEARED 0x01
#define XLH_UPDATE_NEW_ALL_VISIBLE_CLEARED 0x02
#define XLH_UPDATE_PREFIX_FROM_OLD 0x20
#define XLH_UPDATE_SUFFIX_FROM_OLD 0x40
#define XLH_DELETE_ALL_VISIBLE_CLEARED 0x01
#define XLH_DELETE_IS_SUPER 0x08
#define XLH_DELETE_IS_PARTITION_MOVE 0x10
#define XLH_FREEZE_XVAC 0x02
#define XLH_INVALID_XVAC 0x04
#define FROZEN_TRANSACTION_ID 2
#define MOVED_PARTITIONS_BLOCK 0xFFFFFFFFu
#define MOVED_PARTITIONS_OFFSET 0xFFFD

/* btree */
#define XLOG_BTREE_INSERT_LEAF 0x00
#define XLOG_BTREE_INSERT_UPPER 0x10
#define XLOG_BTREE_INSERT_META 0x20
#define XLOG_BTREE_SPLIT_L 0x30
#define XLOG_BTREE_SPLIT_R 0x40
#define XLOG_BTREE_INSERT_POST 0x50
#define XLOG_BTREE_DEDUP 0x60
#define XLOG_BTREE_DELETE 0x70
#define XLOG_BTREE_VACUUM 0xC0
#define BT_OPAQUE_SIZE 16
#define BTP_LEAF 0x001
#define BTP_META 0x008
#define BTP_HAS_GARBAGE 0x040
#define BTP_INCOMPLETE_SPLIT 0x080
#define BTREE_MAGIC 0x053162
#define BTREE_METAPAGE_END 72
#define INDEX_SIZE_MASK 0x1FFF
#define INDEX_ALT_TID_MASK 0x2000
#define BT_IS_POSTING 0x2000
#define BT_OFFSET_MASK 0x0FFF
#define TID_SIZE 6
#define INDEX_TUPLE_HEADER 8
#define P_HIKEY 1

/* Redo of one block: OK, or FALLBACK to the Python code (nothing has been returned yet). */
#define OK 0
#define FALLBACK (-1)

/* DecodedRecord, BlockRef and BlockImage field positions (checked by redo/native.py). */
enum { R_END_LSN = 1, R_XID = 3, R_INFO = 5, R_RMGR_ID = 6, R_BLOCKS = 7, R_MAIN_DATA = 8 };
enum { B_BLOCK_ID = 0, B_BLKNO = 3, B_FORK_FLAGS = 4, B_IMAGE = 5, B_DATA = 6 };
enum { I_DATA = 0, I_HOLE_OFFSET = 1, I_HOLE_LENGTH = 2, I_BIMG_INFO = 3 };

/* ---- little-endian access ------------------------------------------------------------ */

static inline uint16_t
g16(const uint8_t *p, size_t off)
{
    return (uint16_t)(p[off] | (p[off + 1] << 8));
}

static inline uint32_t
g32(const uint8_t *p, size_t off)
{
    p += off;
    return (uint32_t)p[0] | ((uint32_t)p[1] << 8) | ((uint32_t)p[2] << 16) | ((uint32_t)p[3] << 24);
}

static inline void
s16(uint8_t *p, size_t off, unsigned v)
{
    p[off] = (uint8_t)v;
    p[off + 1] = (uint8_t)(v >> 8);
}

static inline void
s32(uint8_t *p, size_t off, uint32_t v)
{
    p += off;
    p[0] = (uint8_t)v;
    p[1] = (uint8_t)(v >> 8);
    p[2] = (uint8_t)(v >> 16);
    p[3] = (uint8_t)(v >> 24);
}

#define LOWER(p) g16(p, OFF_LOWER)
#define UPPER(p) g16(p, OFF_UPPER)
#define SPECIAL(p) g16(p, OFF_SPECIAL)
#define PFLAGS(p) g16(p, OFF_FLAGS)
#define LP_AT(i) (SIZE_OF_PAGE_HEADER + ((size_t)(i)-1) * ITEM_ID_SIZE)
#define LP_OFF(raw) ((raw)&0x7FFF)
#define LP_FLAGS(raw) (((raw) >> 15) & 3)
#define LP_LEN(raw) ((raw) >> 17)
#define LP_RAW(off, flags, len) ((uint32_t)(off) | ((uint32_t)(flags) << 15) | ((uint32_t)(len) << 17))

static inline uint32_t
lp(const uint8_t *p, unsigned offnum)
{
    return g32(p, LP_AT(offnum));
}

static inline unsigned
max_offset(const uint8_t *p)
{
    unsigned lower = LOWER(p);
    return lower <= SIZE_OF_PAGE_HEADER ? 0 : (lower - SIZE_OF_PAGE_HEADER) / ITEM_ID_SIZE;
}

static void
set_lsn(uint8_t *p, uint64_t lsn)
{
    s32(p, 0, (uint32_t)(lsn >> 32));
    s32(p, 4, (uint32_t)lsn);
}

static uint64_t
get_lsn(const uint8_t *p)
{
    return ((uint64_t)g32(p, 0) << 32) | g32(p, 4);
}

/* ---- bufpage.c ----------------------------------------------------------------------- */

/* PageInit */
static void
page_init(uint8_t *p, size_t special_size)
{
    unsigned special = BLCKSZ - (unsigned)MAXALIGN(special_size);
    memset(p, 0, BLCKSZ);
    s16(p, OFF_LOWER, SIZE_OF_PAGE_HEADER);
    s16(p, OFF_UPPER, special);
    s16(p, OFF_SPECIAL, special);
    s16(p, OFF_PAGESIZE_VERSION, PAGESIZE_VERSION);
}

/* The sanity checks bufpage.c makes before changing a page (page.py _check_pointers). */
static int
check_pointers(const uint8_t *p, int aligned_special, unsigned *lower, unsigned *upper,
               unsigned *special)
{
    *lower = LOWER(p);
    *upper = UPPER(p);
    *special = SPECIAL(p);
    if (*lower < SIZE_OF_PAGE_HEADER || *lower > *upper || *upper > *special ||
        *special > BLCKSZ || (aligned_special && *special != MAXALIGN(*special)))
        return FALLBACK;
    return OK;
}

/* PageAddItemExtended: the offset number used, or 0 (InvalidOffsetNumber) on failure. The
 * MAXALIGN padding after the item is not written. */
static unsigned
page_add_item(uint8_t *p, const uint8_t *item, size_t size, unsigned offnum, int overwrite,
              int is_heap)
{
    unsigned lower, upper, special;
    if (check_pointers(p, 0, &lower, &upper, &special) != OK)
        return 0;
    unsigned limit = (lower - SIZE_OF_PAGE_HEADER) / ITEM_ID_SIZE + 1;
    int needshuffle = 0;
    if (offnum != 0) {
        if (offnum < limit) {
            if (overwrite) {
                uint32_t raw = lp(p, offnum);
                if (LP_FLAGS(raw) != LP_UNUSED || LP_LEN(raw) != 0)
                    return 0;
            } else
                needshuffle = 1;
        }
    } else {
        offnum = limit;
        if (PFLAGS(p) & PD_HAS_FREE_LINES) {
            unsigned cand;
            for (cand = 1; cand < limit; cand++) {
                uint32_t raw = lp(p, cand);
                if (LP_FLAGS(raw) == LP_UNUSED && LP_LEN(raw) == 0) {
                    offnum = cand;
                    break;
                }
            }
            if (cand == limit)
                s16(p, OFF_FLAGS, PFLAGS(p) & ~PD_HAS_FREE_LINES);
        }
    }
    if (offnum > limit)
        return 0;
    if (is_heap && offnum > MAX_HEAP_TUPLES_PER_PAGE)
        return 0;
    long new_lower = (offnum == limit || needshuffle) ? (long)lower + ITEM_ID_SIZE : (long)lower;
    long new_upper = (long)upper - (long)MAXALIGN(size);
    if (new_lower > new_upper)
        return 0;
    size_t pos = LP_AT(offnum);
    if (needshuffle)
        memmove(p + pos + ITEM_ID_SIZE, p + pos, lower - pos);
    s32(p, pos, LP_RAW(new_upper, LP_NORMAL, size));
    memcpy(p + new_upper, item, size);
    s16(p, OFF_LOWER, (unsigned)new_lower);
    s16(p, OFF_UPPER, (unsigned)new_upper);
    return offnum;
}

typedef struct {
    unsigned offnum;
    uint32_t raw;
    unsigned itemoff;
    unsigned alignedlen;
} ItemPos;

/* compactify_tuples: pack the items downward from pd_special, the first listed ending at
 * pd_special; each moves with its MAXALIGN padding, line pointers keep flags and lengths. */
static int
compactify(uint8_t *p, const ItemPos *items, unsigned n, unsigned special)
{
    uint8_t src[BLCKSZ];
    memcpy(src, p, BLCKSZ);
    unsigned upper = special;
    for (unsigned k = 0; k < n; k++) {
        if (items[k].itemoff + items[k].alignedlen > BLCKSZ || items[k].alignedlen > upper)
            return FALLBACK;
        upper -= items[k].alignedlen;
        memcpy(p + upper, src + items[k].itemoff, items[k].alignedlen);
        s32(p, LP_AT(items[k].offnum), (items[k].raw & ~(uint32_t)0x7FFF) | upper);
    }
    s16(p, OFF_UPPER, upper);
    return OK;
}

/* PageRepairFragmentation */
static int
page_repair_fragmentation(uint8_t *p)
{
    unsigned lower, upper, special;
    if (check_pointers(p, 1, &lower, &upper, &special) != OK)
        return FALLBACK;
    unsigned nline = (lower - SIZE_OF_PAGE_HEADER) / ITEM_ID_SIZE;
    ItemPos items[MAX_LINE_POINTERS];
    unsigned nitems = 0, totallen = 0, finalused = 0;
    int nunused = 0;
    for (unsigned i = 1; i <= nline; i++) {
        uint32_t raw = lp(p, i);
        if (LP_FLAGS(raw) != LP_UNUSED) {
            unsigned length = LP_LEN(raw);
            if (length) {
                unsigned off = LP_OFF(raw);
                if (off < upper || off >= special)
                    return FALLBACK;
                unsigned aligned = (unsigned)MAXALIGN(length);
                totallen += aligned;
                items[nitems++] = (ItemPos){i, raw, off, aligned};
            }
            finalused = i;
        } else {
            if (raw)
                s32(p, LP_AT(i), 0);
            nunused++;
        }
    }
    if (!nitems)
        s16(p, OFF_UPPER, special);
    else {
        if (totallen > special - lower)
            return FALLBACK;
        if (compactify(p, items, nitems, special) != OK)
            return FALLBACK;
    }
    if (finalused != nline) {
        nunused -= (int)(nline - finalused);
        s16(p, OFF_LOWER, lower - ITEM_ID_SIZE * (nline - finalused));
    }
    unsigned flags = PFLAGS(p);
    s16(p, OFF_FLAGS, nunused > 0 ? flags | PD_HAS_FREE_LINES : flags & ~PD_HAS_FREE_LINES);
    return OK;
}

/* PageTruncateLinePointerArray: drop trailing unused line pointers (never #1). */
static void
page_truncate_line_pointer_array(uint8_t *p)
{
    unsigned nline = max_offset(p);
    unsigned nunusedend = 0;
    int countdone = 0, sethint = 0;
    for (unsigned i = nline; i >= 1; i--) {
        int unused = LP_FLAGS(lp(p, i)) == LP_UNUSED;
        if (!countdone && i > 1) {
            if (unused)
                nunusedend++;
            else
                countdone = 1;
        } else if (unused) {
            sethint = 1;
            break;
        }
    }
    if (nunusedend > 0)
        s16(p, OFF_LOWER, LOWER(p) - ITEM_ID_SIZE * nunusedend);
    unsigned flags = PFLAGS(p);
    s16(p, OFF_FLAGS, sethint ? flags | PD_HAS_FREE_LINES : flags & ~PD_HAS_FREE_LINES);
}

/* Add `delta` to lp_off of the first `nline` line pointers whose item lies at or below
 * `limit` (with storage_only, only those with storage). */
static void
shift_offsets(uint8_t *p, unsigned nline, unsigned limit, unsigned delta, int storage_only)
{
    for (unsigned i = 1; i <= nline; i++) {
        uint32_t raw = lp(p, i);
        if (LP_OFF(raw) <= limit && (!storage_only || LP_LEN(raw)))
            s32(p, LP_AT(i), raw + delta);
    }
}

/* PageIndexTupleDelete: remove an index item and close both gaps. */
static int
page_index_tuple_delete(uint8_t *p, unsigned offnum)
{
    unsigned lower, upper, special;
    if (check_pointers(p, 1, &lower, &upper, &special) != OK)
        return FALLBACK;
    unsigned nline = (lower - SIZE_OF_PAGE_HEADER) / ITEM_ID_SIZE;
    if (offnum < 1 || offnum > nline)
        return FALLBACK;
    uint32_t raw = lp(p, offnum);
    unsigned offset = LP_OFF(raw), size = LP_LEN(raw);
    if (offset < upper || offset + size > special || offset != MAXALIGN(offset))
        return FALLBACK;
    size = (unsigned)MAXALIGN(size);
    size_t pos = SIZE_OF_PAGE_HEADER + (size_t)offnum * ITEM_ID_SIZE;
    if (lower > pos)
        memmove(p + pos - ITEM_ID_SIZE, p + pos, lower - pos);
    if (offset > upper)
        memmove(p + upper + size, p + upper, offset - upper);
    lower -= ITEM_ID_SIZE;
    s16(p, OFF_UPPER, upper + size);
    s16(p, OFF_LOWER, lower);
    if (lower > SIZE_OF_PAGE_HEADER)
        shift_offsets(p, nline - 1, offset, size, 0);
    return OK;
}

/* PageIndexMultiDelete: delete the ascending `offnums` and repack the rest (at most two
 * are deleted one by one, last first, as PostgreSQL does). */
static int
page_index_multi_delete(uint8_t *p, const uint8_t *offnums_le, unsigned nitems)
{
    if (nitems <= 2) {
        for (unsigned k = nitems; k-- > 0;)
            if (page_index_tuple_delete(p, g16(offnums_le, 2 * k)) != OK)
                return FALLBACK;
        return OK;
    }
    unsigned lower, upper, special;
    if (check_pointers(p, 1, &lower, &upper, &special) != OK)
        return FALLBACK;
    unsigned nline = (lower - SIZE_OF_PAGE_HEADER) / ITEM_ID_SIZE;
    ItemPos kept[MAX_LINE_POINTERS];
    uint32_t kept_raw[MAX_LINE_POINTERS];
    unsigned nused = 0, nextitm = 0, totallen = 0;
    for (unsigned i = 1; i <= nline; i++) {
        uint32_t raw = lp(p, i);
        unsigned off = LP_OFF(raw), size = LP_LEN(raw);
        if (off < upper || off + size > special || off != MAXALIGN(off))
            return FALLBACK;
        if (nextitm < nitems && i == g16(offnums_le, 2 * nextitm)) {
            nextitm++;
            continue;
        }
        unsigned aligned = (unsigned)MAXALIGN(size);
        totallen += aligned;
        kept_raw[nused] = raw;
        kept[nused] = (ItemPos){nused + 1, raw, off, aligned};
        nused++;
    }
    if (nextitm != nitems || totallen > special - lower)
        return FALLBACK;
    for (unsigned k = 0; k < nused; k++)
        s32(p, LP_AT(k + 1), kept_raw[k]);
    s16(p, OFF_LOWER, SIZE_OF_PAGE_HEADER + nused * ITEM_ID_SIZE);
    if (nused)
        return compactify(p, kept, nused, special);
    s16(p, OFF_UPPER, special);
    return OK;
}

/* ---- the record and its block references --------------------------------------------- */

#define MAX_BLOCKS (XLR_MAX_BLOCK_ID + 1)

/* One block reference, read from a BlockRef tuple (read_record) or from the record bytes
 * (decode_raw). spc/db/rel/fork are filled by decode_raw only (the chain redo matches on them). */
typedef struct {
    unsigned block_id;
    uint32_t spc, db, rel;
    unsigned fork;
    uint32_t blkno;
    unsigned fork_flags;
    int has_image;
    const uint8_t *img;
    Py_ssize_t img_len;
    unsigned long long hole_offset, hole_length, bimg_info;
    const uint8_t *data;
    Py_ssize_t len;
} Blk;

typedef struct {
    int rmgr;
    unsigned info;
    uint32_t xid;
    unsigned long long end_lsn;
    const uint8_t *main;
    Py_ssize_t main_len;
    int nblocks;
    Blk blocks[MAX_BLOCKS];
} Rec;

static int
as_uint(PyObject *o, unsigned long long *out)
{
    if (!PyLong_Check(o))
        return FALLBACK;
    *out = PyLong_AsUnsignedLongLong(o);
    if (*out == (unsigned long long)-1 && PyErr_Occurred()) {
        PyErr_Clear();
        return FALLBACK;
    }
    return OK;
}

/* A BlockImage tuple into b's image fields (FALLBACK on an unexpected shape). */
static int
read_image(PyObject *image, Blk *b)
{
    if (!PyTuple_Check(image) || PyTuple_GET_SIZE(image) <= I_BIMG_INFO)
        return FALLBACK;
    PyObject *data = PyTuple_GET_ITEM(image, I_DATA);
    if (!PyBytes_Check(data) || as_uint(PyTuple_GET_ITEM(image, I_HOLE_OFFSET), &b->hole_offset) ||
        as_uint(PyTuple_GET_ITEM(image, I_HOLE_LENGTH), &b->hole_length) ||
        as_uint(PyTuple_GET_ITEM(image, I_BIMG_INFO), &b->bimg_info))
        return FALLBACK;
    b->has_image = 1;
    b->img = (const uint8_t *)PyBytes_AS_STRING(data);
    b->img_len = PyBytes_GET_SIZE(data);
    return OK;
}

/* A DecodedRecord tuple into r, every block reference included (FALLBACK on an unexpected
 * shape: the Python redo then runs). */
static int
read_record(PyObject *record, Rec *r)
{
    unsigned long long v;
    if (!PyTuple_Check(record) || PyTuple_GET_SIZE(record) <= R_MAIN_DATA)
        return FALLBACK;
    if (as_uint(PyTuple_GET_ITEM(record, R_RMGR_ID), &v) != OK)
        return FALLBACK;
    r->rmgr = (int)v;
    if (as_uint(PyTuple_GET_ITEM(record, R_INFO), &v) != OK)
        return FALLBACK;
    r->info = (unsigned)v;
    if (as_uint(PyTuple_GET_ITEM(record, R_XID), &v) != OK)
        return FALLBACK;
    r->xid = (uint32_t)v;
    if (as_uint(PyTuple_GET_ITEM(record, R_END_LSN), &r->end_lsn) != OK)
        return FALLBACK;
    PyObject *blocks = PyTuple_GET_ITEM(record, R_BLOCKS);
    PyObject *main = PyTuple_GET_ITEM(record, R_MAIN_DATA);
    if (!PyTuple_Check(blocks) || !PyBytes_Check(main) || PyTuple_GET_SIZE(blocks) > MAX_BLOCKS)
        return FALLBACK;
    r->main = (const uint8_t *)PyBytes_AS_STRING(main);
    r->main_len = PyBytes_GET_SIZE(main);
    r->nblocks = (int)PyTuple_GET_SIZE(blocks);
    for (int i = 0; i < r->nblocks; i++) {
        PyObject *ref = PyTuple_GET_ITEM(blocks, i);
        Blk *b = &r->blocks[i];
        memset(b, 0, sizeof *b);
        if (!PyTuple_Check(ref) || PyTuple_GET_SIZE(ref) <= B_DATA)
            return FALLBACK;
        if (as_uint(PyTuple_GET_ITEM(ref, B_BLOCK_ID), &v) != OK)
            return FALLBACK;
        b->block_id = (unsigned)v;
        if (as_uint(PyTuple_GET_ITEM(ref, B_BLKNO), &v) != OK)
            return FALLBACK;
        b->blkno = (uint32_t)v;
        if (as_uint(PyTuple_GET_ITEM(ref, B_FORK_FLAGS), &v) != OK)
            return FALLBACK;
        b->fork_flags = (unsigned)v;
        PyObject *image = PyTuple_GET_ITEM(ref, B_IMAGE);
        if (image != Py_None && read_image(image, b) != OK)
            return FALLBACK;
        PyObject *data = PyTuple_GET_ITEM(ref, B_DATA);
        if (!PyBytes_Check(data))
            return FALLBACK;
        b->data = (const uint8_t *)PyBytes_AS_STRING(data);
        b->len = PyBytes_GET_SIZE(data);
    }
    return OK;
}

/* 1 found (copied into b), 0 absent. */
static int
find_block(const Rec *r, unsigned block_id, Blk *b)
{
    for (int i = 0; i < r->nblocks; i++) {
        if (r->blocks[i].block_id == block_id) {
            *b = r->blocks[i];
            return 1;
        }
    }
    return 0;
}

/* The block number of another block reference (FALLBACK if absent: Python raises). */
static int
other_blkno(const Rec *r, unsigned block_id, uint32_t *blkno)
{
    Blk b;
    if (find_block(r, block_id, &b) != 1)
        return FALLBACK;
    *blkno = b.blkno;
    return OK;
}

/* ---- heap tuples (heapam.c) ---------------------------------------------------------- */

/* Byte offset of the LP_NORMAL tuple at `offnum` ("invalid lp" otherwise: FALLBACK). */
static long
normal_tuple(const uint8_t *p, unsigned offnum)
{
    if (offnum < 1 || offnum > max_offset(p))
        return FALLBACK;
    uint32_t raw = lp(p, offnum);
    if (LP_FLAGS(raw) != LP_NORMAL || LP_OFF(raw) + SIZEOF_HEAP_TUPLE_HEADER + 1 > BLCKSZ)
        return FALLBACK;
    return LP_OFF(raw);
}

/* A heap tuple rebuilt from xl_heap_header and its body: t_cid is FirstCommandId and
 * HEAP_COMBOCID is cleared (HeapTupleHeaderSetCmin). Returns the length, FALLBACK if > BLCKSZ. */
static long
build_tuple(uint8_t *out, uint32_t xmin, uint32_t xmax, uint32_t blkno, unsigned offnum,
            const uint8_t *hdr, const uint8_t *body, size_t bodylen)
{
    if (bodylen > BLCKSZ - SIZEOF_HEAP_TUPLE_HEADER)
        return FALLBACK;
    s32(out, T_XMIN, xmin);
    s32(out, T_XMAX, xmax);
    s32(out, T_CID, 0);
    s16(out, T_CTID, blkno >> 16);
    s16(out, T_CTID + 2, blkno & 0xFFFF);
    s16(out, T_CTID + 4, offnum);
    s16(out, T_INFOMASK2, g16(hdr, 0));
    s16(out, T_INFOMASK, g16(hdr, 2) & ~HEAP_COMBOCID);
    out[T_HOFF] = hdr[4];
    memcpy(out + SIZEOF_HEAP_TUPLE_HEADER, body, bodylen);
    return (long)(SIZEOF_HEAP_TUPLE_HEADER + bodylen);
}

static int
add_tuple(uint8_t *p, const uint8_t *tup, size_t len, unsigned offnum)
{
    if (max_offset(p) + 1 < offnum)
        return FALLBACK;
    return page_add_item(p, tup, len, offnum, 1, 1) ? OK : FALLBACK;
}

static void
set_ctid(uint8_t *p, size_t pos, uint32_t blkno, unsigned offnum)
{
    s16(p, pos + T_CTID, blkno >> 16);
    s16(p, pos + T_CTID + 2, blkno & 0xFFFF);
    s16(p, pos + T_CTID + 4, offnum);
}

/* Clear the xmax bits and KEYS_UPDATED (plus extra_clear2), then fix_infomask_from_infobits. */
static void
xmax_fixup(uint8_t *p, size_t pos, unsigned infobits, unsigned extra_clear2, unsigned *im2,
           unsigned *im)
{
    unsigned infomask2 = g16(p, pos + T_INFOMASK2);
    unsigned infomask = g16(p, pos + T_INFOMASK);
    infomask &= ~(HEAP_XMAX_BITS | HEAP_MOVED);
    infomask2 &= ~(HEAP_KEYS_UPDATED | extra_clear2);
    if (infobits & XLHL_XMAX_IS_MULTI)
        infomask |= HEAP_XMAX_IS_MULTI;
    if (infobits & XLHL_XMAX_LOCK_ONLY)
        infomask |= HEAP_XMAX_LOCK_ONLY;
    if (infobits & XLHL_XMAX_EXCL_LOCK)
        infomask |= HEAP_XMAX_EXCL_LOCK;
    if (infobits & XLHL_XMAX_KEYSHR_LOCK)
        infomask |= HEAP_XMAX_KEYSHR_LOCK;
    if (infobits & XLHL_KEYS_UPDATED)
        infomask2 |= HEAP_KEYS_UPDATED;
    s16(p, pos + T_INFOMASK2, infomask2);
    s16(p, pos + T_INFOMASK, infomask);
    if (im2)
        *im2 = infomask2;
    if (im)
        *im = infomask;
}

/* HeapTupleHeaderSetCmax(FirstCommandId, false) */
static void
set_cmax0(uint8_t *p, size_t pos)
{
    s32(p, pos + T_CID, 0);
    s16(p, pos + T_INFOMASK, g16(p, pos + T_INFOMASK) & ~HEAP_COMBOCID);
}

/* PageSetPrunable, with TransactionIdPrecedes */
static void
page_set_prunable(uint8_t *p, uint32_t xid)
{
    uint32_t old = g32(p, OFF_PRUNE_XID);
    int precedes = (xid < 3 || old < 3) ? xid < old : (int32_t)(xid - old) < 0;
    if (old == 0 || precedes)
        s32(p, OFF_PRUNE_XID, xid);
}

static void
clear_all_visible(uint8_t *p)
{
    s16(p, OFF_FLAGS, PFLAGS(p) & ~PD_ALL_VISIBLE);
}

/* heap_xlog_insert */
static int
heap_insert(const Rec *r, const Blk *b, uint8_t *p, int have_prev)
{
    if (r->main_len < 3)
        return FALLBACK;
    unsigned offnum = g16(r->main, 0), flags = r->main[2];
    if (r->info & XLOG_HEAP_INIT_PAGE)
        page_init(p, 0);
    else if (!have_prev)
        return FALLBACK;
    if (b->len <= XL_HEAP_HEADER_SIZE)
        return FALLBACK;
    uint8_t tup[BLCKSZ];
    long len = build_tuple(tup, r->xid, 0, b->blkno, offnum, b->data, b->data + XL_HEAP_HEADER_SIZE,
                           (size_t)b->len - XL_HEAP_HEADER_SIZE);
    if (len < 0 || add_tuple(p, tup, (size_t)len, offnum) != OK)
        return FALLBACK;
    if (flags & XLH_INSERT_ALL_VISIBLE_CLEARED)
        clear_all_visible(p);
    return OK;
}

/* heap_xlog_delete */
static int
heap_delete(const Rec *r, const Blk *b, uint8_t *p, int have_prev)
{
    if (r->main_len < 8 || !have_prev)
        return FALLBACK;
    uint32_t xmax = g32(r->main, 0);
    unsigned offnum = g16(r->main, 4), infobits = r->main[6], flags = r->main[7];
    long pos = normal_tuple(p, offnum);
    if (pos < 0)
        return FALLBACK;
    xmax_fixup(p, (size_t)pos, infobits, HEAP_HOT_UPDATED, NULL, NULL);
    if (flags & XLH_DELETE_IS_SUPER)
        s32(p, (size_t)pos + T_XMIN, 0);
    else
        s32(p, (size_t)pos + T_XMAX, xmax);
    set_cmax0(p, (size_t)pos);
    page_set_prunable(p, r->xid);
    if (flags & XLH_DELETE_ALL_VISIBLE_CLEARED)
        clear_all_visible(p);
    if (flags & XLH_DELETE_IS_PARTITION_MOVE)
        set_ctid(p, (size_t)pos, MOVED_PARTITIONS_BLOCK, MOVED_PARTITIONS_OFFSET);
    else
        set_ctid(p, (size_t)pos, b->blkno, offnum);
    return OK;
}

/* heap_xlog_update: block 0 is the new page, block 1 the old one when it differs. */
static int
heap_update(const Rec *r, unsigned block_id, uint8_t *p, int have_prev)
{
    if (r->main_len < 14)
        return FALLBACK;
    uint32_t old_xmax = g32(r->main, 0), new_xmax = g32(r->main, 8);
    unsigned old_off = g16(r->main, 4), old_infobits = r->main[6], flags = r->main[7];
    unsigned new_off = g16(r->main, 12);
    int hot = (r->info & XLOG_HEAP_OPMASK) == XLOG_HEAP_HOT_UPDATE;
    Blk nb, ob;
    if (find_block(r, 0, &nb) != 1)
        return FALLBACK;
    int has_old = find_block(r, 1, &ob);
    if (has_old < 0)
        return FALLBACK;
    long old_pos = -1;
    if (block_id == 1 || !has_old) {
        if (!have_prev)
            return FALLBACK;
        old_pos = normal_tuple(p, old_off);
        if (old_pos < 0)
            return FALLBACK;
        size_t at = (size_t)old_pos;
        xmax_fixup(p, at, old_infobits, hot ? 0 : HEAP_HOT_UPDATED, NULL, NULL);
        if (hot)
            s16(p, at + T_INFOMASK2, g16(p, at + T_INFOMASK2) | HEAP_HOT_UPDATED);
        s32(p, at + T_XMAX, old_xmax);
        set_cmax0(p, at);
        set_ctid(p, at, nb.blkno, new_off);
        page_set_prunable(p, r->xid);
        if (flags & XLH_UPDATE_OLD_ALL_VISIBLE_CLEARED)
            clear_all_visible(p);
        if (block_id == 1)
            return OK;
    } else if (r->info & XLOG_HEAP_INIT_PAGE)
        page_init(p, 0);
    else if (!have_prev)
        return FALLBACK;

    const uint8_t *data = nb.data;
    size_t len = (size_t)nb.len, pos = 0;
    unsigned prefixlen = 0, suffixlen = 0;
    if (flags & XLH_UPDATE_PREFIX_FROM_OLD) {
        if (len < pos + 2)
            return FALLBACK;
        prefixlen = g16(data, pos);
        pos += 2;
    }
    if (flags & XLH_UPDATE_SUFFIX_FROM_OLD) {
        if (len < pos + 2)
            return FALLBACK;
        suffixlen = g16(data, pos);
        pos += 2;
    }
    if (len < pos + XL_HEAP_HEADER_SIZE)
        return FALLBACK;
    const uint8_t *hdr = data + pos;
    pos += XL_HEAP_HEADER_SIZE;
    const uint8_t *logged = data + pos;
    size_t loglen = len - pos;
    /* the body: logged[:bitmap] + old prefix + logged[bitmap:] + old suffix */
    uint8_t body[BLCKSZ];
    size_t bodylen = 0;
    if (prefixlen || suffixlen) {
        if (old_pos < 0)
            return FALLBACK;
        unsigned old_len = LP_LEN(lp(p, old_off));
        unsigned old_hoff = p[old_pos + T_HOFF];
        size_t bitmap_len = loglen;
        if (prefixlen) {
            if (hdr[4] < SIZEOF_HEAP_TUPLE_HEADER)
                return FALLBACK;
            bitmap_len = (size_t)hdr[4] - SIZEOF_HEAP_TUPLE_HEADER;
            size_t start = (size_t)old_pos + old_hoff;
            if (bitmap_len > loglen || start + prefixlen > BLCKSZ)
                return FALLBACK;
            if (loglen + prefixlen + suffixlen > sizeof body)
                return FALLBACK;
            memcpy(body, logged, bitmap_len);
            memcpy(body + bitmap_len, p + start, prefixlen);
            bodylen = bitmap_len + prefixlen;
        }
        if (loglen + prefixlen + suffixlen > sizeof body)
            return FALLBACK;
        memcpy(body + bodylen, logged + (prefixlen ? bitmap_len : 0),
               loglen - (prefixlen ? bitmap_len : 0));
        bodylen += loglen - (prefixlen ? bitmap_len : 0);
        if (suffixlen) {
            size_t end = (size_t)old_pos + old_len;
            if (end > BLCKSZ || suffixlen > end)
                return FALLBACK;
            memcpy(body + bodylen, p + end - suffixlen, suffixlen);
            bodylen += suffixlen;
        }
    } else {
        if (loglen > sizeof body)
            return FALLBACK;
        memcpy(body, logged, loglen);
        bodylen = loglen;
    }
    uint8_t tup[BLCKSZ];
    long tlen = build_tuple(tup, r->xid, new_xmax, nb.blkno, new_off, hdr, body, bodylen);
    if (tlen < 0 || add_tuple(p, tup, (size_t)tlen, new_off) != OK)
        return FALLBACK;
    if (flags & XLH_UPDATE_NEW_ALL_VISIBLE_CLEARED)
        clear_all_visible(p);
    return OK;
}

/* heap_xlog_confirm */
static int
heap_confirm(const Rec *r, const Blk *b, uint8_t *p, int have_prev)
{
    if (r->main_len < 2 || !have_prev)
        return FALLBACK;
    unsigned offnum = g16(r->main, 0);
    long pos = normal_tuple(p, offnum);
    if (pos < 0)
        return FALLBACK;
    set_ctid(p, (size_t)pos, b->blkno, offnum);
    return OK;
}

/* HEAP_XMAX_IS_LOCKED_ONLY */
static int
is_locked_only(unsigned infomask)
{
    return (infomask & HEAP_XMAX_LOCK_ONLY) ||
           (infomask & (HEAP_XMAX_IS_MULTI | HEAP_LOCK_MASK)) == HEAP_XMAX_EXCL_LOCK;
}

/* heap_xlog_lock */
static int
heap_lock(const Rec *r, const Blk *b, uint8_t *p, int have_prev)
{
    if (r->main_len < 8 || !have_prev)
        return FALLBACK;
    uint32_t locking_xid = g32(r->main, 0);
    unsigned offnum = g16(r->main, 4), infobits = r->main[6];
    long pos = normal_tuple(p, offnum);
    if (pos < 0)
        return FALLBACK;
    unsigned im2, im;
    xmax_fixup(p, (size_t)pos, infobits, 0, &im2, &im);
    if (is_locked_only(im)) {
        s16(p, (size_t)pos + T_INFOMASK2, im2 & ~HEAP_HOT_UPDATED);
        set_ctid(p, (size_t)pos, b->blkno, offnum);
    }
    s32(p, (size_t)pos + T_XMAX, locking_xid);
    set_cmax0(p, (size_t)pos);
    return OK;
}

/* heap_xlog_inplace */
static int
heap_inplace(const Rec *r, const Blk *b, uint8_t *p, int have_prev)
{
    if (r->main_len < 2 || !have_prev)
        return FALLBACK;
    unsigned offnum = g16(r->main, 0);
    long pos = normal_tuple(p, offnum);
    if (pos < 0)
        return FALLBACK;
    unsigned length = LP_LEN(lp(p, offnum)), hoff = p[pos + T_HOFF];
    if (length < hoff || length - hoff != (size_t)b->len || (size_t)pos + length > BLCKSZ)
        return FALLBACK;
    memcpy(p + pos + hoff, b->data, (size_t)b->len);
    return OK;
}

/* ---- heap2 --------------------------------------------------------------------------- */

/* One line pointer of a prune/vacuum plan, range-checked as heap2.py _set_lp. */
static int
set_lp(uint8_t *p, unsigned offnum, unsigned off, unsigned flags)
{
    if (offnum < 1 || offnum > max_offset(p))
        return FALLBACK;
    s32(p, LP_AT(offnum), LP_RAW(off, flags, 0));
    return OK;
}

/* heap_xlog_prune: heap_page_prune_execute (redirects, dead, unused), then
 * PageRepairFragmentation. */
static int
heap2_prune(const Rec *r, const Blk *b, uint8_t *p, int have_prev)
{
    if (r->main_len < 8 || !have_prev || b->len % 2)
        return FALLBACK;
    size_t nred = 2 * (size_t)g16(r->main, 4), ndead = g16(r->main, 6);
    size_t noffs = (size_t)b->len / 2;
    if (nred + ndead > noffs)
        return FALLBACK;
    const uint8_t *d = b->data;
    size_t i = 0;
    for (; i < nred; i += 2)
        if (set_lp(p, g16(d, 2 * i), g16(d, 2 * i + 2), LP_REDIRECT) != OK)
            return FALLBACK;
    for (; i < nred + ndead; i++)
        if (set_lp(p, g16(d, 2 * i), 0, LP_DEAD) != OK)
            return FALLBACK;
    for (; i < noffs; i++)
        if (set_lp(p, g16(d, 2 * i), 0, LP_UNUSED) != OK)
            return FALLBACK;
    return page_repair_fragmentation(p);
}

/* heap_xlog_vacuum */
static int
heap2_vacuum(const Rec *r, const Blk *b, uint8_t *p, int have_prev)
{
    if (r->main_len < 2 || !have_prev)
        return FALLBACK;
    size_t nunused = g16(r->main, 0);
    if (2 * nunused > (size_t)b->len)
        return FALLBACK;
    for (size_t i = 0; i < nunused; i++)
        if (set_lp(p, g16(b->data, 2 * i), 0, LP_UNUSED) != OK)
            return FALLBACK;
    page_truncate_line_pointer_array(p);
    return OK;
}

/* heap_xlog_freeze_page: heap_execute_freeze_tuple for each xl_heap_freeze_tuple. */
static int
heap2_freeze_page(const Rec *r, const Blk *b, uint8_t *p, int have_prev)
{
    if (r->main_len < 6 || !have_prev)
        return FALLBACK;
    size_t ntuples = g16(r->main, 4);
    if ((size_t)b->len < ntuples * 12)
        return FALLBACK;
    for (size_t k = 0; k < ntuples; k++) {
        const uint8_t *f = b->data + 12 * k;
        unsigned offnum = g16(f, 4), frzflags = f[10];
        if (offnum < 1 || offnum > max_offset(p))
            return FALLBACK;
        uint32_t raw = lp(p, offnum);
        size_t pos = LP_OFF(raw);
        if (pos + LP_LEN(raw) > BLCKSZ || pos + T_INFOMASK + 2 > BLCKSZ)
            return FALLBACK;
        s32(p, pos + T_XMAX, g32(f, 0));
        if (frzflags & XLH_FREEZE_XVAC)
            s32(p, pos + T_CID, FROZEN_TRANSACTION_ID);
        if (frzflags & XLH_INVALID_XVAC)
            s32(p, pos + T_CID, 0);
        s16(p, pos + T_INFOMASK2, g16(f, 6));
        s16(p, pos + T_INFOMASK, g16(f, 8));
    }
    return OK;
}

/* heap_xlog_multi_insert */
static int
heap2_multi_insert(const Rec *r, const Blk *b, uint8_t *p, int have_prev)
{
    if (r->main_len < 4)
        return FALLBACK;
    unsigned flags = r->main[0];
    size_t ntuples = g16(r->main, 2);
    int init = (r->info & XLOG_HEAP_INIT_PAGE) != 0;
    if (!init && (size_t)r->main_len < 4 + 2 * ntuples)
        return FALLBACK;
    if (init)
        page_init(p, 0);
    else if (!have_prev)
        return FALLBACK;
    const uint8_t *d = b->data;
    size_t len = (size_t)b->len, pos = 0;
    uint8_t tup[BLCKSZ];
    for (size_t i = 0; i < ntuples; i++) {
        unsigned offnum = init ? (unsigned)i + 1 : g16(r->main, 4 + 2 * i);
        pos += pos & 1; /* SHORTALIGN within the MAXALIGNed block data */
        if (pos + 7 > len)
            return FALLBACK;
        size_t datalen = g16(d, pos);
        const uint8_t *hdr = d + pos + 2;
        pos += 7;
        if (pos + datalen > len)
            return FALLBACK;
        long tlen = build_tuple(tup, r->xid, 0, b->blkno, offnum, hdr, d + pos, datalen);
        pos += datalen;
        if (tlen < 0 || add_tuple(p, tup, (size_t)tlen, offnum) != OK)
            return FALLBACK;
    }
    if (pos != len)
        return FALLBACK;
    if (flags & XLH_INSERT_ALL_VISIBLE_CLEARED)
        clear_all_visible(p);
    if (flags & XLH_INSERT_ALL_FROZEN_SET)
        s16(p, OFF_FLAGS, PFLAGS(p) | PD_ALL_VISIBLE);
    return OK;
}

/* heap_xlog_lock_updated */
static int
heap2_lock_updated(const Rec *r, uint8_t *p, int have_prev)
{
    if (r->main_len < 8 || !have_prev)
        return FALLBACK;
    long pos = normal_tuple(p, g16(r->main, 4));
    if (pos < 0)
        return FALLBACK;
    xmax_fixup(p, (size_t)pos, r->main[6], 0, NULL, NULL);
    s32(p, (size_t)pos + T_XMAX, g32(r->main, 0));
    return OK;
}

/* ---- btree (nbtxlog.c) --------------------------------------------------------------- */

/* The special area's offset when a whole BTPageOpaqueData fits, else FALLBACK. */
static long
bt_special(const uint8_t *p)
{
    unsigned special = SPECIAL(p);
    return special + BT_OPAQUE_SIZE > BLCKSZ ? FALLBACK : (long)special;
}

static void
bt_set_opaque(uint8_t *p, uint32_t prev, uint32_t next, uint32_t level, unsigned flags)
{
    size_t s = SPECIAL(p);
    s32(p, s, prev);
    s32(p, s + 4, next);
    s32(p, s + 8, level);
    s16(p, s + 12, flags);
    s16(p, s + 14, 0);
}

static int
bt_clear_incomplete_split(uint8_t *p, int have_prev)
{
    long s = bt_special(p);
    if (!have_prev || s < 0)
        return FALLBACK;
    s16(p, (size_t)s + 12, g16(p, (size_t)s + 12) & ~BTP_INCOMPLETE_SPLIT);
    return OK;
}

/* _bt_restore_meta */
static int
bt_restore_meta(const Blk *b, uint8_t *p)
{
    if (b->len < 25)
        return FALLBACK;
    const uint8_t *d = b->data;
    page_init(p, BT_OPAQUE_SIZE);
    s32(p, 24, BTREE_MAGIC);
    for (int k = 0; k < 6; k++) /* version, root, level, fastroot, fastlevel, num_delpages */
        s32(p, 28 + 4 * k, g32(d, 4 * k));
    s32(p, 56, 0x00000000u); /* btm_last_cleanup_num_heap_tuples = -1.0 */
    s32(p, 60, 0xBFF00000u);
    p[64] = d[24] != 0; /* btm_allequalimage */
    bt_set_opaque(p, 0, 0, 0, BTP_META);
    s16(p, OFF_LOWER, BTREE_METAPAGE_END);
    return OK;
}

static unsigned
index_tuple_size(const uint8_t *t)
{
    return g16(t, 6) & INDEX_SIZE_MASK;
}

/* The item of `offnum` (range- and bounds-checked like page.py get_item). */
static int
get_item(const uint8_t *p, unsigned offnum, const uint8_t **item, unsigned *len)
{
    if (offnum < 1 || offnum > max_offset(p))
        return FALLBACK;
    uint32_t raw = lp(p, offnum);
    if (LP_OFF(raw) + LP_LEN(raw) > BLCKSZ)
        return FALLBACK;
    *item = p + LP_OFF(raw);
    *len = LP_LEN(raw);
    return OK;
}

/* _bt_swap_posting: `nposting` becomes the posting tuple `oposting` (olen bytes) with
 * newitem's heap TID inserted at `postingoff`; its last TID moves into newitem. */
static int
bt_swap_posting(uint8_t *newitem, size_t newlen, const uint8_t *oposting, unsigned olen,
                unsigned postingoff, uint8_t *nposting, unsigned *nlen)
{
    if (olen < INDEX_TUPLE_HEADER || newlen < TID_SIZE)
        return FALLBACK;
    size_t off = ((size_t)g16(oposting, 0) << 16) | g16(oposting, 2);
    unsigned n = g16(oposting, 4) & BT_OFFSET_MASK;
    unsigned size = index_tuple_size(oposting);
    if (!(0 < postingoff && postingoff < n) || size > olen || off + (size_t)n * TID_SIZE > size)
        return FALLBACK;
    memcpy(nposting, oposting, size);
    size_t at = off + (size_t)postingoff * TID_SIZE, last = off + (size_t)(n - 1) * TID_SIZE;
    uint8_t maxtid[TID_SIZE];
    memcpy(maxtid, oposting + last, TID_SIZE);
    memmove(nposting + at + TID_SIZE, oposting + at, last - at);
    memcpy(nposting + at, newitem, TID_SIZE);
    memcpy(newitem, maxtid, TID_SIZE);
    *nlen = size;
    return OK;
}

/* btree_xlog_insert: block 0 the target, 1 the child whose split completes, 2 the metapage. */
static int
bt_insert(const Rec *r, unsigned block_id, const Blk *b, uint8_t *p, int have_prev)
{
    if (block_id == 1)
        return bt_clear_incomplete_split(p, have_prev);
    if (block_id == 2)
        return bt_restore_meta(b, p);
    if (block_id != 0 || !have_prev || r->main_len < 2)
        return FALLBACK;
    unsigned offnum = g16(r->main, 0);
    if ((r->info & 0xF0) != XLOG_BTREE_INSERT_POST)
        return page_add_item(p, b->data, (size_t)b->len, offnum, 0, 0) ? OK : FALLBACK;
    /* INSERT_POST: the posting list before the new item gets its TID, the item the last. */
    if (b->len < 2)
        return FALLBACK;
    unsigned postingoff = g16(b->data, 0);
    size_t newlen = (size_t)b->len - 2;
    uint8_t newitem[BLCKSZ], nposting[BLCKSZ];
    if (newlen > sizeof newitem)
        return FALLBACK;
    memcpy(newitem, b->data + 2, newlen);
    const uint8_t *oposting;
    unsigned olen, nlen;
    if (get_item(p, offnum - 1, &oposting, &olen) != OK)
        return FALLBACK;
    size_t opos = (size_t)(oposting - p);
    if (bt_swap_posting(newitem, newlen, oposting, olen, postingoff, nposting, &nlen) != OK)
        return FALLBACK;
    size_t aligned = MAXALIGN(nlen);
    if (opos + aligned > BLCKSZ)
        return FALLBACK;
    memset(nposting + nlen, 0, aligned - nlen);
    memcpy(p + opos, nposting, aligned);
    return page_add_item(p, newitem, newlen, offnum, 0, 0) ? OK : FALLBACK;
}

/* _bt_restore_page: items logged in physical order are re-added last-first at 1..n. */
static int
bt_restore_items(uint8_t *p, const uint8_t *d, size_t len)
{
    const uint8_t *items[MAX_LINE_POINTERS];
    size_t sizes[MAX_LINE_POINTERS];
    unsigned n = 0;
    size_t pos = 0;
    while (pos < len) {
        if (pos + INDEX_TUPLE_HEADER > len || n == MAX_LINE_POINTERS)
            return FALLBACK;
        size_t size = MAXALIGN(index_tuple_size(d + pos));
        if (size == 0 || pos + size > len)
            return FALLBACK;
        items[n] = d + pos;
        sizes[n++] = size;
        pos += size;
    }
    for (unsigned i = n; i-- > 0;)
        if (!page_add_item(p, items[i], sizes[i], n - i, 0, 0))
            return FALLBACK;
    return OK;
}

/* btree_xlog_split: block 0 the original (left) page, 1 the new right page, 2 the right
 * sibling, 3 the child whose incomplete split this completes. */
static int
bt_split(const Rec *r, unsigned block_id, const Blk *b, uint8_t *p, int have_prev)
{
    if (r->main_len < 10)
        return FALLBACK;
    uint32_t level = g32(r->main, 0);
    unsigned firstrightoff = g16(r->main, 4), newitemoff = g16(r->main, 6);
    unsigned postingoff = g16(r->main, 8);
    int onleft = (r->info & 0xF0) == XLOG_BTREE_SPLIT_L, isleaf = level == 0;
    if (block_id == 3)
        return bt_clear_incomplete_split(p, have_prev);
    uint32_t right_blk, left_blk;
    if (other_blkno(r, 1, &right_blk) != OK)
        return FALLBACK;
    if (block_id == 2) {
        long s = bt_special(p);
        if (!have_prev || s < 0)
            return FALLBACK;
        s32(p, (size_t)s, right_blk);
        return OK;
    }
    if (other_blkno(r, 0, &left_blk) != OK)
        return FALLBACK;
    if (block_id == 1) {
        Blk sib;
        int has_sib = find_block(r, 2, &sib);
        if (has_sib < 0)
            return FALLBACK;
        page_init(p, BT_OPAQUE_SIZE);
        bt_set_opaque(p, left_blk, has_sib ? sib.blkno : 0, level, isleaf ? BTP_LEAF : 0);
        return bt_restore_items(p, b->data, (size_t)b->len);
    }
    if (block_id != 0 || !have_prev)
        return FALLBACK;
    /* the original page stays in p until the new left page (built in left) replaces it */
    long ospecial = bt_special(p);
    if (ospecial < 0 || ospecial != (long)MAXALIGN(ospecial))
        return FALLBACK;
    const uint8_t *d = b->data;
    size_t len = (size_t)b->len, pos = 0;
    uint8_t newitem[BLCKSZ], nposting[BLCKSZ];
    size_t newsize = 0;
    unsigned nlen = 0, replacepostingoff = 0;
    if (onleft || postingoff) {
        if (len < INDEX_TUPLE_HEADER)
            return FALLBACK;
        unsigned tsize = index_tuple_size(d);
        newsize = MAXALIGN(tsize);
        if (newsize > len)
            return FALLBACK;
        memcpy(newitem, d, newsize);
        pos = newsize;
        if (postingoff) {
            replacepostingoff = newitemoff - 1;
            const uint8_t *oposting;
            unsigned olen;
            if (get_item(p, replacepostingoff, &oposting, &olen) != OK)
                return FALLBACK;
            if (bt_swap_posting(newitem, tsize, oposting, olen, postingoff, nposting, &nlen) !=
                OK)
                return FALLBACK;
            memset(newitem + tsize, 0, newsize - tsize);
            memset(nposting + nlen, 0, MAXALIGN(nlen) - nlen);
        }
    }
    if (pos + INDEX_TUPLE_HEADER > len)
        return FALLBACK;
    size_t hikeysz = MAXALIGN(index_tuple_size(d + pos));
    if (pos + hikeysz > len)
        return FALLBACK;
    /* PageGetTempPageCopySpecial */
    uint8_t left[BLCKSZ];
    page_init(left, BLCKSZ - (size_t)ospecial);
    memcpy(left + ospecial, p + ospecial, BLCKSZ - (size_t)ospecial);
    if (!page_add_item(left, d + pos, hikeysz, P_HIKEY, 0, 0))
        return FALLBACK;
    unsigned leftoff = P_HIKEY + 1;
    unsigned off = g32(p, (size_t)ospecial + 4) == 0 ? P_HIKEY : P_HIKEY + 1;
    for (; off < firstrightoff; off++) {
        if (off == replacepostingoff) {
            if (!page_add_item(left, nposting, MAXALIGN(nlen), leftoff++, 0, 0))
                return FALLBACK;
            continue;
        }
        if (onleft && off == newitemoff && !page_add_item(left, newitem, newsize, leftoff++, 0, 0))
            return FALLBACK;
        const uint8_t *item;
        unsigned ilen;
        if (get_item(p, off, &item, &ilen) != OK || !page_add_item(left, item, ilen, leftoff++, 0, 0))
            return FALLBACK;
    }
    if (onleft && off == newitemoff && !page_add_item(left, newitem, newsize, leftoff, 0, 0))
        return FALLBACK;
    uint32_t prev = g32(p, (size_t)ospecial), olevel = g32(p, (size_t)ospecial + 8);
    bt_set_opaque(left, prev, right_blk, olevel, BTP_INCOMPLETE_SPLIT | (isleaf ? BTP_LEAF : 0));
    memcpy(p, left, BLCKSZ);
    return OK;
}

/* PageIndexTupleOverwrite: replace an index item in place, moving the data below it when
 * the size changes (FALLBACK where it returns false). */
static int
page_index_tuple_overwrite(uint8_t *p, unsigned offnum, const uint8_t *item, size_t newsize)
{
    unsigned lower, upper, special;
    if (check_pointers(p, 1, &lower, &upper, &special) != OK)
        return FALLBACK;
    unsigned nline = (lower - SIZE_OF_PAGE_HEADER) / ITEM_ID_SIZE;
    if (offnum < 1 || offnum > nline)
        return FALLBACK;
    uint32_t raw = lp(p, offnum);
    unsigned offset = LP_OFF(raw), oldsize = LP_LEN(raw);
    if (offset < upper || offset + oldsize > special || offset != MAXALIGN(offset))
        return FALLBACK;
    oldsize = (unsigned)MAXALIGN(oldsize);
    size_t aligned = MAXALIGN(newsize);
    if (aligned > oldsize + (upper - lower))
        return FALLBACK;
    int diff = (int)oldsize - (int)aligned;
    if (diff) {
        memmove(p + (int)upper + diff, p + upper, offset - upper);
        s16(p, OFF_UPPER, (unsigned)((int)upper + diff));
        for (unsigned i = 1; i <= nline; i++) { /* shift_offsets(storage_only) by diff */
            uint32_t r2 = lp(p, i);
            if (LP_OFF(r2) <= offset && LP_LEN(r2))
                s32(p, LP_AT(i), r2 + (uint32_t)diff);
        }
    }
    unsigned at = (unsigned)((int)offset + diff);
    s32(p, LP_AT(offnum), LP_RAW(at, LP_FLAGS(raw), newsize));
    memcpy(p + at, item, newsize);
    return OK;
}

static int
bt_is_posting(const uint8_t *t)
{
    return (g16(t, 6) & INDEX_ALT_TID_MASK) && (g16(t, 4) & BT_IS_POSTING);
}

/* _bt_form_posting: `base`'s key with the `ntids` heap TIDs at `tids`; returns the size. */
static long
bt_form_posting(uint8_t *out, const uint8_t *base, unsigned baselen, const uint8_t *tids,
                size_t ntids)
{
    size_t keysize = bt_is_posting(base) ? (((size_t)g16(base, 0) << 16) | g16(base, 2))
                                         : index_tuple_size(base);
    if (ntids == 0 || keysize > baselen || keysize < INDEX_TUPLE_HEADER)
        return FALLBACK;
    size_t newsize = ntids > 1 ? MAXALIGN(keysize + ntids * TID_SIZE) : keysize;
    if (newsize > INDEX_SIZE_MASK)
        return FALLBACK;
    memset(out, 0, newsize);
    memcpy(out, base, keysize);
    unsigned info = (g16(out, 6) & ~INDEX_SIZE_MASK) | (unsigned)newsize;
    if (ntids > 1) {
        info |= INDEX_ALT_TID_MASK;
        s16(out, 0, (unsigned)(keysize >> 16));
        s16(out, 2, (unsigned)(keysize & 0xFFFF));
        s16(out, 4, (unsigned)ntids | BT_IS_POSTING);
        memcpy(out + keysize, tids, ntids * TID_SIZE);
    } else {
        info &= ~INDEX_ALT_TID_MASK;
        memcpy(out, tids, TID_SIZE);
    }
    s16(out, 6, info);
    return (long)newsize;
}

/* The heap TIDs of a plain or posting tuple (pointer and count), FALLBACK if out of bounds. */
static int
bt_tids(const uint8_t *t, unsigned len, const uint8_t **tids, size_t *n)
{
    if (bt_is_posting(t)) {
        size_t off = ((size_t)g16(t, 0) << 16) | g16(t, 2);
        *n = g16(t, 4) & BT_OFFSET_MASK;
        if (off + *n * TID_SIZE > len)
            return FALLBACK;
        *tids = t + off;
    } else {
        *n = 1;
        *tids = t;
    }
    return OK;
}

/* btree_xlog_vacuum / btree_xlog_delete: posting lists lose their deleted TIDs
 * (_bt_update_posting), then the deleted items go (PageIndexMultiDelete). */
static int
bt_vacuum_or_delete(const Rec *r, const Blk *b, uint8_t *p, int have_prev)
{
    int is_delete = (r->info & 0xF0) == XLOG_BTREE_DELETE;
    size_t at = is_delete ? 4 : 0;
    if ((size_t)r->main_len < at + 4 || !have_prev)
        return FALLBACK;
    size_t ndeleted = g16(r->main, at), nupdated = g16(r->main, at + 2);
    const uint8_t *d = b->data;
    size_t len = (size_t)b->len, pos = 2 * (ndeleted + nupdated);
    if (len < pos)
        return FALLBACK;
    for (size_t k = 0; k < nupdated; k++) {
        unsigned offnum = g16(d, 2 * (ndeleted + k));
        if (pos + 2 > len)
            return FALLBACK;
        size_t ndrop = g16(d, pos);
        const uint8_t *drop = d + pos + 2;
        pos += 2 + 2 * ndrop;
        if (pos > len)
            return FALLBACK;
        const uint8_t *orig, *tids;
        unsigned olen;
        size_t n;
        if (get_item(p, offnum, &orig, &olen) != OK || olen < INDEX_TUPLE_HEADER ||
            !bt_is_posting(orig) || bt_tids(orig, olen, &tids, &n) != OK)
            return FALLBACK;
        uint8_t keep[BLCKSZ], newtup[BLCKSZ];
        size_t nkeep = 0;
        for (size_t i = 0; i < n; i++) {
            int dropped = 0;
            for (size_t j = 0; j < ndrop && !dropped; j++)
                dropped = g16(drop, 2 * j) == i;
            if (!dropped)
                memcpy(keep + TID_SIZE * nkeep++, tids + TID_SIZE * i, TID_SIZE);
        }
        long newlen = bt_form_posting(newtup, orig, olen, keep, nkeep);
        if (newlen < 0 || page_index_tuple_overwrite(p, offnum, newtup, (size_t)newlen) != OK)
            return FALLBACK;
    }
    if (ndeleted && page_index_multi_delete(p, d, (unsigned)ndeleted) != OK)
        return FALLBACK;
    long s = bt_special(p);
    if (s < 0)
        return FALLBACK;
    s16(p, (size_t)s + 12, g16(p, (size_t)s + 12) & ~BTP_HAS_GARBAGE);
    return OK;
}

/* btree_xlog_dedup: the page is rebuilt with each logged interval merged into one posting
 * list (_bt_dedup_start_pending, _bt_dedup_save_htid, _bt_dedup_finish_pending). */
static int
bt_dedup(const Rec *r, const Blk *b, uint8_t *p, int have_prev)
{
    if (r->main_len < 2 || !have_prev)
        return FALLBACK;
    size_t nintervals = g16(r->main, 0);
    if ((size_t)b->len < 4 * nintervals)
        return FALLBACK;
    const uint8_t *iv = b->data;
    long special = bt_special(p);
    if (special < 0 || special != (long)MAXALIGN(special))
        return FALLBACK;
    uint8_t out[BLCKSZ]; /* PageGetTempPageCopySpecial */
    page_init(out, BLCKSZ - (size_t)special);
    memcpy(out + special, p + special, BLCKSZ - (size_t)special);
    const uint8_t *item;
    unsigned ilen;
    int rightmost = g32(p, (size_t)special + 4) == 0;
    if (!rightmost) {
        if (get_item(p, P_HIKEY, &item, &ilen) != OK || !page_add_item(out, item, ilen, P_HIKEY, 0, 0))
            return FALLBACK;
    }
    unsigned minoff = rightmost ? P_HIKEY : P_HIKEY + 1, maxoff = max_offset(p);
    size_t ninterval = 0, nitems = 0, ntids = 0;
    unsigned baseoff = 0, baselen = 0;
    const uint8_t *base = NULL;
    uint8_t tids[BLCKSZ], posting[BLCKSZ];
    for (unsigned offnum = minoff; offnum <= maxoff + 1; offnum++) {
        const uint8_t *t = NULL, *ttids;
        size_t tn = 0;
        if (offnum <= maxoff) {
            if (get_item(p, offnum, &item, &ilen) != OK || ilen < INDEX_TUPLE_HEADER ||
                bt_tids(item, ilen, &ttids, &tn) != OK)
                return FALLBACK;
            t = item;
            if (offnum != minoff && ninterval < nintervals && baseoff == g16(iv, 4 * ninterval) &&
                nitems < g16(iv, 4 * ninterval + 2)) {
                if ((ntids + tn) * TID_SIZE > sizeof tids)
                    return FALLBACK;
                memcpy(tids + ntids * TID_SIZE, ttids, tn * TID_SIZE);
                ntids += tn;
                nitems++;
                continue;
            }
        }
        if (offnum != minoff) { /* finish the pending base */
            unsigned target = max_offset(out) + 1;
            if (nitems == 1) {
                if (!page_add_item(out, base, baselen, target, 0, 0))
                    return FALLBACK;
            } else {
                long plen = bt_form_posting(posting, base, baselen, tids, ntids);
                if (plen < 0 || !page_add_item(out, posting, (size_t)plen, target, 0, 0))
                    return FALLBACK;
                ninterval++;
            }
        }
        if (offnum > maxoff)
            break;
        base = t;
        baselen = ilen;
        baseoff = offnum;
        nitems = 1;
        if (tn * TID_SIZE > sizeof tids)
            return FALLBACK;
        memcpy(tids, ttids, tn * TID_SIZE);
        ntids = tn;
    }
    s16(out, (size_t)SPECIAL(out) + 12, g16(out, (size_t)SPECIAL(out) + 12) & ~BTP_HAS_GARBAGE);
    memcpy(p, out, BLCKSZ);
    return OK;
}

/* ---- dispatch ------------------------------------------------------------------------ */

/* Whether this C module redoes the record type (else the Python code does everything). */
static int
handled(int rmgr, unsigned info, unsigned block_id)
{
    unsigned op = info & XLOG_HEAP_OPMASK;
    switch (rmgr) {
    case RM_HEAP_ID:
        return 1; /* every opcode but TRUNCATE, which has no blocks */
    case RM_HEAP2_ID:
        return op == XLOG_HEAP2_PRUNE || op == XLOG_HEAP2_VACUUM || op == XLOG_HEAP2_FREEZE_PAGE ||
               (op == XLOG_HEAP2_VISIBLE && block_id == 1) || op == XLOG_HEAP2_MULTI_INSERT ||
               op == XLOG_HEAP2_LOCK_UPDATED;
    case RM_BTREE_ID:
        switch (info & 0xF0) {
        case XLOG_BTREE_INSERT_LEAF:
        case XLOG_BTREE_INSERT_UPPER:
        case XLOG_BTREE_INSERT_META:
        case XLOG_BTREE_INSERT_POST:
        case XLOG_BTREE_SPLIT_L:
        case XLOG_BTREE_SPLIT_R:
        case XLOG_BTREE_DEDUP:
        case XLOG_BTREE_VACUUM:
        case XLOG_BTREE_DELETE:
            return 1;
        }
        return 0;
    }
    return 0;
}

static int
apply(const Rec *r, unsigned block_id, const Blk *b, uint8_t *p, int have_prev)
{
    unsigned op = r->info & XLOG_HEAP_OPMASK;
    if (r->rmgr == RM_HEAP_ID) {
        switch (op) {
        case XLOG_HEAP_INSERT:
            return heap_insert(r, b, p, have_prev);
        case XLOG_HEAP_DELETE:
            return heap_delete(r, b, p, have_prev);
        case XLOG_HEAP_UPDATE:
        case XLOG_HEAP_HOT_UPDATE:
            return heap_update(r, block_id, p, have_prev);
        case XLOG_HEAP_CONFIRM:
            return heap_confirm(r, b, p, have_prev);
        case XLOG_HEAP_LOCK:
            return heap_lock(r, b, p, have_prev);
        case XLOG_HEAP_INPLACE:
            return heap_inplace(r, b, p, have_prev);
        }
        return FALLBACK;
    }
    if (r->rmgr == RM_HEAP2_ID) {
        switch (op) {
        case XLOG_HEAP2_PRUNE:
            return heap2_prune(r, b, p, have_prev);
        case XLOG_HEAP2_VACUUM:
            return heap2_vacuum(r, b, p, have_prev);
        case XLOG_HEAP2_FREEZE_PAGE:
            return heap2_freeze_page(r, b, p, have_prev);
        case XLOG_HEAP2_VISIBLE: /* the heap page (block 1): PD_ALL_VISIBLE, no LSN stamp */
            if (r->main_len < 5 || !have_prev)
                return FALLBACK;
            s16(p, OFF_FLAGS, PFLAGS(p) | PD_ALL_VISIBLE);
            return OK;
        case XLOG_HEAP2_MULTI_INSERT:
            return heap2_multi_insert(r, b, p, have_prev);
        case XLOG_HEAP2_LOCK_UPDATED:
            return heap2_lock_updated(r, p, have_prev);
        }
        return FALLBACK;
    }
    switch (r->info & 0xF0) {
    case XLOG_BTREE_SPLIT_L:
    case XLOG_BTREE_SPLIT_R:
        return bt_split(r, block_id, b, p, have_prev);
    case XLOG_BTREE_VACUUM:
    case XLOG_BTREE_DELETE:
        return bt_vacuum_or_delete(r, b, p, have_prev);
    case XLOG_BTREE_DEDUP:
        return bt_dedup(r, b, p, have_prev);
    }
    return bt_insert(r, block_id, b, p, have_prev);
}

/* RestoreBlockImage for an uncompressed image into out (FALLBACK: Python decompresses). */
static int
restore_into(const Rec *r, const Blk *b, uint8_t *out)
{
    unsigned long long hole_offset = b->hole_offset, hole_length = b->hole_length;
    Py_ssize_t len = b->img_len;
    if ((b->bimg_info & BKPIMAGE_COMPRESSED) || hole_length > BLCKSZ ||
        (unsigned long long)len != BLCKSZ - hole_length || hole_offset > (unsigned long long)len)
        return FALLBACK;
    memcpy(out, b->img, hole_offset);
    memset(out + hole_offset, 0, hole_length);
    memcpy(out + hole_offset + hole_length, b->img + hole_offset, (size_t)len - hole_offset);
    if (UPPER(out) != 0) /* !PageIsNew */
        set_lsn(out, r->end_lsn);
    return OK;
}

/* Block b of record r redone over prev (NULL: no previous version; prev_len its size; out
 * itself: in place) into out: OK, or FALLBACK where the Python redo must run (out is then
 * garbage: a chain redone in place redoes its records again, chain_redo). The dispatch of
 * XLogReadBufferForRedoExtended as in the Python redo_block: an APPLY image replaces the page;
 * will-init needs no previous version; BLK_NOTFOUND (all-zero page) and BLK_DONE (pd_lsn at
 * or past the record) leave it as it is; else the rmgr's redo, then pd_lsn = EndRecPtr.
 * These rmgrs have no always-init or zero-on-error blocks here (VISIBLE's VM page is left to
 * Python). */
static int
redo_into(const Rec *r, const Blk *b, const uint8_t *prev, Py_ssize_t prev_len, uint8_t *out)
{
    if (b->has_image && (b->bimg_info & BKPIMAGE_APPLY)) {
        if (r->rmgr == RM_GIST_ID) /* GiST redoes over its images: Python */
            return FALLBACK;
        return restore_into(r, b, out);
    }
    if (!handled(r->rmgr, r->info, b->block_id))
        return FALLBACK;
    int will_init = (b->fork_flags & BKPBLOCK_WILL_INIT) != 0;
    if (will_init)
        memset(out, 0, BLCKSZ);
    else {
        if (prev == NULL || prev_len != BLCKSZ)
            return FALLBACK; /* no previous version or a wrong size: Python raises */
        /* Every line pointer up to pd_lower must lie within the page: the code below trusts
         * it (Python raises or reads less on such a page; either way it is Python's case). */
        if (LOWER(prev) > BLCKSZ)
            return FALLBACK;
        if (prev != out)
            memcpy(out, prev, BLCKSZ);
        if (UPPER(prev) == 0 || r->end_lsn <= get_lsn(prev)) /* BLK_NOTFOUND, BLK_DONE */
            return OK;
    }
    if (apply(r, b->block_id, b, out, !will_init) != OK)
        return FALLBACK;
    if (!(r->rmgr == RM_HEAP2_ID && (r->info & XLOG_HEAP_OPMASK) == XLOG_HEAP2_VISIBLE))
        set_lsn(out, r->end_lsn);
    return OK;
}

static PyObject *
py_try_redo_block(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 3) {
        PyErr_SetString(PyExc_TypeError, "try_redo_block(record, block_id, page)");
        return NULL;
    }
    PyObject *page = args[2];
    long block_id = PyLong_Check(args[1]) ? PyLong_AsLong(args[1]) : -1;
    if (block_id == -1 && PyErr_Occurred())
        PyErr_Clear(); /* no such block: Python's error */
    Rec r;
    Blk b;
    if (block_id < 0 || read_record(args[0], &r) != OK || find_block(&r, (unsigned)block_id, &b) != 1)
        Py_RETURN_NONE;
    const uint8_t *prev = NULL;
    Py_ssize_t prev_len = 0;
    if (PyBytes_Check(page)) {
        prev = (const uint8_t *)PyBytes_AS_STRING(page);
        prev_len = PyBytes_GET_SIZE(page);
    }
    else if (PyByteArray_Check(page)) {
        prev = (const uint8_t *)PyByteArray_AS_STRING(page);
        prev_len = PyByteArray_GET_SIZE(page);
    }
    PyObject *out = PyBytes_FromStringAndSize(NULL, BLCKSZ);
    if (out == NULL)
        return NULL;
    if (redo_into(&r, &b, prev, prev_len, (uint8_t *)PyBytes_AS_STRING(out)) != OK) {
        Py_DECREF(out);
        Py_RETURN_NONE;
    }
    return out;
}

/* ---- records from their bytes ---------------------------------------------------------- */

/* The record bytes (XLogRecord header included) ending at end_lsn into r, pointing into data.
 * The layout is pg15/walrecord.h's (DecodeXLogRecord, src/backend/access/transam/xlogreader.c),
 * the one pg15/_walscan.c decodes with: FALLBACK for anything it would hand to the Python
 * decoder (which then decodes or raises, on the Python path). The CRC was checked when the
 * WAL was read. */
static int
decode_raw(const uint8_t *data, Py_ssize_t n, unsigned long long end_lsn, Rec *r)
{
    RecordLayout layout;
    if (!wr_record_layout(data, (int64_t)n, &layout))
        return FALLBACK;
    r->nblocks = layout.nheads;
    for (int i = 0; i < layout.nheads; i++) {
        const BlockHead *h = &layout.heads[i];
        Blk *b = &r->blocks[i];
        memset(b, 0, sizeof *b);
        b->block_id = (unsigned)h->block_id;
        b->fork_flags = (unsigned)h->fork_flags;
        b->fork = b->fork_flags & BKPBLOCK_FORK_MASK;
        b->spc = h->spc;
        b->db = h->db;
        b->rel = h->rel;
        b->blkno = h->blkno;
        if (h->has_image) {
            b->has_image = 1;
            b->img = data + h->image_off;
            b->img_len = (Py_ssize_t)h->bimg_len;
            b->hole_offset = h->hole_offset;
            b->hole_length = h->hole_length;
            b->bimg_info = h->bimg_info;
        }
        b->data = data + h->data_off;
        b->len = (Py_ssize_t)h->data_len;
    }
    r->xid = wr_le32(data + 4);
    r->info = data[16];
    r->rmgr = data[17];
    r->end_lsn = end_lsn;
    r->main = data + layout.main_off;
    r->main_len = (Py_ssize_t)layout.main_len;
    return OK;
}

/* ---- CLOG pages (pageserver/reconstruct/apply_delta.py xact_clog_change, redo/clog.py) --- */

#define RM_XACT_ID 1
#define XLOG_XACT_OPMASK 0x70
#define XLOG_XACT_COMMIT 0x00
#define XLOG_XACT_ABORT 0x20
#define XLOG_XACT_HAS_INFO 0x80
#define XACT_XINFO_HAS_DBINFO (1u << 0)
#define XACT_XINFO_HAS_SUBXACTS (1u << 1)
#define XACT_XINFO_HAS_RELFILENODES (1u << 2)
#define XACT_XINFO_HAS_INVALS (1u << 3)
#define XACT_XINFO_HAS_TWOPHASE (1u << 4)
#define XACT_XINFO_HAS_ORIGIN (1u << 5)
#define XACT_XINFO_HAS_GID (1u << 7)
#define XACT_XINFO_HAS_DROPPED_STATS (1u << 8)
#define CLOG_XACTS_PER_PAGE (BLCKSZ * 4)
#define TRANSACTION_STATUS_COMMITTED 1
#define TRANSACTION_STATUS_ABORTED 2

/* A counted array of `size`-byte items at *pos (ParseCommitRecord / ParseAbortRecord, xactdesc.c):
 * its items' offset, or -1 when it does not fit (the Python decoder raises). */
static Py_ssize_t
counted(const Rec *r, Py_ssize_t *pos, Py_ssize_t size)
{
    if (r->main_len - *pos < 4)
        return -1;
    int32_t n = (int32_t)g32(r->main, (size_t)*pos);
    if (n < 0 || (r->main_len - *pos - 4) / size < n)
        return -1;
    Py_ssize_t items = *pos + 4;
    *pos = items + (Py_ssize_t)n * size;
    return items;
}

/* The CLOG change of a plain COMMIT or ABORT record on page `pageno`: OK, or FALLBACK for
 * every other record (prepared transactions, other rmgrs) and every main data the Python
 * decoder (pg15/rmgr/xact.py _decode_finish) would reject. */
static int
clog_apply(const Rec *r, uint32_t pageno, uint8_t *page)
{
    unsigned op = r->info & XLOG_XACT_OPMASK;
    if (r->rmgr != RM_XACT_ID || (op != XLOG_XACT_COMMIT && op != XLOG_XACT_ABORT))
        return FALLBACK;
    Py_ssize_t pos = 8; /* xact_time */
    if (r->main_len < pos)
        return FALLBACK;
    uint32_t xinfo = 0;
    if (r->info & XLOG_XACT_HAS_INFO) {
        if (r->main_len - pos < 4)
            return FALLBACK;
        xinfo = g32(r->main, (size_t)pos);
        pos += 4;
    }
    if (xinfo & (XACT_XINFO_HAS_TWOPHASE | XACT_XINFO_HAS_GID))
        return FALLBACK;
    if (xinfo & XACT_XINFO_HAS_DBINFO) {
        if (r->main_len - pos < 8)
            return FALLBACK;
        pos += 8;
    }
    Py_ssize_t subxacts = -1, nsub = 0;
    if (xinfo & XACT_XINFO_HAS_SUBXACTS) {
        subxacts = counted(r, &pos, 4);
        if (subxacts < 0)
            return FALLBACK;
        nsub = (pos - subxacts) / 4;
    }
    if ((xinfo & XACT_XINFO_HAS_RELFILENODES) && counted(r, &pos, 12) < 0)
        return FALLBACK;
    if ((xinfo & XACT_XINFO_HAS_DROPPED_STATS) && counted(r, &pos, 12) < 0)
        return FALLBACK;
    if ((xinfo & XACT_XINFO_HAS_INVALS) && op == XLOG_XACT_COMMIT && counted(r, &pos, 16) < 0)
        return FALLBACK;
    if ((xinfo & XACT_XINFO_HAS_ORIGIN) && r->main_len - pos < 16)
        return FALLBACK;
    unsigned status = op == XLOG_XACT_COMMIT ? TRANSACTION_STATUS_COMMITTED
                                             : TRANSACTION_STATUS_ABORTED;
    /* TransactionIdSetStatusBit (clog.c) for the top xid (if any) and each subxact on the page */
    for (Py_ssize_t i = -1; i < nsub; i++) {
        uint32_t xid = i < 0 ? r->xid : g32(r->main, (size_t)(subxacts + 4 * i));
        if (i < 0 && xid == 0)
            continue;
        if (xid / CLOG_XACTS_PER_PAGE != pageno)
            continue;
        size_t byte = (xid % CLOG_XACTS_PER_PAGE) / 4;
        unsigned shift = (xid % 4) * 2;
        page[byte] = (uint8_t)((page[byte] & ~(3u << shift)) | (status << shift));
    }
    return OK;
}

/* ---- visibility-map pages (pageserver/redo/visibilitymap.py, visibilitymap.c) ---------- */

#define VM_MAPSIZE (BLCKSZ - MAXALIGN(SIZE_OF_PAGE_HEADER))
#define VM_HEAPBLOCKS_PER_PAGE (VM_MAPSIZE * 4)
#define VISIBILITYMAP_VALID_BITS 0x03
#define VISIBILITYMAP_ALL_FROZEN 0x02

static void
vm_locate(uint32_t heap_blkno, size_t *pos, unsigned *shift)
{
    uint32_t rem = heap_blkno % VM_HEAPBLOCKS_PER_PAGE;
    *pos = SIZE_OF_PAGE_HEADER + rem / 4;
    *shift = (rem % 4) * 2;
}

/* Block 0 (the VM page) of Heap2 VISIBLE, as the Python redo_block with heap2._visible /
 * vm_redo_visible: read with RBM_ZERO_ON_ERROR, BLK_DONE, PageInit of a new page, then
 * visibilitymap_set, which stamps pd_lsn only when the bits change. */
static int
vm_visible_into(const Rec *r, const Blk *b, const uint8_t *prev, Py_ssize_t prev_len, uint8_t *out)
{
    Blk heap;
    if ((b->fork_flags & BKPBLOCK_WILL_INIT) || r->main_len < 5 || find_block(r, 1, &heap) != 1)
        return FALLBACK;
    if (prev == NULL)
        memset(out, 0, BLCKSZ);
    else if (prev_len != BLCKSZ)
        return FALLBACK;
    else if (prev != out)
        memcpy(out, prev, BLCKSZ);
    if (r->end_lsn <= get_lsn(out)) /* BLK_DONE */
        return OK;
    if (UPPER(out) == 0)
        page_init(out, 0);
    if (r->end_lsn > get_lsn(out)) {
        size_t pos;
        unsigned shift, flags = r->main[4] & VISIBILITYMAP_VALID_BITS;
        vm_locate(heap.blkno, &pos, &shift);
        if (flags != ((out[pos] >> shift) & VISIBILITYMAP_VALID_BITS)) {
            out[pos] |= (uint8_t)(flags << shift);
            set_lsn(out, r->end_lsn);
        }
    }
    return OK;
}

/* The VM bits a Heap/Heap2 record clears without registering the VM page (vm_changes), on VM
 * block vm_blkno of relation (spc, db, rel): visibilitymap_clear, pd_lsn unchanged. OK when
 * the record clears something there, FALLBACK otherwise (SMGR truncation, or an error, in
 * Python). */
static int
vm_clear_into(const Rec *r, uint32_t spc, uint32_t db, uint32_t rel, uint32_t vm_blkno,
              const uint8_t *prev, Py_ssize_t prev_len, uint8_t *out)
{
    const Blk *targets[2];
    unsigned flags[2];
    int n = 0;
    if ((r->rmgr != RM_HEAP_ID && r->rmgr != RM_HEAP2_ID) || r->main_len == 0 || r->nblocks == 0)
        return FALLBACK;
    const Blk *first = &r->blocks[0];
    const uint8_t *d = r->main;
    unsigned op = r->info & XLOG_HEAP_OPMASK;
    if (r->rmgr == RM_HEAP_ID) {
        if (op == XLOG_HEAP_INSERT && r->main_len >= 3 && (d[2] & 0x01)) {
            targets[n] = first;
            flags[n++] = VISIBILITYMAP_VALID_BITS;
        }
        else if (op == XLOG_HEAP_DELETE && r->main_len >= 8 && (d[7] & 0x01)) {
            targets[n] = first;
            flags[n++] = VISIBILITYMAP_VALID_BITS;
        }
        else if ((op == XLOG_HEAP_UPDATE || op == XLOG_HEAP_HOT_UPDATE) && r->main_len >= 8) {
            const Blk *old = first;
            for (int k = 0; k < r->nblocks; k++)
                if (r->blocks[k].block_id == 1) {
                    old = &r->blocks[k];
                    break;
                }
            if (d[7] & 0x01) {
                targets[n] = old;
                flags[n++] = VISIBILITYMAP_VALID_BITS;
            }
            if (d[7] & 0x02) {
                targets[n] = first;
                flags[n++] = VISIBILITYMAP_VALID_BITS;
            }
        }
        else if (op == XLOG_HEAP_LOCK && r->main_len >= 8 && (d[7] & 0x01)) {
            targets[n] = first;
            flags[n++] = VISIBILITYMAP_ALL_FROZEN;
        }
    }
    else if (op == XLOG_HEAP2_MULTI_INSERT && (d[0] & 0x01)) {
        targets[n] = first;
        flags[n++] = VISIBILITYMAP_VALID_BITS;
    }
    else if (op == XLOG_HEAP2_LOCK_UPDATED && r->main_len >= 8 && (d[7] & 0x01)) {
        targets[n] = first;
        flags[n++] = VISIBILITYMAP_ALL_FROZEN;
    }
    int any = 0;
    for (int k = 0; k < n; k++) {
        const Blk *t = targets[k];
        if (t->spc != spc || t->db != db || t->rel != rel ||
            t->blkno / VM_HEAPBLOCKS_PER_PAGE != vm_blkno)
            continue;
        if (!any) {
            if (prev == NULL)
                memset(out, 0, BLCKSZ);
            else if (prev_len != BLCKSZ)
                return FALLBACK;
            else if (prev != out)
                memcpy(out, prev, BLCKSZ);
            any = 1;
        }
        if (UPPER(out) == 0)
            page_init(out, 0);
        size_t pos;
        unsigned shift;
        vm_locate(t->blkno, &pos, &shift);
        out[pos] &= (uint8_t)~((flags[k] & VISIBILITYMAP_VALID_BITS) << shift);
    }
    return any ? OK : FALLBACK;
}

/* ---- a key's whole chain (pageserver/reconstruct/range_rebuild.py) -------------------- */

/* Layer value tags (pageserver/storage/values.py) and the version entry of the layer index
 * (pageserver/storage/layers/blocks.py: lsn u64, tag u8, block u32, offset u32, length u32,
 * big-endian). */
#define TAG_IMAGE 1
#define TAG_DELTA 2
#define TAG_DELTA_INIT 3
#define TAG_TOMBSTONE 4
#define VERSION_ENTRY 21
#define VISIBILITYMAP_FORKNUM 2
#define SLRU_PAGES_PER_SEGMENT 32

static inline uint32_t
be32(const uint8_t *p)
{
    return ((uint32_t)p[0] << 24) | ((uint32_t)p[1] << 16) | ((uint32_t)p[2] << 8) | p[3];
}

static inline uint64_t
le64(const uint8_t *p)
{
    return (uint64_t)g32(p, 0) | ((uint64_t)g32(p, 4) << 32);
}

typedef struct {
    uint64_t lsn;
    int tag;
    const uint8_t *value; /* the encoded value: tag byte, then the payload */
    Py_ssize_t len;
} Version;

/* The versions of the parts with floor < LSN <= lsn, in part order (oldest part first). Each
 * part is (entries, first block, blocks, floor): the key's version entries of one layer, the
 * number of the first block they reference and those blocks decompressed in order. 1 when
 * gathered, 0 when something does not check out (LayerFile._value_in raises on the Python
 * path), -1 on a Python error. */
static int
gather(PyObject *parts, uint64_t lsn, Version **out, Py_ssize_t *count)
{
    Py_ssize_t cap = 0, n = 0;
    Version *v = NULL;
    if (!PyList_Check(parts))
        return 0;
    for (Py_ssize_t i = 0; i < PyList_GET_SIZE(parts); i++) {
        PyObject *part = PyList_GET_ITEM(parts, i);
        Py_buffer entries;
        unsigned long long first_block, floor_plus_one;
        if (!PyTuple_Check(part) || PyTuple_GET_SIZE(part) != 4 ||
            !PyList_Check(PyTuple_GET_ITEM(part, 2)) ||
            as_uint(PyTuple_GET_ITEM(part, 1), &first_block) != OK ||
            as_uint(PyTuple_GET_ITEM(part, 3), &floor_plus_one) != OK)
            goto bad;
        PyObject *blocks = PyTuple_GET_ITEM(part, 2);
        if (PyObject_GetBuffer(PyTuple_GET_ITEM(part, 0), &entries, PyBUF_SIMPLE) < 0) {
            PyErr_Clear();
            goto bad;
        }
        const uint8_t *e = (const uint8_t *)entries.buf;
        Py_ssize_t nentries = entries.len / VERSION_ENTRY;
        int ok = entries.len % VERSION_ENTRY == 0;
        for (Py_ssize_t k = 0; ok && k < nentries; k++, e += VERSION_ENTRY) {
            uint64_t vlsn = ((uint64_t)be32(e) << 32) | be32(e + 4);
            if (vlsn > lsn || vlsn + 1 <= floor_plus_one) /* floor < vlsn <= lsn */
                continue;
            uint32_t block = be32(e + 9), offset = be32(e + 13), length = be32(e + 17);
            unsigned long long b = (unsigned long long)block - first_block;
            if (block < first_block || b >= (unsigned long long)PyList_GET_SIZE(blocks)) {
                ok = 0;
                break;
            }
            PyObject *data = PyList_GET_ITEM(blocks, (Py_ssize_t)b);
            if (!PyBytes_Check(data) || length == 0 ||
                (uint64_t)offset + length > (uint64_t)PyBytes_GET_SIZE(data) ||
                (uint8_t)PyBytes_AS_STRING(data)[offset] != e[8]) {
                ok = 0;
                break;
            }
            if (n == cap) {
                cap = cap ? 2 * cap : 64;
                Version *grown = PyMem_Realloc(v, (size_t)cap * sizeof *v);
                if (grown == NULL) {
                    PyBuffer_Release(&entries);
                    PyMem_Free(v);
                    PyErr_NoMemory();
                    return -1;
                }
                v = grown;
            }
            v[n].lsn = vlsn;
            v[n].tag = e[8];
            v[n].value = (const uint8_t *)PyBytes_AS_STRING(data) + offset;
            v[n].len = length;
            n++;
        }
        PyBuffer_Release(&entries);
        if (!ok)
            goto bad;
    }
    *out = v;
    *count = n;
    return 1;
bad:
    PyMem_Free(v);
    return 0;
}

/* (page or None, [(lsn, will_init, record), ...]): the deltas from i on, for the Python redo
 * to continue the chain (pageserver/reconstruct/apply_delta.py continue_chain). */
static PyObject *
hand_back(const Version *v, Py_ssize_t i, Py_ssize_t n, PyObject *page)
{
    PyObject *rest = PyList_New(n - i);
    if (rest == NULL)
        return NULL;
    for (Py_ssize_t k = i; k < n; k++) {
        PyObject *item = Py_BuildValue("(KOy#)", (unsigned long long)v[k].lsn,
                                       v[k].tag == TAG_DELTA_INIT ? Py_True : Py_False,
                                       (const char *)v[k].value + 1, v[k].len - 1);
        if (item == NULL) {
            Py_DECREF(rest);
            return NULL;
        }
        PyList_SET_ITEM(rest, k - i, item);
    }
    return Py_BuildValue("(ON)", page, rest);
}

/* A key's chain: what its versions make of it (chain_plan), then its redo (chain_redo). Neither
 * touches a Python object, so a run of keys is redone without the GIL (rebuild_run). */
enum { CHAIN_FALSE, CHAIN_NONE, CHAIN_BASE, CHAIN_REDO };
enum { PAGE_NONE, PAGE_BASE, PAGE_OUT };

typedef struct {
    int kind;             /* CHAIN_*: False (the per-key path), None, the base as it is, redo */
    const uint8_t *base;  /* the image the chain starts from, without its tag (NULL: none) */
    Py_ssize_t base_len;
    Py_ssize_t first_delta;
    int is_clog;
    uint32_t f2, f3, f4, f6;
    unsigned f5;
    Py_ssize_t done; /* chain_redo: the versions from done on are left to the Python redo */
    int page;        /* chain_redo: PAGE_* where the page is (PAGE_OUT: in its out buffer) */
} Chain;

/* The plan of a key's value at lsn from its versions v[0..n) (oldest first, each floor < LSN
 * <= lsn); `key`: the 18 bytes of the key. */
static void
chain_plan(const uint8_t *key, const Version *v, Py_ssize_t n, int base_known, Chain *ch)
{
    memset(ch, 0, sizeof *ch);
    ch->kind = CHAIN_FALSE;
    /* The chain's base: the newest image (the image layer's is the first part), will_init
     * delta or tombstone among the versions; else nothing when base_known (an image layer
     * covers the key without holding it, or there is no ancestor); else the ancestor's: the
     * reference path. */
    Py_ssize_t start = n;
    while (start > 0 && v[start - 1].tag == TAG_DELTA)
        start--;
    ch->first_delta = start;
    if (start > 0) {
        const Version *ender = &v[start - 1];
        if (ender->tag == TAG_IMAGE) {
            ch->base = ender->value + 1;
            ch->base_len = ender->len - 1;
        }
        else if (ender->tag == TAG_DELTA_INIT)
            ch->first_delta = start - 1;
        else if (ender->tag != TAG_TOMBSTONE) /* an unknown tag: decode_value raises */
            return;
    }
    else if (!base_known)
        return;
    if (ch->first_delta == n) { /* no deltas: the base as it is */
        ch->kind = ch->base != NULL ? CHAIN_BASE : CHAIN_NONE;
        return;
    }
    ch->f2 = be32(key + 1), ch->f3 = be32(key + 5), ch->f4 = be32(key + 9);
    ch->f6 = be32(key + 14), ch->f5 = key[13];
    int is_rel = key[0] == 0 && ch->f4 != 0 && ch->f6 != 0xFFFFFFFFu;
    /* (a segment number past what 32-bit xids reach would overflow the page number: Python) */
    ch->is_clog = key[0] == 1 && ch->f2 == 0 && ch->f3 == 1 && ch->f6 != 0xFFFFFFFFu &&
                  ch->f4 < (1u << 26) && ch->f6 < SLRU_PAGES_PER_SEGMENT;
    if (!is_rel && !ch->is_clog) /* other SLRUs, or not a page key (Python raises) */
        return;
    if (ch->base == NULL && v[ch->first_delta].tag != TAG_DELTA_INIT && !ch->is_clog &&
        ch->f5 != VISIBILITYMAP_FORKNUM) /* no base: Python raises */
        return;
    ch->kind = CHAIN_REDO;
}

/* A CHAIN_REDO chain's deltas v[first_delta..limit) redone in place in out (BLCKSZ bytes),
 * each over the page the one before left there (no copy of the page per record): the index
 * of the first one not redone. *in_buf: the page is in out; *have: there is a page (in out,
 * else the base); *spoiled: the record C gave up on may have written part of itself into the
 * page in out, which is then not the page before it. */
static Py_ssize_t
chain_apply(const Chain *ch, const Version *v, Py_ssize_t limit, uint8_t *out, int *in_buf,
            int *have, int *spoiled)
{
    const uint32_t f2 = ch->f2, f3 = ch->f3, f4 = ch->f4, f6 = ch->f6;
    const unsigned f5 = ch->f5;
    *in_buf = 0;
    *have = ch->base != NULL;
    *spoiled = 0;
    if (ch->base == NULL && v[ch->first_delta].tag != TAG_DELTA_INIT) {
        memset(out, 0, BLCKSZ); /* SLRU and VM pages start from zeros */
        *in_buf = *have = 1;
    }
    Py_ssize_t i;
    for (i = ch->first_delta; i < limit; i++) {
        const Version *d = &v[i];
        Rec r;
        if (d->tag == TAG_DELTA_INIT)
            *have = *in_buf = 0;
        if (d->len < 9 || decode_raw(d->value + 9, d->len - 9, d->lsn, &r) != OK)
            break;
        const uint8_t *prev = NULL;
        Py_ssize_t prev_len = 0;
        if (*have) {
            prev = *in_buf ? out : ch->base;
            prev_len = *in_buf ? BLCKSZ : ch->base_len;
        }
        int done;
        if (ch->is_clog) {
            if (*have && prev_len != BLCKSZ)
                break;
            if (!*have)
                memset(out, 0, BLCKSZ);
            else if (prev != out)
                memcpy(out, prev, BLCKSZ);
            done = clog_apply(&r, f4 * SLRU_PAGES_PER_SEGMENT + f6, out);
        }
        else {
            const Blk *b = NULL;
            for (int k = 0; k < r.nblocks; k++) {
                const Blk *c = &r.blocks[k];
                if (c->spc == f2 && c->db == f3 && c->rel == f4 && c->fork == f5 &&
                    c->blkno == f6) {
                    b = c;
                    break;
                }
            }
            if (b == NULL)
                done = f5 == VISIBILITYMAP_FORKNUM
                           ? vm_clear_into(&r, f2, f3, f4, f6, prev, prev_len, out)
                           : FALLBACK;
            else if (f5 == VISIBILITYMAP_FORKNUM && r.rmgr == RM_HEAP2_ID &&
                     (r.info & XLOG_HEAP_OPMASK) == XLOG_HEAP2_VISIBLE && b->block_id == 0 &&
                     !(b->has_image && (b->bimg_info & BKPIMAGE_APPLY)))
                done = vm_visible_into(&r, b, prev, prev_len, out);
            else
                done = redo_into(&r, b, prev, prev_len, out);
        }
        if (done != OK) {
            *spoiled = *in_buf;
            break;
        }
        *in_buf = *have = 1;
    }
    return i;
}

/* A CHAIN_REDO chain's deltas redone into out (BLCKSZ bytes): sets ch->page and ch->done.
 * Where C gives up on a record after writing part of it into the page, the records before it
 * are redone again (they did not fail, and do the same again): the Python redo goes on from
 * the page as it was before that record. */
static void
chain_redo(Chain *ch, const Version *v, Py_ssize_t n, uint8_t *out)
{
    int in_buf, have, spoiled;
    Py_ssize_t i = chain_apply(ch, v, n, out, &in_buf, &have, &spoiled);
    while (spoiled)
        i = chain_apply(ch, v, i, out, &in_buf, &have, &spoiled);
    ch->page = in_buf ? PAGE_OUT : have ? PAGE_BASE : PAGE_NONE;
    ch->done = i;
}

/* The key's value as rebuild_page returns it: the value, None, False (the per-key path) or
 * (page, rest) (see rebuild_page in _redo.pyi); NULL on a Python error. `out`: the page a
 * CHAIN_REDO chain was redone into (a new reference, taken), NULL for any other. */
static PyObject *
chain_value(const Chain *ch, const Version *v, Py_ssize_t n, PyObject *out)
{
    PyObject *page;
    switch (ch->kind) {
    case CHAIN_FALSE:
        return Py_NewRef(Py_False);
    case CHAIN_NONE:
        return Py_NewRef(Py_None);
    case CHAIN_BASE:
        return PyBytes_FromStringAndSize((const char *)ch->base, ch->base_len);
    }
    if (ch->page == PAGE_OUT)
        page = out;
    else {
        Py_DECREF(out);
        page = ch->page == PAGE_BASE
                   ? PyBytes_FromStringAndSize((const char *)ch->base, ch->base_len)
                   : Py_NewRef(Py_None);
        if (page == NULL)
            return NULL;
    }
    if (ch->done == n)
        return page;
    PyObject *result = hand_back(v, ch->done, n, page);
    Py_DECREF(page);
    return result;
}

/* A key's value at lsn from its versions v[0..n), with the GIL (rebuild_page). */
static PyObject *
rebuild_versions(const uint8_t *key, const Version *v, Py_ssize_t n, int base_known)
{
    Chain ch;
    chain_plan(key, v, n, base_known, &ch);
    if (ch.kind != CHAIN_REDO)
        return chain_value(&ch, v, n, NULL);
    PyObject *out = PyBytes_FromStringAndSize(NULL, BLCKSZ);
    if (out == NULL)
        return NULL;
    chain_redo(&ch, v, n, (uint8_t *)PyBytes_AS_STRING(out));
    return chain_value(&ch, v, n, out);
}

/* rebuild_page(key, lsn, parts, base_known): see _redo.pyi. */
static PyObject *
py_rebuild_page(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    unsigned long long lsn;
    if (nargs != 4 || !PyBytes_Check(args[0]) || PyBytes_GET_SIZE(args[0]) != 18 ||
        as_uint(args[1], &lsn) != OK) {
        PyErr_SetString(PyExc_TypeError, "rebuild_page(key, lsn, parts, base_known)");
        return NULL;
    }
    int base_known = PyObject_IsTrue(args[3]);
    if (base_known < 0)
        return NULL;
    Version *v = NULL;
    Py_ssize_t n = 0;
    int got = gather(args[2], lsn, &v, &n);
    if (got < 0)
        return NULL;
    if (got == 0)
        Py_RETURN_FALSE;
    PyObject *result =
        rebuild_versions((const uint8_t *)PyBytes_AS_STRING(args[0]), v, n, base_known);
    PyMem_Free(v);
    return result;
}

/* ---- a run of keys (pageserver/reconstruct/range_rebuild.py, _Cursor and rebuild_range's
 * per-key loop the reference) ----------------------------------------------------------------
 *
 * rebuild_run(keys, lsn, deltas, images, tiles, in_memory, base_known) -> [value, ...]: see
 * _redo.pyi. A layer is (keys, firsts, file, versions_at, narrow, lsn_base, lsn_end,
 * read_block, state): its key table (LayerFile._keys), its mapped file whose version table
 * (">QBIII" entries, or narrow ">IBHIH" ones above lsn_base) starts at versions_at, the
 * layer's end LSN, read_block(b) -> the block decompressed and checked, and state, a list
 * [i, held block number, held block] the walk keeps between calls (_Cursor's i and blocks). */

#define NARROW_ENTRY 13
#define KEY_BYTES 18

typedef struct {
    Py_buffer keys, firsts, file;
    Py_ssize_t n_keys, versions_at, esize;
    uint64_t lsn_base, lsn_end, in_file;
    int narrow, open;
    PyObject *read_block, *state;
    Py_ssize_t i;
    long long held_no;
    PyObject *held;          /* borrowed from state until written back */
    PyObject **blocks;       /* the blocks of the current key (new references) */
    Py_ssize_t n_blocks, cap_blocks;
    long long first_block;
    Py_ssize_t v_start, v_stop; /* the current key's version entries used */
    /* Blocks read here, not through read_block (LayerFile.run_input's `native`): where its
     * block table starts and its block count, this thread's zstd decompress method, the
     * file's `_decompressor_of` (None where it has no dictionary; asked once a call, at its
     * first dictionary block: asked for every layer of a walk, a thread's few kept
     * dictionary decompressors were made anew at every walk), the blocks being prefetched
     * for read_block (none read here while any are: it takes them), the fault-around window
     * and the span of compressed bytes copied out, unmapped at RELEASE_SPAN (blocks.py). */
    int native;
    Py_ssize_t blocks_at, file_blocks, fault_around, release_span, span_lo, span_hi;
    PyObject *plain, *dict_of, *ahead;
    PyObject *dict; /* the dictionary blocks' decompress method, once asked (owned) */
} RunLayer;

#define BLOCK_ENTRY 20 /* a block table entry: offset u64, compressed length, length, CRC-32C */

/* The span of compressed bytes copied out of the file unmapped (LayerFile._release: their
 * pages stay in the page cache; mapped, every block ever read would count in the RSS). */
static void
run_release_span(RunLayer *c)
{
    if (c->span_hi > c->span_lo) {
        Py_ssize_t lo = c->span_lo - c->span_lo % c->fault_around;
        Py_ssize_t hi = c->span_hi + (c->fault_around - c->span_hi % c->fault_around) %
                                         c->fault_around;
        if (hi > c->file.len)
            hi = c->file.len;
        if (hi > lo)
            (void)madvise((char *)c->file.buf + lo, (size_t)(hi - lo), MADV_DONTNEED);
    }
    c->span_lo = c->span_hi = 0;
}

/* Block b of a layer read as LayerFile._block reads it (entry, CRC-32C, zstd, length) with no
 * Python of its own between them: a 1% checkout's scattered pages spent more in read_block's
 * bookkeeping than in zstd (py-spy). NULL with no error set where anything is off: the caller
 * asks read_block, which raises the file's error; NULL with one set for what is not the
 * data's (KeyboardInterrupt, SystemExit): not swallowed. */
static PyObject *
run_read_native(RunLayer *c, long long b)
{
    if (b < 0 || b >= c->file_blocks)
        return NULL;
    const uint8_t *e = (const uint8_t *)c->file.buf + c->blocks_at + (Py_ssize_t)b * BLOCK_ENTRY;
    uint64_t off = ((uint64_t)be32(e) << 32) | be32(e + 4);
    uint32_t clen = be32(e + 8), ulen = be32(e + 12), crc = be32(e + 16);
    if (off > (uint64_t)c->file.len || clen > (uint64_t)c->file.len - off)
        return NULL;
    const uint8_t *src = (const uint8_t *)c->file.buf + off;
    if (crc32c_of(src, clen) != crc)
        return NULL;
    PyObject *dec = c->plain;
    if (b > 0 && c->dict_of != Py_None) {
        if (c->dict == NULL) {
            PyObject *d = PyObject_CallFunction(c->dict_of, "L", b);
            c->dict = d == NULL ? NULL : PyObject_GetAttrString(d, "decompress");
            Py_XDECREF(d);
            if (c->dict == NULL) {
                if (PyErr_ExceptionMatches(PyExc_Exception))
                    PyErr_Clear();
                return NULL;
            }
        }
        dec = c->dict;
    }
    PyObject *raw = PyBytes_FromStringAndSize((const char *)src, clen);
    PyObject *size = PyLong_FromUnsignedLong(ulen);
    PyObject *out = NULL;
    if (raw != NULL && size != NULL)
        out = PyObject_CallFunctionObjArgs(dec, raw, size, NULL);
    Py_XDECREF(raw);
    Py_XDECREF(size);
    if (out == NULL || !PyBytes_Check(out) || PyBytes_GET_SIZE(out) != (Py_ssize_t)ulen) {
        if (out == NULL && PyErr_ExceptionMatches(PyExc_Exception))
            PyErr_Clear();
        Py_XDECREF(out);
        return NULL;
    }
    Py_ssize_t lo = (Py_ssize_t)off, hi = lo + (Py_ssize_t)clen;
    if (c->span_hi > c->span_lo && lo >= c->span_lo && lo <= c->span_hi + c->fault_around) {
        if (hi > c->span_hi)
            c->span_hi = hi;
    }
    else {
        run_release_span(c);
        c->span_lo = lo;
        c->span_hi = hi;
    }
    if (c->span_hi - c->span_lo >= c->release_span)
        run_release_span(c);
    return out;
}

static void
run_layer_release(RunLayer *c)
{
    for (Py_ssize_t k = 0; k < c->n_blocks; k++)
        Py_XDECREF(c->blocks[k]);
    PyMem_Free(c->blocks);
    if (c->open) {
        if (c->native)
            run_release_span(c);
        Py_CLEAR(c->dict);
        PyBuffer_Release(&c->keys);
        PyBuffer_Release(&c->firsts);
        PyBuffer_Release(&c->file);
    }
}

static int
run_layer_open(PyObject *t, RunLayer *c)
{
    memset(c, 0, sizeof *c);
    unsigned long long base, end;
    c->blocks_at = -1;
    if (!PyArg_ParseTuple(t, "y*y*y*npKKOO!|nnOOO!nn:rebuild_run layer", &c->keys, &c->firsts,
                          &c->file, &c->versions_at, &c->narrow, &base, &end, &c->read_block,
                          &PyList_Type, &c->state, &c->blocks_at, &c->file_blocks, &c->plain,
                          &c->dict_of, &PyDict_Type, &c->ahead, &c->fault_around,
                          &c->release_span))
        return -1;
    c->open = 1;
    if (c->blocks_at >= 0) {
        if (c->ahead == NULL || c->file_blocks < 0 || c->fault_around < 1 ||
            c->release_span < 0 ||
            c->file_blocks > (c->file.len - c->blocks_at) / BLOCK_ENTRY ||
            !PyCallable_Check(c->plain) ||
            (c->dict_of != Py_None && !PyCallable_Check(c->dict_of))) {
            PyErr_SetString(PyExc_ValueError, "rebuild_run: inconsistent native block reads");
            return -1;
        }
        c->native = 1;
    }
    c->lsn_base = base;
    c->lsn_end = end;
    c->esize = c->narrow ? NARROW_ENTRY : VERSION_ENTRY;
    c->n_keys = c->keys.len / KEY_BYTES;
    if (c->firsts.len != (c->n_keys + 1) * 8 || c->versions_at < 0 ||
        c->versions_at > c->file.len || PyList_GET_SIZE(c->state) != 3) {
        PyErr_SetString(PyExc_ValueError, "rebuild_run: inconsistent layer index");
        return -1;
    }
    c->in_file = (uint64_t)(c->file.len - c->versions_at) / (uint64_t)c->esize;
    long long i = PyLong_AsLongLong(PyList_GET_ITEM(c->state, 0));
    long long held_no = PyLong_AsLongLong(PyList_GET_ITEM(c->state, 1));
    if (PyErr_Occurred())
        return -1;
    if (i < 0 || i > c->n_keys) {
        PyErr_SetString(PyExc_ValueError, "rebuild_run: layer position out of range");
        return -1;
    }
    c->i = (Py_ssize_t)i;
    c->held_no = held_no;
    c->held = PyList_GET_ITEM(c->state, 2);
    return 0;
}

/* Write the walk's position and held block back into the layer's state. */
static int
run_layer_save(RunLayer *c)
{
    PyObject *i = PyLong_FromSsize_t(c->i), *no = PyLong_FromLongLong(c->held_no);
    if (i == NULL || no == NULL) {
        Py_XDECREF(i);
        Py_XDECREF(no);
        return -1;
    }
    PyList_SetItem(c->state, 0, i);
    PyList_SetItem(c->state, 1, no);
    PyList_SetItem(c->state, 2, Py_NewRef(c->held));
    return 0;
}

static inline const uint8_t *
run_key(const RunLayer *c, Py_ssize_t i)
{
    return (const uint8_t *)c->keys.buf + i * KEY_BYTES;
}

static inline uint64_t
run_first(const RunLayer *c, Py_ssize_t i)
{
    uint64_t v;
    memcpy(&v, (const char *)c->firsts.buf + 8 * i, 8);
    return v;
}

static inline const uint8_t *
run_entry(const RunLayer *c, uint64_t v)
{
    return (const uint8_t *)c->file.buf + c->versions_at + v * (uint64_t)c->esize;
}

static inline uint64_t
run_lsn(const RunLayer *c, const uint8_t *e)
{
    if (c->narrow)
        return c->lsn_base + be32(e);
    return ((uint64_t)be32(e) << 32) | be32(e + 4);
}

static inline int
run_tag(const RunLayer *c, const uint8_t *e)
{
    return e[c->narrow ? 4 : 8];
}

static inline uint32_t
run_block(const RunLayer *c, const uint8_t *e)
{
    return c->narrow ? ((uint32_t)e[5] << 8 | e[6]) : be32(e + 9);
}

static inline uint32_t
run_offset(const RunLayer *c, const uint8_t *e)
{
    return c->narrow ? be32(e + 7) : be32(e + 13);
}

static inline uint32_t
run_length(const RunLayer *c, const uint8_t *e)
{
    return c->narrow ? ((uint32_t)e[11] << 8 | e[12]) : be32(e + 17);
}

/* -1 if the key at the layer's position sorts before key, 0 if equal, 1 after (or past the
 * end: _PAST_END). */
static inline int
run_next_cmp(const RunLayer *c, const uint8_t *key)
{
    if (c->i >= c->n_keys)
        return 1;
    int r = memcmp(run_key(c, c->i), key, KEY_BYTES);
    return r < 0 ? -1 : r > 0;
}

/* Index of the newest version in [lo, hi) with LSN <= lsn, or lo - 1 (last_at_or_below). */
static int64_t
run_at_or_below(const RunLayer *c, int64_t lo, int64_t hi, uint64_t lsn)
{
    if (hi > lo && run_lsn(c, run_entry(c, (uint64_t)hi - 1)) <= lsn)
        return hi - 1;
    while (lo < hi) {
        int64_t mid = lo + (hi - lo) / 2;
        if (run_lsn(c, run_entry(c, (uint64_t)mid)) <= lsn)
            lo = mid + 1;
        else
            hi = mid;
    }
    return lo - 1;
}

/* _Cursor.versions: 1 with the key's versions in (floor, lsn) (floor -1: none) from the
 * newest chain start on (`whole`: all) in v_start..v_stop and their blocks read, *based set;
 * 0 if the layer holds none; -1 on a Python error; -2 when the entries are out of order (the
 * per-key path decides). */
/* The blocks the versions gathered for a run's keys point into: a layer's blocks of its
 * previous key are kept here, not released, until those keys are redone (rebuild_run). */
typedef struct {
    PyObject **items;
    Py_ssize_t n, cap, bytes;
} Kept;

static void
kept_clear(Kept *k)
{
    for (Py_ssize_t i = 0; i < k->n; i++)
        Py_DECREF(k->items[i]);
    k->n = 0;
    k->bytes = 0;
}

static int
run_versions(RunLayer *c, const uint8_t *key, int64_t floor, uint64_t lsn, int whole,
             int *based, Kept *kept)
{
    int cmp = run_next_cmp(c, key);
    if (cmp > 0)
        return 0;
    if (cmp < 0) { /* lower_bound from the position: keys ascend */
        Py_ssize_t lo = c->i, hi = c->n_keys;
        while (lo < hi) {
            Py_ssize_t mid = lo + (hi - lo) / 2;
            if (memcmp(run_key(c, mid), key, KEY_BYTES) < 0)
                lo = mid + 1;
            else
                hi = mid;
        }
        c->i = lo;
        if (run_next_cmp(c, key) != 0)
            return 0;
    }
    uint64_t vfirst = run_first(c, c->i), vstop = run_first(c, c->i + 1);
    c->i++;
    if (vstop < vfirst || vstop > c->in_file) {
        PyErr_SetString(PyExc_ValueError, "rebuild_run: version entry past the file");
        return -1;
    }
    int64_t start = (int64_t)vfirst, stop = (int64_t)vstop;
    if (floor >= 0)
        start = run_at_or_below(c, (int64_t)vfirst, (int64_t)vstop, (uint64_t)floor) + 1;
    stop = run_at_or_below(c, (int64_t)vfirst, (int64_t)vstop, lsn) + 1;
    if (start >= stop)
        return 0;
    /* chain_start: the newest entry whose tag is not TAG_DELTA */
    int64_t s = stop - 1;
    while (s >= start && run_tag(c, run_entry(c, (uint64_t)s)) == TAG_DELTA)
        s--;
    *based = s >= start;
    if (s > start && !whole)
        start = s;
    long long first = run_block(c, run_entry(c, (uint64_t)start));
    long long last = run_block(c, run_entry(c, (uint64_t)stop - 1));
    if (last < first)
        return -2;
    Py_ssize_t nb = (Py_ssize_t)(last - first + 1);
    if (kept->n + c->n_blocks > kept->cap) {
        Py_ssize_t cap = 2 * (kept->n + c->n_blocks) + 16;
        PyObject **grown = PyMem_Realloc(kept->items, (size_t)cap * sizeof *grown);
        if (grown == NULL) {
            PyErr_NoMemory();
            return -1;
        }
        kept->items = grown;
        kept->cap = cap;
    }
    PyObject **blocks = PyMem_Calloc((size_t)nb, sizeof *blocks);
    if (blocks == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    for (Py_ssize_t k = 0; k < nb; k++) {
        long long b = first + k;
        PyObject *got;
        if (b == c->held_no && c->held != Py_None)
            got = Py_NewRef(c->held);
        else if (c->native && PyDict_GET_SIZE(c->ahead) == 0 &&
                 ((got = run_read_native(c, b)) != NULL || PyErr_Occurred()))
            ; /* read, or an error that is not the data's: raised (got NULL) */
        else
            got = PyObject_CallFunction(c->read_block, "L", b);
        if (got == NULL) {
            for (Py_ssize_t j = 0; j < k; j++)
                Py_DECREF(blocks[j]);
            PyMem_Free(blocks);
            return -1;
        }
        blocks[k] = got;
    }
    for (Py_ssize_t k = 0; k < c->n_blocks; k++) { /* the gathered versions point into them */
        kept->bytes += PyBytes_Check(c->blocks[k]) ? PyBytes_GET_SIZE(c->blocks[k]) : 0;
        kept->items[kept->n++] = c->blocks[k];
    }
    PyMem_Free(c->blocks);
    c->blocks = blocks;
    c->n_blocks = nb;
    c->first_block = first;
    c->held_no = last;
    c->held = blocks[nb - 1]; /* kept alive by blocks until replaced */
    c->v_start = (Py_ssize_t)start;
    c->v_stop = (Py_ssize_t)stop;
    return 1;
}

/* Append layer c's current versions with floor_plus_one <= LSN + 1, LSN <= lsn to v (gather
 * for one part): 1, 0 on an invalid value reference, -1 on no memory. */
static int
run_gather(const RunLayer *c, uint64_t floor_plus_one, uint64_t lsn, Version **v,
           Py_ssize_t *n, Py_ssize_t *cap)
{
    for (Py_ssize_t k = c->v_start; k < c->v_stop; k++) {
        const uint8_t *e = run_entry(c, (uint64_t)k);
        uint64_t vlsn = run_lsn(c, e);
        if (vlsn > lsn || vlsn + 1 <= floor_plus_one)
            continue;
        long long b = (long long)run_block(c, e) - c->first_block;
        uint32_t offset = run_offset(c, e), length = run_length(c, e);
        if (b < 0 || b >= c->n_blocks)
            return 0;
        PyObject *data = c->blocks[b];
        if (!PyBytes_Check(data) || length == 0 ||
            (uint64_t)offset + length > (uint64_t)PyBytes_GET_SIZE(data) ||
            (uint8_t)PyBytes_AS_STRING(data)[offset] != run_tag(c, e))
            return 0;
        if (*n == *cap) {
            *cap = *cap ? 2 * *cap : 64;
            Version *grown = PyMem_Realloc(*v, (size_t)*cap * sizeof **v);
            if (grown == NULL) {
                PyErr_NoMemory();
                return -1;
            }
            *v = grown;
        }
        (*v)[*n].lsn = vlsn;
        (*v)[*n].tag = run_tag(c, e);
        (*v)[*n].value = (const uint8_t *)PyBytes_AS_STRING(data) + offset;
        (*v)[*n].len = length;
        (*n)++;
    }
    return 1;
}

typedef struct {
    const uint8_t *start, *end; /* keys (18 bytes), or any bytes as KeyRange bounds */
    Py_ssize_t start_len, end_len;
    uint64_t lsn;
    Py_ssize_t image; /* index into the image layers */
} RunTile;

/* bound <= key, as bytes compare (key: KEY_BYTES long) */
static inline int
bound_at_or_below(const uint8_t *bound, Py_ssize_t len, const uint8_t *key)
{
    int c = memcmp(bound, key, len < KEY_BYTES ? (size_t)len : KEY_BYTES);
    return c < 0 || (c == 0 && len <= KEY_BYTES);
}

/* One key of a run: its chain, its versions (v_off, n: in the run's gathered versions) and
 * the page its redo goes into (a new bytes object, CHAIN_REDO only). */
typedef struct {
    Chain ch;
    Py_ssize_t v_off, n;
    PyObject *out;
} RunKey;

/* Bytes of blocks a run keeps for the keys gathered before it redoes them (the versions of a
 * hot page's long chain can fill many blocks): memory stays bounded whatever the keys. The
 * tests lower it (run_kept_bytes) so that runs split after every key. */
static Py_ssize_t run_kept_limit = 32 << 20;
#define RUN_KEPT_BYTES run_kept_limit

/* run_kept_bytes(n) -> the limit before: see RUN_KEPT_BYTES. */
static PyObject *
py_run_kept_bytes(PyObject *self, PyObject *arg)
{
    Py_ssize_t n = PyLong_AsSsize_t(arg);
    if (n == -1 && PyErr_Occurred())
        return NULL;
    if (n < 1) {
        PyErr_SetString(PyExc_ValueError, "run_kept_bytes: at least 1");
        return NULL;
    }
    Py_ssize_t before = run_kept_limit;
    run_kept_limit = n;
    return PyLong_FromSsize_t(before);
}

/* With `into` (a writable buffer of len(keys) records of `stride` bytes, BLCKSZ unless
 * given), a key whose value is a whole page is written at its place in it (key k's at the
 * end of record k: k * stride + stride - BLCKSZ) and its value is True: no bytes object per
 * page, and no copy of it into the basebackup's chunk after (pageserver/reconstruct/
 * range_rebuild.py PageFill; a delta's fork member, whose records are a block number and a
 * page, is filled so in place); other values come as without it. */
static PyObject *
py_rebuild_run(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    unsigned long long lsn;
    if (nargs < 7 || nargs > 9 || !PyList_Check(args[0]) || as_uint(args[1], &lsn) != OK ||
        !PyList_Check(args[2]) || !PyList_Check(args[3]) || !PyList_Check(args[4]) ||
        !PyAnySet_Check(args[5])) {
        PyErr_SetString(PyExc_TypeError, "rebuild_run(keys, lsn, deltas, images, tiles, "
                                         "in_memory, base_known, into=None, stride=BLCKSZ)");
        return NULL;
    }
    int root = PyObject_IsTrue(args[6]);
    if (root < 0)
        return NULL;
    PyObject *keys = args[0], *in_memory = args[5];
    Py_ssize_t nd = PyList_GET_SIZE(args[2]), ni = PyList_GET_SIZE(args[3]);
    Py_ssize_t nt = PyList_GET_SIZE(args[4]), nk = PyList_GET_SIZE(keys);
    Py_buffer into = {0};
    uint8_t *pages = NULL; /* into's bytes, moved to the first page; NULL: no into */
    Py_ssize_t stride = BLCKSZ;
    if (nargs == 9 && args[8] != Py_None) {
        stride = PyLong_AsSsize_t(args[8]);
        if (stride == -1 && PyErr_Occurred())
            return NULL;
        if (stride < BLCKSZ || stride > 16 * BLCKSZ) {
            PyErr_SetString(PyExc_ValueError, "rebuild_run: stride out of range");
            return NULL;
        }
    }
    if (nargs >= 8 && args[7] != Py_None) {
        if (PyObject_GetBuffer(args[7], &into, PyBUF_WRITABLE) < 0)
            return NULL;
        if (into.len / stride < nk) {
            PyBuffer_Release(&into);
            PyErr_SetString(PyExc_ValueError, "rebuild_run: into holds fewer pages than keys");
            return NULL;
        }
        pages = (uint8_t *)into.buf + (stride - BLCKSZ);
    }
    Py_ssize_t opened = 0;
    RunLayer *layers = PyMem_Calloc((size_t)(nd + ni + 1), sizeof *layers);
    RunTile *tiles = PyMem_Calloc((size_t)(nt + 1), sizeof *tiles);
    Py_ssize_t *order = PyMem_Calloc((size_t)(nd + 1), sizeof *order);
    Version *v = NULL;
    Py_ssize_t cap = 0;
    PyObject *out = NULL;
    RunKey *keys_at = NULL;
    Kept kept = {0};
    if (layers == NULL || tiles == NULL || order == NULL) {
        PyErr_NoMemory();
        goto done;
    }
    for (; opened < nd + ni; opened++) {
        PyObject *t = PyList_GET_ITEM(opened < nd ? args[2] : args[3],
                                      opened < nd ? opened : opened - nd);
        if (run_layer_open(t, &layers[opened]) < 0) {
            run_layer_release(&layers[opened]);
            goto done;
        }
    }
    for (Py_ssize_t t = 0; t < nt; t++) {
        PyObject *tile = PyList_GET_ITEM(args[4], t);
        unsigned long long tl;
        if (!PyTuple_Check(tile) || PyTuple_GET_SIZE(tile) != 4 ||
            !PyBytes_Check(PyTuple_GET_ITEM(tile, 0)) ||
            !PyBytes_Check(PyTuple_GET_ITEM(tile, 1)) ||
            as_uint(PyTuple_GET_ITEM(tile, 2), &tl) != OK ||
            !PyLong_Check(PyTuple_GET_ITEM(tile, 3))) {
            PyErr_SetString(PyExc_TypeError, "rebuild_run: a tile is (start, end, lsn, image)");
            goto done;
        }
        Py_ssize_t im = PyLong_AsSsize_t(PyTuple_GET_ITEM(tile, 3));
        if (im < 0 || im >= ni) {
            PyErr_SetString(PyExc_ValueError, "rebuild_run: a tile's image is out of range");
            goto done;
        }
        tiles[t].start = (const uint8_t *)PyBytes_AS_STRING(PyTuple_GET_ITEM(tile, 0));
        tiles[t].end = (const uint8_t *)PyBytes_AS_STRING(PyTuple_GET_ITEM(tile, 1));
        tiles[t].start_len = PyBytes_GET_SIZE(PyTuple_GET_ITEM(tile, 0));
        tiles[t].end_len = PyBytes_GET_SIZE(PyTuple_GET_ITEM(tile, 1));
        tiles[t].lsn = tl;
        tiles[t].image = nd + im;
    }
    out = PyList_New(nk);
    keys_at = PyMem_Calloc((size_t)nk + 1, sizeof *keys_at);
    if (out == NULL || keys_at == NULL) {
        PyErr_NoMemory();
        goto fail;
    }
    Py_ssize_t t = 0, j = 0;
    while (j < nk) {
        /* The keys' versions gathered (blocks read) with the GIL, up to RUN_KEPT_BYTES of
         * blocks kept for them, then redone without it, then made into values with it. */
        Py_ssize_t from = j, n = 0;
        for (; j < nk; j++) {
            RunKey *rk = &keys_at[j];
            PyObject *keyobj = PyList_GET_ITEM(keys, j);
            if (!PyBytes_Check(keyobj) || PyBytes_GET_SIZE(keyobj) != KEY_BYTES) {
                PyErr_SetString(PyExc_TypeError, "rebuild_run: keys are 18-byte keys");
                goto fail;
            }
            const uint8_t *key = (const uint8_t *)PyBytes_AS_STRING(keyobj);
            rk->ch.kind = CHAIN_FALSE;
            rk->v_off = n;
            if (PySet_GET_SIZE(in_memory) > 0) {
                int held = PySet_Contains(in_memory, keyobj);
                if (held < 0)
                    goto fail;
                if (held)
                    continue;
            }
            /* the tile holding the key: tiles ascend and so do keys */
            while (t < nt && bound_at_or_below(tiles[t].end, tiles[t].end_len, key))
                t++;
            const RunTile *tile = NULL;
            if (t < nt && bound_at_or_below(tiles[t].start, tiles[t].start_len, key))
                tile = &tiles[t];
            uint64_t floor_plus_one = tile != NULL ? tile->lsn + 1 : 0;
            /* newest layer first, down to the one holding the chain's start */
            Py_ssize_t parts = 0;
            int based = 0, bad = 0;
            for (Py_ssize_t d = 0; d < nd; d++) {
                RunLayer *c = &layers[d];
                if (run_next_cmp(c, key) > 0 || c->lsn_end <= floor_plus_one)
                    continue;
                int b = 0;
                int got = run_versions(c, key, (int64_t)floor_plus_one - 1, lsn, 0, &b, &kept);
                if (got == -1)
                    goto fail;
                if (got == -2) {
                    bad = 1;
                    break;
                }
                if (got == 1) {
                    order[parts++] = d;
                    based = b;
                    if (based)
                        break;
                }
            }
            int gathered = 1;
            if (!bad && tile != NULL && !based) {
                RunLayer *c = &layers[tile->image];
                int b = 0;
                int got = run_versions(c, key, -1, tile->lsn, 1, &b, &kept);
                if (got == -1)
                    goto fail;
                if (got == -2)
                    bad = 1;
                else if (got == 1) {
                    if (c->v_stop - c->v_start != 1 ||
                        run_tag(c, run_entry(c, (uint64_t)c->v_start)) != TAG_IMAGE)
                        bad = 1; /* not one image: LayerCorrupt there */
                    else
                        gathered = run_gather(c, tile->lsn, lsn, &v, &n, &cap);
                }
            }
            for (Py_ssize_t p = parts - 1; !bad && gathered == 1 && p >= 0; p--)
                gathered = run_gather(&layers[order[p]], floor_plus_one, lsn, &v, &n, &cap);
            if (gathered < 0)
                goto fail;
            rk->n = n - rk->v_off;
            if (!bad && gathered == 1) {
                chain_plan(key, v + rk->v_off, rk->n, tile != NULL || root, &rk->ch);
                if (rk->ch.kind == CHAIN_REDO && pages == NULL &&
                    (rk->out = PyBytes_FromStringAndSize(NULL, BLCKSZ)) == NULL)
                    goto fail;
            }
            if (kept.bytes >= RUN_KEPT_BYTES) {
                j++;
                break;
            }
        }
        Py_BEGIN_ALLOW_THREADS
        for (Py_ssize_t k = from; k < j; k++) {
            RunKey *rk = &keys_at[k];
            if (rk->ch.kind == CHAIN_REDO)
                chain_redo(&rk->ch, v + rk->v_off, rk->n,
                           pages != NULL ? pages + k * stride
                                         : (uint8_t *)PyBytes_AS_STRING(rk->out));
            else if (pages != NULL && rk->ch.kind == CHAIN_BASE && rk->ch.base_len == BLCKSZ)
                memcpy(pages + k * stride, rk->ch.base, BLCKSZ);
        }
        Py_END_ALLOW_THREADS
        for (Py_ssize_t k = from; k < j; k++) {
            RunKey *rk = &keys_at[k];
            PyObject *value;
            if (pages != NULL && rk->ch.kind == CHAIN_BASE && rk->ch.base_len == BLCKSZ)
                value = Py_NewRef(Py_True);
            else if (pages != NULL && rk->ch.kind == CHAIN_REDO) {
                if (rk->ch.page == PAGE_OUT && rk->ch.done == rk->n)
                    value = Py_NewRef(Py_True);
                else { /* the Python redo goes on: the page so far as bytes, as without into */
                    PyObject *page =
                        rk->ch.page == PAGE_OUT
                            ? PyBytes_FromStringAndSize((const char *)pages + k * stride, BLCKSZ)
                            : Py_NewRef(Py_None);
                    if (page == NULL)
                        goto fail;
                    value = chain_value(&rk->ch, v + rk->v_off, rk->n, page);
                }
            }
            else
                value = chain_value(&rk->ch, v + rk->v_off, rk->n, rk->out);
            rk->out = NULL;
            if (value == NULL)
                goto fail;
            PyList_SET_ITEM(out, k, value);
        }
        kept_clear(&kept);
    }
    for (Py_ssize_t k = 0; k < opened; k++)
        if (run_layer_save(&layers[k]) < 0)
            goto fail;
    goto done;
fail:
    Py_CLEAR(out);
done:
    if (keys_at != NULL)
        for (Py_ssize_t k = 0; k < nk; k++)
            Py_XDECREF(keys_at[k].out);
    PyMem_Free(keys_at);
    kept_clear(&kept);
    PyMem_Free(kept.items);
    for (Py_ssize_t k = 0; k < opened; k++)
        run_layer_release(&layers[k]);
    PyMem_Free(layers);
    PyMem_Free(tiles);
    PyMem_Free(order);
    PyMem_Free(v);
    if (pages != NULL)
        PyBuffer_Release(&into);
    return out;
}

/* The Python redo_block (redo_block_python), called for what try_redo_block hands back. */
static PyObject *py_fallback;

static PyObject *
py_init(PyObject *self, PyObject *fallback)
{
    if (!PyCallable_Check(fallback)) {
        PyErr_SetString(PyExc_TypeError, "init() takes the Python redo_block");
        return NULL;
    }
    Py_XSETREF(py_fallback, Py_NewRef(fallback));
    Py_RETURN_NONE;
}

/* redo_block in full: the C path, else the Python one (one call for the caller either way). */
static PyObject *
py_redo_block(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (py_fallback == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "pageserver.redo._redo.init() was not called");
        return NULL;
    }
    PyObject *out = py_try_redo_block(self, args, nargs);
    if (out != Py_None)
        return out;
    Py_DECREF(out);
    return PyObject_Vectorcall(py_fallback, args, (size_t)nargs, NULL);
}

/* ---- module -------------------------------------------------------------------------- */

static PyMethodDef methods[] = {
    {"try_redo_block", (PyCFunction)(void (*)(void))py_try_redo_block, METH_FASTCALL,
     "try_redo_block(record, block_id, page) -> bytes, or None where the Python redo must run."},
    {"redo_block", (PyCFunction)(void (*)(void))py_redo_block, METH_FASTCALL,
     "redo_block(record, block_id, page) -> bytes: try_redo_block, else the Python redo."},
    {"init", py_init, METH_O, "Register the Python redo_block for what C hands back."},
    {"rebuild_page", (PyCFunction)(void (*)(void))py_rebuild_page, METH_FASTCALL,
     "rebuild_page(key, lsn, parts, base_known): a key's value from its layer versions."},
    {"rebuild_run", (PyCFunction)(void (*)(void))py_rebuild_run, METH_FASTCALL,
     "rebuild_run(keys, lsn, deltas, images, tiles, in_memory, base_known, into=None): keys' "
     "values."},
    {"run_kept_bytes", py_run_kept_bytes, METH_O,
     "run_kept_bytes(n) -> the limit before: bytes of blocks a run keeps before it redoes."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_redo", "C fast path of native redo (see pageserver/redo/native.py).",
    -1, methods,
};

PyMODINIT_FUNC
PyInit__redo(void)
{
    PyObject *m = PyModule_Create(&module);
    if (m == NULL)
        return NULL;
    /* the fields read by position, for redo/native.py to check against the NamedTuples */
    PyObject *fields = Py_BuildValue(
        "{s{sisisisisisi}s{sisisisisi}s{sisisisi}}", "DecodedRecord", "end_lsn", R_END_LSN, "xid",
        R_XID, "info", R_INFO, "rmgr_id", R_RMGR_ID, "blocks", R_BLOCKS, "main_data", R_MAIN_DATA,
        "BlockRef", "block_id", B_BLOCK_ID, "blkno", B_BLKNO, "fork_flags", B_FORK_FLAGS, "image",
        B_IMAGE, "data", B_DATA, "BlockImage", "data", I_DATA, "hole_offset", I_HOLE_OFFSET,
        "hole_length", I_HOLE_LENGTH, "bimg_info", I_BIMG_INFO);
    if (fields == NULL || PyModule_AddObject(m, "RECORD_FIELDS", fields) < 0) {
        Py_XDECREF(fields);
        Py_DECREF(m);
        return NULL;
    }
    /* rebuild_run takes `into`, a buffer it writes whole pages into (range_rebuild.PageFill):
     * a module built before it has no such constant */
    if (PyModule_AddIntConstant(m, "REBUILD_RUN_INTO", 2) < 0) { /* 2: with its stride */
        Py_DECREF(m);
        return NULL;
    }
    /* a layer of rebuild_run may say how its blocks are read here (run_read_native) */
    crc_select();
    if (PyModule_AddIntConstant(m, "REBUILD_RUN_READS", 1) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
