/*
 * Optional C storage of the in-memory layer (pageserver/storage/layers/inmemory.py: ArenaLayer;
 * InMemoryLayer, a dict of per-key lists of (LSN, Value), stays the reference).
 *
 * Profiling bench.ingest showed the dict-of-lists layer cost more than the ingest itself: one
 * tuple, one value object and one payload bytes object per version (millions per layer), built
 * by the C ingest path and then walked again by the cyclic garbage collector at every full
 * collection, which took as long as the ingest. Here a version is 24 bytes in an array and its
 * encoded value (values.encode_value: tag byte + payload) is copied into one growing buffer;
 * no Python object is made per version, so there is nothing for the collector to walk.
 *
 *   Arena(expect=0)                         empty; room for about `expect` bytes of values
 *                                           (the layer's checkpoint_distance) made at once
 *   a.put(key, lsn, encoded) -> None | int  append a version of `key` (18 bytes); if lsn is
 *                                           below the key's last version, nothing is put and
 *                                           that LSN is returned (the caller raises)
 *   a.collect(key, lsn, floor) -> (list[(lsn, encoded)], ended)
 *   a.newest_lsn(key, lsn) -> int | None
 *   a.newest_versions(start, end, lsn) -> list[(key, lsn, tag)] in key order
 *   a.split_above(cut) -> (Arena | None, versions moved, encoded bytes moved, new max LSN)
 *   a.key_groups() -> list[(key, list[(lsn, encoded)])] in key order
 *   a.pack(block_size, lsn_lo, lsn_hi) -> (data, block ends, key table, version table,
 *                                          n_keys, n_versions, uncompressed bytes, last LSN)
 *
 * and two functions over frozen arenas, oldest first, whose LSN ranges are disjoint (a
 * catch-up's flush merges them straight into L1 layers: pageserver/storage/compaction.py
 * merge_frozen, whose reference is the L0 merge of the layers they would have been):
 *
 *   merge_cuts(arenas, target) -> list[key]  where the L1 layers of their merge start, the
 *                                           first excepted: before a key once the keys since
 *                                           the last cut hold `target` bytes of values
 *   pack_merged(arenas, start, end, block_size, lsn_lo, lsn_hi) -> what `pack` returns, for
 *                                           the keys in [start, end) (end None: KEY_MAX) of
 *                                           all arenas, each key's versions in arena order
 *   merge_packer(same arguments) -> MergePacker: pack_merged in steps, .fill(blocks) ->
 *                                           (ends of the blocks cut since, done), .data()
 *                                           (blocks final once reported), .result() (what
 *                                           pack_merged returns, once done)
 *
 * with the semantics of the InMemoryLayer methods of the same names. `pack` lays the layer out
 * as blocks.LayerFileWriter.add_key does, key by key in key order (so the file written is the
 * same byte for byte): `data` is the raw value blocks back to back, `block ends` their end
 * offsets in it (">Q" each; a version starts a new block when it does not fit in a non-empty
 * one), the key table is n_keys x ">18sI" (key, first version), the version table
 * n_versions x ">QBIII" (LSN, tag, block, offset, length). It copies the values with the GIL
 * released (a frozen layer is flushed on the flusher thread while ingest goes on).
 *
 * The C ingest path (pageserver/ingest/_walingest.c) appends through the capsule _C_API
 * (struct InmemApi below) without making the payload a Python object at all.
 *
 * Threads: the layer's owner serializes writers (the timeline's lock); every method but pack
 * runs with the GIL held and never releases it, so readers see a consistent arena. pack reads
 * the arena without the GIL: meanwhile its writers (put, split_above, the capsule's append)
 * refuse with RuntimeError (`busy`), and the readers, which only read, may run. No buffer of
 * the arena is ever exported (reads copy into bytes), so its reallocations leave no reader
 * holding a stale pointer.
 *
 * LSNs are unsigned 64-bit: a negative or bigger one is an OverflowError (the "K" format would
 * silently take it modulo 2**64).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include "inmem_api.h"

#define TAG_DELTA 2 /* values.TAG_DELTA: the only tag that does not end a chain */
#define ENTRY_SIZE 21
#define KEY_ENTRY_SIZE (KEY_SIZE + 4)

typedef struct {
    uint64_t lsn;
    uint64_t off; /* of the encoded value in data */
    uint32_t len;
} Version;

typedef struct {
    uint8_t key[KEY_SIZE];
    uint32_t n, cap;
    uint32_t *v; /* indexes into versions, LSN order */
} Chain;

typedef struct {
    PyObject_HEAD
    char *data;
    size_t data_len, data_cap;
    Version *versions;
    size_t n_versions, cap_versions;
    Chain *chains;
    size_t n_chains, cap_chains;
    int32_t *slots; /* open addressing over chains, -1 empty; size a power of two */
    size_t n_slots;
    int busy; /* pack() is reading it without the GIL: no writes */
    int fresh;       /* data is a fresh mapping, not a spare's, and not prefaulted yet */
    int prefaulting; /* the thread `prefault` is mapping data's pages in (prefault_start) */
    pthread_t prefault;
} Arena;

static PyTypeObject ArenaType;

static uint64_t
hash_key(const uint8_t *k)
{
    uint64_t h = 1469598103934665603ull; /* FNV-1a */
    for (int i = 0; i < KEY_SIZE; i++) {
        h ^= k[i];
        h *= 1099511628211ull;
    }
    return h ^ (h >> 29);
}

