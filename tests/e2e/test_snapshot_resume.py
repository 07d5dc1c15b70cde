"""Resumable push and pull between two homes (issue 12 item 3, acceptance "Resume"): a push
and a pull SIGKILLed at several seeded random points, then run again, end with the very bytes
of an uninterrupted push (same SHA-256) and send less than a whole transfer; no kill leaves a
file at the destination's name or a snapshot on the receiver. Over a directory, ssh (a real
sshd), s3 (moto, parts of 1 MiB) and `neon snapshot recv` (neon://, --http) for push, s3 for
pull."""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import random
import shutil
import signal
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from cli.progress import PROGRESS_ENV, ProgressReport
from cli.receiver_partials import PARTIALS_DIR
from cli.transport.resume import partial_name
from cli.transport.spool import SPOOL_DIR
from tests.e2e.test_snapshot_delta import node_dump
from tests.e2e.test_snapshot_export import snapshot_dump
from tests.e2e.test_snapshot_recv import receiving, wait_for
from tests.neoncli import NeonCli, free_port, psql
from tests.neoncli import kill_when as neoncli_kill_when
from tests.pgtest import pg_reachable_tmpdir
from tests.relay import capped_relay
from tests.s3d import MotoS3, moto_s3
from tests.sshd import ssh_server

SNAP = "pgdata1@s1"
FILE = "pgdata1@s1.neon"
PART = 1024 * 1024
KILLS = 3
SEED = 20261204


@pytest.fixture(scope="module")
def base() -> Iterator[Path]:
    path = pg_reachable_tmpdir("neon-resume-")
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def s3d() -> Iterator[MotoS3]:
    import moto.s3.models

    saved = moto.s3.models.S3_UPLOAD_PART_MIN_SIZE
    moto.s3.models.S3_UPLOAD_PART_MIN_SIZE = 1  # parts of 1 MiB: many from a small file
    try:
        with moto_s3() as server:
            yield server
    finally:
        moto.s3.models.S3_UPLOAD_PART_MIN_SIZE = saved


@pytest.fixture(scope="module")
def sender(base: Path, s3d: MotoS3) -> Iterator[NeonCli]:
    """A snapshot whose .neon file is about 15 MB (hex text compresses about twofold)."""
    neon = NeonCli(base / "sender", {**s3d.env(), "NEON_S3_PART_SIZE": str(PART)})
    try:
        neon.run("pg", "create", "--port", str(free_port()))
        c = str(neon.json("pg", "show", "pgdata1")["connstr"])
        psql(
            c,
            "CREATE TABLE r AS SELECT g, (SELECT string_agg(md5(random()::text || g || i),"
            " '') FROM generate_series(1, 30) i) AS v FROM generate_series(1, 30000) g",
        )
        neon.run("snapshot", "create", SNAP)
        yield neon
    finally:
        neon.cleanup()


@pytest.fixture(scope="module")
def receiver(base: Path, s3d: MotoS3) -> Iterator[NeonCli]:
    neon = NeonCli(base / "receiver", s3d.env())
    try:
        yield neon
    finally:
        neon.cleanup()


@pytest.fixture(scope="module")
def reference(sender: NeonCli, base: Path) -> dict[str, Any]:
    """An uninterrupted push: the bytes every resumed one must end with."""
    out = base / "reference.neon"
    pushed = sender.json("snapshot", "push", "--to", str(out), SNAP)
    data = out.read_bytes()
    assert pushed["bytes_sent"] == len(data) > 12 * PART
    assert pushed["sha256"] == hashlib.sha256(data).hexdigest()
    # The stream is the same at every export: a second push, the same bytes.
    again = sender.json("snapshot", "push", "--to", str(base / "again.neon"), SNAP)
    assert again["sha256"] == pushed["sha256"]
    return {"size": len(data), "sha256": pushed["sha256"]}


