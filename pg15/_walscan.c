/*
 * Optional C accelerator for the two per-record hot loops of WAL catch-up:
 *
 *   scan(...)           the WalReader's common case: whole records (in one page or spanning
 *                       ordinary continuation pages) with the expected prev-link and a good
 *                       CRC-32C, returned as RawRecord tuples;
 *   decode_record(raw)  pg15.records.decode_record, producing the same NamedTuples.
 *
 * Both are strictly a fast path of the pure-Python implementation, which stays the reference:
 * scan() stops (returns what it has) at anything unusual (page header flags, timeline change,
 * XLOG_SWITCH, a CRC mismatch, bytes not yet fed) and the Python reader takes over there, so
 * every error and every end-of-WAL decision is made by Python. decode_record() hands every
 * record it would reject to the Python decoder, which raises the error. Tests run both over
 * the same WAL (and over damaged WAL) and require equal results.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

#define WAL_BLOCK 8192u
#define SHORT_PAGE_HEADER 24
#define LONG_PAGE_HEADER 40
#define RECORD_HEADER 24
#define XLOG_PAGE_MAGIC 0xD110
#define XLP_FIRST_IS_CONTRECORD 0x0001
#define XLP_LONG_HEADER 0x0002
#define XLP_FIRST_IS_OVERWRITE_CONTRECORD 0x0008
#define XLP_ALL_FLAGS 0x000F
#define RM_XLOG_ID 0
#define RM_MAX_BUILTIN_ID 21
#define XLOG_SWITCH 0x40
#define MAX_RECORD_SIZE 0x3FFFFFFFu

#include "crc32c.h"
#include "walrecord.h" /* the record layout, shared with the fused C ingest */

/* ---- little-endian loads ------------------------------------------------------------- */

static inline uint16_t
load16(const uint8_t *p)
{
    return (uint16_t)(p[0] | (p[1] << 8));
}

static inline uint32_t
load32(const uint8_t *p)
{
    return (uint32_t)p[0] | ((uint32_t)p[1] << 8) | ((uint32_t)p[2] << 16) | ((uint32_t)p[3] << 24);
}

static inline uint64_t
load64(const uint8_t *p)
{
    return (uint64_t)load32(p) | ((uint64_t)load32(p + 4) << 32);
}

/* ---- CRC-32C: pg15/crc32c.h ------------------------------------------------------ */

/* PostgreSQL's record CRC: the body after the header, then header bytes 0..19. */
static uint32_t
record_crc(const uint8_t *rec, size_t tot_len)
{
    uint32_t c = crc_update(0xFFFFFFFFu, rec + RECORD_HEADER, tot_len - RECORD_HEADER);
    c = crc_update(c, rec, 20);
    return c ^ 0xFFFFFFFFu;
}

static PyObject *
py_crc32c(PyObject *self, PyObject *args)
{
    Py_buffer view;
    unsigned int start = 0;
    if (!PyArg_ParseTuple(args, "y*|I", &view, &start))
        return NULL;
    uint32_t c = crc_update(start ^ 0xFFFFFFFFu, view.buf, (size_t)view.len) ^ 0xFFFFFFFFu;
    PyBuffer_Release(&view);
    return PyLong_FromUnsignedLong(c);
}

/* ---- the types the Python side defines ----------------------------------------------- */

static PyTypeObject *RawRecordType;
static PyTypeObject *DecodedRecordType;
static PyTypeObject *BlockRefType;
static PyTypeObject *BlockImageType;
static PyObject *RelFileNodeClass;
static PyObject *py_fallback_decoder;
static PyObject *empty_tuple;

/* A NamedTuple instance built as tuple.__new__(cls, items) would: the items are stolen. */
static PyObject *
new_record_tuple(PyTypeObject *type, Py_ssize_t n, PyObject **items)
{
    PyObject *t = type->tp_alloc(type, n);
    if (t == NULL) {
        for (Py_ssize_t i = 0; i < n; i++)
            Py_XDECREF(items[i]);
        return NULL;
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        if (items[i] == NULL) { /* a failed allocation among the items */
            for (Py_ssize_t j = i + 1; j < n; j++)
                Py_XDECREF(items[j]);
            Py_DECREF(t);
            return NULL;
        }
        PyTuple_SET_ITEM(t, i, items[i]);
    }
    return t;
}

