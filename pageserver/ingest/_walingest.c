/*
 * Optional C fast path of WalIngest (pageserver/ingest/walingest.py) for the records that
 * dominate a write load: Heap, Heap2 and Btree records, whose only effects are on the pages
 * they reference (plus relation sizes and visibility-map bits), XLOG full-page images, and
 * plain commits and aborts.
 *
 *   ingest_run(records, raws, start, ctx) -> (next, bytes, versions, last_end, last_prev)
 *   ingest_raw_run(raw_records, start, ctx) -> the same, from records not decoded yet
 *
 * puts the values of records[start:] into the open in-memory layer's arena (the C storage of
 * pageserver/storage/layers/_inmem.c, through its capsule: no Python object per value), as
 * WalIngest.ingest_record would, and stops at the first record it does not handle (returns
 * its index: the Python reference ingests it, then calls again after it). A record is left to
 * Python, with nothing changed, when it is of another rmgr, was already ingested, carries a
 * compressed image, needs its delta re-encoded without images (an image and a delta in one
 * record), advances nextXid, or touches a relation fork whose directory entry or size is not
 * in the caches yet. Python stays the reference: tests ingest the same real WAL both ways and
 * require equal layers.
 *
 * What a handled record becomes (see walingest.py for the why):
 *  - a block with an image: Image(page), the hole re-inserted as zeros, pd_lsn set to the
 *    record's end LSN unless the page is new (PageIsNew: pd_upper == 0);
 *  - any other block: WalDelta(u64 LE start LSN + the XLogRecord bytes, will_init =
 *    BKPBLOCK_WILL_INIT); these rmgrs have no always-init blocks;
 *  - the fork's size grows to blkno + 1 (Image of u32 LE on the size key);
 *  - the visibility-map bits Heap/Heap2 records clear (the XLH_*_CLEARED flags of heapam_xlog.h)
 *    become a WalDelta on the VM page of that heap block, unless the record already put it.
 * Per record, a later put of a key replaces the value of an earlier one and keeps its place
 * (a Python dict); all are put at the record's end LSN.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <limits.h>
#include <stdint.h>
#include <string.h>

#include "inmem_api.h"
#include "walrecord.h" /* pg15/walrecord.h: the record layout, shared with pg15/_walscan.c */

#define BLCKSZ 8192
#define REL_PREFIX 0x00
#define SLRU_PREFIX 0x01 /* keys._SLRU_PREFIX */
#define CLOG_KIND 0      /* keys.SlruKind.CLOG */
#define SIZE_MARKER 0xFFFFFFFFu
#define VERSION_OVERHEAD 48 /* inmemory.VERSION_OVERHEAD */
#define TAG_IMAGE 1         /* values.TAG_* */
#define TAG_DELTA 2
#define TAG_DELTA_INIT 3

#define RM_XLOG_ID 0
#define RM_XACT_ID 1
#define XLOG_FPI_FOR_HINT 0xA0 /* catalog/pg_control.h */
#define XLOG_FPI 0xB0
#define RM_HEAP2_ID 9
#define RM_HEAP_ID 10
#define RM_BTREE_ID 11
#define FIRST_NORMAL_XID 3u
#define XID_CHECKPOINT_INTERVAL 1024u /* walingest.XID_CHECKPOINT_INTERVAL */

#define BKPBLOCK_WILL_INIT 0x40
#define PD_UPPER_OFFSET 14

#define VISIBILITYMAP_FORKNUM 2
/* visibilitymap.c: MAPSIZE = BLCKSZ - MAXALIGN(SizeOfPageHeaderData), 4 heap blocks a byte */
#define HEAPBLOCKS_PER_PAGE ((BLCKSZ - 24) * 4)

#define MAX_PUTS 80  /* blocks (<= 33) + their size keys + VM pages and theirs */
#define MAX_SIZES 70

/* DecodedRecord / BlockRef / BlockImage field positions (pg15/records.py NamedTuples) */
enum { R_LSN, R_END_LSN, R_TOT_LEN, R_XID, R_PREV, R_INFO, R_RMGR, R_BLOCKS, R_MAIN };
enum { B_ID, B_RNODE, B_FORK, B_BLKNO, B_FLAGS, B_IMAGE, B_DATA };
enum { I_DATA, I_HOLE_OFFSET, I_HOLE_LENGTH, I_INFO };

/*
 * One record as the ingest below reads it, from either source: a DecodedRecord tuple and its
 * raw bytes (ingest_run), or the raw bytes alone, laid out by wr_record_layout (ingest_raw_run:
 * no Python object is made for the record). Pointers point into Python bytes objects that
 * the caller's lists keep alive for the run.
 */
typedef struct {
    int block_id, flags; /* flags: the block's fork_flags */
    uint32_t spc, db, rel, fork, blkno;
    int has_image;
    const uint8_t *image; /* bimg_len bytes */
    Py_ssize_t image_len;
    long hole_offset, hole_length, bimg_info;
} RecBlock;

typedef struct {
    uint64_t lsn, end_lsn;
    uint32_t xid;
    int info, rmid;
    int nblocks;
    RecBlock blocks[XLR_MAX_BLOCK_ID + 1];
    const uint8_t *main;
    Py_ssize_t main_len;
    const uint8_t *raw; /* the XLogRecord bytes, NULL when unknown (no delta in C then) */
    Py_ssize_t raw_len;
} Rec;

/* A value to put, as its encoding (values.encode_value): tag, then the payload, which is
 * `small` (a size), page `page` of the record's page buffer (an image), or the record's
 * delta payload (u64 LE start LSN + the XLogRecord bytes) */
enum { V_SMALL, V_PAGE, V_DELTA };
typedef struct {
    uint8_t key[KEY_SIZE];
    uint8_t tag, kind;
    uint8_t small[4];
    int page;
    Py_ssize_t size; /* encoded value size */
} Put;

typedef struct {
    uint32_t spc, db, rel, fork;
    uint32_t nblocks;
} SizeChange;

/*
 * The fork sizes looked up in a run (self._sizes, checked against self._dbs and self._rels
 * once): building the lookup tuples per block reference was the largest cost of the C path.
 * Grown sizes are kept here (dirty) and written back into self._sizes when the run ends;
 * nothing else reads that dict meanwhile (the GIL is held throughout).
 */
#define SIZE_SLOTS 512
#define SIZE_MAX_USED 384
typedef struct {
    SizeChange s;
    uint8_t used, dirty;
} SizeEntry;

