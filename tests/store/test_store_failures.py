"""Bad adapters and bad stores: each refused with a clear reason, nothing left in the cache."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file
from store_helpers import WEIGHTS, cache_files, settings_for

from openlora_ray.adapter_format import CONFIG_FILE
from openlora_ray.errors import InvalidAdapterError, InvalidAdapterIdError, StoreUnavailableError
from openlora_ray.store import MANIFEST_FILE, AdapterStore
from openlora_ray.store.manifest import build_manifest


def publish_raw(s3_client, bucket: str, folder, name: str, version: str) -> None:
    """Put a version into the bucket the way a buggy or malicious publisher would: no checks."""
    manifest = build_manifest(name, version, folder)
    for f in (CONFIG_FILE, WEIGHTS):
        s3_client.put_object(Bucket=bucket, Key=f"adapters/{name}/{version}/{f}", Body=(folder / f).read_bytes())
    s3_client.put_object(Bucket=bucket, Key=f"adapters/{name}/{version}/{MANIFEST_FILE}", Body=manifest.to_json())


def test_corrupted_object_is_a_sha_mismatch_and_leaves_nothing(make_store, adapters, s3, s3_client, tmp_path):
    store = make_store()
    store.push(adapters[0], "bad@v1")
    data = bytearray((adapters[0] / WEIGHTS).read_bytes())
    data[-1] ^= 0xFF  # same size, one flipped bit in the last weight
    s3_client.put_object(Bucket=s3.bucket, Key=f"adapters/bad/v1/{WEIGHTS}", Body=bytes(data))
    with pytest.raises(InvalidAdapterError, match="sha256 mismatch for adapter_model.safetensors"):
        store.resolve("bad@v1")
    assert cache_files(tmp_path / "cache") == []


def test_truncated_safetensors(make_store, adapter_copy, s3, s3_client, tmp_path):
    store = make_store()
    w = adapter_copy / WEIGHTS
    w.write_bytes(w.read_bytes()[: w.stat().st_size // 2])
    with pytest.raises(InvalidAdapterError, match="not a valid safetensors file"):
        store.push(adapter_copy, "trunc@v1")
    assert store.list() == []
    publish_raw(s3_client, s3.bucket, adapter_copy, "trunc", "v1")  # manifest agrees with the bad file
    with pytest.raises(InvalidAdapterError, match="'trunc@v1'.*not a valid safetensors file"):
        store.resolve("trunc@v1")
    assert cache_files(tmp_path / "cache") == []


def test_object_shorter_than_manifest(make_store, adapters, s3, s3_client, tmp_path):
    store = make_store()
    store.push(adapters[0], "short@v1")
    s3_client.put_object(Bucket=s3.bucket, Key=f"adapters/short/v1/{WEIGHTS}", Body=b"\x00" * 10)
    with pytest.raises(InvalidAdapterError, match="truncated or replaced"):
        store.resolve("short@v1")
    assert cache_files(tmp_path / "cache") == []


def test_missing_config(make_store, adapter_copy, s3, s3_client):
    store = make_store()
    (adapter_copy / CONFIG_FILE).unlink()
    with pytest.raises(InvalidAdapterError, match="missing adapter_config.json"):
        store.push(adapter_copy, "nocfg@v1")
    # A manifest without the config file is refused too, before any download.
    s3_client.put_object(
        Bucket=s3.bucket, Key=f"adapters/nocfg/v1/{MANIFEST_FILE}",
        Body=json.dumps({"name": "nocfg", "version": "v1", "created_at": "2025-01-01T00:00:00Z",
                         "files": {WEIGHTS: {"size": 1, "sha256": "0" * 64}}}),
    )
    with pytest.raises(InvalidAdapterError, match="missing adapter_config.json"):
        store.resolve("nocfg@v1")
    assert s3.count("GET", WEIGHTS) == 0


def test_pickle_only_adapter_is_refused(make_store, adapter_copy):
    (adapter_copy / WEIGHTS).rename(adapter_copy / "adapter_model.bin")
    with pytest.raises(InvalidAdapterError, match="pickled .bin"):
        make_store().push(adapter_copy, "pkl@v1")


def test_manifest_listing_other_files_is_refused(make_store, adapters, s3, s3_client):
    store = make_store()
    store.push(adapters[0], "evil@v1")
    key = f"adapters/evil/v1/{MANIFEST_FILE}"
    m = json.loads(s3_client.get_object(Bucket=s3.bucket, Key=key)["Body"].read())
    m["files"]["../../../etc/cron.d/x"] = {"size": 1, "sha256": "0" * 64}
    s3_client.put_object(Bucket=s3.bucket, Key=key, Body=json.dumps(m))
    with pytest.raises(InvalidAdapterError, match="unexpected files"):
        store.resolve("evil@v1")


def test_oversize_adapter_refused_before_upload_and_before_download(make_store, adapters, s3, tmp_path):
    size = sum((adapters[0] / f).stat().st_size for f in (CONFIG_FILE, WEIGHTS))
    with pytest.raises(InvalidAdapterError, match="over the limit"):
        make_store(max_adapter_bytes=size - 1).push(adapters[0], "big@v1")
    assert s3.count("PUT", WEIGHTS) == 0
    make_store(cache_dir=tmp_path / "pusher").push(adapters[0], "big@v1")
    s3.log.clear()
    with pytest.raises(InvalidAdapterError, match=f"'big@v1'.*{size} bytes, over the limit"):
        make_store(max_adapter_bytes=size - 1).resolve("big@v1")
    assert s3.count("GET", WEIGHTS) == 0
    assert cache_files(tmp_path / "cache") == []


def test_non_finite_weights_are_refused(make_store, adapter_copy, s3, s3_client, tmp_path):
    tensors = load_file(adapter_copy / WEIGHTS)
    key = next(k for k in tensors if "lora_B" in k)
    tensors[key] = tensors[key].copy()
    tensors[key][0, 0] = np.nan
    save_file(tensors, adapter_copy / WEIGHTS, metadata={"format": "pt"})
    with pytest.raises(InvalidAdapterError, match="1 NaN/Inf"):
        make_store().push(adapter_copy, "nan@v1")
    publish_raw(s3_client, s3.bucket, adapter_copy, "nan", "v1")
    with pytest.raises(InvalidAdapterError, match="nan@v1.*NaN/Inf"):
        make_store().resolve("nan@v1")
    assert cache_files(tmp_path / "cache") == []


@pytest.mark.parametrize("bad", ["../x", "", "a" * 10_000, "a/b", "x@../../etc", "x@v1/y", "CAPS"])
def test_bad_ids_never_reach_the_store(make_store, adapters, s3, bad, tmp_path):
    store = make_store()
    s3.log.clear()
    with pytest.raises(InvalidAdapterIdError):
        store.resolve(bad)
    with pytest.raises(InvalidAdapterIdError):
        store.push(adapters[0], bad)
    assert s3.log == [] and cache_files(tmp_path / "cache") == []


def test_server_down_is_quick_and_clear(s3, refused_endpoint, adapters, tmp_path):
    store = AdapterStore(
        settings_for(f"s3://{s3.bucket}/adapters", tmp_path / "cache", refused_endpoint, max_attempts=2)
    )
    t0 = time.monotonic()
    with pytest.raises(StoreUnavailableError, match=f"cannot reach .*{refused_endpoint}.*check the endpoint"):
        store.resolve("any@v1")
    with pytest.raises(StoreUnavailableError):
        store.push(adapters[0], "any@v1")
    assert time.monotonic() - t0 < 5
    assert cache_files(tmp_path / "cache") == []


def test_slow_server_times_out_clearly(s3, silent_endpoint, tmp_path):
    store = AdapterStore(
        settings_for(
            f"s3://{s3.bucket}/adapters", tmp_path / "cache", silent_endpoint, read_timeout_s=0.3, max_attempts=1
        )
    )
    t0 = time.monotonic()
    with pytest.raises(StoreUnavailableError, match=r"did not answer within 0.3s"):
        store.resolve("any@v1")
    assert time.monotonic() - t0 < 3
    assert cache_files(tmp_path / "cache") == []


def test_missing_bucket_and_bad_credentials(s3, adapters, tmp_path, monkeypatch):
    store = AdapterStore(settings_for("s3://no-such-bucket-here/a", tmp_path / "cache", s3.endpoint))
    with pytest.raises(StoreUnavailableError, match="bucket 'no-such-bucket-here' does not exist"):
        store.list()
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    store = AdapterStore(settings_for(f"s3://{s3.bucket}/a", tmp_path / "cache", s3.endpoint))
    with pytest.raises(StoreUnavailableError, match="no usable AWS credentials"):
        store.list()


def test_unknown_aws_profile(s3, tmp_path):
    with pytest.raises(StoreUnavailableError, match="no-such-profile"):
        AdapterStore(settings_for(f"s3://{s3.bucket}/a", tmp_path / "cache", s3.endpoint, profile="no-such-profile"))


def test_local_store_folder_missing(tmp_path):
    store = AdapterStore(settings_for(str(tmp_path / "absent"), tmp_path / "cache"))
    with pytest.raises(StoreUnavailableError, match="does not exist"):
        store.resolve("x@v1")


@pytest.mark.parametrize("mode", ["stall", "drop"])
def test_failure_mid_download_leaves_no_partial_files(half_body_endpoint, tmp_path, mode):
    endpoint, state = half_body_endpoint
    state["mode"] = mode
    store = AdapterStore(
        settings_for("s3://bucket/adapters", tmp_path / "cache", endpoint, read_timeout_s=0.5, max_attempts=1)
    )
    with pytest.raises(StoreUnavailableError, match=endpoint):
        store.resolve("half@v1")
    assert cache_files(tmp_path / "cache") == []
