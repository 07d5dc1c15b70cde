/*
 * Shared by the C fast paths that make or read the store's value objects (Image, WalDelta in
 * pageserver/storage/values.py). They are frozen, slotted dataclasses, so their fields are
 * member slots at fixed offsets; reading or filling those slots directly is what __init__ and
 * attribute access do, without running Python code per value.
 */
#ifndef PG_NEON_NATIVE_SLOTS_H
#define PG_NEON_NATIVE_SLOTS_H

#include <Python.h>
#include <structmember.h> /* PyMemberDef */

/* The offset of slot `name` of `type`, or -1 with an exception set. */
static Py_ssize_t
slot_offset(PyObject *type, const char *name)
{
    PyObject *descr = PyObject_GetAttrString(type, name);
    if (descr == NULL)
        return -1;
    Py_ssize_t offset = -1;
    if (Py_IS_TYPE(descr, &PyMemberDescr_Type))
        offset = ((PyMemberDescrObject *)descr)->d_member->offset;
    else
        PyErr_Format(PyExc_TypeError, "%s is not a slot of the value type", name);
    Py_DECREF(descr);
    return offset;
}

/* The object in the slot at `offset` of `obj` (borrowed; NULL if unset). */
static inline PyObject *
slot_get(PyObject *obj, Py_ssize_t offset)
{
    return *(PyObject **)((char *)obj + offset);
}

#endif
