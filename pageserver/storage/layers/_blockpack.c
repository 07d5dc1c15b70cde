/*
 * Optional C fast path of LayerFileWriter.add_key (pageserver/storage/layers/blocks.py): the
 * per-version loop that encodes values into the current value block and packs their version
 * table entries. The Python loop stays the reference; tests write the same layers both ways.
 *
 *   pack_versions(versions, start, buf, limit, block_no, entries, lsn_lo, lsn_hi, prev,
 *                 value_types) -> (next, added, last_lsn, status)
 *
 * appends versions[start:] ((LSN, value) pairs) to `buf` (bytearray, the open block) and
 * their entries to `entries` (bytearray), and stops with status
 *   0  all appended;
 *   1  versions[next] does not fit in a non-empty block: the caller compresses the block,
 *      empties `buf` and calls again from `next` with block_no + 1;
 *   2  versions[next] has an LSN outside [lsn_lo, lsn_hi);
 *   3  versions[next] has an LSN below the one before it (`prev` for the first);
 *   4  versions[next] is not a value (an empty encoding or an unknown object).
 * A value is its encoding (bytes: a tag byte, then the payload; values.encode_value) or an
 * Image, WalDelta or Tombstone object (value_types: those three classes), encoded here.
 * An entry is struct ">QBIII": LSN, tag, block number, offset in the block, length.
 *
 * It also holds the reader's key lookup, LayerFile.lower_bound:
 *
 *   lower_bound(keys, key_size, key) -> index of the first key >= key
 *
 * over `keys`, key_size-byte keys packed back to back in ascending order, comparing as
 * Python compares bytes (memcmp, then the shorter first). A basebackup of pages that have
 * WAL versions looks every page up in every layer it reads through: the Python loop was the
 * largest part of an export's time.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

#include "native_slots.h"

#define TAG_IMAGE 1 /* values.TAG_* */
#define TAG_DELTA 2
#define TAG_DELTA_INIT 3
#define TAG_TOMBSTONE 4
#define ENTRY_SIZE 21
#define NARROW_SIZE 13 /* blocks._NARROW_ENTRY */
#define KEY_SIZE 18 /* keys.KEY_SIZE */


static void
put_be(uint8_t *p, uint64_t v, int n)
{
    for (int i = n - 1; i >= 0; i--, v >>= 8)
        p[i] = (uint8_t)v;
}

static PyObject *
py_pack_versions(PyObject *self, PyObject *args)
{
    PyObject *versions, *buf, *entries, *image_t, *delta_t, *tomb_t;
    Py_ssize_t start, limit;
    unsigned long block_no;
    unsigned long long lo, hi, prev;
    if (!PyArg_ParseTuple(
            args, "O!nO!nkO!KKK(OOO):pack_versions", &PyList_Type, &versions, &start,
            &PyByteArray_Type, &buf, &limit, &block_no, &PyByteArray_Type, &entries, &lo, &hi,
            &prev, &image_t, &delta_t, &tomb_t))
        return NULL;
    if (start < 0 || limit < 0 || (uint64_t)limit > UINT32_MAX || block_no > UINT32_MAX) {
        /* entries hold block numbers and offsets as u32 */
        PyErr_SetString(PyExc_ValueError, "pack_versions: start, limit or block out of range");
        return NULL;
    }
    Py_ssize_t image_data = slot_offset(image_t, "data");
    Py_ssize_t delta_record = image_data < 0 ? -1 : slot_offset(delta_t, "record");
    Py_ssize_t delta_init = delta_record < 0 ? -1 : slot_offset(delta_t, "will_init");
    if (delta_init < 0)
        return NULL;
    Py_ssize_t n = PyList_GET_SIZE(versions), i = start, added = 0;
    int status = 0;
    for (; i < n; i++) {
        PyObject *item = PyList_GET_ITEM(versions, i);
        if (!PyTuple_Check(item) || PyTuple_GET_SIZE(item) != 2) {
            status = 4;
            break;
        }
        unsigned long long lsn = PyLong_AsUnsignedLongLong(PyTuple_GET_ITEM(item, 0));
        if (lsn == (unsigned long long)-1 && PyErr_Occurred()) {
            if (!PyErr_ExceptionMatches(PyExc_OverflowError))
                return NULL;
            PyErr_Clear(); /* negative or past 2**64: outside [lo, hi), as the reference says */
            status = 2;
            break;
        }
        if (lsn < lo || lsn >= hi) {
            status = 2;
            break;
        }
        if (lsn < prev) {
            status = 3;
            break;
        }
        PyObject *value = PyTuple_GET_ITEM(item, 1);
        const char *body = NULL;
        Py_ssize_t body_len = 0;
        int tag;
        if (PyBytes_Check(value)) {
            if (PyBytes_GET_SIZE(value) == 0) {
                status = 4;
                break;
            }
            tag = (uint8_t)PyBytes_AS_STRING(value)[0];
            body = PyBytes_AS_STRING(value) + 1;
            body_len = PyBytes_GET_SIZE(value) - 1;
        } else {
            PyObject *data = NULL;
            if (Py_IS_TYPE(value, (PyTypeObject *)image_t)) {
                tag = TAG_IMAGE;
                data = slot_get(value, image_data);
            } else if (Py_IS_TYPE(value, (PyTypeObject *)delta_t)) {
                PyObject *init = slot_get(value, delta_init);
                tag = init == Py_True ? TAG_DELTA_INIT : TAG_DELTA;
                data = slot_get(value, delta_record);
            } else if (Py_IS_TYPE(value, (PyTypeObject *)tomb_t)) {
                tag = TAG_TOMBSTONE;
            } else {
                status = 4;
                break;
            }
            if (data != NULL) {
                if (!PyBytes_Check(data)) {
                    status = 4;
                    break;
                }
                body = PyBytes_AS_STRING(data);
                body_len = PyBytes_GET_SIZE(data);
            }
        }
        Py_ssize_t size = 1 + body_len, used = PyByteArray_GET_SIZE(buf);
        if (size > UINT32_MAX || used > UINT32_MAX) {
            status = 4; /* its length or offset does not fit the entry */
            break;
        }
        if (used > 0 && used + size > limit) {
            status = 1;
            break;
        }
        Py_ssize_t at = PyByteArray_GET_SIZE(entries);
        if (PyByteArray_Resize(entries, at + ENTRY_SIZE) < 0 ||
            PyByteArray_Resize(buf, used + size) < 0)
            return NULL;
        uint8_t *e = (uint8_t *)PyByteArray_AS_STRING(entries) + at;
        put_be(e, lsn, 8);
        e[8] = (uint8_t)tag;
        put_be(e + 9, block_no, 4);
        put_be(e + 13, (uint64_t)used, 4);
        put_be(e + 17, (uint64_t)size, 4);
        uint8_t *b = (uint8_t *)PyByteArray_AS_STRING(buf) + used;
        b[0] = (uint8_t)tag;
        if (body_len)
            memcpy(b + 1, body, body_len);
        added += size;
        prev = lsn;
    }
    return Py_BuildValue("nnKi", i, added, prev, status);
}

