"""Remote history benchmark (issue 13): layer uploads to S3 against a plain multipart upload,
and a cold attach from S3 that extracts one snapshot.

    .venv/bin/python -m bench.remote [--db-mib 1024] [--parallel 4] [--rounds 3] [--keep]

1. moto's S3 server runs as a child process on 127.0.0.1 (its memory is not ours). A
   throwaway home (`neon pg create`) gets an s3 storage on it and a PITR area kept there
   (`pitr create --storage s3tank`); `pgbench -i` at the scale giving --db-mib of data
   (70 per GiB); a snapshot `pgdata1@bench`; CHECKPOINT and a WAL switch. The clock then
   runs until the bucket's index reaches the snapshot's LSN (the end-to-end upload lag after
   the load, for information).
2. Upload throughput, in this process, of the same bytes (the home's layer files) to two
   prefixes of a fresh bucket:
   - ours: one round of the uploader's queue (pageserver/remote/upload_queue.py: each file
     read, its SHA-256 checked, one PutObject, at most --parallel at once, then the index);
   - reference: what `aws s3 cp --recursive` does with its defaults, through aiobotocore:
     files over 8 MiB as multipart uploads of 8 MiB parts, the rest as one PutObject, at most
     10 requests at once.
   --rounds of each, the sides alternating (a fresh bucket per round); the best of each side
   is compared. Peak RSS of this process (VmHWM, reset before each) for each.
3. A cold attach: a fresh home attaches the bucket (`storage attach -t s3`), `pitr list`
   (one LIST, one GET of the index: timed), then `pitr extract-snapshot` at the snapshot's
   LSN (timed); the bytes it downloaded (the files under its mirror of the area) against the
   snapshot's size (`snapshot list` SIZE on the first home: the layers a read at it needs) and
   the database's size (pg_database_size of every database). Peak RSS of its pageserver.

Goals (the issue's): ours >= 0.8 x the reference upload rate; the cold extraction downloads
<= 1.2 x the snapshot's size. Prints a table and, last, one JSON line. Run by hand.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from bench.common import (
    MIB,
    machine_info,
    mib,
    mib_per_s,
    print_machine,
    print_table,
    reset_peak,
    run_benchmark,
    say,
    vm_hwm_kib,
)
from pageserver.remote.index import RemoteIndex
from pageserver.remote.objects import open_bucket
from pageserver.remote.settings import RemoteSettings
from pageserver.remote.upload_queue import DEFAULT_PARALLEL, Upload, UploadQueue
from pg15.lsn import format_lsn
from tests.neoncli import NeonCli, free_port, pgbench, psql
from tests.pgtest import pg_reachable_tmpdir
from tests.s3d import ACCESS_KEY, REGION, SECRET_KEY

SCALE_PER_GIB = 70
PART = 8 * MIB  # aws s3 cp: multipart_threshold and multipart_chunksize
REF_CONCURRENCY = 10  # aws s3 cp: max_concurrent_requests


@contextmanager
def moto_process() -> Iterator[str]:
    """moto's server as a child (stopped by its PID); its endpoint."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    moto = Path(sys.executable).with_name("moto_server")
    proc = subprocess.Popen(
        [str(moto), "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise RuntimeError("moto_server did not come up") from None
                time.sleep(0.2)
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def s3_client(endpoint: str) -> Any:
    import boto3

    return boto3.client(
        "s3", endpoint_url=endpoint, region_name=REGION,
        aws_access_key_id=ACCESS_KEY, aws_secret_access_key=SECRET_KEY,
    )  # fmt: skip


def daemon_pid(neon: NeonCli) -> int:
    return int((neon.home / "pageserver" / "pageserver.pid").read_text().strip())


def attach(neon: NeonCli, endpoint: str, bucket: str, secret: Path) -> None:
    neon.run(
        "storage", "attach", "-t", "s3", "-n", "s3tank", "-c", f"bucket={bucket}",
        "-c", f"endpoint={endpoint}", "-c", f"region={REGION}",
        "-c", f"access_key_id={ACCESS_KEY}", "-c", f"secret_access_key=@{secret}",
    )  # fmt: skip


def layer_files(home: Path) -> list[Path]:
    """The layer files of the home's native storages (storage/NAME/pagestore)."""
    return sorted(p for p in home.glob("storage/*/pagestore/timelines/*/*") if "__" in p.name)


async def upload_ours(
    endpoint: str, bucket: str, secret: Path, files: list[Path], parallel: int
) -> None:
    settings = RemoteSettings("bench", bucket, "ours", endpoint, REGION, ACCESS_KEY, str(secret))
    uploads = []
    for f in files:
        body = f.read_bytes()
        uploads.append(
            Upload(f.name, settings.key(f.name), len(body), hashlib.sha256(body).hexdigest(),
                   f.read_bytes)
        )  # fmt: skip
    index = RemoteIndex(generation=1, area={}, node_id="bench", pgdata="", node_state={},
                        timelines={}, objects={}, snapshots=[])  # fmt: skip

    async with open_bucket(settings) as store:
        queue = UploadQueue(store, parallel=parallel)
        await queue.run_round(
            uploads, lambda: store.put(settings.key("index.json"), index.encode()), []
        )


async def upload_reference(endpoint: str, bucket: str, files: list[Path]) -> None:
    """`aws s3 cp --recursive`'s defaults with aiobotocore: multipart over 8 MiB."""
    from aiobotocore.session import get_session
    from botocore.config import Config

    slots = asyncio.Semaphore(REF_CONCURRENCY)
    config = Config(max_pool_connections=REF_CONCURRENCY)
    async with get_session().create_client(
        "s3", region_name=REGION, endpoint_url=endpoint, config=config,
        aws_access_key_id=ACCESS_KEY, aws_secret_access_key=SECRET_KEY,
    ) as client:  # fmt: skip

        async def part(key: str, upload_id: str, number: int, f: Path) -> dict[str, Any]:
            async with slots:
                with open(f, "rb") as fh:
                    fh.seek((number - 1) * PART)
                    data = fh.read(PART)
                answer = await client.upload_part(
                    Bucket=bucket, Key=key, UploadId=upload_id, PartNumber=number, Body=data
                )
                return {"ETag": answer["ETag"], "PartNumber": number}

        async def one(f: Path) -> None:
            key = f"ref/{f.name}"
            size = f.stat().st_size
            if size <= PART:
                async with slots:
                    await client.put_object(Bucket=bucket, Key=key, Body=f.read_bytes())
                return
            started = await client.create_multipart_upload(Bucket=bucket, Key=key)
            uid = started["UploadId"]
            parts = await asyncio.gather(
                *(part(key, uid, n, f) for n in range(1, (size + PART - 1) // PART + 1))
            )
            await client.complete_multipart_upload(
                Bucket=bucket, Key=key, UploadId=uid, MultipartUpload={"Parts": list(parts)}
            )

        await asyncio.gather(*(one(f) for f in files))


def timed(coro: Any) -> tuple[float, int]:
    """Wall seconds and peak RSS (KiB) of running `coro` in this process."""
    reset_peak()
    started = time.perf_counter()
    asyncio.run(coro)
    return time.perf_counter() - started, vm_hwm_kib()


def tree_size(root: Path) -> int:
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file())


def run(args: argparse.Namespace) -> dict[str, Any]:
    before = machine_info()
    base = pg_reachable_tmpdir("neon-bench-remote-")
    secret = base / "s3-secret"
    secret.write_text(SECRET_KEY)
    a, b = NeonCli(base / "a", {}), NeonCli(base / "b", {})
    scale = max(1, round(args.db_mib * SCALE_PER_GIB / 1024))
    results: dict[str, Any] = {"db_mib_asked": args.db_mib, "pgbench_scale": scale}
    try:
        with moto_process() as endpoint:
            s3 = s3_client(endpoint)
            bucket = "bench-history"
            s3.create_bucket(Bucket=bucket)
            say(f"moto at {endpoint}; a home with a PITR area in s3 (pgbench scale {scale})")
            a.run("pg", "create", "--port", str(free_port()))
            attach(a, endpoint, bucket, secret)
            a.run("pitr", "create", "area", "--pg", "pgdata1", "--storage", "s3tank")
            conn = str(a.json("pg", "show", "pgdata1")["connstr"])
            pgbench(conn, "-i", "-q", "-s", str(scale))
            db_bytes = int(psql(conn, "SELECT sum(pg_database_size(oid)) FROM pg_database"))
            snap = a.json("snapshot", "create", "pgdata1@bench")
            lsn = int(snap["lsn"])
            psql(conn, "SELECT pg_switch_wal(); CHECKPOINT;")
            say(f"snapshot at {format_lsn(lsn)}; waiting for the bucket to reach it")
            started = time.perf_counter()
            while True:
                shown = a.json("storage", "show", "s3tank")
                [up] = [u for u in shown["uploads"] if u["area"] == "area"]
                if int(up["remote_lsn"]) >= lsn:
                    break
                if time.perf_counter() - started > args.timeout:
                    raise RuntimeError(f"the uploads did not reach {format_lsn(lsn)}: {up}")
                time.sleep(1)
            e2e = time.perf_counter() - started
            snap_size = next(
                s["size_bytes"] for s in a.json("snapshot", "list") if s["name"] == "pgdata1@bench"
            )
            files = layer_files(a.home)
            layer_bytes = sum(f.stat().st_size for f in files)
            results.update(
                db_bytes=db_bytes, snapshot_bytes=snap_size, bucket_bytes=up["remote_bytes"],
                upload_lag_after_load_s=round(e2e, 2), layer_files=len(files),
                layer_bytes=layer_bytes,
            )  # fmt: skip

            say(f"upload throughput: {len(files)} layer files, {mib(layer_bytes):.1f} MiB")
            ours_runs: list[tuple[float, int]] = []
            ref_runs: list[tuple[float, int]] = []
            for n in range(args.rounds):  # sides alternate; the best of each is compared
                bucket_n = f"bench-upload-{n}"
                s3.create_bucket(Bucket=bucket_n)
                sides = [
                    (ref_runs, lambda b=bucket_n: upload_reference(endpoint, b, files)),
                    (ours_runs, lambda b=bucket_n: upload_ours(
                        endpoint, b, secret, files, args.parallel)),
                ]  # fmt: skip
                for runs, make in sides if n % 2 == 0 else sides[::-1]:
                    runs.append(timed(make()))
            say(f"upload rounds (s): ours {[round(r[0], 2) for r in ours_runs]}, "
                f"reference {[round(r[0], 2) for r in ref_runs]}")  # fmt: skip
            ours_s, ref_s = min(r[0] for r in ours_runs), min(r[0] for r in ref_runs)
            ours_rss, ref_rss = max(r[1] for r in ours_runs), max(r[1] for r in ref_runs)
            results.update(
                ours_upload_rounds_s=[round(r[0], 3) for r in ours_runs],
                ref_upload_rounds_s=[round(r[0], 3) for r in ref_runs],
                ours_upload_s=round(ours_s, 3), ref_upload_s=round(ref_s, 3),
                ours_mib_s=round(mib_per_s(layer_bytes, ours_s), 1),
                ref_mib_s=round(mib_per_s(layer_bytes, ref_s), 1),
                upload_ratio=round(ref_s / ours_s, 3),
                ours_upload_vmhwm_kib=ours_rss, ref_upload_vmhwm_kib=ref_rss,
            )  # fmt: skip

            say("a cold attach from the bucket: list, then extract the snapshot")
            attach(b, endpoint, bucket, secret)
            b.run("pageserver", "start")
            t0 = time.perf_counter()
            areas = b.json("pitr", "list")
            attach_s = time.perf_counter() - t0
            assert [x["name"] for x in areas] == ["area"], areas
            t0 = time.perf_counter()
            b.json("pitr", "extract-snapshot", "area", "--lsn", format_lsn(lsn), "--as", "cold")
            extract_s = time.perf_counter() - t0
            mirror = b.home / "pageserver" / "remote" / "s3tank" / "area" / "pagestore"
            downloaded = sum(
                tree_size(mirror / d) for d in ("timelines", "wal", "wal_blocks", "lsn_index")
            )
            results.update(
                attach_list_s=round(attach_s, 3), extract_s=round(extract_s, 3),
                downloaded_bytes=downloaded,
                downloaded_per_snapshot=round(downloaded / snap_size, 3),
                downloaded_per_db=round(downloaded / db_bytes, 3),
                attached_pageserver_vmhwm_kib=vm_hwm_kib(daemon_pid(b)),
                uploading_pageserver_vmhwm_kib=vm_hwm_kib(daemon_pid(a)),
            )  # fmt: skip
            cold = [s for s in b.json("snapshot", "list") if s["name"] == "pgdata1@cold"]
            assert cold and int(cold[0]["lsn"]) <= lsn, cold
    finally:
        b.cleanup()
        a.cleanup()
        if args.keep:
            print(f"kept {base}", file=sys.stderr)
        else:
            shutil.rmtree(base, ignore_errors=True)
    results["machine_before"], results["machine_after"] = before, machine_info()
    r = results
    print(f"database {mib(r['db_bytes']):.0f} MiB (pgbench scale {scale}); snapshot SIZE "
          f"{mib(r['snapshot_bytes']):.1f} MiB; bucket {mib(r['bucket_bytes']):.1f} MiB; "
          f"upload lag after the load {r['upload_lag_after_load_s']} s")  # fmt: skip
    print_table(
        ("upload of the layer files", "seconds", "MiB/s", "peak RSS MiB"),
        [
            ("ours (upload queue, PutObject)", r["ours_upload_s"], r["ours_mib_s"],
             r["ours_upload_vmhwm_kib"] / 1024),
            ("aws s3 cp-like multipart", r["ref_upload_s"], r["ref_mib_s"],
             r["ref_upload_vmhwm_kib"] / 1024),
        ],
    )  # fmt: skip
    print(f"ours / reference rate: {r['upload_ratio']:.2f} (goal >= 0.8)")
    print_table(
        ("cold attach from S3", "value"),
        [
            ("pitr list (attach) s", r["attach_list_s"]),
            ("extract-snapshot s", r["extract_s"]),
            ("downloaded MiB", mib(r["downloaded_bytes"])),
            ("downloaded / snapshot SIZE", r["downloaded_per_snapshot"]),
            ("downloaded / database size", r["downloaded_per_db"]),
            ("attached pageserver peak RSS MiB", r["attached_pageserver_vmhwm_kib"] / 1024),
        ],
    )
    print("goal: downloaded <= 1.2 x the snapshot's size")
    print_machine(results)
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench.remote", description=__doc__.splitlines()[0])
    parser.add_argument("--db-mib", type=int, default=1024, help="database size (MiB)")
    parser.add_argument("--parallel", type=int, default=DEFAULT_PARALLEL)
    parser.add_argument("--rounds", type=int, default=3, help="upload rounds per side")
    parser.add_argument("--timeout", type=float, default=900, help="upload wait (s)")
    parser.add_argument("--keep", action="store_true")
    return run_benchmark("remote", run, parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