typedef struct {
    /* context */
    PyObject *arena, *dbs, *rels, *sizes;
    PyObject *clog_segments, *slru_sizes, *clog_kind;
    uint32_t next_xid;
    uint8_t (*pages)[BLCKSZ]; /* MAX_PUTS pages, allocated on the first image */
    /* per record */
    const Rec *rec;
    uint64_t end_lsn; /* the record's */
    int has_image;
    uint8_t start_le[8]; /* the record's start LSN, u64 LE: the head of its delta payload */
    int n_pages;
    Put puts[MAX_PUTS];
    int n_puts;
    SizeChange staged[MAX_SIZES];
    int n_staged;
    SizeEntry *size_cache; /* SIZE_SLOTS, allocated with the run */
    int n_cached;
    /* the fields of the RelFileNode objects seen last (the decoder shares one object per
     * relation; the records list keeps them alive during the run) */
    PyObject *rnodes[4];
    uint32_t rnode_fields[4][3];
    int rnode_next;
} Ingest;

static SizeEntry *
cached_size(Ingest *st, uint32_t spc, uint32_t db, uint32_t rel, uint32_t fork, int add)
{
    uint32_t h = ((spc * 2654435761u) ^ (db * 40503u) ^ (rel * 2246822519u) ^ fork);
    h ^= h >> 15;
    for (uint32_t i = h % SIZE_SLOTS;; i = (i + 1) % SIZE_SLOTS) {
        SizeEntry *e = &st->size_cache[i];
        if (!e->used) {
            if (!add || st->n_cached == SIZE_MAX_USED)
                return NULL;
            st->n_cached++;
            e->used = 1;
            e->dirty = 0;
            e->s.spc = spc;
            e->s.db = db;
            e->s.rel = rel;
            e->s.fork = fork;
            return e;
        }
        if (e->s.spc == spc && e->s.db == db && e->s.rel == rel && e->s.fork == fork)
            return e;
    }
}

static int
set_size(Ingest *st, const SizeChange *s)
{
    PyObject *k = Py_BuildValue("(kkkk)", (unsigned long)s->spc, (unsigned long)s->db,
                                (unsigned long)s->rel, (unsigned long)s->fork);
    PyObject *v = PyLong_FromUnsignedLong(s->nblocks);
    int r = (k == NULL || v == NULL) ? -1 : PyDict_SetItem(st->sizes, k, v);
    Py_XDECREF(k);
    Py_XDECREF(v);
    return r;
}

/* the grown sizes into self._sizes, once the run has succeeded */
static int
write_back_sizes(Ingest *st)
{
    if (st->size_cache == NULL)
        return 0;
    int r = 0;
    for (int i = 0; i < SIZE_SLOTS && r == 0; i++) {
        SizeEntry *e = &st->size_cache[i];
        if (e->used && e->dirty)
            r = set_size(st, &e->s);
    }
    return r;
}

/* outcome of one record */
#define OK 0
#define LEAVE -1 /* not handled here: Python ingests it */
#define FAIL -2  /* a Python exception is set */

static void
store_key6(uint8_t *k, uint8_t prefix, uint32_t spc, uint32_t db, uint32_t rel, uint32_t fork,
           uint32_t blkno)
{
    /* keys.py: struct ">BIIIBI" (prefix, then four fields, fork-like byte, block) */
    uint32_t f[3] = {spc, db, rel};
    k[0] = prefix;
    for (int i = 0; i < 3; i++) {
        k[1 + 4 * i] = (uint8_t)(f[i] >> 24);
        k[2 + 4 * i] = (uint8_t)(f[i] >> 16);
        k[3 + 4 * i] = (uint8_t)(f[i] >> 8);
        k[4 + 4 * i] = (uint8_t)f[i];
    }
    k[13] = (uint8_t)fork;
    k[14] = (uint8_t)(blkno >> 24);
    k[15] = (uint8_t)(blkno >> 16);
    k[16] = (uint8_t)(blkno >> 8);
    k[17] = (uint8_t)blkno;
}

static void
store_key(uint8_t *k, uint32_t spc, uint32_t db, uint32_t rel, uint32_t fork, uint32_t blkno)
{
    store_key6(k, REL_PREFIX, spc, db, rel, fork, blkno);
}

static void
reset_record(Ingest *st)
{
    st->n_puts = 0;
    st->n_staged = 0;
    st->n_pages = 0;
}

/* self._puts[key] = value: replace in place (keeping its place), or append */
static int
put(Ingest *st, const uint8_t *key, const Put *value)
{
    Put *p = NULL;
    for (int i = 0; i < st->n_puts; i++)
        if (memcmp(st->puts[i].key, key, KEY_SIZE) == 0)
            p = &st->puts[i];
    if (p == NULL) {
        if (st->n_puts == MAX_PUTS)
            return LEAVE;
        p = &st->puts[st->n_puts++];
    }
    *p = *value;
    memcpy(p->key, key, KEY_SIZE);
    return OK;
}

static int
has_put(Ingest *st, const uint8_t *key)
{
    for (int i = 0; i < st->n_puts; i++)
        if (memcmp(st->puts[i].key, key, KEY_SIZE) == 0)
            return 1;
    return 0;
}

/* WalIngest._delta: WalDelta(u64 LE start LSN + the record bytes, will_init) */
static int
delta_value(Ingest *st, int will_init, Put *out)
{
    if (st->rec->raw == NULL || st->has_image)
        return LEAVE; /* the payload must be re-encoded without images: Python does it */
    out->tag = will_init ? TAG_DELTA_INIT : TAG_DELTA;
    out->kind = V_DELTA;
    out->size = 1 + 8 + st->rec->raw_len;
    return OK;
}

static int
get_u32(PyObject *obj, uint32_t *out)
{
    unsigned long v = PyLong_AsUnsignedLong(obj);
    if (v == (unsigned long)-1 && PyErr_Occurred())
        return FAIL;
    if (v > 0xFFFFFFFFul)
        return LEAVE;
    *out = (uint32_t)v;
    return OK;
}

static PyObject *rnode_names[3]; /* "spc", "db", "rel", interned at import */

static int
rnode_fields(Ingest *st, PyObject *rnode, uint32_t *spc, uint32_t *db, uint32_t *rel)
{
    uint32_t *outs[3] = {spc, db, rel};
    for (int k = 0; k < 4; k++) {
        if (st->rnodes[k] == rnode) {
            for (int i = 0; i < 3; i++)
                *outs[i] = st->rnode_fields[k][i];
            return OK;
        }
    }
    for (int i = 0; i < 3; i++) {
        PyObject *v = PyObject_GetAttr(rnode, rnode_names[i]);
        if (v == NULL)
            return FAIL;
        int r = get_u32(v, outs[i]);
        Py_DECREF(v);
        if (r != OK)
            return r;
    }
    int k = st->rnode_next++ & 3;
    st->rnodes[k] = rnode;
    for (int i = 0; i < 3; i++)
        st->rnode_fields[k][i] = *outs[i];
    return OK;
}

/* WalIngest._extend with everything already cached: the fork is in its database's directory
 * and its size is known; grows the size (staged until the record is done) */