static int
grow_slots(Arena *a)
{
    size_t n = a->n_slots ? a->n_slots * 2 : 1024;
    int32_t *slots = PyMem_Malloc(n * sizeof *slots);
    if (slots == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    memset(slots, 0xFF, n * sizeof *slots);
    for (size_t c = 0; c < a->n_chains; c++) {
        size_t i = hash_key(a->chains[c].key) & (n - 1);
        while (slots[i] >= 0)
            i = (i + 1) & (n - 1);
        slots[i] = (int32_t)c;
    }
    PyMem_Free(a->slots);
    a->slots = slots;
    a->n_slots = n;
    return 0;
}

/* The chain of `key`, or NULL (created when `create`; NULL with an exception set on failure) */
static Chain *
find_chain(Arena *a, const uint8_t *key, int create)
{
    if (a->n_slots) {
        size_t mask = a->n_slots - 1, i = hash_key(key) & mask;
        for (; a->slots[i] >= 0; i = (i + 1) & mask) {
            Chain *c = &a->chains[a->slots[i]];
            if (memcmp(c->key, key, KEY_SIZE) == 0)
                return c;
        }
    }
    if (!create)
        return NULL;
    if ((a->n_chains + 1) * 2 > a->n_slots && grow_slots(a) < 0)
        return NULL;
    if (a->n_chains == a->cap_chains) {
        size_t cap = a->cap_chains ? a->cap_chains * 2 : 256;
        Chain *chains = PyMem_Realloc(a->chains, cap * sizeof *chains);
        if (chains == NULL) {
            PyErr_NoMemory();
            return NULL;
        }
        a->chains = chains;
        a->cap_chains = cap;
    }
    size_t mask = a->n_slots - 1, i = hash_key(key) & mask;
    while (a->slots[i] >= 0)
        i = (i + 1) & mask;
    a->slots[i] = (int32_t)a->n_chains;
    Chain *c = &a->chains[a->n_chains++];
    memcpy(c->key, key, KEY_SIZE);
    c->n = c->cap = 0;
    c->v = NULL;
    return c;
}

static int
reserve(void **buf, size_t *cap, size_t need, size_t item, size_t first)
{
    if (need <= *cap)
        return 0;
    size_t n = *cap ? *cap : first;
    while (n < need && n <= SIZE_MAX / 2)
        n *= 2;
    if (n < need || n > SIZE_MAX / item) {
        PyErr_NoMemory();
        return -1;
    }
    void *p = PyMem_Realloc(*buf, n * item);
    if (p == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    *buf = p;
    *cap = n;
    return 0;
}

/* Arena.prefault(): a fresh arena's data buffer mapped in on a thread of its own
 * (MADV_POPULATE_WRITE), not page by page by the first copy of each value into it: on the
 * decode thread those faults were 23% of a catch-up's (bench.ingest: the first arenas of a
 * run, before dead ones leave spares; ~0.03 s of CPU per 36 MiB arena), taken while the
 * flusher, waiting for a second layer to merge with, leaves the other core idle. Asked for
 * while catching up only (NodeStore.maybe_flush): the whole buffer is then resident at once,
 * where a slow live node's layer only maps the pages its values fill. The kernel keeps the
 * contents of pages already written, so the writer and the thread may meet on the same pages.
 * The thread touches no Python object; it is joined before the buffer is reallocated or freed
 * (prefault_join). */
static unsigned long long prefaults; /* fresh arenas whose buffer a thread mapped in (tests) */

typedef struct {
    void *addr;
    size_t len;
} PrefaultJob;

static void *
prefault_run(void *arg)
{
    PrefaultJob *job = arg;
#ifdef MADV_POPULATE_WRITE
    (void)madvise(job->addr, job->len, MADV_POPULATE_WRITE); /* best effort: EINVAL before 5.14 */
#endif
    free(job);
    return NULL;
}

static void
prefault_start(Arena *a)
{
    long page = sysconf(_SC_PAGESIZE);
    a->fresh = 0; /* one try: without a thread the writer faults the pages in as before */
    if (page <= 0)
        return;
    uintptr_t lo = ((uintptr_t)a->data + (uintptr_t)page - 1) & ~((uintptr_t)page - 1);
    uintptr_t hi = ((uintptr_t)a->data + a->data_cap) & ~((uintptr_t)page - 1);
    PrefaultJob *job = hi > lo ? malloc(sizeof *job) : NULL;
    if (job == NULL)
        return;
    job->addr = (void *)lo;
    job->len = hi - lo;
    if (pthread_create(&a->prefault, NULL, prefault_run, job) != 0) {
        free(job);
        return;
    }
    a->prefaulting = 1;
    prefaults++;
}

static void
prefault_join(Arena *a)
{
    if (a->prefaulting) {
        pthread_join(a->prefault, NULL);
        a->prefaulting = 0;
    }
}

/* Append a version whose encoding is tag + a + b (no LSN order check); 0, or -1 and an
 * exception */
static int
arena_append(PyObject *self, const uint8_t *key, uint64_t lsn, uint8_t tag, const void *a,
             size_t na, const void *b, size_t nb)
{
    Arena *ar = (Arena *)self;
    size_t len = 1 + na + nb;
    if (ar->busy) {
        PyErr_SetString(PyExc_RuntimeError, "in-memory layer written while it is packed");
        return -1;
    }
    if (na > UINT32_MAX || nb > UINT32_MAX || len > UINT32_MAX ||
        ar->n_versions >= UINT32_MAX || ar->n_chains >= INT32_MAX) {
        PyErr_SetString(PyExc_OverflowError, "in-memory layer value or version count too big");
        return -1;
    }
    Chain *c = find_chain(ar, key, 1);
    if (c == NULL)
        return -1;
    if (c->n == c->cap) {
        /* n_versions < UINT32_MAX bounds c->n; the doubling must not wrap to a small cap */
        uint64_t cap = c->cap ? (uint64_t)c->cap * 2 : 2;
        if (cap > UINT32_MAX)
            cap = UINT32_MAX;
        uint32_t *v = PyMem_Realloc(c->v, (size_t)cap * sizeof *v);
        if (v == NULL) {
            PyErr_NoMemory();
            return -1;
        }
        c->v = v;
        c->cap = (uint32_t)cap;
    }
    if (ar->data_len + len > ar->data_cap)
        prefault_join(ar); /* data moves: the thread must be done with the old pages */
    if (reserve((void **)&ar->versions, &ar->cap_versions, ar->n_versions + 1, sizeof(Version),
                4096) < 0 ||
        reserve((void **)&ar->data, &ar->data_cap, ar->data_len + len, 1, 1 << 20) < 0)
        return -1;
    char *p = ar->data + ar->data_len;
    p[0] = (char)tag;
    if (na)
        memcpy(p + 1, a, na);
    if (nb)
        memcpy(p + 1 + na, b, nb);
    Version *v = &ar->versions[ar->n_versions];
    v->lsn = lsn;
    v->off = ar->data_len;
    v->len = (uint32_t)len;
    c->v[c->n++] = (uint32_t)ar->n_versions++;
    ar->data_len += len;
    return 0;
}

/* O& converter of an LSN: an int in [0, 2**64) (OverflowError otherwise, TypeError if no int) */
static int
lsn_arg(PyObject *obj, void *out)
{
    unsigned long long v = PyLong_AsUnsignedLongLong(obj);
    if (v == (unsigned long long)-1 && PyErr_Occurred())
        return 0;
    *(unsigned long long *)out = v;
    return 1;
}

static size_t
arena_mark(PyObject *self)
{
    return ((Arena *)self)->n_versions;
}

/* Drop the versions appended since `mark` (arena_mark): a chain's versions are in append
 * order, so each chain loses a tail; their bytes go as data_len returns to the first's
 * offset. Chains left empty stay (every reader skips them). */
static void
arena_rollback(PyObject *self, size_t mark)
{
    Arena *a = (Arena *)self;
    if (mark >= a->n_versions || a->busy)
        return;
    for (size_t i = 0; i < a->n_chains; i++) {
        Chain *c = &a->chains[i];
        while (c->n && c->v[c->n - 1] >= mark)
            c->n--;
    }
    a->data_len = a->versions[mark].off;
    a->n_versions = mark;
}

static int
key_arg(PyObject *obj, const uint8_t **key)
{
    if (!PyBytes_Check(obj) || PyBytes_GET_SIZE(obj) != KEY_SIZE) {
        PyErr_SetString(PyExc_ValueError, "a key is 18 bytes");
        return -1;
    }
    *key = (const uint8_t *)PyBytes_AS_STRING(obj);
    return 0;
}

static PyObject *
Arena_put(Arena *self, PyObject *args)
{
    PyObject *keyobj;
    unsigned long long lsn;
    Py_buffer enc;
    const uint8_t *key;
    if (!PyArg_ParseTuple(args, "OO&y*:put", &keyobj, lsn_arg, &lsn, &enc))
        return NULL;
    PyObject *result = NULL;
    if (key_arg(keyobj, &key) < 0)
        goto done;
    if (enc.len < 1) {
        PyErr_SetString(PyExc_ValueError, "an encoded value has at least its tag byte");
        goto done;
    }
    Chain *c = find_chain(self, key, 0);
    if (c != NULL && c->n && self->versions[c->v[c->n - 1]].lsn > lsn) {
        result = PyLong_FromUnsignedLongLong(self->versions[c->v[c->n - 1]].lsn);
        goto done;
    }
    const uint8_t *p = enc.buf;
    if (arena_append((PyObject *)self, key, lsn, p[0], p + 1, (size_t)enc.len - 1, NULL, 0) == 0)
        result = Py_NewRef(Py_None);
done:
    PyBuffer_Release(&enc);
    return result;
}

/* versions of c with LSN <= lsn: the index past the last one (bisect_right) */
static uint32_t
upto(Arena *a, Chain *c, uint64_t lsn)
{
    uint32_t lo = 0, hi = c->n;
    if (hi && a->versions[c->v[hi - 1]].lsn <= lsn)
        return hi;
    while (lo < hi) {
        uint32_t mid = lo + (hi - lo) / 2;
        if (a->versions[c->v[mid]].lsn <= lsn)
            lo = mid + 1;
        else
            hi = mid;
    }
    return lo;
}

static PyObject *
version_pair(Arena *a, Version *v)
{
    return Py_BuildValue("(Ky#)", (unsigned long long)v->lsn, a->data + v->off,
                         (Py_ssize_t)v->len);
}

static PyObject *
Arena_collect(Arena *self, PyObject *args)
{
    PyObject *keyobj;
    unsigned long long lsn;
    long long floor;
    const uint8_t *key;
    if (!PyArg_ParseTuple(args, "OO&L:collect", &keyobj, lsn_arg, &lsn, &floor) || key_arg(keyobj, &key) < 0)
        return NULL;
    PyObject *out = PyList_New(0);
    if (out == NULL)
        return NULL;
    int ended = 0;
    Chain *c = find_chain(self, key, 0);
    if (c != NULL) {
        for (int64_t i = (int64_t)upto(self, c, lsn) - 1; i >= 0; i--) {
            Version *v = &self->versions[c->v[i]];
            if (floor >= 0 && v->lsn <= (unsigned long long)floor) /* LSNs past 2**63 too */
                break;
            PyObject *pair = version_pair(self, v);
            if (pair == NULL || PyList_Append(out, pair) < 0) {
                Py_XDECREF(pair);
                Py_DECREF(out);
                return NULL;
            }
            Py_DECREF(pair);
            if (self->data[v->off] != TAG_DELTA) {
                ended = 1;
                break;
            }
        }
    }
    return Py_BuildValue("(NO)", out, ended ? Py_True : Py_False);
}

static PyObject *
Arena_newest_lsn(Arena *self, PyObject *args)
{
    PyObject *keyobj;
    unsigned long long lsn;
    const uint8_t *key;
    if (!PyArg_ParseTuple(args, "OO&:newest_lsn", &keyobj, lsn_arg, &lsn) || key_arg(keyobj, &key) < 0)
        return NULL;
    Chain *c = find_chain(self, key, 0);
    uint32_t i = c != NULL ? upto(self, c, lsn) : 0;
    if (i == 0)
        Py_RETURN_NONE;
    return PyLong_FromUnsignedLongLong(self->versions[c->v[i - 1]].lsn);
}

static int
cmp_chain(const void *x, const void *y)
{
    return memcmp((*(Chain *const *)x)->key, (*(Chain *const *)y)->key, KEY_SIZE);
}

/* the non-empty chains (with keys in [start, end) if start is given), sorted; caller frees */
static Chain **
sorted_chains(Arena *a, const uint8_t *start, const uint8_t *end, size_t *n)
{
    Chain **out = PyMem_Malloc((a->n_chains ? a->n_chains : 1) * sizeof *out);
    if (out == NULL) {
        PyErr_NoMemory();
        return NULL;
    }
    size_t k = 0;
    for (size_t i = 0; i < a->n_chains; i++) {
        Chain *c = &a->chains[i];
        if (c->n == 0)
            continue;
        if (start != NULL &&
            (memcmp(c->key, start, KEY_SIZE) < 0 || memcmp(c->key, end, KEY_SIZE) >= 0))
            continue;
        out[k++] = c;
    }
    qsort(out, k, sizeof *out, cmp_chain);
    *n = k;
    return out;
}

static PyObject *
Arena_newest_versions(Arena *self, PyObject *args)
{
    PyObject *startobj, *endobj;
    unsigned long long lsn;
    const uint8_t *start, *end;
    if (!PyArg_ParseTuple(args, "OOO&:newest_versions", &startobj, &endobj, lsn_arg, &lsn) ||
        key_arg(startobj, &start) < 0 || key_arg(endobj, &end) < 0)
        return NULL;
    size_t n;
    Chain **chains = sorted_chains(self, start, end, &n);
    if (chains == NULL)
        return NULL;
    PyObject *out = PyList_New(0);
    for (size_t i = 0; out != NULL && i < n; i++) {
        Chain *c = chains[i];
        uint32_t j = upto(self, c, lsn);
        if (j == 0)
            continue;
        Version *v = &self->versions[c->v[j - 1]];
        PyObject *item = Py_BuildValue("(y#Ki)", (const char *)c->key, (Py_ssize_t)KEY_SIZE,
                                       (unsigned long long)v->lsn, (int)(uint8_t)self->data[v->off]);
        if (item == NULL || PyList_Append(out, item) < 0)
            Py_CLEAR(out);
        Py_XDECREF(item);
    }
    PyMem_Free(chains);
    return out;
}

static PyObject *
Arena_split_above(Arena *self, PyObject *args)
{
    unsigned long long cut;
    if (!PyArg_ParseTuple(args, "O&:split_above", lsn_arg, &cut))
        return NULL;
    if (self->busy) {
        PyErr_SetString(PyExc_RuntimeError, "in-memory layer split while it is packed");
        return NULL;
    }
    /* Copy first, then cut: a failure (MemoryError) leaves this arena whole */
    Arena *rest = NULL;
    unsigned long long moved = 0, moved_bytes = 0;
    unsigned long long max_lsn = 0;
    int kept = 0;
    for (size_t i = 0; i < self->n_chains; i++) {
        Chain *c = &self->chains[i];
        for (uint32_t j = upto(self, c, cut); j < c->n; j++) {
            Version *v = &self->versions[c->v[j]];
            if (rest == NULL && (rest = (Arena *)ArenaType.tp_alloc(&ArenaType, 0)) == NULL)
                return NULL; /* zeroed */
            const uint8_t *p = (const uint8_t *)self->data + v->off;
            if (arena_append((PyObject *)rest, c->key, v->lsn, p[0], p + 1, v->len - 1, NULL,
                             0) < 0) {
                Py_DECREF(rest);
                return NULL;
            }
            moved++;
            moved_bytes += v->len;
        }
    }
    for (size_t i = 0; i < self->n_chains; i++) {
        Chain *c = &self->chains[i];
        uint32_t keep = upto(self, c, cut);
        c->n = keep;
        if (keep && (!kept || self->versions[c->v[keep - 1]].lsn > max_lsn)) {
            max_lsn = self->versions[c->v[keep - 1]].lsn;
            kept = 1;
        }
    }
    PyObject *max_obj = kept ? PyLong_FromUnsignedLongLong(max_lsn) : PyLong_FromLong(-1);
    if (max_obj == NULL) {
        Py_XDECREF(rest);
        return NULL;
    }
    return Py_BuildValue("(NKKN)", rest != NULL ? (PyObject *)rest : Py_NewRef(Py_None), moved,
                         moved_bytes, max_obj);
}

static PyObject *
Arena_key_groups(Arena *self, PyObject *unused)
{
    size_t n;
    Chain **chains = sorted_chains(self, NULL, NULL, &n);
    if (chains == NULL)
        return NULL;
    PyObject *out = PyList_New((Py_ssize_t)n);
    for (size_t i = 0; out != NULL && i < n; i++) {
        Chain *c = chains[i];
        PyObject *group = PyList_New(c->n);
        for (uint32_t j = 0; group != NULL && j < c->n; j++) {
            PyObject *pair = version_pair(self, &self->versions[c->v[j]]);
            if (pair == NULL)
                Py_CLEAR(group);
            else
                PyList_SET_ITEM(group, j, pair);
        }
        PyObject *item = group == NULL ? NULL
                                       : Py_BuildValue("(y#N)", (const char *)c->key,
                                                       (Py_ssize_t)KEY_SIZE, group);
        if (item == NULL)
            Py_CLEAR(out);
        else
            PyList_SET_ITEM(out, (Py_ssize_t)i, item);
    }
    PyMem_Free(chains);
    return out;
}

static void
put_be(uint8_t *p, uint64_t v, int n)
{
    for (int i = n - 1; i >= 0; i--, v >>= 8)
        p[i] = (uint8_t)v;
}

/* The layout pack() returns, filled with the GIL released (the arena is not changed
 * meanwhile: `busy` makes its writers refuse) */
typedef struct {
    Arena *a;
    Chain **chains;
    size_t n;
    Py_ssize_t limit;
    unsigned long long lo, hi;
    uint8_t *data, *keys, *entries;
    uint64_t *ends; /* block ends in data; n_versions + 1 entries of room */
    size_t n_blocks;
    unsigned long long bad_lsn, last_lsn;
    int bad;
    size_t used, at, v_no; /* the fill's cursor: bytes in the open block, in data, versions */
} Pack;

/* The key entry `i`: the key and the number of its first version. */
static void
pack_key(Pack *p, size_t i, const uint8_t *key)
{
    memcpy(p->keys + i * KEY_ENTRY_SIZE, key, KEY_SIZE);
    put_be(p->keys + i * KEY_ENTRY_SIZE + KEY_SIZE, p->v_no, 4);
}

/* Append one version (its entry and its bytes), opening a new block when the value would
 * take the open one past limit; -1 (p->bad) for an LSN outside [lo, hi). */
static int
pack_put(Pack *p, const Arena *a, const Version *v)
{
    if (v->lsn < p->lo || v->lsn >= p->hi) {
        p->bad = 1;
        p->bad_lsn = v->lsn;
        return -1;
    }
    if (p->used > 0 && p->used + v->len > (size_t)p->limit) {
        p->ends[p->n_blocks++] = p->at;
        p->used = 0;
    }
    uint8_t *e = p->entries + p->v_no * ENTRY_SIZE;
    put_be(e, v->lsn, 8);
    e[8] = (uint8_t)a->data[v->off];
    put_be(e + 9, p->n_blocks, 4);
    put_be(e + 13, p->used, 4);
    put_be(e + 17, v->len, 4);
    memcpy(p->data + p->at, a->data + v->off, v->len);
    p->used += v->len;
    p->at += v->len;
    p->last_lsn = v->lsn;
    p->v_no++;
    return 0;
}

/* Close the last block. */
static void
pack_end(Pack *p)
{
    if (p->used > 0)
        p->ends[p->n_blocks++] = p->at;
}

/* The output buffers of a pack of n_keys keys and n_versions versions of n_bytes (bufs:
 * data, keys, entries) and the block ends' room; -1 with an exception set (the caller
 * releases what was made: pack_release). */
static PyObject *packed_new(size_t n_bytes, uint8_t **data);

static int
pack_open(Pack *p, size_t n_keys, size_t n_versions, size_t n_bytes, PyObject **bufs)
{
    uint8_t *data = NULL;
    bufs[0] = packed_new(n_bytes, &data);
    bufs[1] = PyBytes_FromStringAndSize(NULL, (Py_ssize_t)(n_keys * KEY_ENTRY_SIZE));
    bufs[2] = PyBytes_FromStringAndSize(NULL, (Py_ssize_t)(n_versions * ENTRY_SIZE));
    p->ends = PyMem_Malloc((n_versions + 1) * sizeof *p->ends);
    if (bufs[0] == NULL || bufs[1] == NULL || bufs[2] == NULL || p->ends == NULL) {
        if (p->ends == NULL)
            PyErr_NoMemory();
        return -1;
    }
    p->data = data;
    p->keys = (uint8_t *)PyBytes_AS_STRING(bufs[1]);
    p->entries = (uint8_t *)PyBytes_AS_STRING(bufs[2]);
    return 0;
}

static void
pack_release(Pack *p, PyObject **bufs)
{
    PyMem_Free(p->ends);
    p->ends = NULL;
    for (int i = 0; i < 3; i++)
        Py_CLEAR(bufs[i]);
}

/* The filled pack as Python's (data, ends, keys, entries, n_keys, n_versions, n_bytes,
 * last_lsn), or NULL with the error of an LSN outside the range; the buffers are released
 * either way. */
static PyObject *
pack_result(Pack *p, PyObject **bufs, size_t n_keys, size_t n_versions, size_t n_bytes)
{
    PyObject *result = NULL;
    if (p->bad) {
        /* the reference's message (blocks.py: f"LSN {lsn:X} ..."); PyErr_Format has no %X */
        char lsn_hex[17];
        snprintf(lsn_hex, sizeof lsn_hex, "%llX", p->bad_lsn);
        PyErr_Format(PyExc_ValueError, "LSN %s outside the layer's LSN range", lsn_hex);
    } else {
        PyObject *ends = PyBytes_FromStringAndSize(NULL, (Py_ssize_t)(p->n_blocks * 8));
        if (ends != NULL) {
            for (size_t b = 0; b < p->n_blocks; b++)
                put_be((uint8_t *)PyBytes_AS_STRING(ends) + 8 * b, p->ends[b], 8);
            result = Py_BuildValue("(NNNNnnKK)", bufs[0], ends, bufs[1], bufs[2],
                                   (Py_ssize_t)n_keys, (Py_ssize_t)n_versions,
                                   (unsigned long long)n_bytes, p->last_lsn);
            bufs[0] = bufs[1] = bufs[2] = NULL; /* N: the tuple took them */
        }
    }
    pack_release(p, bufs);
    return result;
}

static void
pack_fill(Pack *p)
{
    Arena *a = p->a;
    for (size_t i = 0; i < p->n; i++) {
        Chain *c = p->chains[i];
        pack_key(p, i, c->key);
        for (uint32_t j = 0; j < c->n; j++)
            if (pack_put(p, a, &a->versions[c->v[j]]) < 0)
                return;
    }
    pack_end(p);
}

static PyObject *
Arena_pack(Arena *self, PyObject *args)
{
    Pack p = {.a = self};
    if (!PyArg_ParseTuple(args, "nO&O&:pack", &p.limit, lsn_arg, &p.lo, lsn_arg, &p.hi))
        return NULL;
    /* block offsets are u32 in the version table: a block holds at most limit bytes before
     * its last value starts */
    if (p.limit <= 0 || (uint64_t)p.limit > UINT32_MAX) {
        PyErr_SetString(PyExc_ValueError, "pack: block size out of range");
        return NULL;
    }
    size_t n_versions = 0, n_bytes = 0;
    p.chains = sorted_chains(self, NULL, NULL, &p.n);
    if (p.chains == NULL)
        return NULL;
    for (size_t i = 0; i < p.n; i++) {
        n_versions += p.chains[i]->n;
        for (uint32_t j = 0; j < p.chains[i]->n; j++)
            n_bytes += self->versions[p.chains[i]->v[j]].len;
    }
    PyObject *bufs[3] = {NULL, NULL, NULL}, *result = NULL;
    if (pack_open(&p, p.n, n_versions, n_bytes, bufs) < 0) {
        pack_release(&p, bufs);
    } else {
        self->busy++;
        Py_BEGIN_ALLOW_THREADS
        pack_fill(&p);
        Py_END_ALLOW_THREADS
        self->busy--;
        result = pack_result(&p, bufs, p.n, n_versions, n_bytes);
    }
    PyMem_Free(p.chains);
    return result;
}

/* The buffers of the last arenas freed (SPARES of each), for the next arenas to take: a layer's
 * values were most of the C ingest's copy cost in page faults on fresh memory (a new arena's
 * buffers are mapped afresh: the malloc tuning returns them to the system on free), 0.18 s of
 * CPU per 256 MiB against 0.025 s into pages already touched. Only while the GIL is held
 * (new and dealloc). At most SPARES buffers of each kind are kept: the daemon holds up to
 * two layers' worth more memory (pages touched: the values they held) while no node ingests. */
#define SPARES 2
#define SPARE_MIN (4u << 20) /* smaller buffers come from the heap, not fresh mappings */

typedef struct {
    void *buf[SPARES];
    size_t cap[SPARES]; /* in items */
    int n;
} Spares;

static Spares spare_data, spare_versions;
static unsigned long long recycled; /* arenas that took spare buffers (the tests read it) */
static unsigned long long packs_recycled; /* packs made on a spare's memory (the tests too) */

/* The newest spare buffer into *buf, *cap if it holds `need` items and at most twice that
 * (1), else nothing (0; spares of the wrong size are freed) */
static int
take_spare(Spares *s, void **buf, size_t *cap, size_t need)
{
    while (s->n > 0) {
        int i = --s->n;
        if (s->cap[i] >= need && s->cap[i] / 2 <= need) {
            *buf = s->buf[i];
            *cap = s->cap[i];
            return 1;
        }
        PyMem_Free(s->buf[i]);
    }
    return 0;
}

/* A dying arena's buffer kept as a spare (if it is large and there is room), else freed */
static void
give_spare(Spares *s, void *buf, size_t cap, size_t item)
{
    if (buf != NULL && s->n < SPARES && cap * item >= SPARE_MIN) {
        s->buf[s->n] = buf;
        s->cap[s->n++] = cap;
    } else
        PyMem_Free(buf);
}

/* A pack's values of SPARE_MIN bytes or more (a layer's, or an L1 piece's: tens of MiB): a
 * read-only buffer whose memory, once its last view is gone (the blocks compressed), is kept
 * for the next pack (spare_packs). As fresh bytes they were faulted in page by page at every
 * flush, then unmapped: 45% of the flush thread's CPU in a catch-up (bench.ingest: 58k page
 * faults, 0.16 s of system time, while the decode thread waited for the flusher). */
typedef struct {
    PyObject_HEAD
    uint8_t *buf;
    size_t cap;
    Py_ssize_t len;
} Packed;

static Spares spare_packs;
#define PACK_SPARES 1 /* (at most SPARES) an idle daemon holds one pack's memory more */

/* The spare holding `need` bytes and at most twice that into *buf, *cap (1), else nothing (0;
 * the spares are kept: packs come in many sizes) */
static int
take_fitting(Spares *s, void **buf, size_t *cap, size_t need)
{
    for (int i = s->n - 1; i >= 0; i--)
        if (s->cap[i] >= need && s->cap[i] / 2 <= need) {
            *buf = s->buf[i];
            *cap = s->cap[i];
            s->n--;
            s->buf[i] = s->buf[s->n];
            s->cap[i] = s->cap[s->n];
            return 1;
        }
    return 0;
}

static int
Packed_getbuffer(Packed *self, Py_buffer *view, int flags)
{
    return PyBuffer_FillInfo(view, (PyObject *)self, self->buf, self->len, 1, flags);
}

/* A dead pack's memory kept as the newest spare (the oldest freed when there is no room: a
 * spare of another size must not keep the next one out) */
static void
give_newest(Spares *s, void *buf, size_t cap)
{
    if (buf == NULL || cap < SPARE_MIN) {
        PyMem_Free(buf);
        return;
    }
    if (s->n == PACK_SPARES) {
        PyMem_Free(s->buf[0]);
        memmove(s->buf, s->buf + 1, (PACK_SPARES - 1) * sizeof s->buf[0]);
        memmove(s->cap, s->cap + 1, (PACK_SPARES - 1) * sizeof s->cap[0]);
        s->n--;
    }
    s->buf[s->n] = buf;
    s->cap[s->n++] = cap;
}

static void
Packed_dealloc(Packed *self)
{
    give_newest(&spare_packs, self->buf, self->cap);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyBufferProcs Packed_as_buffer = {(getbufferproc)Packed_getbuffer, NULL};

static PyTypeObject PackedType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "pageserver.storage.layers._inmem.Packed",
    .tp_basicsize = sizeof(Packed),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "A pack's values, read-only (see packed_new).",
    .tp_dealloc = (destructor)Packed_dealloc,
    .tp_as_buffer = &Packed_as_buffer,
};

/* n_bytes to fill through *data: bytes below SPARE_MIN, else a Packed on a spare's memory if
 * one fits (its pages already mapped); NULL on no memory. */
static PyObject *
packed_new(size_t n_bytes, uint8_t **data)
{
    if (n_bytes < SPARE_MIN) {
        PyObject *b = PyBytes_FromStringAndSize(NULL, (Py_ssize_t)n_bytes);
        if (b != NULL)
            *data = (uint8_t *)PyBytes_AS_STRING(b);
        return b;
    }
    Packed *o = PyObject_New(Packed, &PackedType);
    if (o == NULL)
        return NULL;
    void *buf = NULL;
    size_t cap = 0;
    if (take_fitting(&spare_packs, &buf, &cap, n_bytes))
        packs_recycled++;
    else if ((buf = PyMem_Malloc(n_bytes)) != NULL)
        cap = n_bytes;
    o->buf = buf;
    o->cap = cap;
    o->len = (Py_ssize_t)n_bytes;
    if (buf == NULL) {
        o->cap = 0;
        Py_DECREF(o); /* frees nothing */
        PyErr_NoMemory();
        return NULL;
    }
    *data = (uint8_t *)buf;
    return (PyObject *)o;
}

static PyObject *
Arena_new(PyTypeObject *type, PyObject *args, PyObject *kwds)
{
    Py_ssize_t expect = 0;
    if (!_PyArg_NoKeywords("Arena", kwds) || !PyArg_ParseTuple(args, "|n:Arena", &expect))
        return NULL;
    Arena *a = (Arena *)type->tp_alloc(type, 0); /* zeroed */
    if (a != NULL && expect > 0) {
        /* One allocation each, never copied by realloc while the layer fills (below glibc's
         * mmap threshold a growing buffer is copied at every doubling); pages are only
         * touched as values arrive */
        size_t data = (size_t)expect + expect / 8, versions = (size_t)expect / 48 + 1024;
        int took_data = take_spare(&spare_data, (void **)&a->data, &a->data_cap, data);
        int took = took_data &
                   take_spare(&spare_versions, (void **)&a->versions, &a->cap_versions, versions);
        recycled += took;
        if (reserve((void **)&a->data, &a->data_cap, data, 1, data) < 0 ||
            reserve((void **)&a->versions, &a->cap_versions, versions, sizeof(Version),
                    versions) < 0)
            Py_CLEAR(a);
        else
            a->fresh = !took_data && a->data_cap >= SPARE_MIN; /* a spare's pages are mapped */
    }
    return (PyObject *)a;
}

static void
Arena_dealloc(Arena *a)
{
    for (size_t i = 0; i < a->n_chains; i++)
        PyMem_Free(a->chains[i].v);
    PyMem_Free(a->chains);
    PyMem_Free(a->slots);
    prefault_join(a);
    give_spare(&spare_versions, a->versions, a->cap_versions, sizeof(Version));
    give_spare(&spare_data, a->data, a->data_cap, 1);
    Py_TYPE(a)->tp_free((PyObject *)a);
}

static PyObject *
Arena_nbytes(Arena *a, void *unused)
{
    size_t chains = 0;
    for (size_t i = 0; i < a->n_chains; i++)
        chains += a->chains[i].cap * sizeof(uint32_t);
    return PyLong_FromSize_t(a->data_cap + a->cap_versions * sizeof(Version) +
                             a->cap_chains * sizeof(Chain) + a->n_slots * sizeof(int32_t) + chains);
}

/* prefault(wait=False) -> whether a thread now maps the fresh data buffer in (see
 * prefault_start; False for a spare's buffer or once done); `wait` joins it (tests) */
static PyObject *
Arena_prefault(Arena *a, PyObject *args)
{
    int wait = 0;
    if (!PyArg_ParseTuple(args, "|p:prefault", &wait))
        return NULL;
    int started = 0;
    if (a->fresh) {
        prefault_start(a);
        started = a->prefaulting;
    }
    if (wait)
        prefault_join(a); /* with the GIL: joined once (the thread needs no GIL) */
    return PyBool_FromLong(started);
}

static PyMethodDef Arena_methods[] = {
    {"put", (PyCFunction)Arena_put, METH_VARARGS, NULL},
    {"prefault", (PyCFunction)Arena_prefault, METH_VARARGS, NULL},
    {"collect", (PyCFunction)Arena_collect, METH_VARARGS, NULL},
    {"newest_lsn", (PyCFunction)Arena_newest_lsn, METH_VARARGS, NULL},
    {"newest_versions", (PyCFunction)Arena_newest_versions, METH_VARARGS, NULL},
    {"split_above", (PyCFunction)Arena_split_above, METH_VARARGS, NULL},
    {"key_groups", (PyCFunction)Arena_key_groups, METH_NOARGS, NULL},
    {"pack", (PyCFunction)Arena_pack, METH_VARARGS, NULL},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef Arena_getset[] = {
    {"nbytes", (getter)Arena_nbytes, NULL, "memory held (buffers' capacity)", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyTypeObject ArenaType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "pageserver.storage.layers._inmem.Arena",
    .tp_basicsize = sizeof(Arena),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "The versions of an in-memory layer (see the module comment).",
    .tp_new = Arena_new,
    .tp_dealloc = (destructor)Arena_dealloc,
    .tp_methods = Arena_methods,
    .tp_getset = Arena_getset,
};


/* --- merging frozen arenas (merge_cuts, pack_merged) ------------------------------------- */

typedef struct {
    Arena *a;
    Chain **chains; /* sorted, in the range asked */
    size_t n, i;
} MSrc;

typedef struct {
    MSrc *src;
    Py_ssize_t k;
    Chain **group; /* k slots: the chains of the current key, NULL where a source has none */
} Merge;

static void
merge_close(Merge *m)
{
    for (Py_ssize_t j = 0; m->src != NULL && j < m->k; j++)
        PyMem_Free(m->src[j].chains);
    PyMem_Free(m->src);
    PyMem_Free(m->group);
    m->src = NULL;
    m->group = NULL;
}

/* the sources of `arenas` (a list or tuple of Arena) over [start, end) (start NULL: all) */
static int
merge_open(Merge *m, PyObject *arenas, const uint8_t *start, const uint8_t *end)
{
    PyObject *seq = PySequence_Fast(arenas, "merge: arenas must be a sequence");
    if (seq == NULL)
        return -1;
    m->k = PySequence_Fast_GET_SIZE(seq);
    m->src = PyMem_Calloc(m->k ? (size_t)m->k : 1, sizeof *m->src);
    m->group = PyMem_Calloc(m->k ? (size_t)m->k : 1, sizeof *m->group);
    if (m->src == NULL || m->group == NULL) {
        PyErr_NoMemory();
        goto fail;
    }
    for (Py_ssize_t j = 0; j < m->k; j++) {
        PyObject *item = PySequence_Fast_GET_ITEM(seq, j);
        if (!PyObject_TypeCheck(item, &ArenaType)) {
            PyErr_SetString(PyExc_TypeError, "merge: arenas must be Arena objects");
            goto fail;
        }
        m->src[j].a = (Arena *)item;
        m->src[j].chains = sorted_chains(m->src[j].a, start, end, &m->src[j].n);
        if (m->src[j].chains == NULL)
            goto fail;
    }
    Py_DECREF(seq);
    return 0;
fail:
    Py_DECREF(seq);
    merge_close(m);
    return -1;
}

/* the next key's chains into m->group (advancing past them); its key, NULL when done */
static const uint8_t *
merge_next(Merge *m)
{
    const uint8_t *key = NULL;
    for (Py_ssize_t j = 0; j < m->k; j++) {
        MSrc *s = &m->src[j];
        if (s->i < s->n && (key == NULL || memcmp(s->chains[s->i]->key, key, KEY_SIZE) < 0))
            key = s->chains[s->i]->key;
    }
    if (key == NULL)
        return NULL;
    for (Py_ssize_t j = 0; j < m->k; j++) {
        MSrc *s = &m->src[j];
        m->group[j] = NULL;
        if (s->i < s->n && memcmp(s->chains[s->i]->key, key, KEY_SIZE) == 0)
            m->group[j] = s->chains[s->i++];
    }
    return key;
}

static void
merge_rewind(Merge *m)
{
    for (Py_ssize_t j = 0; j < m->k; j++)
        m->src[j].i = 0;
}

static PyObject *
inmem_merge_cuts(PyObject *module, PyObject *args)
{
    PyObject *arenas;
    unsigned long long target;
    if (!PyArg_ParseTuple(args, "OK:merge_cuts", &arenas, &target))
        return NULL;
    Merge m = {0};
    if (merge_open(&m, arenas, NULL, NULL) < 0)
        return NULL;
    PyObject *out = PyList_New(0);
    unsigned long long held = 0;
    const uint8_t *key;
    while (out != NULL && (key = merge_next(&m)) != NULL) {
        if (held > 0 && held >= target) {
            PyObject *k = PyBytes_FromStringAndSize((const char *)key, KEY_SIZE);
            if (k == NULL || PyList_Append(out, k) < 0)
                Py_CLEAR(out);
            Py_XDECREF(k);
            held = 0;
        }
        for (Py_ssize_t j = 0; j < m.k; j++) {
            Chain *c = m.group[j];
            for (uint32_t i = 0; c != NULL && i < c->n; i++)
                held += m.src[j].a->versions[c->v[i]].len;
        }
    }
    merge_close(&m);
    return out;
}

/* --- a merged pack filled in steps (merge_packer) ------------------------------------------
 * pack_merged's fill, a few blocks at a time: the blocks cut so far are final (the data
 * buffer is sized for the whole pack up front), so the writer hands them to the zstd pool
 * while the next ones are packed; the same bytes as pack_merged. */

typedef struct {
    PyObject_HEAD
    Merge m;
    Pack p;
    PyObject *bufs[3];
    size_t n_keys, n_versions, n_bytes, key_i, reported;
    Py_ssize_t at_src; /* within the current key (m.group): its next source, -1 between keys */
    uint32_t at_version; /* and that source's next version */
    int state; /* 0: filling, 1: filled (pack_end done), 2: result taken or released */
} MergePacker;

static PyTypeObject MergePackerType;

/* The arenas writable again and the merge's memory freed (once). */
static void
packer_unbusy(MergePacker *self)
{
    for (Py_ssize_t j = 0; self->m.src != NULL && j < self->m.k; j++) {
        self->m.src[j].a->busy--;
        Py_DECREF(self->m.src[j].a);
    }
    merge_close(&self->m);
}

/* A packer over (arenas, start, end, block_size, lsn_lo, lsn_hi) as `name` takes them. */
static MergePacker *
packer_open(PyObject *args, const char *name)
{
    PyObject *arenas, *startobj, *endobj;
    const uint8_t *start, *end = NULL;
    Py_ssize_t limit;
    unsigned long long lo, hi;
    if (!PyArg_ParseTuple(args, "OOOnO&O&", &arenas, &startobj, &endobj, &limit, lsn_arg, &lo,
                          lsn_arg, &hi) ||
        key_arg(startobj, &start) < 0 || (endobj != Py_None && key_arg(endobj, &end) < 0))
        return NULL;
    /* block offsets are u32 in the version table */
    if (limit <= 0 || (uint64_t)limit > UINT32_MAX) {
        PyErr_Format(PyExc_ValueError, "%s: block size out of range", name);
        return NULL;
    }
    /* no stored key starts with 0xFF (keys.check_key): all FF bounds every key */
    static const uint8_t key_max[KEY_SIZE] = {
        0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF,
        0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF,
    };
    MergePacker *self = PyObject_New(MergePacker, &MergePackerType);
    if (self == NULL)
        return NULL;
    memset(&self->m, 0, sizeof self->m);
    memset(&self->p, 0, sizeof self->p);
    self->bufs[0] = self->bufs[1] = self->bufs[2] = NULL;
    self->n_keys = self->n_versions = self->n_bytes = self->key_i = self->reported = 0;
    self->at_src = -1;
    self->at_version = 0;
    self->state = 2;
    self->p.limit = limit;
    self->p.lo = lo;
    self->p.hi = hi;
    if (merge_open(&self->m, arenas, start, end != NULL ? end : key_max) < 0) {
        Py_DECREF(self);
        return NULL;
    }
    while (merge_next(&self->m) != NULL) {
        self->n_keys++;
        for (Py_ssize_t j = 0; j < self->m.k; j++) {
            Chain *c = self->m.group[j];
            for (uint32_t i = 0; c != NULL && i < c->n; i++) {
                self->n_versions++;
                self->n_bytes += self->m.src[j].a->versions[c->v[i]].len;
            }
        }
    }
    merge_rewind(&self->m);
    if (pack_open(&self->p, self->n_keys, self->n_versions, self->n_bytes, self->bufs) < 0) {
        pack_release(&self->p, self->bufs);
        merge_close(&self->m);
        Py_DECREF(self);
        return NULL;
    }
    for (Py_ssize_t j = 0; j < self->m.k; j++) {
        Py_INCREF(self->m.src[j].a);
        self->m.src[j].a->busy++;
    }
    self->state = 0;
    return self;
}

/* Pack versions until `want` more blocks are cut (a step may end inside a key: a hot page's
 * versions span many blocks) or none is left (then closes the last block); 1 when done (or
 * p.bad), with the GIL released. */
static int
packer_step(MergePacker *self, size_t want)
{
    Merge *m = &self->m;
    Pack *p = &self->p;
    size_t target = p->n_blocks + want;
    int done = 0;
    Py_BEGIN_ALLOW_THREADS
    while (p->n_blocks < target && !p->bad) {
        if (self->at_src < 0) {
            const uint8_t *key = merge_next(m);
            if (key == NULL) {
                pack_end(p);
                done = 1;
                break;
            }
            pack_key(p, self->key_i++, key);
            self->at_src = 0;
            self->at_version = 0;
        }
        for (; self->at_src < m->k; self->at_src++, self->at_version = 0) {
            Chain *c = m->group[self->at_src];
            Arena *a = m->src[self->at_src].a;
            while (c != NULL && self->at_version < c->n && p->n_blocks < target) {
                if (pack_put(p, a, &a->versions[c->v[self->at_version]]) < 0)
                    break;
                self->at_version++;
            }
            if (p->bad || (c != NULL && self->at_version < c->n))
                break; /* the step ends inside this key */
        }
        if (self->at_src >= m->k)
            self->at_src = -1;
    }
    Py_END_ALLOW_THREADS
    return done || p->bad;
}

/* The filled pack's result (pack_result), the arenas released. */
static PyObject *
packer_result(MergePacker *self)
{
    self->state = 2;
    packer_unbusy(self);
    return pack_result(&self->p, self->bufs, self->n_keys, self->n_versions, self->n_bytes);
}

static PyObject *
inmem_merge_packer(PyObject *module, PyObject *args)
{
    return (PyObject *)packer_open(args, "merge_packer");
}

/* pack_merged: a packer filled at once */
static PyObject *
inmem_pack_merged(PyObject *module, PyObject *args)
{
    MergePacker *self = packer_open(args, "pack_merged");
    if (self == NULL)
        return NULL;
    packer_step(self, SIZE_MAX / 2);
    PyObject *result = packer_result(self);
    Py_DECREF(self);
    return result;
}

/* fill(blocks) -> (ends, done): packs versions until `blocks` more blocks are cut or none
 * is left; `ends` the ">Q" ends (in data) of the blocks cut since the last call, the last
 * block's too once done. */
static PyObject *
MergePacker_fill(MergePacker *self, PyObject *args)
{
    Py_ssize_t want;
    if (!PyArg_ParseTuple(args, "n:fill", &want))
        return NULL;
    if (self->state != 0) {
        PyErr_SetString(PyExc_RuntimeError, "merge_packer: already filled");
        return NULL;
    }
    Pack *p = &self->p;
    int done = packer_step(self, (size_t)(want > 0 ? want : 1));
    if (p->bad) { /* pack_result raises the reference's error and releases the buffers */
        Py_XDECREF(packer_result(self));
        return NULL;
    }
    PyObject *ends = PyBytes_FromStringAndSize(NULL, (Py_ssize_t)((p->n_blocks - self->reported) * 8));
    if (ends == NULL)
        return NULL;
    for (size_t b = self->reported; b < p->n_blocks; b++)
        put_be((uint8_t *)PyBytes_AS_STRING(ends) + 8 * (b - self->reported), p->ends[b], 8);
    self->reported = p->n_blocks;
    if (done)
        self->state = 1;
    return Py_BuildValue("(NO)", ends, done ? Py_True : Py_False);
}

/* data() -> the pack's data buffer (its blocks final as fill reports them) */
static PyObject *
MergePacker_data(MergePacker *self, PyObject *unused)
{
    if (self->bufs[0] == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "merge_packer: released");
        return NULL;
    }
    return Py_NewRef(self->bufs[0]);
}

/* result() -> what pack_merged returns, once filled */
static PyObject *
MergePacker_result(MergePacker *self, PyObject *unused)
{
    if (self->state != 1) {
        PyErr_SetString(PyExc_RuntimeError, "merge_packer: not filled");
        return NULL;
    }
    return packer_result(self);
}

static void
MergePacker_dealloc(MergePacker *self)
{
    if (self->state != 2)
        packer_unbusy(self);
    merge_close(&self->m);
    pack_release(&self->p, self->bufs);
    PyObject_Free(self);
}

static PyMethodDef MergePacker_methods[] = {
    {"fill", (PyCFunction)MergePacker_fill, METH_VARARGS, NULL},
    {"data", (PyCFunction)MergePacker_data, METH_NOARGS, NULL},
    {"result", (PyCFunction)MergePacker_result, METH_NOARGS, NULL},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject MergePackerType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "pageserver.storage.layers._inmem.MergePacker",
    .tp_basicsize = sizeof(MergePacker),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "pack_merged filled a few blocks at a time (see merge_packer).",
    .tp_dealloc = (destructor)MergePacker_dealloc,
    .tp_methods = MergePacker_methods,
};

static PyObject *
inmem_recycled(PyObject *self, PyObject *unused)
{
    return PyLong_FromUnsignedLongLong(recycled);
}

static PyObject *
inmem_prefaults(PyObject *self, PyObject *unused)
{
    return PyLong_FromUnsignedLongLong(prefaults);
}

static PyObject *
inmem_packs_recycled(PyObject *self, PyObject *unused)
{
    return PyLong_FromUnsignedLongLong(packs_recycled);
}

static PyMethodDef module_methods[] = {
    {"recycled", inmem_recycled, METH_NOARGS,
     "recycled() -> arenas made so far on a dead arena's buffers (see spare_data)"},
    {"prefaults", inmem_prefaults, METH_NOARGS,
     "prefaults() -> fresh arenas whose data a thread mapped in (see prefault_start)"},
    {"merge_packer", inmem_merge_packer, METH_VARARGS,
     "merge_packer(arenas, start, end, block_size, lsn_lo, lsn_hi) -> MergePacker"},
    {"packs_recycled", inmem_packs_recycled, METH_NOARGS,
     "packs_recycled() -> packs made so far on a dead pack's memory (see Packed)"},
    {"merge_cuts", inmem_merge_cuts, METH_VARARGS, NULL},
    {"pack_merged", inmem_pack_merged, METH_VARARGS, NULL},
    {NULL, NULL, 0, NULL},
};

static InmemApi api = {INMEM_API_VERSION, &ArenaType, arena_append, arena_mark, arena_rollback};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_inmem", "C storage of the in-memory layer.", -1, module_methods,
};

PyMODINIT_FUNC
PyInit__inmem(void)
{
    if (PyType_Ready(&ArenaType) < 0 || PyType_Ready(&PackedType) < 0 ||
        PyType_Ready(&MergePackerType) < 0)
        return NULL;
    PyObject *m = PyModule_Create(&module);
    if (m == NULL)
        return NULL;
    api.type = &ArenaType;
    PyObject *capsule = PyCapsule_New(&api, INMEM_CAPSULE, NULL);
    int r = capsule == NULL ? -1 : PyModule_AddObjectRef(m, "_C_API", capsule);
    Py_XDECREF(capsule);
    if (r < 0 || PyModule_AddObjectRef(m, "Arena", (PyObject *)&ArenaType) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