static int
check_tuple_subtype(PyObject *obj, const char *what)
{
    if (!PyType_Check(obj) || !PyType_IsSubtype((PyTypeObject *)obj, &PyTuple_Type)) {
        PyErr_Format(PyExc_TypeError, "%s must be a tuple subclass", what);
        return -1;
    }
    return 0;
}

static PyObject *
py_init_reader(PyObject *self, PyObject *args)
{
    PyObject *raw;
    if (!PyArg_ParseTuple(args, "O", &raw) || check_tuple_subtype(raw, "RawRecord") < 0)
        return NULL;
    Py_INCREF(raw);
    Py_XSETREF(RawRecordType, (PyTypeObject *)raw);
    Py_RETURN_NONE;
}

static PyObject *
py_init_decoder(PyObject *self, PyObject *args)
{
    PyObject *decoded, *blockref, *image, *relfilenode, *fallback;
    if (!PyArg_ParseTuple(args, "OOOOO", &decoded, &blockref, &image, &relfilenode, &fallback))
        return NULL;
    if (check_tuple_subtype(decoded, "DecodedRecord") < 0 ||
        check_tuple_subtype(blockref, "BlockRef") < 0 ||
        check_tuple_subtype(image, "BlockImage") < 0)
        return NULL;
    if (!PyCallable_Check(relfilenode) || !PyCallable_Check(fallback)) {
        PyErr_SetString(PyExc_TypeError, "RelFileNode and the fallback decoder must be callable");
        return NULL;
    }
    Py_INCREF(decoded);
    Py_XSETREF(DecodedRecordType, (PyTypeObject *)decoded);
    Py_INCREF(blockref);
    Py_XSETREF(BlockRefType, (PyTypeObject *)blockref);
    Py_INCREF(image);
    Py_XSETREF(BlockImageType, (PyTypeObject *)image);
    Py_INCREF(relfilenode);
    Py_XSETREF(RelFileNodeClass, relfilenode);
    Py_INCREF(fallback);
    Py_XSETREF(py_fallback_decoder, fallback);
    Py_RETURN_NONE;
}

/* ---- the reader's fast path ---------------------------------------------------------- */

typedef struct {
    const uint8_t *buf;
    uint64_t base;     /* LSN of buf[0] */
    uint64_t avail_end; /* LSN just past the last byte */
    uint64_t seg_size;
    uint64_t system_id;
    int system_id_known;
    uint32_t timeline; /* the timeline of the last page header the reader accepted */
} ScanCtx;

/*
 * The size of the ordinary page header at `lsn`, or 0 if anything about it is unusual (or
 * not fed yet): the Python reader decides those. `cont` says a record continues onto this
 * page with `rem` bytes left.
 */
static int
page_header_size(const ScanCtx *ctx, uint64_t lsn, int cont, uint32_t rem)
{
    if (lsn >= ctx->avail_end || ctx->avail_end - lsn < SHORT_PAGE_HEADER)
        return 0;
    const uint8_t *p = ctx->buf + (lsn - ctx->base);
    uint16_t magic = load16(p), info = load16(p + 2);
    if (magic != XLOG_PAGE_MAGIC || (info & ~XLP_ALL_FLAGS) || load32(p + 4) != ctx->timeline ||
        load64(p + 8) != lsn)
        return 0;
    if (cont) {
        if (!(info & XLP_FIRST_IS_CONTRECORD) || (info & XLP_FIRST_IS_OVERWRITE_CONTRECORD) ||
            load32(p + 16) != rem)
            return 0;
    }
    else if (info & (XLP_FIRST_IS_CONTRECORD | XLP_FIRST_IS_OVERWRITE_CONTRECORD))
        return 0;
    if (info & XLP_LONG_HEADER) {
        if (ctx->avail_end - lsn < LONG_PAGE_HEADER || !ctx->system_id_known ||
            load64(p + 24) != ctx->system_id || load32(p + 32) != ctx->seg_size ||
            load32(p + 36) != WAL_BLOCK)
            return 0;
        return LONG_PAGE_HEADER;
    }
    if (lsn % ctx->seg_size == 0)
        return 0;
    return SHORT_PAGE_HEADER;
}

static PyObject *
make_raw_record(uint64_t lsn, uint64_t end_lsn, PyObject *data)
{
    PyObject *items[3] = {PyLong_FromUnsignedLongLong(lsn), PyLong_FromUnsignedLongLong(end_lsn),
                          data};
    return new_record_tuple(RawRecordType, 3, items);
}