/* Whether the `size` bytes at `p` are all zero: the first byte, then each byte against the
 * next (memcmp runs at memory speed; a page with data usually differs in its first bytes). */
static int
all_zero(const uint8_t *p, Py_ssize_t size)
{
    return size == 0 || (p[0] == 0 && memcmp(p, p + 1, (size_t)size - 1) == 0);
}

/*
 * nonzero_pages(data, size) -> list of the offsets of data's `size`-byte pages that are not
 * all zero: ImageRunWriter.add_pages' page filter (image.py, `_nonzero_pages_python` the
 * reference), on any buffer (a memoryview of a decompressed frame: no copy of the pages).
 */
static PyObject *
py_nonzero_pages(PyObject *self, PyObject *args)
{
    Py_buffer data;
    Py_ssize_t size;
    if (!PyArg_ParseTuple(args, "y*n:nonzero_pages", &data, &size))
        return NULL;
    PyObject *out = NULL;
    if (size <= 0 || data.len % size) {
        PyErr_SetString(PyExc_ValueError, "nonzero_pages: not whole pages");
        goto done;
    }
    out = PyList_New(0);
    if (out == NULL)
        goto done;
    const uint8_t *p = (const uint8_t *)data.buf;
    for (Py_ssize_t o = 0; o < data.len; o += size) {
        if (all_zero(p + o, size))
            continue;
        PyObject *v = PyLong_FromSsize_t(o);
        if (v == NULL || PyList_Append(out, v) < 0) {
            Py_XDECREF(v);
            Py_CLEAR(out);
            goto done;
        }
        Py_DECREF(v);
    }
done:
    PyBuffer_Release(&data);
    return out;
}

/*
 * pack_images(prefix, first, data, offsets, i, size, keys, buf, limit, block_no, entries, n,
 *             lsn) -> (next, status)
 *
 * LayerFileWriter.add_images' loop (blocks.py, `_pack_images_python` the reference): for each
 * offset o of offsets[i:], the image data[o : o + size] at `lsn` of key prefix + the u32
 * block first + o // size: its key entry (">18sI": key, version index n, n + 1...) appended to
 * the list `keys`, its version entry (as pack_versions) to `entries`, its tag and bytes to
 * `buf` (the open block). Status 0: all appended; 1: offsets[next] does not fit in the
 * non-empty block (the caller cuts it and calls again from `next` with block_no + 1).
 */
#ifndef COPY_WITHOUT_GIL
#define COPY_WITHOUT_GIL (32 * 1024)
#endif