static int
extend(Ingest *st, uint32_t spc, uint32_t db, uint32_t rel, uint32_t fork, uint32_t nblocks)
{
    for (int i = 0; i < st->n_staged; i++) {
        SizeChange *s = &st->staged[i];
        if (s->spc == spc && s->db == db && s->rel == rel && s->fork == fork) {
            if (nblocks <= s->nblocks)
                return OK;
            s->nblocks = nblocks;
            goto put_size;
        }
    }
    SizeEntry *cached = cached_size(st, spc, db, rel, fork, 0);
    if (cached != NULL) {
        if (nblocks <= cached->s.nblocks)
            return OK;
        if (st->n_staged == MAX_SIZES)
            return LEAVE;
        SizeChange *s = &st->staged[st->n_staged++];
        *s = cached->s;
        s->nblocks = nblocks;
        goto put_size;
    }
    {
        PyObject *dbkey = Py_BuildValue("(kk)", (unsigned long)spc, (unsigned long)db);
        if (dbkey == NULL)
            return FAIL;
        int in_dbs = PySet_Contains(st->dbs, dbkey);
        PyObject *rels = in_dbs == 1 ? PyDict_GetItemWithError(st->rels, dbkey) : NULL;
        Py_DECREF(dbkey);
        if (in_dbs < 0 || PyErr_Occurred())
            return FAIL;
        if (rels == NULL)
            return LEAVE;
        PyObject *relkey = Py_BuildValue("(kk)", (unsigned long)rel, (unsigned long)fork);
        if (relkey == NULL)
            return FAIL;
        int in_rels = PySet_Contains(rels, relkey);
        Py_DECREF(relkey);
        if (in_rels < 0)
            return FAIL;
        if (in_rels == 0)
            return LEAVE;
        PyObject *sizekey = Py_BuildValue(
            "(kkkk)", (unsigned long)spc, (unsigned long)db, (unsigned long)rel,
            (unsigned long)fork);
        if (sizekey == NULL)
            return FAIL;
        PyObject *size = PyDict_GetItemWithError(st->sizes, sizekey);
        Py_DECREF(sizekey);
        if (size == NULL)
            return PyErr_Occurred() ? FAIL : LEAVE;
        if (size == Py_None)
            return LEAVE;
        uint32_t current;
        int r = get_u32(size, &current);
        if (r != OK)
            return r;
        SizeEntry *e = cached_size(st, spc, db, rel, fork, 1);
        if (e == NULL)
            return LEAVE; /* the run's cache is full: Python ingests the record */
        e->s.nblocks = current;
        if (nblocks <= current)
            return OK;
        if (st->n_staged == MAX_SIZES)
            return LEAVE;
        SizeChange *s = &st->staged[st->n_staged++];
        s->spc = spc;
        s->db = db;
        s->rel = rel;
        s->fork = fork;
        s->nblocks = nblocks;
    }
put_size: {
    uint8_t key[KEY_SIZE];
    store_key(key, spc, db, rel, fork, SIZE_MARKER);
    Put value = {.tag = TAG_IMAGE, .kind = V_SMALL, .size = 1 + 4,
                 .small = {(uint8_t)nblocks, (uint8_t)(nblocks >> 8), (uint8_t)(nblocks >> 16),
                           (uint8_t)(nblocks >> 24)}};
    return put(st, key, &value);
}
}

/* ingest.page_after_image for an uncompressed image */
static int
image_value(Ingest *st, const RecBlock *b, Put *out)
{
    long hole_offset = b->hole_offset, hole_length = b->hole_length;
    if ((b->bimg_info & BKPIMAGE_COMPRESSED) || hole_offset < 0 || hole_length < 0 ||
        hole_offset + hole_length > BLCKSZ || b->image_len != BLCKSZ - hole_length)
        return LEAVE; /* compressed, or odd: restore_page decides */
    if (st->pages == NULL && (st->pages = PyMem_Malloc(MAX_PUTS * sizeof *st->pages)) == NULL) {
        PyErr_NoMemory();
        return FAIL;
    }
    if (st->n_pages == MAX_PUTS)
        return LEAVE;
    out->page = st->n_pages++;
    uint8_t *p = st->pages[out->page];
    const uint8_t *src = b->image;
    memcpy(p, src, hole_offset);
    memset(p + hole_offset, 0, hole_length);
    memcpy(p + hole_offset + hole_length, src + hole_offset, BLCKSZ - hole_offset - hole_length);
    if (p[PD_UPPER_OFFSET] | p[PD_UPPER_OFFSET + 1]) {
        /* PageSetLSN: pd_lsn is {xlogid, xrecoff}, each a native (little-endian) uint32 */
        uint64_t end = st->end_lsn;
        uint32_t hi = (uint32_t)(end >> 32), lo = (uint32_t)end;
        for (int i = 0; i < 4; i++) {
            p[i] = (uint8_t)(hi >> (8 * i));
            p[4 + i] = (uint8_t)(lo >> (8 * i));
        }
    }
    out->tag = TAG_IMAGE;
    out->kind = V_PAGE;
    out->size = 1 + BLCKSZ;
    return OK;
}

static const RecBlock *
block_by_id(const Rec *rec, int id)
{
    for (int i = 0; i < rec->nblocks; i++)
        if (rec->blocks[i].block_id == id)
            return &rec->blocks[i];
    return NULL;
}

/* one VM clear (visibilitymap.vm_changes): a delta on the VM page, the VM fork extended */
static int
vm_clear(Ingest *st, const RecBlock *block)
{
    uint32_t vm_blkno = block->blkno / HEAPBLOCKS_PER_PAGE;
    uint8_t key[KEY_SIZE];
    store_key(key, block->spc, block->db, block->rel, VISIBILITYMAP_FORKNUM, vm_blkno);
    if (!has_put(st, key)) {
        Put value;
        int r = delta_value(st, 0, &value);
        if (r == OK)
            r = put(st, key, &value);
        if (r != OK)
            return r;
    }
    return extend(st, block->spc, block->db, block->rel, VISIBILITYMAP_FORKNUM, vm_blkno + 1);
}

