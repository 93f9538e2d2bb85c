"""Adapter ids and store URIs: strict parsing, never a path."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from openlora_ray.errors import InvalidAdapterIdError
from openlora_ray.store.ids import AdapterId, new_version, parse_adapter_id, version_sort_key
from openlora_ray.store.uri import InvalidStoreUriError, LocalRoot, S3Root, parse_store_uri, split_reference


@pytest.mark.parametrize(
    "raw, expected",
    [("sql", AdapterId("sql")), ("sql-helper_2.1@v3", AdapterId("sql-helper_2.1", "v3")),
     ("a@20250131-235959-123456", AdapterId("a", "20250131-235959-123456"))],
)
def test_valid_ids(raw, expected):
    assert parse_adapter_id(raw) == expected
    assert str(expected) == raw


@pytest.mark.parametrize(
    "raw, reason",
    [
        ("", "empty name"),
        ("../x", "may only contain"),
        ("..", "may only contain"),
        ("a/b", "may only contain"),
        ("a\\b", "may only contain"),
        ("/etc/passwd", "may only contain"),
        ("x@../y", "may only contain"),
        ("x@", "empty version"),
        ("@v1", "empty name"),
        ("x@v1@v2", "more than one"),
        ("Upper", "may only contain"),
        ("sp ace", "may only contain"),
        ("nul\x00", "may only contain"),
        (".hidden", "may only contain"),
        ("a" * 65, "at most 64"),
        ("a@" + "v" * 65, "at most 64"),
        ("a" * 100_000, "at most 64"),
    ],
)
def test_bad_ids_are_refused_with_a_reason(raw, reason):
    with pytest.raises(InvalidAdapterIdError, match=reason) as e:
        parse_adapter_id(raw)
    assert len(str(e.value)) < 300  # an absurd id is not echoed in full


@given(st.text(max_size=80))
def test_any_accepted_id_is_a_single_safe_path_component(raw):
    try:
        aid = parse_adapter_id(raw)
    except InvalidAdapterIdError:
        return
    for part in (aid.name, aid.version or "x"):
        assert "/" not in part and "\\" not in part and part not in (".", "..")
        assert Path(part).name == part and not part.startswith(".")
        assert part == part.lower()


def test_new_versions_sort_in_time_order():
    a, b = new_version(), new_version()
    assert a <= b
    assert parse_adapter_id(f"x@{a}").version == a
    assert sorted(["v10", "v2", "v1"], key=version_sort_key) == ["v1", "v2", "v10"]


def test_store_uris(tmp_path):
    assert parse_store_uri("s3://bucket") == S3Root("bucket", "")
    assert parse_store_uri("s3://my.bucket/a/b/") == S3Root("my.bucket", "a/b")
    assert parse_store_uri(f"file://{tmp_path}") == LocalRoot(tmp_path.resolve())
    assert parse_store_uri(str(tmp_path)) == LocalRoot(tmp_path.resolve())
    for bad in ("", "s3://", "s3://B", "s3://a", "s3://bucket/../x", "gs://bucket", "file://host/x"):
        with pytest.raises(InvalidStoreUriError):
            parse_store_uri(bad)


def test_references(tmp_path):
    assert split_reference("s3://b-1/p/q/name@v2") == (S3Root("b-1", "p/q"), AdapterId("name", "v2"))
    assert split_reference("s3://b-1/name") == (S3Root("b-1", ""), AdapterId("name"))
    assert split_reference(f"{tmp_path}/name@v1") == (LocalRoot(tmp_path.resolve()), AdapterId("name", "v1"))
    for bad in ("name", "s3://bucket", "/name"):
        with pytest.raises(InvalidAdapterIdError):
            split_reference(bad)
    with pytest.raises(InvalidAdapterIdError):
        split_reference("s3://bucket/..")