static PyObject *
py_pack_images(PyObject *self, PyObject *args)
{
    Py_buffer prefix, data;
    PyObject *offsets, *keys, *buf, *entries;
    unsigned long first, block_no, n;
    unsigned long long lsn;
    Py_ssize_t i, size, limit;
    if (!PyArg_ParseTuple(
            args, "y*ky*O!nnO!O!nkO!kK:pack_images", &prefix, &first, &data, &PyList_Type,
            &offsets, &i, &size, &PyList_Type, &keys, &PyByteArray_Type, &buf, &limit,
            &block_no, &PyByteArray_Type, &entries, &n, &lsn))
        return NULL;
    PyObject *result = NULL;
    Py_ssize_t *sources = NULL; /* the offsets of the pages to copy into the block */
    int status = 0;
    if (prefix.len != KEY_SIZE - 4 || size <= 0 || size >= UINT32_MAX || limit < 0 ||
        (uint64_t)limit > UINT32_MAX || block_no > UINT32_MAX || first > UINT32_MAX || i < 0) {
        PyErr_SetString(PyExc_ValueError, "pack_images: an argument is out of range");
        goto done;
    }
    Py_ssize_t count = PyList_GET_SIZE(offsets), used = PyByteArray_GET_SIZE(buf);
    Py_ssize_t stride = size + 1, fit = count - i;
    if (used + stride > UINT32_MAX) {
        PyErr_SetString(PyExc_ValueError, "pack_images: the block is too large");
        goto done;
    }
    /* The images that fit in the block (at least one in an empty block), its buffer and the
     * entries grown once for all of them: grown per image, each resize could move the block. */
    if (used > 0 || fit > 1) {
        Py_ssize_t room = used + stride > limit ? (used > 0 ? 0 : 1) : (limit - used) / stride;
        if (room < fit) {
            fit = room;
            status = 1;
        }
    }
    Py_ssize_t at = PyByteArray_GET_SIZE(entries), copied = 0, first_used = used;
    sources = fit > 0 ? PyMem_Malloc((size_t)fit * sizeof *sources) : NULL;
    if (fit > 0 && (sources == NULL || PyByteArray_Resize(entries, at + fit * ENTRY_SIZE) < 0 ||
                    PyByteArray_Resize(buf, used + fit * stride) < 0)) {
        if (sources == NULL)
            PyErr_NoMemory();
        goto done;
    }
    for (Py_ssize_t end = i + fit; i < end; i++, used += stride, at += ENTRY_SIZE) {
        Py_ssize_t o = PyLong_AsSsize_t(PyList_GET_ITEM(offsets, i));
        if (o == -1 && PyErr_Occurred())
            goto failed;
        if (o < 0 || o % size || o + size > data.len || first + (uint64_t)(o / size) > UINT32_MAX ||
            n >= UINT32_MAX) {
            PyErr_SetString(PyExc_ValueError, "pack_images: an offset is out of range");
            goto failed;
        }
        uint8_t key[KEY_SIZE + 4];
        memcpy(key, prefix.buf, KEY_SIZE - 4);
        put_be(key + KEY_SIZE - 4, first + (uint64_t)(o / size), 4);
        put_be(key + KEY_SIZE, n, 4);
        PyObject *entry = PyBytes_FromStringAndSize((const char *)key, sizeof key);
        if (entry == NULL)
            goto failed;
        int appended = PyList_Append(keys, entry);
        Py_DECREF(entry);
        if (appended < 0)
            goto failed;
        uint8_t *e = (uint8_t *)PyByteArray_AS_STRING(entries) + at;
        put_be(e, lsn, 8);
        e[8] = TAG_IMAGE;
        put_be(e + 9, block_no, 4);
        put_be(e + 13, (uint64_t)used, 4);
        put_be(e + 17, (uint64_t)stride, 4);
        ((uint8_t *)PyByteArray_AS_STRING(buf))[used] = TAG_IMAGE;
        sources[copied++] = o;
        n++;
    }
    /* The pages themselves copied without the GIL when they are many (a block's worth: the
     * frames' decompression and the event loop go on meanwhile); nothing else touches the
     * block, and `data` is held by its buffer export. */
    {
        uint8_t *b = (uint8_t *)PyByteArray_AS_STRING(buf) + first_used + 1;
        const uint8_t *src = (const uint8_t *)data.buf;
        if (copied * size >= COPY_WITHOUT_GIL) {
            Py_BEGIN_ALLOW_THREADS
            for (Py_ssize_t k = 0; k < copied; k++)
                memcpy(b + k * stride, src + sources[k], (size_t)size);
            Py_END_ALLOW_THREADS
        } else {
            for (Py_ssize_t k = 0; k < copied; k++)
                memcpy(b + k * stride, src + sources[k], (size_t)size);
        }
    }
    result = Py_BuildValue("ni", i, status);
    goto done;
failed: /* the block and entries hold exactly the images appended before the error */
    {
        uint8_t *b = (uint8_t *)PyByteArray_AS_STRING(buf) + first_used + 1;
        for (Py_ssize_t k = 0; k < copied; k++)
            memcpy(b + k * stride, (const uint8_t *)data.buf + sources[k], (size_t)size);
        PyObject *type, *value, *tb;
        PyErr_Fetch(&type, &value, &tb);
        (void)PyByteArray_Resize(buf, used);
        (void)PyByteArray_Resize(entries, at);
        PyErr_Restore(type, value, tb);
    }
done:
    PyMem_Free(sources);
    PyBuffer_Release(&prefix);
    PyBuffer_Release(&data);
    return result;
}

/*
 * pack_values(keys, values, i, tag, lsn, keys_out, buf, limit, block_no, entries, n)
 *   -> (next, status, added, last)
 *
 * LayerFileWriter.add_values' loop (blocks.py, pack_values_python the reference): for each
 * k from i, the value values[k] (bytes; None: nothing) at `lsn` of keys[k], encoded as the
 * byte `tag` and the value: its key entry (">18sI": key, version index n, n + 1...) appended to
 * the list keys_out, its version entry (as pack_versions) to `entries`, its bytes to `buf` (the
 * open block). `added`: the encoded bytes appended, `last`: the index of the last key given a
 * value (-1: none). Status 0: all appended; 1: values[next] does not fit in the non-empty
 * block (the caller cuts it and calls again from `next` with block_no + 1); 2: keys[next] is
 * not above the key before it.
 */
static PyObject *
py_pack_values(PyObject *self, PyObject *args)
{
    PyObject *keys, *values, *keys_out, *buf, *entries;
    Py_ssize_t i, limit;
    int tag;
    unsigned long block_no, n;
    unsigned long long lsn;
    if (!PyArg_ParseTuple(args, "O!O!niKO!O!nkO!k:pack_values", &PyList_Type, &keys,
                          &PyList_Type, &values, &i, &tag, &lsn, &PyList_Type, &keys_out,
                          &PyByteArray_Type, &buf, &limit, &block_no, &PyByteArray_Type,
                          &entries, &n))
        return NULL;
    Py_ssize_t count = PyList_GET_SIZE(keys), added = 0, last = -1;
    if (PyList_GET_SIZE(values) != count || i < 0 || tag < 0 || tag > 255 || limit < 0 ||
        (uint64_t)limit > UINT32_MAX || block_no > UINT32_MAX) {
        PyErr_SetString(PyExc_ValueError, "pack_values: an argument is out of range");
        return NULL;
    }
    /* First the values that go into this block and their bytes (the block and the entries
     * are then grown once: grown per value, each resize could copy the block) */
    int status = 0;
    Py_ssize_t used = PyByteArray_GET_SIZE(buf), end = i, room = used, n_new = 0;
    for (; end < count; end++) {
        PyObject *key = PyList_GET_ITEM(keys, end), *value = PyList_GET_ITEM(values, end);
        if (!PyBytes_Check(key) || PyBytes_GET_SIZE(key) != KEY_SIZE) {
            PyErr_SetString(PyExc_TypeError, "pack_values: keys are 18-byte keys");
            return NULL;
        }
        if (end > 0) {
            PyObject *before = PyList_GET_ITEM(keys, end - 1);
            if (!PyBytes_Check(before) || PyBytes_GET_SIZE(before) != KEY_SIZE ||
                memcmp(PyBytes_AS_STRING(before), PyBytes_AS_STRING(key), KEY_SIZE) >= 0) {
                status = 2;
                break;
            }
        }
        if (value == Py_None)
            continue;
        if (!PyBytes_Check(value)) {
            PyErr_SetString(PyExc_TypeError, "pack_values: values are bytes or None");
            return NULL;
        }
        Py_ssize_t size = PyBytes_GET_SIZE(value) + 1;
        if (room > 0 && room + size > limit) {
            status = 1;
            break;
        }
        if ((uint64_t)room + (uint64_t)size > UINT32_MAX || n + n_new >= UINT32_MAX) {
            PyErr_SetString(PyExc_ValueError, "pack_values: the block is too large");
            return NULL;
        }
        room += size;
        n_new++;
    }
    Py_ssize_t at = PyByteArray_GET_SIZE(entries);
    if (n_new > 0 && (PyByteArray_Resize(entries, at + n_new * ENTRY_SIZE) < 0 ||
                      PyByteArray_Resize(buf, room) < 0))
        return NULL; /* (the caller aborts the writer) */
    uint8_t *e = (uint8_t *)PyByteArray_AS_STRING(entries) + at;
    uint8_t *b = (uint8_t *)PyByteArray_AS_STRING(buf);
    for (; i < end; i++) {
        PyObject *key = PyList_GET_ITEM(keys, i), *value = PyList_GET_ITEM(values, i);
        if (value == Py_None)
            continue;
        Py_ssize_t size = PyBytes_GET_SIZE(value) + 1;
        uint8_t entry[KEY_SIZE + 4];
        memcpy(entry, PyBytes_AS_STRING(key), KEY_SIZE);
        put_be(entry + KEY_SIZE, n, 4);
        PyObject *key_entry = PyBytes_FromStringAndSize((const char *)entry, sizeof entry);
        if (key_entry == NULL)
            return NULL;
        int appended = PyList_Append(keys_out, key_entry);
        Py_DECREF(key_entry);
        if (appended < 0)
            return NULL;
        put_be(e, lsn, 8);
        e[8] = (uint8_t)tag;
        put_be(e + 9, block_no, 4);
        put_be(e + 13, (uint64_t)used, 4);
        put_be(e + 17, (uint64_t)size, 4);
        e += ENTRY_SIZE;
        b[used] = (uint8_t)tag;
        memcpy(b + used + 1, PyBytes_AS_STRING(value), (size_t)size - 1);
        used += size;
        n++;
        added += size;
        last = i;
    }
    return Py_BuildValue("ninn", i, status, added, last);
}