/* heapam_xlog.h: the XLH_*_CLEARED flags of each record's main data */
static int
vm_changes(Ingest *st, int rmid, int info)
{
    const Rec *rec = st->rec;
    if (rmid == RM_BTREE_ID || rec->main_len == 0 || rec->nblocks == 0)
        return OK;
    const uint8_t *d = rec->main;
    Py_ssize_t n = rec->main_len;
    const RecBlock *first = &rec->blocks[0];
    int op = info & 0x70;
    if (rmid == RM_HEAP_ID) {
        if (op == 0x00 && n >= 3 && (d[2] & 0x01)) /* INSERT, ALL_VISIBLE_CLEARED */
            return vm_clear(st, first);
        if (op == 0x10 && n >= 8 && (d[7] & 0x01)) /* DELETE, ALL_VISIBLE_CLEARED */
            return vm_clear(st, first);
        if ((op == 0x20 || op == 0x40) && n >= 8) { /* UPDATE, HOT_UPDATE */
            const RecBlock *old = block_by_id(rec, 1);
            int r = OK;
            if (d[7] & 0x01) /* OLD_ALL_VISIBLE_CLEARED */
                r = vm_clear(st, old != NULL ? old : first);
            if (r == OK && (d[7] & 0x02)) /* NEW_ALL_VISIBLE_CLEARED */
                r = vm_clear(st, first);
            return r;
        }
        if (op == 0x60 && n >= 8 && (d[7] & 0x01)) /* LOCK, ALL_FROZEN_CLEARED */
            return vm_clear(st, first);
        return OK;
    }
    if (op == 0x50 && (d[0] & 0x01)) /* HEAP2 MULTI_INSERT, ALL_VISIBLE_CLEARED */
        return vm_clear(st, first);
    if (op == 0x60 && n >= 8 && (d[7] & 0x01)) /* HEAP2 LOCK_UPDATED, ALL_FROZEN_CLEARED */
        return vm_clear(st, first);
    return OK;
}

/* walingest._note_xid changes nothing: _full_xid_at_least(current, xid) == current */
static int
xid_unchanged(uint32_t xid, uint32_t next_xid)
{
    if (xid < FIRST_NORMAL_XID)
        return OK;
    uint32_t rounded = (xid + XID_CHECKPOINT_INTERVAL) & ~(XID_CHECKPOINT_INTERVAL - 1);
    if (rounded < FIRST_NORMAL_XID)
        rounded = FIRST_NORMAL_XID;
    /* TransactionIdPrecedes(rounded, next_xid) or equal */
    if (rounded == next_xid || (uint32_t)(rounded - next_xid) >= 0x80000000u)
        return OK;
    return LEAVE;
}

static uint32_t
load_u32(const uint8_t *p)
{
    return (uint32_t)p[0] | ((uint32_t)p[1] << 8) | ((uint32_t)p[2] << 16) |
           ((uint32_t)p[3] << 24);
}

/*
 * WalIngest._ingest_xact for a plain COMMIT or ABORT (xact.h: xl_xact_commit / xl_xact_abort,
 * then the parts xinfo announces, in order): a delta on the CLOG page of each xid (the
 * top-level one and its subtransactions), in page order. Records that drop relations, belong
 * to two-phase commit or carry parts not walked here go to Python, and so does a CLOG segment
 * not in the caches or too short (its size grows).
 */
static int
ingest_xact(Ingest *st, int info)
{
    int op = info & 0x70; /* XLOG_XACT_OPMASK */
    if (op != 0x00 && op != 0x20)
        return LEAVE; /* COMMIT, ABORT only */
    if (st->rec->nblocks != 0)
        return LEAVE;
    const uint8_t *d = st->rec->main;
    Py_ssize_t n = st->rec->main_len, pos = 8; /* xact_time */
    uint32_t xinfo = 0;
    if (info & 0x80) { /* XLOG_XACT_HAS_INFO */
        if (n < pos + 4)
            return LEAVE;
        xinfo = load_u32(d + pos);
        pos += 4;
    }
    /* DBINFO, SUBXACTS, INVALS, AE_LOCKS, ORIGIN: anything else goes to Python */
    if (xinfo & ~(uint32_t)((1 << 0) | (1 << 1) | (1 << 3) | (1 << 5) | (1 << 6)))
        return LEAVE;
    if (xinfo & (1 << 0))
        pos += 8;
    uint32_t nsub = 0;
    const uint8_t *subs = NULL;
    if (xinfo & (1 << 1)) {
        if (n < pos + 4)
            return LEAVE;
        int32_t count = (int32_t)load_u32(d + pos);
        if (count < 0 || count > 65536 || n < pos + 4 + 4 * (Py_ssize_t)count)
            return LEAVE;
        nsub = (uint32_t)count;
        subs = d + pos + 4;
        pos += 4 + 4 * (Py_ssize_t)count;
    }
    if ((xinfo & (1 << 3)) && op == 0x00) {
        if (n < pos + 4)
            return LEAVE;
        int32_t count = (int32_t)load_u32(d + pos);
        if (count < 0 || n < pos + 4 + 16 * (Py_ssize_t)count) /* SharedInvalidationMessage */
            return LEAVE;
        pos += 4 + 16 * (Py_ssize_t)count;
    }
    if ((xinfo & (1 << 5)) && n < pos + 16) /* xl_xact_origin */
        return LEAVE;
    if (n < pos)
        return LEAVE;

    uint32_t top = st->rec->xid;
    /* the CLOG pages (clog.c: CLOG_XACTS_PER_PAGE = BLCKSZ * 4), sorted and unique */
    uint32_t pages[64];
    int npages = 0;
    for (uint32_t i = 0; i <= nsub; i++) {
        uint32_t xid;
        if (i == 0) {
            if (top == 0)
                continue;
            xid = (uint32_t)top;
        } else {
            xid = load_u32(subs + 4 * (i - 1));
        }
        if (xid_unchanged(xid, st->next_xid) != OK)
            return LEAVE;
        uint32_t page = xid / (BLCKSZ * 4);
        int at = 0;
        while (at < npages && pages[at] < page)
            at++;
        if (at < npages && pages[at] == page)
            continue;
        if (npages == 64)
            return LEAVE;
        memmove(pages + at + 1, pages + at, (npages - at) * sizeof pages[0]);
        pages[at] = page;
        npages++;
    }
    for (int i = 0; i < npages; i++) {
        uint32_t segno = pages[i] / 32, blkno = pages[i] % 32; /* SLRU_PAGES_PER_SEGMENT */
        PyObject *seg = PyLong_FromUnsignedLong(segno);
        if (seg == NULL)
            return FAIL;
        int known = PySet_Contains(st->clog_segments, seg);
        PyObject *sizekey = known == 1 ? PyTuple_Pack(2, st->clog_kind, seg) : NULL;
        Py_DECREF(seg);
        if (known < 0)
            return FAIL;
        if (known == 0)
            return LEAVE;
        if (sizekey == NULL)
            return FAIL;
        PyObject *size = PyDict_GetItemWithError(st->slru_sizes, sizekey);
        Py_DECREF(sizekey);
        if (size == NULL)
            return PyErr_Occurred() ? FAIL : LEAVE;
        uint32_t blocks;
        int r = size == Py_None ? LEAVE : get_u32(size, &blocks);
        if (r != OK)
            return r;
        if (blkno + 1 > blocks)
            return LEAVE;
        uint8_t key[KEY_SIZE];
        store_key6(key, SLRU_PREFIX, CLOG_KIND, 1, segno, 0, blkno); /* keys.slru_block_key */
        if (!has_put(st, key)) {
            Put value;
            r = delta_value(st, 0, &value);
            if (r == OK)
                r = put(st, key, &value);
            if (r != OK)
                return r;
        }
    }
    return OK;
}

