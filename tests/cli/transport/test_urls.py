"""URLs to locations (cli/transport/__init__.py and the file scheme): a path or file:// URL,
a directory or a file in one; unknown schemes and malformed URLs are one line each, with any
password masked."""

from __future__ import annotations

from pathlib import Path

import pytest

from cli.transport import is_transport_url, parse_location, url_scheme
from cli.transport.file import FileStore
from cli.transport.http import HttpStore
from cli.transport.ssh import SshStore
from proto.errors import InvalidArgument


def test_scheme_picks_the_transport(tmp_path: Path) -> None:
    assert isinstance(parse_location(str(tmp_path / "x.neon")).store, FileStore)
    assert isinstance(parse_location(f"file://{tmp_path}/x.neon").store, FileStore)
    assert isinstance(parse_location("SSH://host/x.neon").store, SshStore)
    assert isinstance(parse_location("https://host/x.neon").store, HttpStore)
    assert url_scheme("basebackup://u@h/") == "basebackup" and url_scheme("a:b/c") is None
    assert is_transport_url("http://h/x.neon") and not is_transport_url("basebackup://u@h/")
    assert not is_transport_url(str(tmp_path))


@pytest.mark.parametrize(
    "url", ["ftp://me:s3cret@host/x.neon", "s4://bucket/x.neon", "gopher://h/x"]
)
def test_unknown_scheme_is_one_line(url: str) -> None:
    with pytest.raises(InvalidArgument) as raised:
        parse_location(url)
    text = str(raised.value)
    assert text.startswith("unknown URL scheme") and "file://, ssh://, http://" in text
    assert "s3cret" not in text and "\n" not in text


def test_paths_and_file_urls(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "dir").mkdir()
    for url in (str(tmp_path / "dir"), f"{tmp_path}/new/", f"file://{tmp_path}/dir"):
        assert parse_location(url).name is None, url
    loc = parse_location(f"file://localhost{tmp_path}/a%20b.neon")
    assert isinstance(loc.store, FileStore)
    assert (loc.store.directory, loc.name) == (tmp_path, "a b.neon")
    assert loc.url == str(tmp_path / "a b.neon")
    monkeypatch.chdir(tmp_path)
    relative = parse_location("dir/x.neon")
    assert isinstance(relative.store, FileStore) and relative.store.directory == tmp_path / "dir"
    assert parse_location("dir").named("p@s.neon").url == str(tmp_path / "dir" / "p@s.neon")


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("file://otherhost/x.neon", "a local path"),
        ("file:relative/x.neon", "a local path"),
        ("file:///x.neon?a=b", "query"),
        ("", "empty path"),
    ],
)
def test_malformed_file_urls(url: str, message: str) -> None:
    with pytest.raises(InvalidArgument, match=message):
        parse_location(url)


def test_directory_url_has_no_object(tmp_path: Path) -> None:
    with pytest.raises(InvalidArgument, match=r"names a directory; give the URL of a \.neon file"):
        parse_location(str(tmp_path)).object_name  # noqa: B018
