"""What a push refuses (inconsistent files, a base model's shapes, max_rank, reused versions), and
the node cache never serving other content under a version string."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from store_helpers import TINY_LLAMA_DIMS, WEIGHTS, settings_for

from openlora_ray.adapter_format import CONFIG_FILE
from openlora_ray.cli import main
from openlora_ray.errors import AdapterNotFoundError, InvalidAdapterError
from openlora_ray.store import MANIFEST_FILE, AdapterStore, AdapterVersionExistsError
from openlora_ray.store.manifest import build_manifest
from openlora_ray.store.profile import PROFILE_FILE, StoreProfile, StoreProfileError
from openlora_ray.store.s3 import S3ObjectStore
from openlora_ray.store.uri import S3Root

KEY = "base_model.model.model.layers.{layer}.{block}.{proj}.lora_{ab}.weight"


def key(layer: int, proj: str, ab: str) -> str:
    block = "self_attn" if proj.endswith(("q_proj", "k_proj", "v_proj", "o_proj")) else "mlp"
    return KEY.format(layer=layer, block=block, proj=proj, ab=ab)


def base_model_dir(path: Path, hidden: int = 64, intermediate: int = 128, layers: int = 2) -> Path:
    """A model folder as far as a store profile reads it: its config.json."""
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps({
        "hidden_size": hidden, "intermediate_size": intermediate, "num_hidden_layers": layers,
        "num_attention_heads": 4, "num_key_value_heads": 2, "_name_or_path": f"tiny-{hidden}",
    }))
    return path


def edit_tensors(folder: Path, fn) -> Path:
    tensors = load_file(folder / WEIGHTS)
    fn(tensors)
    save_file(tensors, folder / WEIGHTS, metadata={"format": "pt"})
    return folder


def edit_config(folder: Path, **changes) -> Path:
    cfg = json.loads((folder / CONFIG_FILE).read_text())
    cfg.update(changes)
    (folder / CONFIG_FILE).write_text(json.dumps(cfg))
    return folder


@pytest.fixture
def folder_store(tmp_path) -> AdapterStore:
    (tmp_path / "store").mkdir()
    return AdapterStore(settings_for(str(tmp_path / "store"), tmp_path / "cache"))


def _rank(r: int):
    def fn(t: dict) -> None:
        for k in list(t):
            t[k] = torch.zeros(r, t[k].shape[1]) if ".lora_A." in k else torch.zeros(t[k].shape[0], r)
    return fn


@pytest.mark.parametrize(
    "mutate,reason",
    [
        (lambda p: edit_tensors(p, lambda t: t.__setitem__(key(1, "q_proj", "A"), torch.zeros(4, 80))),
         "q_proj input width (lora_A) differs across layers: 64 in"),
        (lambda p: edit_tensors(p, lambda t: t.__setitem__(key(0, "down_proj", "B"), torch.zeros(72, 4))),
         "down_proj output width (lora_B) differs across layers"),
        (lambda p: edit_tensors(p, lambda t: [t.__setitem__(key(i, "k_proj", "A"), torch.zeros(4, 96)) for i in (0, 1)]),
         "tensors disagree on the model's hidden size: 64 in"),
        (lambda p: edit_tensors(p, lambda t: t.__setitem__(key(0, "q_proj", "B"), torch.zeros(64, 8))),
         "expected [64, 4] (r=4)"),
        (lambda p: edit_config(edit_tensors(p, _rank(40)), r=40), "rank 40 is above the width of the matrices it adapts (32)"),
        (lambda p: edit_config(p, target_modules=["q_proj", "v_proj"]), "which adapter_config.json's target_modules does not list"),
    ],
    ids=["A-width-across-layers", "B-width-across-layers", "hidden-size", "A-B-ranks", "rank-above-width", "undeclared-target"],
)
def test_push_refuses_an_inconsistent_adapter_without_a_recorded_base(folder_store, adapter_copy, mutate, reason):
    mutate(adapter_copy)
    with pytest.raises(InvalidAdapterError, match="bad@v1") as err:
        folder_store.push(adapter_copy, "bad@v1")
    assert reason in str(err.value)
    assert folder_store.list() == []


def test_a_recorded_profile_refuses_wrong_shapes_layers_and_ranks(folder_store, adapters, adapter_copy, tmp_path):
    folder_store.push(adapters[0], "before@v1")  # no profile: only self-consistency is checked
    folder_store.init(StoreProfile.from_model_dir(base_model_dir(tmp_path / "m576", hidden=576, intermediate=1536, layers=30), max_rank=64))
    assert folder_store.profile().dims.hidden_size == 576
    with pytest.raises(InvalidAdapterError, match=r"has shape \[4, (64|128)\], expected \[4, (576|1536)\]"):
        folder_store.push(adapters[1], "tiny@v1")  # made for a 64-wide model
    with pytest.raises(InvalidAdapterError, match="rank 16 exceeds the server's max_rank 8"):
        AdapterStore(folder_store.settings, max_rank=8).push(edit_config(edit_tensors(adapter_copy, _rank(16)), r=16), "r16@v1")
    with pytest.raises(InvalidAdapterError, match=r"expected \[4096, \d+\] \(r=4096\)"):
        folder_store.push(edit_config(adapter_copy, r=4096), "huge@v1")
    with pytest.raises(StoreProfileError, match="already serves tiny-576"):
        folder_store.init(StoreProfile.from_model_dir(base_model_dir(tmp_path / "m64"), max_rank=8))
    folder_store.init(StoreProfile.from_model_dir(tmp_path / "m64", max_rank=8), replace=True)
    folder_store.push(adapters[1], "tiny@v1")
    assert [str(v.id) for v in folder_store.list()] == ["before@v1", "tiny@v1"]  # the profile is no adapter


def test_layers_the_base_lacks_and_a_stricter_max_rank_of_the_pusher(folder_store, adapters, tmp_path):
    folder_store.init(StoreProfile.from_model_dir(base_model_dir(tmp_path / "m1", layers=1), max_rank=8))
    with pytest.raises(InvalidAdapterError, match="targets layer 1, base model has 1"):
        folder_store.push(adapters[0], "deep@v1")
    strict = AdapterStore(folder_store.settings, max_rank=2)
    with pytest.raises(InvalidAdapterError, match="rank 4 exceeds the server's max_rank 2"):
        strict.push(adapters[0], "deep@v1")
    other = AdapterStore(folder_store.settings, dims=TINY_LLAMA_DIMS)  # 2 layers: not the recorded base
    with pytest.raises(StoreProfileError, match="not the one this store serves"):
        other.push(adapters[0], "deep@v1")


def test_cli_init_and_push_print_the_reason(run, s3, adapters, adapter_copy, tmp_path):
    uri = f"s3://{s3.bucket}/team"
    model = base_model_dir(tmp_path / "model")
    rc, out, _ = run("init", uri, "--base-model", str(model), "--max-rank", "4")
    assert rc == 0 and "hidden 64" in out and "max_rank 4" in out
    assert run("push", str(adapters[0]), f"{uri}/ok@v1")[0] == 0
    rc, _, err = run("push", str(edit_config(edit_tensors(adapter_copy, _rank(8)), r=8)), f"{uri}/wide@v1")
    assert rc == 1 and "rank 8 exceeds the server's max_rank 4" in err
    rc, _, err = run("push", str(adapters[1]), f"{uri}/x@v1", "--base-model", str(base_model_dir(tmp_path / "m2", hidden=128)))
    assert rc == 1 and "not the one this store serves" in err
    rc, _, err = run("push", str(adapters[1]), f"{uri}/x@v1", "--max-rank", "2")
    assert rc == 1 and "max_rank 2" in err
    rc, out, _ = run("ls", uri)
    assert [line.split()[0] for line in out.splitlines()[1:]] == ["ok"]


@pytest.fixture
def run(s3, tmp_path, capsys):
    def run(*argv: str) -> tuple[int, str, str]:
        opts = ["--endpoint-url", s3.endpoint, "--region", "us-east-1", "--path-style",
                "--cache-dir", str(tmp_path / "cache"), "--retries", "1", "--connect-timeout", "1"]
        rc = main(["adapters", *argv, *opts])
        out, err = capsys.readouterr()
        return rc, out, err

    return run


def test_a_deleted_version_is_never_pushed_again(make_store, adapters):
    store = make_store()
    store.push(adapters[0], "bot@v1")
    store.delete("bot@v1")
    with pytest.raises(AdapterVersionExistsError, match="bot@v1 was deleted.*push this adapter as a new version"):
        store.push(adapters[1], "bot@v1")
    with pytest.raises(AdapterNotFoundError):
        store.resolve("bot@v1")
    store.push(adapters[1], "bot@v2")
    assert str(store.pin("bot")) == "bot@v2"


def test_node_cache_notices_a_version_whose_objects_were_replaced(make_store, adapters, s3, s3_client, tmp_path):
    """Someone deletes the tombstone and the objects by hand and uploads other weights under bot@v1:
    a node that cached the old content fetches the new one instead of serving the old."""
    store = make_store()
    store.push(adapters[0], "bot@v1")
    old = store.fetch("bot@v1")
    assert (old.path / WEIGHTS).read_bytes() == (adapters[0] / WEIGHTS).read_bytes()
    s3_client.delete_objects(Bucket=s3.bucket, Delete={"Objects": [
        {"Key": o["Key"]} for o in s3_client.list_objects_v2(Bucket=s3.bucket, Prefix="adapters/bot/")["Contents"]]})
    manifest = build_manifest("bot", "v1", adapters[1])
    for f in (CONFIG_FILE, WEIGHTS):
        s3_client.put_object(Bucket=s3.bucket, Key=f"adapters/bot/v1/{f}", Body=(adapters[1] / f).read_bytes())
    s3_client.put_object(Bucket=s3.bucket, Key=f"adapters/bot/v1/{MANIFEST_FILE}", Body=manifest.to_json())
    new = store.fetch("bot@v1")
    assert new.downloaded and new.manifest.content_digest == manifest.content_digest != old.manifest.content_digest
    assert (new.path / WEIGHTS).read_bytes() == (adapters[1] / WEIGHTS).read_bytes()


def test_another_nodes_delete_is_noticed_and_an_outage_serves_the_cached_copy(make_store, adapters, s3, tmp_path, refused_endpoint):
    store = make_store()
    store.push(adapters[0], "a@v1")
    store.push(adapters[0], "b@v1")
    node = make_store(cache_dir=tmp_path / "node-cache")
    node.fetch("a@v1"), node.fetch("b@v1")
    store.delete("a@v1")  # on another node: this node's cache is not told
    with pytest.raises(AdapterNotFoundError):
        node.fetch("a@v1")
    assert "a@v1" not in node.cached_ids()
    # The same store and node cache while the store's endpoint refuses connections (nothing listens).
    dead = S3ObjectStore(S3Root(s3.bucket, "adapters"), node.settings.model_copy(update={"endpoint_url": refused_endpoint}))
    down = AdapterStore(node.settings, backend=dead)
    assert not down.fetch("b@v1").downloaded  # the checked copy is served while the store cannot answer


def test_profile_file_is_not_an_adapter_and_bad_profiles_are_clear(folder_store, tmp_path):
    (tmp_path / "store" / PROFILE_FILE).write_text("{}")
    with pytest.raises(StoreProfileError, match="damaged: dims"):
        folder_store.profile()
    assert folder_store.list() == []
    with pytest.raises(StoreProfileError, match="not a Hugging Face model folder"):
        StoreProfile.from_model_dir(tmp_path / "nothing", 8)
    shutil.rmtree(tmp_path / "store")


def test_cli_ls_pages_with_limit_and_after(folder_store, adapters, tmp_path, capsys):
    for name in ("b", "a", "c"):
        folder_store.push(adapters[0], f"{name}@v1")
    uri = str(tmp_path / "store")
    assert main(["adapters", "ls", uri, "--limit", "2", "--cache-dir", str(tmp_path / "c")]) == 0
    out, err = capsys.readouterr()
    assert [line.split()[0] for line in out.splitlines()[1:]] == ["a", "b"] and "--after b" in err
    assert main(["adapters", "ls", uri, "--limit", "2", "--after", "b", "--json", "--cache-dir", str(tmp_path / "c")]) == 0
    out, err = capsys.readouterr()
    assert [json.loads(line)["name"] for line in out.splitlines()] == ["c"] and err == ""
    assert main(["adapters", "ls", uri, "--limit", "0", "--cache-dir", str(tmp_path / "c")]) == 1