static int
ingest_one(Ingest *st)
{
    const Rec *rec = st->rec;
    int rmid = rec->rmid, info = rec->info;
    if (rmid == RM_XACT_ID)
        return ingest_xact(st, info);
    /* XLOG_FPI (log_newpage: index builds, ...) and XLOG_FPI_FOR_HINT: their blocks' images
     * are the pages (xlog_redo in access/transam/xlog.c restores them, main data none); a
     * hint record's block without an image changes nothing, any other goes to Python */
    int fpi = rmid == RM_XLOG_ID && ((info & 0xF0) == XLOG_FPI || (info & 0xF0) == XLOG_FPI_FOR_HINT);
    if (!fpi && rmid != RM_HEAP_ID && rmid != RM_HEAP2_ID && rmid != RM_BTREE_ID)
        return LEAVE;
    st->has_image = 0;
    for (int i = 0; i < rec->nblocks; i++)
        if (rec->blocks[i].has_image)
            st->has_image = 1;
    for (int i = 0; i < rec->nblocks; i++) {
        const RecBlock *b = &rec->blocks[i];
        if (b->rel == 0 || b->blkno == SIZE_MARKER || b->fork > 3)
            return LEAVE; /* keys.py refuses these: let Python raise */
        Put value;
        int r;
        if (b->has_image)
            r = image_value(st, b, &value);
        else if (fpi && (info & 0xF0) == XLOG_FPI_FOR_HINT)
            continue;
        else if (fpi)
            return LEAVE; /* the rmgr's always_init decides: Python */
        else
            r = delta_value(st, (b->flags & BKPBLOCK_WILL_INIT) != 0, &value);
        if (r != OK)
            return r;
        uint8_t key[KEY_SIZE];
        store_key(key, b->spc, b->db, b->rel, b->fork, b->blkno);
        r = put(st, key, &value);
        if (r == OK)
            r = extend(st, b->spc, b->db, b->rel, b->fork, b->blkno + 1);
        if (r != OK)
            return r;
    }
    return fpi ? OK : vm_changes(st, rmid, info);
}

/* the record is done: sizes into the cache, values into the layer */
static InmemApi *inmem; /* from _inmem's capsule, at import */

static int
commit(Ingest *st, uint64_t lsn, Py_ssize_t *bytes)
{
    for (int i = 0; i < st->n_puts; i++) {
        Put *p = &st->puts[i];
        const void *a = p->small, *b = NULL;
        size_t na = 4, nb = 0;
        if (p->kind == V_PAGE) {
            a = st->pages[p->page];
            na = BLCKSZ;
        } else if (p->kind == V_DELTA) {
            a = st->start_le;
            na = 8;
            b = st->rec->raw;
            nb = (size_t)st->rec->raw_len;
        }
        if (inmem->append(st->arena, p->key, lsn, p->tag, a, na, b, nb) < 0)
            return FAIL; /* the run's appends are rolled back */
        *bytes += p->size + VERSION_OVERHEAD;
    }
    /* Only into the cache (extend cached every size it staged): self._sizes changes when
     * the run succeeds, so a failed run leaves the caches as they were */
    for (int i = 0; i < st->n_staged; i++) {
        SizeChange *s = &st->staged[i];
        SizeEntry *e = cached_size(st, s->spc, s->db, s->rel, s->fork, 0);
        if (e == NULL) {
            PyErr_SetString(PyExc_SystemError, "_walingest: a staged fork size is not cached");
            return FAIL;
        }
        e->s.nblocks = s->nblocks;
        e->dirty = 1;
    }
    return OK;
}

/* The tuple shapes rec_from_tuple reads with unchecked PyTuple_GET_ITEM (pg15/records.py):
 * a DecodedRecord whose blocks are BlockRefs and whose images are BlockImages, main data bytes */
static int
record_shape_ok(PyObject *rec)
{
    if (!PyTuple_Check(rec) || PyTuple_GET_SIZE(rec) <= R_MAIN ||
        !PyBytes_Check(PyTuple_GET_ITEM(rec, R_MAIN)))
        return 0;
    PyObject *blocks = PyTuple_GET_ITEM(rec, R_BLOCKS);
    if (!PyTuple_Check(blocks) || PyTuple_GET_SIZE(blocks) > XLR_MAX_BLOCK_ID + 1)
        return 0;
    for (Py_ssize_t i = 0; i < PyTuple_GET_SIZE(blocks); i++) {
        PyObject *b = PyTuple_GET_ITEM(blocks, i);
        if (!PyTuple_Check(b) || PyTuple_GET_SIZE(b) <= B_DATA)
            return 0;
        PyObject *image = PyTuple_GET_ITEM(b, B_IMAGE);
        if (image != Py_None && (!PyTuple_Check(image) || PyTuple_GET_SIZE(image) <= I_INFO ||
                                 !PyBytes_Check(PyTuple_GET_ITEM(image, I_DATA))))
            return 0;
    }
    return 1;
}

static int
handled_rmgr(int rmid)
{
    return rmid == RM_XACT_ID || rmid == RM_HEAP_ID || rmid == RM_HEAP2_ID ||
           rmid == RM_BTREE_ID || rmid == RM_XLOG_ID;
}