def kill_points(size: int, salt: int) -> list[int]:
    """KILLS points, ascending, between a tenth and two thirds of `size`."""
    rng = random.Random(SEED + salt)
    return sorted(rng.randrange(size // 10, 2 * size // 3) for _ in range(KILLS))


@contextlib.contextmanager
def no_part_stored_beyond(number: int) -> Iterator[None]:
    """moto (in this process) stores no part numbered above `number` until the block ends.
    With 8 parts in flight a push can send its last parts and its CompleteMultipartUpload
    between two looks at the bucket, and the server completes the object after the kill;
    held parts make a push killed once it reached a point one that cannot have completed."""
    import moto.s3.models

    original = moto.s3.models.S3Backend.upload_part
    released = threading.Event()

    def upload_part(
        self: Any, bucket_name: str, multipart_id: str, part_id: int, value: bytes
    ) -> Any:
        if part_id > number:
            released.wait(60)
        return original(self, bucket_name, multipart_id, part_id, value)

    moto.s3.models.S3Backend.upload_part = upload_part  # type: ignore[method-assign]
    try:
        yield
    finally:
        moto.s3.models.S3Backend.upload_part = original  # type: ignore[method-assign]
        released.set()


def kill_when(
    home: NeonCli, args: list[str], reached: Callable[[], int], at: int,
    hold: Callable[[int], contextlib.AbstractContextManager[None]] | None = None,
) -> None:  # fmt: skip
    """Run `neon ARGS` and SIGKILL it once `reached()` (bytes at the far side) is `at`; it
    must not have finished first (tests/neoncli.py's kill_when). `hold(at)`, if given, is
    entered around the run: what keeps the far side from going much beyond `at` before the
    kill."""
    with hold(at) if hold is not None else contextlib.nullcontext():
        neoncli_kill_when(home, lambda: reached() >= at, *args)


def file_size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


def resumed_push(
    sender: NeonCli, url: str, reached: Callable[[], int], visible: Callable[[], bool],
    reference: dict[str, Any], salt: int,
    hold: Callable[[int], contextlib.AbstractContextManager[None]] | None = None,
) -> dict[str, Any]:  # fmt: skip
    for at in kill_points(reference["size"], salt):
        kill_when(sender, ["snapshot", "push", "--to", url, SNAP], reached, at, hold)
        assert not visible(), f"a push killed at {at} bytes left a visible file"
    pushed: dict[str, Any] = sender.json("snapshot", "push", "--to", url, SNAP)
    print(f"resumed push to {url}: {pushed['bytes_sent']} of {reference['size']} bytes sent, "
          f"resumed at {pushed['bytes_resumed']}")  # fmt: skip
    assert pushed["sha256"] == reference["sha256"]
    assert pushed["bytes_resumed"] > 0 and pushed["bytes_sent"] < reference["size"]
    assert pushed["bytes_sent"] + pushed["bytes_resumed"] == reference["size"]
    return pushed


def test_push_to_a_directory_killed_and_resumed(
    sender: NeonCli, base: Path, reference: dict[str, Any]
) -> None:
    dest = base / "dest"
    dest.mkdir()
    partial = dest / partial_name(FILE)
    resumed_push(
        sender, f"{dest}/", lambda: file_size(partial),
        lambda: any(not n.startswith(".") for n in (p.name for p in dest.iterdir())),
        reference, 1,
    )  # fmt: skip
    data = (dest / FILE).read_bytes()
    assert hashlib.sha256(data).hexdigest() == reference["sha256"]
    assert sorted(p.name for p in dest.iterdir()) == [FILE]  # the partial became the file
    out = sender.run("snapshot", "push", "--to", f"{dest}/", "--force", SNAP).stdout
    assert "resumed" not in out  # nothing left to resume: a whole push


def test_push_over_ssh_killed_and_resumed(
    sender: NeonCli, base: Path, reference: dict[str, Any]
) -> None:
    dest = base / "over-ssh"
    dest.mkdir()
    partial = dest / partial_name(FILE)
    with ssh_server() as sshd:
        home = NeonCli(sender.home, {**sender.env_extra, **sshd.env()})
        resumed_push(
            home, sshd.url(f"{dest}/"), lambda: file_size(partial),
            lambda: any(not n.startswith(".") for n in (p.name for p in dest.iterdir())),
            reference, 4,
        )  # fmt: skip
    data = (dest / FILE).read_bytes()
    assert hashlib.sha256(data).hexdigest() == reference["sha256"]
    assert sorted(p.name for p in dest.iterdir()) == [FILE]


def test_push_to_s3_and_pull_killed_and_resumed(
    sender: NeonCli, receiver: NeonCli, s3d: MotoS3, reference: dict[str, Any]
) -> None:
    bucket = s3d.new_bucket()
    client = s3d.client()
    key = f"snaps/{FILE}"

    def uploaded() -> int:
        uploads = client.list_multipart_uploads(Bucket=bucket).get("Uploads", [])
        return max(
            (
                sum(p["Size"] for p in client.list_parts(
                    Bucket=bucket, Key=key, UploadId=u["UploadId"]).get("Parts", []))
                for u in uploads
            ),
            default=0,
        )  # fmt: skip

    def visible() -> bool:
        return bool(client.list_objects_v2(Bucket=bucket).get("Contents"))

    pushed = resumed_push(
        sender, f"s3://{bucket}/snaps/", uploaded, visible, reference, 2,
        lambda at: no_part_stored_beyond(-(-at // PART)),
    )  # fmt: skip
    body = client.get_object(Bucket=bucket, Key=key)["Body"].read()
    assert hashlib.sha256(body).hexdigest() == reference["sha256"]
    assert client.list_multipart_uploads(Bucket=bucket).get("Uploads", []) == []

    def spooled() -> int:
        return sum(file_size(p) for p in receiver.home.glob(f"storage/*/{SPOOL_DIR}/*.neon"))

    for at in kill_points(reference["size"], 3):
        kill_when(receiver, ["snapshot", "pull", "--from", pushed["url"], "copy"], spooled, at)
        names = [s["name"] for s in receiver.json("snapshot", "list")]
        assert "copy" not in names, f"a pull killed at {at} bytes left a snapshot"
    pulled = json.loads(
        receiver.run("snapshot", "pull", "--from", pushed["url"], "copy", "--json").stdout
    )
    print(f"resumed pull: {pulled['bytes_received']} of {reference['size']} bytes fetched, "
          f"resumed at {pulled['bytes_resumed']}")  # fmt: skip
    assert pulled["bytes_resumed"] > 0 and pulled["bytes_received"] < reference["size"]
    # The pulled file, resumed, is the pushed one: its SHA-256 and size, as push says them.
    assert (pulled["sha256"], pulled["file_bytes"]) == (pushed["sha256"], pushed["file_bytes"])
    assert pulled["snapshot_bytes"] == pushed["snapshot_bytes"]
    assert pulled["origin"]["source"] == SNAP  # an object, as `snapshot list --json` has it
    assert spooled() == 0  # a finished pull removes its spool
    # A damaged spool does not check out: dropped, and the pull runs again from the start.
    kill_when(receiver, ["snapshot", "pull", "--from", pushed["url"], "copy2"], spooled, 2 * PART)
    [kept] = receiver.home.glob(f"storage/*/{SPOOL_DIR}/*.neon")
    with kept.open("r+b") as f:
        f.seek(PART)
        byte = f.read(1)
        f.seek(PART)
        f.write(bytes([byte[0] ^ 0xFF]))
    again = receiver.json("snapshot", "pull", "--from", pushed["url"], "copy2")
    assert again["bytes_resumed"] == 0 and again["bytes_received"] >= reference["size"]
    assert spooled() == 0
    assert node_dump(receiver, "copy", "copy1") == snapshot_dump(sender, SNAP)


@pytest.mark.parametrize("wire", ["neon", "http"])
def test_push_to_recv_killed_and_resumed(
    sender: NeonCli, receiver: NeonCli, reference: dict[str, Any], wire: str
) -> None:
    """A push to `neon snapshot recv` (neon://, and --http) killed at seeded points: the
    receiver keeps what arrived, out of sight, and names no snapshot; the push run again
    sends only the rest (compared block by block with the kept bytes' digests), and the
    snapshot it makes has the sender's data; nothing is kept once it is in. Over http (the
    same receiver behind another wire) two kills, and the SHA-256 stands for the dump.
    The receiver's progress (as JSON lines) ends at the tar's size the pusher sent: the
    kept bytes count towards it."""
    storage = receiver.home / "storage" / "local"  # the default native storage
    kept = storage / PARTIALS_DIR / FILE

    def arrived() -> int:
        return max((file_size(p) for p in storage.glob(".import-*/fetched.neon")), default=0)

    showing = NeonCli(receiver.home, {**receiver.env_extra, PROGRESS_ENV: "json"})
    with receiving(showing, *(["--http"] if wire == "http" else [])) as recv:
        url = recv.line()
        with capped_relay(url) as relay:
            for at in kill_points(reference["size"], 5)[: 3 if wire == "neon" else 2]:
                # The cut push goes through a relay that passes on a bound of its bytes:
                # those it wrote before its SIGKILL still arrive from the kernel's buffers,
                # and a push whose last bytes were in them completed (the CI run at
                # 2edaed8). The bound: up to `at` from where it resumes (all that is kept:
                # a prefix of the same stream) and a MiB for the requests and frames, short
                # of the whole.
                resumes_at = file_size(kept)
                relay.cap = max(at - resumes_at, 0) + 2**20
                assert max(at, resumes_at) + 2**20 < reference["size"]
                cut = ["snapshot", "push", "--to", relay.url(url), SNAP]
                kill_when(sender, cut, arrived, at)
                # Kept, and the cut push's handler done (a later point may be kept already).
                done = functools.partial(cut_kept, kept, at, arrived)
                wait_for(done, f"the cut push's {at} bytes kept")
                assert "pgdata1-s1" not in [s["name"] for s in receiver.json("snapshot", "list")]
        # --full: no listing first, so only the PUT's answer tells the pusher the receiver
        # keeps the index itself (review M2: it GETs it no more with the used-up token).
        pushed = sender.json("snapshot", "push", "--full", "--to", url, SNAP)
        recv.line()  # the next URL: the snapshot is in
        recv.proc.send_signal(signal.SIGTERM)
        _, rest = recv.proc.communicate(timeout=60)
    assert "refused a connection" not in recv.err + rest, recv.err + rest
    reports = [ProgressReport.parse(line) for line in (recv.err + rest).splitlines()]
    # The resumed push's last report: its whole tar of its total, the kept bytes counted. Not
    # necessarily the last line: a cut push's handler may close its bar (bytes, no total)
    # after the next push began, on a loaded box (the CI run at dc54477).
    ends = [(r.what, r.done, r.total) for r in reports if r is not None]
    assert (f"Receiving {FILE}", pushed["snapshot_bytes"], pushed["snapshot_bytes"]) in ends, ends
    print(f"resumed push to recv: {pushed['bytes_sent']} of {reference['size']} bytes sent, "
          f"resumed at {pushed['bytes_resumed']}")  # fmt: skip
    assert pushed["sha256"] == reference["sha256"]
    assert pushed["bytes_resumed"] > 0 and pushed["bytes_sent"] < reference["size"]
    assert pushed["bytes_sent"] + pushed["bytes_resumed"] == reference["size"]
    assert not kept.exists()
    try:
        if wire == "neon":
            assert snapshot_dump(receiver, "pgdata1-s1") == snapshot_dump(sender, SNAP)
    finally:
        receiver.run("snapshot", "destroy", "pgdata1-s1")


def holds(path: Path, size: int) -> bool:
    return file_size(path) >= size


def cut_kept(kept: Path, size: int, arrived: Callable[[], int]) -> bool:
    """`kept` holds `size` bytes and no import is under way (`arrived` says none)."""
    return holds(kept, size) and not arrived()