/*
 * scan(buf, base, pos, prev_lsn, segment_size, system_id, timeline, max_records)
 *     -> list[RawRecord]
 *
 * `pos` is where the reader is, between records (a record start or a page boundary), and
 * `prev_lsn` the start of the previous record. Returns the records that follow, up to the
 * first thing the fast path does not handle.
 */
static PyObject *
py_scan(PyObject *self, PyObject *args)
{
    const char *bufp;
    Py_ssize_t buflen, max_records;
    unsigned long long base, pos, prev_lsn, seg_size;
    PyObject *system_id;
    unsigned int timeline;
    if (!PyArg_ParseTuple(args, "y#KKKKOIn", &bufp, &buflen, &base, &pos, &prev_lsn, &seg_size,
                          &system_id, &timeline, &max_records))
        return NULL;
    if (RawRecordType == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "_walscan.init_reader() was not called");
        return NULL;
    }
    ScanCtx ctx = {(const uint8_t *)bufp, base, base + (uint64_t)buflen, seg_size, 0, 0, timeline};
    if (system_id != Py_None) {
        ctx.system_id = PyLong_AsUnsignedLongLong(system_id);
        if (ctx.system_id == (uint64_t)-1 && PyErr_Occurred())
            return NULL;
        ctx.system_id_known = 1;
    }
    if (seg_size == 0 || (seg_size & (seg_size - 1)) || seg_size < WAL_BLOCK) {
        PyErr_SetString(PyExc_ValueError, "bad segment size");
        return NULL;
    }
    PyObject *out = PyList_New(0);
    if (out == NULL)
        return NULL;
    if (pos < base || timeline == 0)
        return out;

    while (PyList_GET_SIZE(out) < max_records && pos < ctx.avail_end) {
        uint64_t page_off = pos % WAL_BLOCK;
        if (page_off == 0) {
            int hs = page_header_size(&ctx, pos, 0, 0);
            if (hs == 0)
                break;
            pos += hs;
            continue;
        }
        if (pos & 7)
            break;
        uint64_t room = WAL_BLOCK - page_off;
        const uint8_t *rec = ctx.buf + (pos - base);
        const uint8_t *head = rec;
        uint8_t split_head[RECORD_HEADER];
        if (room < RECORD_HEADER) {
            /* The record header itself continues after the next page header; that page
               header is checked with the rest of the record below. */
            uint64_t page = pos + room;
            if (page >= ctx.avail_end || ctx.avail_end - page < SHORT_PAGE_HEADER)
                break;
            uint64_t hs = (load16(ctx.buf + (page - base) + 2) & XLP_LONG_HEADER)
                              ? LONG_PAGE_HEADER
                              : SHORT_PAGE_HEADER;
            if (page + hs >= ctx.avail_end || ctx.avail_end - (page + hs) < RECORD_HEADER - room)
                break;
            memcpy(split_head, rec, room);
            memcpy(split_head + room, ctx.buf + (page + hs - base), RECORD_HEADER - room);
            head = split_head;
        }
        else if (ctx.avail_end - pos < RECORD_HEADER)
            break;
        uint32_t tot_len = load32(head);
        uint64_t prev = load64(head + 8);
        uint8_t info = head[16], rmid = head[17];
        if (prev != prev_lsn || tot_len < RECORD_HEADER || tot_len > MAX_RECORD_SIZE ||
            rmid > RM_MAX_BUILTIN_ID || (rmid == RM_XLOG_ID && (info & 0xF0) == XLOG_SWITCH))
            break;
        PyObject *data;
        uint64_t end = 0;
        if (tot_len <= room) {
            if (ctx.avail_end - pos < tot_len)
                break;
            end = pos + tot_len;
            data = PyBytes_FromStringAndSize((const char *)rec, tot_len);
            if (data == NULL)
                goto error;
        }
        else {
            /* Check every continuation page first, then copy the pieces. */
            uint64_t left = tot_len - room, page = pos + room;
            int ok = 1;
            while (left > 0) {
                int hs = page_header_size(&ctx, page, 1, (uint32_t)left);
                if (hs == 0) {
                    ok = 0;
                    break;
                }
                uint64_t room_here = WAL_BLOCK - (uint64_t)hs;
                uint64_t take = room_here < left ? room_here : left;
                if (page + hs > ctx.avail_end || ctx.avail_end - (page + hs) < take) {
                    ok = 0;
                    break;
                }
                left -= take;
                end = page + hs + take;
                page += WAL_BLOCK;
            }
            if (!ok)
                break;
            data = PyBytes_FromStringAndSize(NULL, tot_len);
            if (data == NULL)
                goto error;
            uint8_t *dst = (uint8_t *)PyBytes_AS_STRING(data);
            memcpy(dst, rec, room);
            uint64_t got = room;
            page = pos + room;
            while (got < tot_len) {
                int hs = page_header_size(&ctx, page, 1, (uint32_t)(tot_len - got));
                uint64_t room_here = WAL_BLOCK - (uint64_t)hs;
                uint64_t take = room_here < tot_len - got ? room_here : tot_len - got;
                memcpy(dst + got, ctx.buf + (page + hs - base), take);
                got += take;
                page += WAL_BLOCK;
            }
        }
        const uint8_t *whole = (const uint8_t *)PyBytes_AS_STRING(data);
        if (record_crc(whole, tot_len) != load32(whole + 20)) {
            Py_DECREF(data);
            break;
        }
        uint64_t end_lsn = (end + 7) & ~(uint64_t)7;
        PyObject *raw = make_raw_record(pos, end_lsn, data);
        if (raw == NULL)
            goto error;
        int rc = PyList_Append(out, raw);
        Py_DECREF(raw);
        if (rc < 0)
            goto error;
        prev_lsn = pos;
        pos = end_lsn;
    }
    return out;