static PyObject *
py_lower_bound(PyObject *self, PyObject *args)
{
    Py_buffer keys, key;
    Py_ssize_t key_size;
    if (!PyArg_ParseTuple(args, "y*ny*:lower_bound", &keys, &key_size, &key))
        return NULL;
    if (key_size <= 0 || keys.len % key_size) {
        PyBuffer_Release(&keys);
        PyBuffer_Release(&key);
        PyErr_SetString(PyExc_ValueError, "keys are not whole keys of key_size bytes");
        return NULL;
    }
    const uint8_t *base = keys.buf;
    Py_ssize_t lo = 0, hi = keys.len / key_size;
    Py_ssize_t common = key.len < key_size ? key.len : key_size;
    while (lo < hi) {
        Py_ssize_t mid = lo + (hi - lo) / 2;
        int c = memcmp(base + mid * key_size, key.buf, (size_t)common);
        if (c < 0 || (c == 0 && key_size < key.len))
            lo = mid + 1;
        else
            hi = mid;
    }
    PyBuffer_Release(&keys);
    PyBuffer_Release(&key);
    return PyLong_FromSsize_t(lo);
}

/*
 * first_bad_page(pages, size, limit) -> index of the first page that is not `size` bytes
 * long or whose pd_lsn (its first 8 bytes: two little-endian uint32, high half first) is
 * above `limit`, or -1: the basebackup's per-page check (tar_stream._first_bad_page_python
 * is the reference). `pages` is a list of bytes (or other bytes-like objects); the tar maker
 * joins them afterwards.
 */
static PyObject *
py_first_bad_page(PyObject *self, PyObject *args)
{
    PyObject *pages;
    Py_ssize_t size;
    unsigned long long limit;
    if (!PyArg_ParseTuple(args, "O!nK:first_bad_page", &PyList_Type, &pages, &size, &limit))
        return NULL;
    if (size < 8) {
        PyErr_SetString(PyExc_ValueError, "first_bad_page: a page holds at least its LSN");
        return NULL;
    }
    Py_ssize_t n = PyList_GET_SIZE(pages);
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *page = PyList_GET_ITEM(pages, i);
        uint8_t p[8];
        if (PyBytes_Check(page)) {
            if (PyBytes_GET_SIZE(page) != size)
                return PyLong_FromSsize_t(i);
            memcpy(p, PyBytes_AS_STRING(page), 8);
        } else { /* any other bytes-like page (a test's source may hand bytearrays) */
            Py_buffer view;
            if (PyObject_GetBuffer(page, &view, PyBUF_SIMPLE) < 0)
                return NULL;
            Py_ssize_t len = view.len;
            if (len == size)
                memcpy(p, view.buf, 8);
            PyBuffer_Release(&view);
            if (len != size)
                return PyLong_FromSsize_t(i);
        }
        uint64_t hi = (uint64_t)p[0] | (uint64_t)p[1] << 8 | (uint64_t)p[2] << 16
            | (uint64_t)p[3] << 24;
        uint64_t lo = (uint64_t)p[4] | (uint64_t)p[5] << 8 | (uint64_t)p[6] << 16
            | (uint64_t)p[7] << 24;
        if ((hi << 32 | lo) > limit)
            return PyLong_FromSsize_t(i);
    }
    return PyLong_FromLong(-1);
}

