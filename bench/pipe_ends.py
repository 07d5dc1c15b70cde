"""The ends of bench.exchange's reference pipelines that no stock tool on this machine offers
(the aws CLI and nc are not installed): an S3 upload or download of a stream, and a TCP send
to a sink that stores what it receives.

    python -m bench.pipe_ends s3-put BUCKET KEY     # stdin -> multipart upload
    python -m bench.pipe_ends s3-get BUCKET KEY     # object -> stdout
    python -m bench.pipe_ends tcp-sink FILE         # prints its port; one connection -> FILE
    python -m bench.pipe_ends tcp-send PORT         # stdin -> 127.0.0.1:PORT
    python -m bench.pipe_ends untar DIR             # a basebackup tar on stdin -> DIR

`untar` is the receiving end of our own extraction (bench.extract): the CLI's unpacking of a
basebackup (datadir_files/untar.py) in a process of its own, as `neon` unpacks what the pageserver
streams to it.

s3 uses boto3's managed transfers (what `aws s3 cp - s3://...` does), with the part size and
parallel parts of our s3 transport, credentials and endpoint from the standard AWS variables.
The sink fsyncs FILE before it answers, and the sender waits for that answer, so a timed
sender covers the whole transfer, as a push to `neon snapshot recv` does.
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import sys
from typing import BinaryIO

PART_BYTES = 16 << 20  # as cli/transport/s3.py
PARTS_IN_FLIGHT = 8
CHUNK = 1 << 20
DONE = b"ok"


def s3_transfer(direction: str, bucket: str, key: str) -> None:
    import boto3
    from boto3.s3.transfer import TransferConfig

    config = TransferConfig(
        multipart_chunksize=PART_BYTES, max_concurrency=PARTS_IN_FLIGHT, use_threads=True
    )
    client = boto3.client("s3")
    if direction == "put":
        client.upload_fileobj(sys.stdin.buffer, bucket, key, Config=config)
    else:
        client.download_fileobj(bucket, key, sys.stdout.buffer, Config=config)


def tcp_sink(path: str) -> None:
    with socket.create_server(("127.0.0.1", 0)) as listener:
        print(listener.getsockname()[1], flush=True)
        conn, _ = listener.accept()
    with conn, open(path, "wb") as out:
        copy(conn.makefile("rb"), out)
        out.flush()
        os.fsync(out.fileno())
        conn.sendall(DONE)


def tcp_send(port: int) -> None:
    with socket.create_connection(("127.0.0.1", port)) as conn:
        with conn.makefile("wb") as out:
            copy(sys.stdin.buffer, out)
        conn.shutdown(socket.SHUT_WR)
        if conn.recv(len(DONE)) != DONE:
            raise SystemExit("bench.pipe_ends: the sink did not confirm the stream")


def copy(source: BinaryIO, sink: BinaryIO) -> None:
    shutil.copyfileobj(source, sink, CHUNK)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.pipe_ends", description=__doc__)
    sub = ap.add_subparsers(dest="cmd", required=True)
    for name in ("s3-put", "s3-get"):
        s3 = sub.add_parser(name)
        s3.add_argument("bucket")
        s3.add_argument("key")
    sub.add_parser("tcp-sink").add_argument("file")
    sub.add_parser("tcp-send").add_argument("port", type=int)
    sub.add_parser("untar").add_argument("dir")
    args = ap.parse_args(argv)
    if args.cmd.startswith("s3-"):
        s3_transfer(args.cmd.removeprefix("s3-"), args.bucket, args.key)
    elif args.cmd == "tcp-sink":
        tcp_sink(args.file)
    elif args.cmd == "untar":
        from pathlib import Path

        from datadir_files.untar import extract_basebackup

        extract_basebackup(sys.stdin.buffer, Path(args.dir))
    else:
        tcp_send(args.port)
    return 0


if __name__ == "__main__":
    sys.exit(main())