error:
    Py_DECREF(out);
    return NULL;
}

/* ---- the decoder --------------------------------------------------------------------- */

/* RelFileNode objects, shared by their three OIDs: a workload touches few relations. */
#define RNODE_CACHE_SIZE 1024
typedef struct {
    uint32_t spc, db, rel;
    PyObject *obj;
} RnodeSlot;
static RnodeSlot rnode_cache[RNODE_CACHE_SIZE];

static PyObject *
rnode_get(uint32_t spc, uint32_t db, uint32_t rel)
{
    uint32_t h = (rel * 2654435761u) ^ (db * 40503u) ^ spc;
    RnodeSlot *slot = &rnode_cache[h & (RNODE_CACHE_SIZE - 1)];
    if (slot->obj != NULL && slot->rel == rel && slot->db == db && slot->spc == spc) {
        Py_INCREF(slot->obj);
        return slot->obj;
    }
    PyObject *obj = PyObject_CallFunction(RelFileNodeClass, "kkk", (unsigned long)spc,
                                          (unsigned long)db, (unsigned long)rel);
    if (obj == NULL)
        return NULL;
    Py_XSETREF(slot->obj, obj);
    slot->spc = spc;
    slot->db = db;
    slot->rel = rel;
    Py_INCREF(obj);
    return obj;
}

static PyObject *
bytes_slice(const uint8_t *p, uint64_t n)
{
    return PyBytes_FromStringAndSize((const char *)p, (Py_ssize_t)n);
}