/* LayerFile._keys: blocks.key_table_python is the reference (its docstring says what) */
static PyObject *
py_key_table(PyObject *self, PyObject *args)
{
    Py_buffer table;
    Py_ssize_t n_keys;
    unsigned long long n_versions;
    if (!PyArg_ParseTuple(args, "y*nK:key_table", &table, &n_keys, &n_versions))
        return NULL;
    if (n_keys < 0 || n_keys > table.len / (KEY_SIZE + 4) ||
        table.len != n_keys * (KEY_SIZE + 4)) {
        PyBuffer_Release(&table);
        PyErr_SetString(PyExc_ValueError, "key table size does not match its key count");
        return NULL;
    }
    PyObject *keys = PyBytes_FromStringAndSize(NULL, n_keys * KEY_SIZE);
    PyObject *firsts = PyBytes_FromStringAndSize(NULL, (n_keys + 1) * 8);
    if (keys == NULL || firsts == NULL) {
        PyBuffer_Release(&table);
        Py_XDECREF(keys);
        Py_XDECREF(firsts);
        return NULL;
    }
    const uint8_t *t = table.buf;
    char *k = PyBytes_AS_STRING(keys);
    uint64_t *f = (uint64_t *)PyBytes_AS_STRING(firsts), prev = 0;
    Py_ssize_t bad = -1;
    for (Py_ssize_t i = 0; i < n_keys; i++, t += KEY_SIZE + 4) {
        memcpy(k + i * KEY_SIZE, t, KEY_SIZE);
        const uint8_t *b = t + KEY_SIZE;
        f[i] = ((uint64_t)b[0] << 24) | ((uint64_t)b[1] << 16) | ((uint64_t)b[2] << 8) | b[3];
    }
    f[n_keys] = n_versions;
    for (Py_ssize_t i = 0; i <= n_keys && bad < 0; i++) {
        if (f[i] < prev || f[i] > n_versions)
            bad = i;
        prev = f[i];
    }
    if (bad < 0 && n_keys && f[0] != 0)
        bad = 0;
    PyBuffer_Release(&table);
    return Py_BuildValue("(NNn)", keys, firsts, bad);
}

/*
 * LayerFile.newest_of_keys (blocks.py, newest_of_keys_python the reference):
 *   newest_of_keys(keys, firsts, file, versions_at, start, end_key, narrow, lsn_base
 *                  [, upto[, above]]) -> [(key, lsn, tag)]
 * for keys number start.. below end_key, the newest version at or below upto of each, left
 * out where it is at or below above (a diff's keys written in a window: most keys of a layer
 * spanning it are not, and were made into tuples only to be dropped); `keys` packed back to back, `firsts` (array "Q") the
 * first version of each key plus n_versions, `file` the mapped layer whose version table
 * (">QBIII" entries, or narrow ">IBHIH" ones with LSNs above lsn_base: see narrow_versions)
 * starts at versions_at; the index was checked when the file was opened.
 */
static PyObject *
py_newest_of_keys(PyObject *self, PyObject *args)
{
    Py_buffer keys, firsts, file, end;
    Py_ssize_t versions_at, start;
    int narrow;
    unsigned long long lsn_base, upto = ~0ULL;
    long long above = -1; /* none: every key with a version at or below upto */
    if (!PyArg_ParseTuple(args, "y*y*y*nny*pK|KL:newest_of_keys", &keys, &firsts, &file,
                          &versions_at, &start, &end, &narrow, &lsn_base, &upto, &above))
        return NULL;
    const Py_ssize_t size = narrow ? NARROW_SIZE : ENTRY_SIZE;
    PyObject *out = NULL;
    Py_ssize_t n_keys = keys.len / KEY_SIZE;
    if (firsts.len != (n_keys + 1) * 8 || start < 0 || versions_at < 0 ||
        versions_at > file.len) {
        PyErr_SetString(PyExc_ValueError, "newest_of_keys: inconsistent index");
        goto done;
    }
    /* version entries the file holds past versions_at: a first beyond them is refused before
     * any multiplication (a corrupt count must not wrap the offset into the file) */
    uint64_t in_file = (uint64_t)(file.len - versions_at) / (uint64_t)size;
    out = PyList_New(0);
    size_t cmp = end.len < KEY_SIZE ? (size_t)end.len : KEY_SIZE;
    for (Py_ssize_t i = start; out != NULL && i < n_keys; i++) {
        const char *key = (const char *)keys.buf + i * KEY_SIZE;
        int c = memcmp(key, end.buf, cmp);
        if (c > 0 || (c == 0 && KEY_SIZE >= end.len))
            break; /* key >= end_key, as bytes compare */
        uint64_t first, stop; /* firsts may be any buffer: unaligned loads */
        memcpy(&first, (const char *)firsts.buf + 8 * i, 8);
        memcpy(&stop, (const char *)firsts.buf + 8 * (i + 1), 8);
        if (stop <= first)
            continue;
        if (stop > in_file) {
            PyErr_SetString(PyExc_ValueError, "newest_of_keys: version entry past the file");
            Py_CLEAR(out);
            break;
        }
        /* the newest version at or below upto: entries are in LSN order within a key */
        const uint8_t *e = NULL;
        unsigned long long lsn = 0;
        for (uint64_t v = stop; v > first; v--) {
            const uint8_t *at = (const uint8_t *)file.buf + versions_at + (v - 1) * size;
            unsigned long long at_lsn = 0;
            for (int k = 0; k < (narrow ? 4 : 8); k++)
                at_lsn = (at_lsn << 8) | at[k];
            if (narrow)
                at_lsn += lsn_base;
            if (at_lsn <= upto) {
                e = at;
                lsn = at_lsn;
                break;
            }
        }
        if (e == NULL)
            continue; /* every version of the key is above upto */
        if (above >= 0 && lsn <= (unsigned long long)above)
            continue; /* not written in (above, upto] */
        PyObject *item = Py_BuildValue("(y#Ki)", key, (Py_ssize_t)KEY_SIZE, lsn,
                                       (int)e[narrow ? 4 : 8]);
        if (item == NULL || PyList_Append(out, item) < 0)
            Py_CLEAR(out);
        Py_XDECREF(item);
    }
done:
    PyBuffer_Release(&keys);
    PyBuffer_Release(&firsts);
    PyBuffer_Release(&file);
    PyBuffer_Release(&end);
    return out;
}