/* A DecodedRecord (and its raw bytes or None) as a Rec: OK, LEAVE (Python ingests it) or FAIL */
static int
rec_from_tuple(Ingest *st, PyObject *obj, PyObject *raw, Rec *r)
{
    if (!record_shape_ok(obj))
        return LEAVE; /* not a DecodedRecord as the decoder makes them: Python decides */
    if (raw != Py_None && !PyBytes_Check(raw))
        return LEAVE;
    r->raw = raw == Py_None ? NULL : (const uint8_t *)PyBytes_AS_STRING(raw);
    r->raw_len = raw == Py_None ? 0 : PyBytes_GET_SIZE(raw);
    unsigned long long end = PyLong_AsUnsignedLongLong(PyTuple_GET_ITEM(obj, R_END_LSN));
    unsigned long long start = PyLong_AsUnsignedLongLong(PyTuple_GET_ITEM(obj, R_LSN));
    unsigned long xid = PyLong_AsUnsignedLong(PyTuple_GET_ITEM(obj, R_XID));
    long rmid = PyLong_AsLong(PyTuple_GET_ITEM(obj, R_RMGR));
    long info = PyLong_AsLong(PyTuple_GET_ITEM(obj, R_INFO));
    if (PyErr_Occurred())
        return FAIL;
    if (xid > 0xFFFFFFFFul || rmid < 0 || rmid > 255 || info < 0 || info > 255)
        return LEAVE;
    r->end_lsn = end;
    r->lsn = start;
    r->xid = (uint32_t)xid;
    r->rmid = (int)rmid;
    r->info = (int)info;
    PyObject *main = PyTuple_GET_ITEM(obj, R_MAIN);
    r->main = (const uint8_t *)PyBytes_AS_STRING(main);
    r->main_len = PyBytes_GET_SIZE(main);
    r->nblocks = 0;
    if (!handled_rmgr(r->rmid))
        return OK; /* ingest_one leaves it: its blocks are not read */
    PyObject *blocks = PyTuple_GET_ITEM(obj, R_BLOCKS);
    for (Py_ssize_t i = 0; i < PyTuple_GET_SIZE(blocks); i++) {
        PyObject *b = PyTuple_GET_ITEM(blocks, i);
        RecBlock *rb = &r->blocks[r->nblocks++];
        int rc = rnode_fields(st, PyTuple_GET_ITEM(b, B_RNODE), &rb->spc, &rb->db, &rb->rel);
        if (rc == OK)
            rc = get_u32(PyTuple_GET_ITEM(b, B_FORK), &rb->fork);
        if (rc == OK)
            rc = get_u32(PyTuple_GET_ITEM(b, B_BLKNO), &rb->blkno);
        if (rc != OK)
            return rc;
        long id = PyLong_AsLong(PyTuple_GET_ITEM(b, B_ID));
        long flags = PyLong_AsLong(PyTuple_GET_ITEM(b, B_FLAGS));
        if (PyErr_Occurred())
            return FAIL;
        rb->block_id = (int)(id < INT_MIN ? INT_MIN : id > INT_MAX ? INT_MAX : id);
        rb->flags = (int)(flags & 0xFF);
        PyObject *image = PyTuple_GET_ITEM(b, B_IMAGE);
        rb->has_image = image != Py_None;
        if (rb->has_image) {
            PyObject *data = PyTuple_GET_ITEM(image, I_DATA);
            rb->image = (const uint8_t *)PyBytes_AS_STRING(data);
            rb->image_len = PyBytes_GET_SIZE(data);
            rb->hole_offset = PyLong_AsLong(PyTuple_GET_ITEM(image, I_HOLE_OFFSET));
            rb->hole_length = PyLong_AsLong(PyTuple_GET_ITEM(image, I_HOLE_LENGTH));
            rb->bimg_info = PyLong_AsLong(PyTuple_GET_ITEM(image, I_INFO));
            if (PyErr_Occurred())
                return FAIL;
        }
    }
    return OK;
}

/*
 * A RawRecord (lsn, end_lsn, bytes: the reader's, pg15/xlog_reader.py) as a Rec, laid out
 * by wr_record_layout: no DecodedRecord is made. LEAVE for anything else, and for a record
 * the layout does not accept (the Python decoder raises there if it is bad).
 */
static int
rec_from_raw(Ingest *st, PyObject *obj, PyObject *unused, Rec *r)
{
    if (!PyTuple_Check(obj) || PyTuple_GET_SIZE(obj) != 3 ||
        !PyBytes_CheckExact(PyTuple_GET_ITEM(obj, 2)))
        return LEAVE;
    unsigned long long start = PyLong_AsUnsignedLongLong(PyTuple_GET_ITEM(obj, 0));
    unsigned long long end = PyLong_AsUnsignedLongLong(PyTuple_GET_ITEM(obj, 1));
    if (PyErr_Occurred())
        return FAIL;
    PyObject *bytes = PyTuple_GET_ITEM(obj, 2);
    const uint8_t *data = (const uint8_t *)PyBytes_AS_STRING(bytes);
    Py_ssize_t n = PyBytes_GET_SIZE(bytes);
    r->lsn = start;
    r->end_lsn = end;
    r->raw = data;
    r->raw_len = n;
    if (n < WR_RECORD_HEADER)
        return LEAVE;
    /* XLogRecord (access/xlogrecord.h): xl_tot_len, xl_xid, xl_prev, xl_info, xl_rmid */
    r->xid = wr_le32(data + 4);
    r->info = data[16];
    r->rmid = data[17];
    r->nblocks = 0;
    r->main = data;
    r->main_len = 0;
    if (!handled_rmgr(r->rmid))
        return OK; /* ingest_one leaves it */
    RecordLayout lay;
    if (!wr_record_layout(data, n, &lay))
        return LEAVE;
    r->main = data + lay.main_off;
    r->main_len = (Py_ssize_t)lay.main_len;
    for (int i = 0; i < lay.nheads; i++) {
        const BlockHead *h = &lay.heads[i];
        RecBlock *rb = &r->blocks[r->nblocks++];
        rb->block_id = h->block_id;
        rb->flags = h->fork_flags;
        rb->spc = h->spc;
        rb->db = h->db;
        rb->rel = h->rel;
        rb->fork = (uint32_t)(h->fork_flags & BKPBLOCK_FORK_MASK);
        rb->blkno = h->blkno;
        rb->has_image = h->has_image;
        rb->image = data + h->image_off;
        rb->image_len = h->bimg_len;
        rb->hole_offset = h->hole_offset;
        rb->hole_length = h->hole_length;
        rb->bimg_info = h->bimg_info;
    }
    return OK;
}

typedef int (*RecReader)(Ingest *st, PyObject *obj, PyObject *raw, Rec *r);

/*
 * The run shared by ingest_run (DecodedRecords + raws) and ingest_raw_run (RawRecords,
 * raws NULL): records[start:] into the arena until a record is left to Python or `budget`
 * bytes are added. All or nothing on an error.
 */