static PyObject *
py_decode_record(PyObject *self, PyObject *raw)
{
    if (DecodedRecordType == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "_walscan.init_decoder() was not called");
        return NULL;
    }
    if (!PyTuple_Check(raw) || PyTuple_GET_SIZE(raw) != 3 ||
        !PyBytes_CheckExact(PyTuple_GET_ITEM(raw, 2)))
        return PyObject_CallOneArg(py_fallback_decoder, raw);
    PyObject *lsn_obj = PyTuple_GET_ITEM(raw, 0), *end_obj = PyTuple_GET_ITEM(raw, 1);
    PyObject *bytes = PyTuple_GET_ITEM(raw, 2);
    const uint8_t *data = (const uint8_t *)PyBytes_AS_STRING(bytes);
    int64_t n = PyBytes_GET_SIZE(bytes);

    RecordLayout lay;
    if (!wr_record_layout(data, n, &lay))
        goto fallback;
    int nheads = lay.nheads;
    BlockHead *heads = lay.heads;
    uint64_t main_len = lay.main_len;
    int has_origin = lay.has_origin, has_toplevel = lay.has_toplevel;
    uint32_t origin = lay.origin, toplevel = lay.toplevel;

    PyObject *blocks;
    if (nheads == 0) {
        blocks = empty_tuple;
        Py_INCREF(blocks);
    }
    else {
        blocks = PyTuple_New(nheads);
        if (blocks == NULL)
            return NULL;
        for (int i = 0; i < nheads; i++) {
            BlockHead *h = &heads[i];
            PyObject *image = Py_None;
            Py_INCREF(image);
            if (h->has_image) {
                Py_DECREF(image);
                PyObject *items[4] = {bytes_slice(data + h->image_off, h->bimg_len),
                                      PyLong_FromUnsignedLong(h->hole_offset),
                                      PyLong_FromUnsignedLong(h->hole_length),
                                      PyLong_FromUnsignedLong(h->bimg_info)};
                image = new_record_tuple(BlockImageType, 4, items);
                if (image == NULL) {
                    Py_DECREF(blocks);
                    return NULL;
                }
            }
            PyObject *items[7] = {PyLong_FromLong(h->block_id),
                                  rnode_get(h->spc, h->db, h->rel),
                                  PyLong_FromLong(h->fork_flags & BKPBLOCK_FORK_MASK),
                                  PyLong_FromUnsignedLong(h->blkno),
                                  PyLong_FromLong(h->fork_flags),
                                  image,
                                  bytes_slice(data + h->data_off, h->data_len)};
            PyObject *ref = new_record_tuple(BlockRefType, 7, items);
            if (ref == NULL) {
                Py_DECREF(blocks);
                return NULL;
            }
            PyTuple_SET_ITEM(blocks, i, ref);
        }
    }
    PyObject *origin_obj = Py_None, *toplevel_obj = Py_None;
    if (has_origin)
        origin_obj = PyLong_FromUnsignedLong(origin);
    else
        Py_INCREF(origin_obj);
    if (has_toplevel)
        toplevel_obj = PyLong_FromUnsignedLong(toplevel);
    else
        Py_INCREF(toplevel_obj);
    Py_INCREF(lsn_obj);
    Py_INCREF(end_obj);
    PyObject *items[11] = {lsn_obj,
                           end_obj,
                           PyLong_FromUnsignedLong(load32(data)),
                           PyLong_FromUnsignedLong(load32(data + 4)),
                           PyLong_FromUnsignedLongLong(load64(data + 8)),
                           PyLong_FromLong(data[16]),
                           PyLong_FromLong(data[17]),
                           blocks,
                           bytes_slice(data + lay.main_off, main_len),
                           origin_obj,
                           toplevel_obj};
    return new_record_tuple(DecodedRecordType, 11, items);

fallback:
    return PyObject_CallOneArg(py_fallback_decoder, raw);
}

/* decode_records(list_of_raw) -> list of DecodedRecord: decode_record over a whole batch. */
static PyObject *
py_decode_records(PyObject *self, PyObject *batch)
{
    if (!PyList_Check(batch)) {
        PyErr_SetString(PyExc_TypeError, "decode_records() takes a list of RawRecord");
        return NULL;
    }
    Py_ssize_t n = PyList_GET_SIZE(batch);
    PyObject *out = PyList_New(n);
    if (out == NULL)
        return NULL;
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *rec = py_decode_record(self, PyList_GET_ITEM(batch, i));
        if (rec == NULL) {
            Py_DECREF(out);
            return NULL;
        }
        PyList_SET_ITEM(out, i, rec);
    }
    return out;
}

/* ---- module -------------------------------------------------------------------------- */

static PyMethodDef methods[] = {
    {"init_reader", py_init_reader, METH_VARARGS, "Register the RawRecord type."},
    {"init_decoder", py_init_decoder, METH_VARARGS,
     "Register DecodedRecord, BlockRef, BlockImage, RelFileNode and the Python decoder."},
    {"scan", py_scan, METH_VARARGS, "The WalReader fast path (see the module comment)."},
    {"decode_record", py_decode_record, METH_O, "pg15.records.decode_record in C."},
    {"decode_records", py_decode_records, METH_O, "decode_record over a list of records."},
    {"crc32c", py_crc32c, METH_VARARGS, "CRC-32C of a buffer, continuing from a value."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_walscan", "C fast paths of the WAL reader and decoder.", -1, methods,
};

PyMODINIT_FUNC
PyInit__walscan(void)
{
    crc_select();
    empty_tuple = PyTuple_New(0);
    if (empty_tuple == NULL)
        return NULL;
    PyObject *m = PyModule_Create(&module);
    if (m == NULL)
        return NULL;
    if (PyModule_AddStringConstant(m, "crc_implementation",
                                   crc_update == crc_update_sw ? "table" : "sse4.2") < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