/*
 * The L0 merge of compaction (pageserver/storage/compaction.py, whose Python loop is the
 * reference: heapq.merge of every L0 layer's key groups, the groups of one key joined oldest
 * layer first, each merged key given to LayerFileWriter.add_key). It was the largest part of
 * compaction's CPU: a tuple, a slice and a heap step per version, for every version of the
 * WAL. Here the same walk copies each encoded value from its decompressed block straight
 * into the writer's open block:
 *
 *   Merge(inputs) with inputs [(keys, firsts, file, versions_at, read_block), ...] oldest
 *   first: a layer's key table (LayerFile._keys: keys back to back, array "Q" firsts), its
 *   mapped file with the version table at versions_at, and read_block(b) -> bytes (the
 *   block decompressed and checked: LayerFile.read_block);
 *   .next_key() -> the next key to merge (bytes), or None when every input is exhausted;
 *   .run(buf, entries, keys_out, limit, block_no, n_versions, lsn_lo, lsn_hi, target,
 *        added_before, max_keys, max_blocks, cut)
 *     -> (status, versions, added, last_key, last_lsn, next_key, bad_input, bad_block, bad_lsn)
 *   adds the next key (unconditionally: the caller decided it goes into this writer) and
 *   those after it, as add_key does (buf, entries, block_no, limit: see pack_versions; a key
 *   entry, key + first version ">I", appended to the list keys_out; a full block cut as
 *   bytes(buf) appended to the list cut, buf emptied, block_no + 1), and stops before a key
 *   with status
 *     0  no key is left;
 *     1  added_before + added >= target (the caller cuts the L1 layer at next_key);
 *     2  max_keys keys or max_blocks cut blocks (the caller writes them, checks whether it
 *        is cancelled and calls again);
 *   or in the key with
 *     3  a version LSN outside [lsn_lo, lsn_hi) (bad_lsn), 4  an LSN below the one before it,
 *     5  an invalid value reference (input bad_input, block bad_block),
 *     6  a key not above the one before it (an input's key table out of order).
 * A key whose versions are all empty gets no key entry (add_key adds nothing for it).
 * Inputs must not change while merged; close() releases them (the files' maps can then close).
 */
typedef struct {
    Py_buffer keys, firsts, file;
    Py_ssize_t n_keys, i, versions_at;
    PyObject *read_block, *block;
    long long block_no;
} MergeInput;

typedef struct {
    PyObject_HEAD
    MergeInput *in;
    Py_ssize_t n;
    uint8_t prev[KEY_SIZE];
    int have_prev;
} Merge;

static void
merge_release(Merge *m)
{
    for (Py_ssize_t j = 0; j < m->n; j++) {
        MergeInput *in = &m->in[j];
        if (in->keys.obj)
            PyBuffer_Release(&in->keys);
        if (in->firsts.obj)
            PyBuffer_Release(&in->firsts);
        if (in->file.obj)
            PyBuffer_Release(&in->file);
        Py_CLEAR(in->read_block);
        Py_CLEAR(in->block);
    }
    PyMem_Free(m->in);
    m->in = NULL;
    m->n = 0;
}

static void
merge_dealloc(Merge *m)
{
    merge_release(m);
    Py_TYPE(m)->tp_free((PyObject *)m);
}

