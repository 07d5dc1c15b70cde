"""Rmgr-specific decoding of a record's main data into typed, frozen structs: one module per
rmgr, and `pg15.rmgr.main_data.decode_main` to dispatch on a record's rmgr id."""