static PyObject *
run(PyObject *records, PyObject *raws, Py_ssize_t start, PyObject *ctx, RecReader read)
{
    Ingest st;
    unsigned long long last_record_lsn;
    Py_ssize_t budget;
    unsigned long next_xid;
    memset(&st, 0, sizeof st);
    if (!PyArg_ParseTuple(ctx, "O!O!O!O!KnkO!O!O:ingest_run", inmem->type, &st.arena,
                          &PySet_Type, &st.dbs, &PyDict_Type, &st.rels, &PyDict_Type, &st.sizes,
                          &last_record_lsn, &budget, &next_xid, &PySet_Type,
                          &st.clog_segments, &PyDict_Type, &st.slru_sizes, &st.clog_kind))
        return NULL;
    if (raws != NULL && PyList_GET_SIZE(raws) != PyList_GET_SIZE(records)) {
        PyErr_SetString(PyExc_ValueError, "records and raws differ in length");
        return NULL;
    }
    if (start < 0) {
        PyErr_SetString(PyExc_IndexError, "ingest_run: negative start");
        return NULL;
    }
    Rec *rec = PyMem_Malloc(sizeof *rec);
    if (rec == NULL)
        return PyErr_NoMemory();
    st.next_xid = (uint32_t)next_xid;
    st.size_cache = PyMem_Calloc(SIZE_SLOTS, sizeof *st.size_cache);
    if (st.size_cache == NULL) {
        PyMem_Free(rec);
        return PyErr_NoMemory();
    }
    st.rec = rec;
    Py_ssize_t i = start, bytes = 0, versions = 0;
    uint64_t last_end = 0, last_prev = 0;
    int took = 0;
    /* All or nothing: on an error Python accounts none of the run (Timeline.put_records),
     * so its versions leave the layer and its grown sizes are not written back */
    size_t run_mark = inmem->mark(st.arena);
    for (; i < PyList_GET_SIZE(records) && bytes < budget; i++) {
        int r = read(&st, PyList_GET_ITEM(records, i), raws ? PyList_GET_ITEM(raws, i) : NULL,
                     rec);
        if (r == FAIL)
            goto fail;
        if (r == LEAVE)
            break;
        st.end_lsn = rec->end_lsn;
        if (rec->end_lsn <= last_record_lsn)
            break; /* already ingested: Python skips it */
        for (int k = 0; k < 8; k++)
            st.start_le[k] = (uint8_t)(rec->lsn >> (8 * k));
        r = xid_unchanged(rec->xid, st.next_xid);
        if (r == OK)
            r = ingest_one(&st);
        if (r == OK) {
            r = commit(&st, rec->end_lsn, &bytes);
            versions += st.n_puts;
        }
        reset_record(&st);
        if (r == FAIL)
            goto fail;
        if (r == LEAVE)
            break;
        last_end = rec->end_lsn;
        last_prev = rec->lsn;
        last_record_lsn = rec->end_lsn;
        took = 1;
    }
    PyMem_Free(st.pages);
    st.pages = NULL;
    int written = write_back_sizes(&st);
    PyMem_Free(st.size_cache);
    st.size_cache = NULL;
    PyMem_Free(rec);
    rec = NULL;
    PyObject *result = NULL;
    if (written == 0 && took)
        result = Py_BuildValue("nnnKK", i, bytes, versions, (unsigned long long)last_end,
                               (unsigned long long)last_prev);
    else if (written == 0)
        result = Py_BuildValue("nnnOO", i, bytes, versions, Py_None, Py_None);
    if (result != NULL)
        return result;
    /* (a write-back that failed, MemoryError, may have left some grown sizes in self._sizes) */
fail:
    inmem->rollback(st.arena, run_mark);
    PyMem_Free(st.pages);
    PyMem_Free(st.size_cache);
    PyMem_Free(rec);
    return NULL;
}

static PyObject *
py_ingest_run(PyObject *self, PyObject *args)
{
    PyObject *records, *raws, *ctx;
    Py_ssize_t start;
    if (!PyArg_ParseTuple(args, "O!O!nO!:ingest_run", &PyList_Type, &records, &PyList_Type,
                          &raws, &start, &PyTuple_Type, &ctx))
        return NULL;
    return run(records, raws, start, ctx, rec_from_tuple);
}

/*
 *   ingest_raw_run(raw_records, start, ctx) -> (next, bytes, versions, last_end, last_prev)
 *
 * ingest_run fused with the decoder: records[start:] are the reader's RawRecords, laid out
 * here (pg15/walrecord.h) and put into the arena without a DecodedRecord, BlockRef or
 * payload object; the record it stops at (next) is decoded and ingested by Python.
 */
static PyObject *
py_ingest_raw_run(PyObject *self, PyObject *args)
{
    PyObject *records, *ctx;
    Py_ssize_t start;
    if (!PyArg_ParseTuple(args, "O!nO!:ingest_raw_run", &PyList_Type, &records, &start,
                          &PyTuple_Type, &ctx))
        return NULL;
    return run(records, NULL, start, ctx, rec_from_raw);
}

/*
 * LsnIndex.observe_all's loop (pageserver/ingest/lsn_index.py, the reference):
 *
 *   index_entries(records, start, stop, last_lsn, last_sample, c_max, sample_distance)
 *       -> (reached, last_lsn, last_sample, b_end, b_start, c_end, c_time, c_max, entries)
 *
 * the index entries records[start:reached] make: a commit (xact COMMIT or COMMIT_PREPARED)
 * is a boundary with its xact_time, any other record ending sample_distance past the last
 * boundary a plain boundary, records ending at or below last_lsn nothing. The arrays come as
 * native-order bytes for array.frombytes (c_max, the running maximum of commit times, goes
 * on from `c_max`, None when there is none yet), `entries` as the file's records (_ENTRY,
 * "<IIQQq": CRC-32C of the rest, flags, end, start, xact_time). It stops before a commit
 * record too short to hold its xact_time (Python raises). `records` may be DecodedRecords or
 * the reader's RawRecords (what ingest_raw_run took: rmgr and info come from the XLogRecord
 * header, a commit's main data from wr_record_layout).
 */
static uint32_t crc32c_table[256];

static uint32_t
crc32c(const uint8_t *p, size_t n)
{
    uint32_t crc = 0xFFFFFFFFu;
    while (n--)
        crc = crc32c_table[(crc ^ *p++) & 0xFF] ^ (crc >> 8);
    return crc ^ 0xFFFFFFFFu;
}

typedef struct {
    char *p;
    size_t n, cap;
} Buf;

static int
buf_put(Buf *b, const void *data, size_t n)
{
    if (b->n + n > b->cap) {
        size_t cap = b->cap ? b->cap * 2 : 4096;
        while (cap < b->n + n)
            cap *= 2;
        char *q = PyMem_Realloc(b->p, cap);
        if (q == NULL) {
            PyErr_NoMemory();
            return -1;
        }
        b->p = q;
        b->cap = cap;
    }
    memcpy(b->p + b->n, data, n);
    b->n += n;
    return 0;
}

static void
store_le(uint8_t *p, uint64_t v, int n)
{
    for (int i = 0; i < n; i++, v >>= 8)
        p[i] = (uint8_t)v;
}

