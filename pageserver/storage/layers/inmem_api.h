/*
 * The C interface of pageserver/storage/layers/_inmem.c for other extensions (the C ingest
 * path appends to an in-memory layer's arena without making Python objects): import it with
 * PyCapsule_Import(INMEM_CAPSULE, 0).
 */
#ifndef PG_NEON_INMEM_API_H
#define PG_NEON_INMEM_API_H

#include <Python.h>
#include <stdint.h>

#define KEY_SIZE 18
#define INMEM_CAPSULE "pageserver.storage.layers._inmem._C_API"
/* Bumped with any change of InmemApi: an importer built against another layout refuses to
 * load (ImportError) instead of calling through a mismatched table */
#define INMEM_API_VERSION 2

typedef struct {
    int version; /* INMEM_API_VERSION */
    PyTypeObject *type; /* _inmem.Arena */
    /* Append a version of `key` at `lsn` whose encoding is tag + a[:na] + b[:nb] (no LSN
     * order check: the caller keeps per-key LSNs non-decreasing). 0, or -1 with an exception. */
    int (*append)(PyObject *arena, const uint8_t *key, uint64_t lsn, uint8_t tag, const void *a,
                  size_t na, const void *b, size_t nb);
    /* The arena's version count now (a mark), and back to a mark: the versions appended since
     * are dropped (a C ingest run that fails leaves nothing of its records in the layer). */
    size_t (*mark)(PyObject *arena);
    void (*rollback)(PyObject *arena, size_t mark);
} InmemApi;

#endif
