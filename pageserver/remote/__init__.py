"""History kept in an S3 bucket, after Neon's remote timeline client.

A PITR area placed on an s3 storage (`neon pitr create --storage s3tank`) has its page
history copied to the bucket as it is produced, under ``<prefix>/pitr/<area>/``::

    lease.json          which pageserver writes this history (owner, generation)
    index.json          the remote index: what the history is and every object it names,
                        each with its size and SHA-256 (pageserver/remote/index.py)
    objects/...         layer files (immutable: one object each, named as the file), archived
                        WAL segments, the LSN index

The ordering rules are Neon's (pageserver/src/tenant/upload_queue.rs): objects first, then the
index that names them, and an object the index stopped naming is deleted only once that
index is in the bucket; so the index in the bucket only ever names complete objects whose
checksums it holds, whatever moment the pageserver dies at. A second pageserver that tries to
write the same history is refused by the lease (pageserver/remote/lease.py).

Another machine attaches the bucket and reads the history from it alone
(pageserver/remote/mirror.py): only the layers an extraction needs are downloaded, each
checked against its SHA-256 before it is used.
"""