static PyObject *
py_index_entries(PyObject *self, PyObject *args)
{
    PyObject *records, *cmax_obj;
    Py_ssize_t start, stop;
    long long last_lsn, last_sample, sample_distance;
    if (!PyArg_ParseTuple(args, "O!nnLLOL:index_entries", &PyList_Type, &records, &start, &stop,
                          &last_lsn, &last_sample, &cmax_obj, &sample_distance))
        return NULL;
    int have_max = cmax_obj != Py_None;
    long long c_max = have_max ? PyLong_AsLongLong(cmax_obj) : 0;
    if (c_max == -1 && PyErr_Occurred())
        return NULL;
    if (start < 0 || stop > PyList_GET_SIZE(records) || start > stop) {
        PyErr_SetString(PyExc_IndexError, "index_entries: bad record range");
        return NULL;
    }
    Buf out[6] = {{0}}; /* b_end, b_start, c_end, c_time, c_max, entries */
    Py_ssize_t i = start;
    for (; i < stop; i++) {
        PyObject *rec = PyList_GET_ITEM(records, i);
        /* a DecodedRecord, or a RawRecord (lsn, end_lsn, bytes) read through its header */
        int raw = PyTuple_Check(rec) && PyTuple_GET_SIZE(rec) == 3 &&
                  PyBytes_CheckExact(PyTuple_GET_ITEM(rec, 2));
        if (!raw && (!PyTuple_Check(rec) || PyTuple_GET_SIZE(rec) <= R_MAIN))
            break;
        if (raw && PyBytes_GET_SIZE(PyTuple_GET_ITEM(rec, 2)) < WR_RECORD_HEADER)
            break; /* Python decodes it (and raises) */
        unsigned long long end = PyLong_AsUnsignedLongLong(PyTuple_GET_ITEM(rec, raw ? 1 : R_END_LSN));
        if (end == (unsigned long long)-1 && PyErr_Occurred())
            goto fail;
        if (end > (unsigned long long)LLONG_MAX)
            break;
        if ((long long)end <= last_lsn)
            continue;
        const uint8_t *data = raw ? (const uint8_t *)PyBytes_AS_STRING(PyTuple_GET_ITEM(rec, 2)) : NULL;
        long rmid = raw ? data[17] : PyLong_AsLong(PyTuple_GET_ITEM(rec, R_RMGR));
        long info = raw ? data[16] : PyLong_AsLong(PyTuple_GET_ITEM(rec, R_INFO));
        if (PyErr_Occurred())
            goto fail;
        int commit = rmid == RM_XACT_ID && ((info & 0x70) == 0x00 || (info & 0x70) == 0x30);
        long long xtime = 0;
        if (commit) {
            const uint8_t *main;
            if (raw) {
                PyObject *bytes = PyTuple_GET_ITEM(rec, 2);
                RecordLayout lay;
                if (!wr_record_layout(data, PyBytes_GET_SIZE(bytes), &lay) || lay.main_len < 8)
                    break; /* Python decodes it (and raises) */
                main = data + lay.main_off;
            } else {
                PyObject *m = PyTuple_GET_ITEM(rec, R_MAIN);
                if (!PyBytes_Check(m) || PyBytes_GET_SIZE(m) < 8)
                    break; /* Python raises */
                main = (const uint8_t *)PyBytes_AS_STRING(m);
            }
            xtime = (long long)load_u32(main) | ((long long)load_u32(main + 4) << 32);
        } else {
            long long since; /* end - last_sample; past LLONG_MAX is past any distance */
            if (!__builtin_sub_overflow((long long)end, last_sample, &since) &&
                since < sample_distance)
                continue;
        }
        unsigned long long rec_start = PyLong_AsUnsignedLongLong(PyTuple_GET_ITEM(rec, raw ? 0 : R_LSN));
        if (rec_start == (unsigned long long)-1 && PyErr_Occurred())
            goto fail;
        uint64_t e64 = end, s64 = rec_start;
        if (buf_put(&out[0], &e64, 8) < 0 || buf_put(&out[1], &s64, 8) < 0)
            goto fail;
        uint32_t flags = 1; /* FLAG_BOUNDARY */
        if (commit) {
            flags |= 2; /* FLAG_COMMIT */
            c_max = have_max && c_max > xtime ? c_max : xtime;
            have_max = 1;
            if (buf_put(&out[2], &e64, 8) < 0 || buf_put(&out[3], &xtime, 8) < 0 ||
                buf_put(&out[4], &c_max, 8) < 0)
                goto fail;
        }
        uint8_t entry[32];
        store_le(entry + 4, flags, 4);
        store_le(entry + 8, end, 8);
        store_le(entry + 16, rec_start, 8);
        store_le(entry + 24, (uint64_t)xtime, 8);
        store_le(entry, crc32c(entry + 4, 28), 4);
        if (buf_put(&out[5], entry, sizeof entry) < 0)
            goto fail;
        last_lsn = (long long)end;
        last_sample = (long long)end;
    }
    PyObject *result = Py_BuildValue(
        "nLLy#y#y#y#y#y#", i, last_lsn, last_sample, out[0].p ? out[0].p : "",
        (Py_ssize_t)out[0].n, out[1].p ? out[1].p : "", (Py_ssize_t)out[1].n,
        out[2].p ? out[2].p : "", (Py_ssize_t)out[2].n, out[3].p ? out[3].p : "",
        (Py_ssize_t)out[3].n, out[4].p ? out[4].p : "", (Py_ssize_t)out[4].n,
        out[5].p ? out[5].p : "", (Py_ssize_t)out[5].n);
    for (int k = 0; k < 6; k++)
        PyMem_Free(out[k].p);
    return result;
fail:
    for (int k = 0; k < 6; k++)
        PyMem_Free(out[k].p);
    return NULL;
}

static PyMethodDef methods[] = {
    {"ingest_run", py_ingest_run, METH_VARARGS, "WalIngest's fast path (see the module comment)."},
    {"ingest_raw_run", py_ingest_raw_run, METH_VARARGS,
     "ingest_run on the reader's RawRecords, fused with the decoder (see its comment)."},
    {"index_entries", py_index_entries, METH_VARARGS,
     "LsnIndex.observe_all's loop (see its comment)."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_walingest", "C fast path of pageserver.ingest.walingest.", -1,
    methods,
};

PyMODINIT_FUNC
PyInit__walingest(void)
{
    static const char *names[3] = {"spc", "db", "rel"};
    for (int i = 0; i < 3; i++)
        if ((rnode_names[i] = PyUnicode_InternFromString(names[i])) == NULL)
            return NULL;
    /* PyCapsule_Import walks attributes from the top package: import the module first */
    PyObject *owner = PyImport_ImportModule("pageserver.storage.layers._inmem");
    if (owner == NULL)
        return NULL;
    Py_DECREF(owner);
    if ((inmem = PyCapsule_Import(INMEM_CAPSULE, 0)) == NULL)
        return NULL;
    if (inmem->version != INMEM_API_VERSION) {
        PyErr_Format(PyExc_ImportError,
                     "_walingest was built for _inmem C API version %d, the loaded _inmem has "
                     "%d: rebuild the extensions",
                     INMEM_API_VERSION, inmem->version);
        inmem = NULL;
        return NULL;
    }
    for (uint32_t n = 0; n < 256; n++) {
        uint32_t c = n;
        for (int k = 0; k < 8; k++)
            c = c & 1 ? (c >> 1) ^ 0x82F63B78u : c >> 1; /* CRC-32C (Castagnoli), reflected */
        crc32c_table[n] = c;
    }
    return PyModule_Create(&module);
}