static int
merge_init(Merge *m, PyObject *args, PyObject *kwds)
{
    PyObject *inputs;
    if (!PyArg_ParseTuple(args, "O!:Merge", &PyList_Type, &inputs))
        return -1;
    merge_release(m);
    m->have_prev = 0;
    Py_ssize_t n = PyList_GET_SIZE(inputs);
    m->in = PyMem_Calloc(n ? n : 1, sizeof(MergeInput));
    if (m->in == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    m->n = n;
    for (Py_ssize_t j = 0; j < n; j++) {
        MergeInput *in = &m->in[j];
        in->block_no = -1;
        if (!PyArg_ParseTuple(PyList_GET_ITEM(inputs, j), "y*y*y*nO:Merge input", &in->keys,
                              &in->firsts, &in->file, &in->versions_at, &in->read_block)) {
            merge_release(m);
            return -1;
        }
        Py_INCREF(in->read_block);
        in->n_keys = in->keys.len / KEY_SIZE;
        if (in->keys.len % KEY_SIZE || in->firsts.len != (in->n_keys + 1) * 8 ||
            in->versions_at < 0 || in->versions_at > in->file.len ||
            !PyCallable_Check(in->read_block)) {
            merge_release(m);
            PyErr_SetString(PyExc_ValueError, "Merge: inconsistent input index");
            return -1;
        }
    }
    return 0;
}

static uint64_t
first_of(const MergeInput *in, Py_ssize_t i)
{
    uint64_t v; /* firsts may be any buffer: unaligned load */
    memcpy(&v, (const char *)in->firsts.buf + 8 * i, 8);
    return v;
}

/* The smallest current key over the inputs, or NULL */
static const uint8_t *
merge_min(const Merge *m)
{
    const uint8_t *best = NULL;
    for (Py_ssize_t j = 0; j < m->n; j++) {
        const MergeInput *in = &m->in[j];
        if (in->i >= in->n_keys)
            continue;
        const uint8_t *k = (const uint8_t *)in->keys.buf + in->i * KEY_SIZE;
        if (best == NULL || memcmp(k, best, KEY_SIZE) < 0)
            best = k;
    }
    return best;
}

static PyObject *
merge_next_key(Merge *m, PyObject *noargs)
{
    const uint8_t *k = merge_min(m);
    if (k == NULL)
        Py_RETURN_NONE;
    return PyBytes_FromStringAndSize((const char *)k, KEY_SIZE);
}

static PyObject *
merge_close(Merge *m, PyObject *noargs)
{
    merge_release(m);
    Py_RETURN_NONE;
}

static uint64_t
get_be(const uint8_t *p, int n)
{
    uint64_t v = 0;
    for (int i = 0; i < n; i++)
        v = (v << 8) | p[i];
    return v;
}

/* Cut the open block: bytes(buf) onto `cut`, buf emptied */
static int
cut_block(PyObject *buf, PyObject *cut)
{
    PyObject *raw = PyBytes_FromStringAndSize(PyByteArray_AS_STRING(buf),
                                              PyByteArray_GET_SIZE(buf));
    if (raw == NULL)
        return -1;
    int rc = PyList_Append(cut, raw);
    Py_DECREF(raw);
    if (rc < 0)
        return -1;
    return PyByteArray_Resize(buf, 0);
}

static PyObject *
merge_run(Merge *m, PyObject *args)
{
    PyObject *buf, *entries, *keys_out, *cut;
    Py_ssize_t limit, max_keys, max_blocks;
    unsigned long long block_no, n_versions, lo, hi, target, before;
    if (!PyArg_ParseTuple(args, "O!O!O!nKKKKKKnnO!:run", &PyByteArray_Type, &buf,
                          &PyByteArray_Type, &entries, &PyList_Type, &keys_out, &limit,
                          &block_no, &n_versions, &lo, &hi, &target, &before, &max_keys,
                          &max_blocks, &PyList_Type, &cut))
        return NULL;
    if (limit < 0 || (uint64_t)limit > UINT32_MAX) {
        PyErr_SetString(PyExc_ValueError, "run: block limit out of range");
        return NULL;
    }
    int status = 0;
    Py_ssize_t keys_done = 0, bad_input = -1;
    long long bad_block = -1;
    unsigned long long added = 0, versions = 0, last_lsn = 0, bad_lsn = 0;
    uint8_t key[KEY_SIZE], last_key[KEY_SIZE];
    int have_last = 0;
    for (;;) {
        const uint8_t *next = merge_min(m);
        if (next == NULL) {
            status = 0;
            break;
        }
        if (keys_done > 0) {
            if (before + added >= target) {
                status = 1;
                break;
            }
            if (keys_done >= max_keys || PyList_GET_SIZE(cut) >= max_blocks) {
                status = 2;
                break;
            }
        }
        memcpy(key, next, KEY_SIZE);
        if (m->have_prev && memcmp(key, m->prev, KEY_SIZE) <= 0) {
            status = 6;
            goto stopped;
        }
        memcpy(m->prev, key, KEY_SIZE);
        m->have_prev = 1;
        keys_done++;
        unsigned long long prev = lo;
        int key_entry = 0;
        for (Py_ssize_t j = 0; j < m->n; j++) {
            MergeInput *in = &m->in[j];
            if (in->i >= in->n_keys ||
                memcmp((const uint8_t *)in->keys.buf + in->i * KEY_SIZE, key, KEY_SIZE))
                continue;
            uint64_t first = first_of(in, in->i), stop = first_of(in, in->i + 1);
            in->i++;
            uint64_t in_file = (uint64_t)(in->file.len - in->versions_at) / ENTRY_SIZE;
            if (stop > in_file || first > stop) {
                PyErr_SetString(PyExc_ValueError, "Merge: version entry past the file");
                return NULL;
            }
            for (uint64_t v = first; v < stop; v++) {
                const uint8_t *e =
                    (const uint8_t *)in->file.buf + in->versions_at + v * ENTRY_SIZE;
                unsigned long long lsn = get_be(e, 8);
                uint8_t tag = e[8];
                long long b = (long long)get_be(e + 9, 4);
                uint64_t offset = get_be(e + 13, 4), length = get_be(e + 17, 4);
                if (b != in->block_no) {
                    PyObject *block = PyObject_CallFunction(in->read_block, "L", b);
                    if (block == NULL)
                        return NULL;
                    if (!PyBytes_Check(block)) {
                        Py_DECREF(block);
                        PyErr_SetString(PyExc_TypeError, "read_block must return bytes");
                        return NULL;
                    }
                    Py_XSETREF(in->block, block);
                    in->block_no = b;
                }
                const uint8_t *data = (const uint8_t *)PyBytes_AS_STRING(in->block);
                if (offset + length > (uint64_t)PyBytes_GET_SIZE(in->block) || length == 0 ||
                    data[offset] != tag) {
                    status = 5;
                    bad_input = j;
                    bad_block = b;
                    goto stopped;
                }
                if (lsn < lo || lsn >= hi) {
                    status = 3;
                    bad_lsn = lsn;
                    goto stopped;
                }
                if (lsn < prev) {
                    status = 4;
                    bad_lsn = lsn;
                    goto stopped;
                }
                if (!key_entry) {
                    uint8_t entry[KEY_SIZE + 4];
                    memcpy(entry, key, KEY_SIZE);
                    put_be(entry + KEY_SIZE, n_versions + versions, 4);
                    PyObject *k = PyBytes_FromStringAndSize((const char *)entry, sizeof entry);
                    if (k == NULL || PyList_Append(keys_out, k) < 0) {
                        Py_XDECREF(k);
                        return NULL;
                    }
                    Py_DECREF(k);
                    key_entry = 1;
                }
                Py_ssize_t used = PyByteArray_GET_SIZE(buf);
                if (used > 0 && (uint64_t)used + length > (uint64_t)limit) {
                    if (cut_block(buf, cut) < 0)
                        return NULL;
                    block_no++;
                    used = 0;
                }
                if (used > UINT32_MAX || length > UINT32_MAX || block_no > UINT32_MAX) {
                    PyErr_SetString(PyExc_ValueError, "run: value does not fit an entry");
                    return NULL;
                }
                Py_ssize_t at = PyByteArray_GET_SIZE(entries);
                if (PyByteArray_Resize(entries, at + ENTRY_SIZE) < 0 ||
                    PyByteArray_Resize(buf, used + (Py_ssize_t)length) < 0)
                    return NULL;
                uint8_t *out = (uint8_t *)PyByteArray_AS_STRING(entries) + at;
                put_be(out, lsn, 8);
                out[8] = tag;
                put_be(out + 9, block_no, 4);
                put_be(out + 13, (uint64_t)used, 4);
                put_be(out + 17, length, 4);
                memcpy(PyByteArray_AS_STRING(buf) + used, data + offset, length);
                added += length;
                versions++;
                prev = lsn;
            }
        }
        if (key_entry) {
            memcpy(last_key, key, KEY_SIZE);
            last_lsn = prev;
            have_last = 1;
        }
    }
    {
        const uint8_t *next = merge_min(m);
        return Py_BuildValue(
            "iKKNKNnLK", status, versions, added,
            have_last ? PyBytes_FromStringAndSize((const char *)last_key, KEY_SIZE)
                      : Py_NewRef(Py_None),
            last_lsn,
            next ? PyBytes_FromStringAndSize((const char *)next, KEY_SIZE) : Py_NewRef(Py_None),
            bad_input, bad_block, bad_lsn);
    }
stopped:
    return Py_BuildValue("iKKOKNnLK", status, versions, added, Py_None, last_lsn,
                         PyBytes_FromStringAndSize((const char *)key, KEY_SIZE), bad_input,
                         bad_block, bad_lsn);
}

static PyMethodDef merge_methods[] = {
    {"next_key", (PyCFunction)merge_next_key, METH_NOARGS, "The next key to merge, or None."},
    {"run", (PyCFunction)merge_run, METH_VARARGS, "Merge keys into a writer (module comment)."},
    {"close", (PyCFunction)merge_close, METH_NOARGS, "Release the inputs."},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject MergeType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "_blockpack.Merge",
    .tp_basicsize = sizeof(Merge),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "The L0 merge of compaction (see the comment above it in _blockpack.c).",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)merge_init,
    .tp_dealloc = (destructor)merge_dealloc,
    .tp_methods = merge_methods,
};

/*
 * The version table of a format version 2 layer file (blocks.py: narrow_versions_python and
 * widen_versions_python are the references):
 *   narrow_versions(entries, lsn_base) -> bytes, or None if an entry does not fit
 * turns ">QBIII" entries (LSN, tag, block, offset, length) into ">IBHIH" ones (LSN - lsn_base,
 * tag, block, offset, length): 13 bytes, not 21, the version table being about 40% of an L1
 * file of hot pages. None: an LSN below lsn_base or 4 GiB above it, a block number above
 * 65535 or a length above 65535 (the writer then keeps format version 1).
 *   widen_versions(raw, lsn_base) -> bytes
 * the inverse (the chain redo of _redo.c reads ">QBIII" entries).
 */
static PyObject *
py_narrow_versions(PyObject *self, PyObject *args)
{
    Py_buffer in;
    unsigned long long base;
    if (!PyArg_ParseTuple(args, "y*K:narrow_versions", &in, &base))
        return NULL;
    if (in.len % ENTRY_SIZE) {
        PyBuffer_Release(&in);
        PyErr_SetString(PyExc_ValueError, "narrow_versions: not whole entries");
        return NULL;
    }
    Py_ssize_t n = in.len / ENTRY_SIZE;
    PyObject *out = PyBytes_FromStringAndSize(NULL, n * NARROW_SIZE);
    if (out == NULL) {
        PyBuffer_Release(&in);
        return NULL;
    }
    const uint8_t *p = in.buf;
    uint8_t *o = (uint8_t *)PyBytes_AS_STRING(out);
    for (Py_ssize_t i = 0; i < n; i++, p += ENTRY_SIZE, o += NARROW_SIZE) {
        uint64_t lsn = get_be(p, 8), block = get_be(p + 9, 4), length = get_be(p + 17, 4);
        if (lsn < base || lsn - base > UINT32_MAX || block > 0xFFFF || length > 0xFFFF) {
            Py_DECREF(out);
            PyBuffer_Release(&in);
            Py_RETURN_NONE;
        }
        put_be(o, lsn - base, 4);
        o[4] = p[8];
        put_be(o + 5, block, 2);
        memcpy(o + 7, p + 13, 4);
        put_be(o + 11, length, 2);
    }
    PyBuffer_Release(&in);
    return out;
}

static PyObject *
py_widen_versions(PyObject *self, PyObject *args)
{
    Py_buffer in;
    unsigned long long base;
    if (!PyArg_ParseTuple(args, "y*K:widen_versions", &in, &base))
        return NULL;
    if (in.len % NARROW_SIZE) {
        PyBuffer_Release(&in);
        PyErr_SetString(PyExc_ValueError, "widen_versions: not whole entries");
        return NULL;
    }
    Py_ssize_t n = in.len / NARROW_SIZE;
    PyObject *out = PyBytes_FromStringAndSize(NULL, n * ENTRY_SIZE);
    if (out == NULL) {
        PyBuffer_Release(&in);
        return NULL;
    }
    const uint8_t *p = in.buf;
    uint8_t *o = (uint8_t *)PyBytes_AS_STRING(out);
    for (Py_ssize_t i = 0; i < n; i++, p += NARROW_SIZE, o += ENTRY_SIZE) {
        put_be(o, base + get_be(p, 4), 8);
        o[8] = p[4];
        put_be(o + 9, get_be(p + 5, 2), 4);
        memcpy(o + 13, p + 7, 4);
        put_be(o + 17, get_be(p + 11, 2), 4);
    }
    PyBuffer_Release(&in);
    return out;
}

static PyMethodDef methods[] = {
    {"narrow_versions", py_narrow_versions, METH_VARARGS,
     "Version entries in format version 2's layout, or None (see the comment above it)."},
    {"widen_versions", py_widen_versions, METH_VARARGS,
     "Format version 2's version entries back in version 1's layout."},
    {"newest_of_keys", py_newest_of_keys, METH_VARARGS,
     "LayerFile.newest_of_keys' loop (blocks.py)."},
    {"key_table", py_key_table, METH_VARARGS, "LayerFile._keys' table split (blocks.py)."},
    {"pack_versions", py_pack_versions, METH_VARARGS,
     "LayerFileWriter.add_key's loop (see the module comment)."},
    {"nonzero_pages", py_nonzero_pages, METH_VARARGS,
     "The offsets of a buffer's pages that are not all zero (see the comment above it)."},
    {"pack_images", py_pack_images, METH_VARARGS,
     "LayerFileWriter.add_images' loop (see the comment above it)."},
    {"pack_values", py_pack_values, METH_VARARGS,
     "LayerFileWriter.add_values' loop (see the comment above it)."},
    {"first_bad_page", py_first_bad_page, METH_VARARGS,
     "The basebackup's per-page check (see the comment above it)."},
    {"lower_bound", py_lower_bound, METH_VARARGS,
     "LayerFile.lower_bound (see the module comment)."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_blockpack", "C fast path of the layer file writer.", -1, methods,
};

PyMODINIT_FUNC
PyInit__blockpack(void)
{
    if (PyType_Ready(&MergeType) < 0)
        return NULL;
    PyObject *mod = PyModule_Create(&module);
    if (mod == NULL)
        return NULL;
    if (PyModule_AddObjectRef(mod, "Merge", (PyObject *)&MergeType) < 0) {
        Py_DECREF(mod);
        return NULL;
    }
    return mod;
}
