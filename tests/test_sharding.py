"""Sharded caching: any shard count gives the store the unsharded run writes, array for array."""

from __future__ import annotations

import h5py
import pytest

torch = pytest.importorskip("torch")

from devkit.tiny_models import build_tiny_model  # noqa: E402
from layerscope.engine.store import cache_store, gather_store  # noqa: E402
from layerscope.engine.tokens import make_batches, shard_batches  # noqa: E402
from layerscope.errors import LayerscopeError  # noqa: E402

WORDS = (
    "the quick brown fox jumps over a lazy dog while 12 or 71 is larger than 9 and Paris".split()
)
# 23 prompts of varied length: not divisible by 2 or 3, and several batches per shard.
TEXTS = [
    " ".join(WORDS[(3 * i) % len(WORDS) :][: 1 + (7 * i) % 13] or WORDS[:2]) for i in range(23)
]
PIDS = [f"p{i:02d}" for i in range(len(TEXTS))]
LABELS = ["yes" if i % 3 else "no" for i in range(len(TEXTS))]
GROUPS = [f"g{i % 4}" for i in range(len(TEXTS))]


@pytest.fixture(scope="module")
def bridge(tmp_path_factory):
    from layerscope.engine.loading import load_model

    root = build_tiny_model(
        tmp_path_factory.mktemp("model") / "gpt2",
        "gpt2",
        n_layers=3,
        d_model=32,
        n_heads=4,
        n_positions=128,
    )
    return load_model(str(root), device="cpu")


def _cache(bridge, path, shard=None):
    model, info = bridge
    return cache_store(
        model,
        PIDS,
        TEXTS,
        LABELS,
        path,
        components=["resid_post", "attn_out"],
        poolings=["mean", "last", "max"],
        token_level_layers=[0, 2],
        batch_size=4,
        model_info=info,
        groups=GROUPS,
        log=None,
        shard=shard,
    )


def _contents(path):
    """Every dataset's array (with its dtype) and every attribute of an HDF5 file."""
    arrays = {}
    with h5py.File(path) as f:
        f.visititems(
            lambda name, obj: (
                arrays.__setitem__(name, obj[()]) if isinstance(obj, h5py.Dataset) else None
            )
        )
        attrs = dict(f.attrs)
    return arrays, attrs


@pytest.fixture(scope="module")
def unsharded(bridge, tmp_path_factory):
    path = tmp_path_factory.mktemp("plain") / "store.h5"
    _cache(bridge, path)
    return _contents(path)


@pytest.mark.parametrize("n_shards", [1, 2, 3])
def test_gathered_shards_equal_unsharded_store(bridge, unsharded, tmp_path, n_shards):
    shards = [tmp_path / f"{i}-of-{n_shards}.h5" for i in range(n_shards)]
    sizes = []
    for i, path in enumerate(shards):
        _cache(bridge, path, shard=(i, n_shards))
        with h5py.File(path) as f:
            assert f.attrs["kind"] == "shard"
            sizes.append(int(f.attrs["n_prompts"]))
    assert sum(sizes) == len(PIDS)
    if n_shards > 1:
        assert min(sizes) > 0  # balanced: no empty shard on this table
    store = tmp_path / "store.h5"
    gather_store([str(p) for p in shards], store, log=None)
    arrays, attrs = _contents(store)
    ref_arrays, ref_attrs = unsharded
    assert sorted(arrays) == sorted(ref_arrays)
    for name, ref in ref_arrays.items():
        got = arrays[name]
        assert got.dtype == ref.dtype, name
        assert got.shape == ref.shape, name
        if got.dtype.kind in "fi":
            assert got.tobytes() == ref.tobytes(), name  # byte-for-byte, not merely close
        else:
            assert got.tolist() == ref.tolist(), name
    assert {k: str(v) for k, v in attrs.items()} == {k: str(v) for k, v in ref_attrs.items()}


def test_shard_batches_cover_every_batch_once():
    lengths = [5, 1, 9, 3, 3, 7, 2, 8, 8, 4, 6]
    batches = make_batches(lengths, 3)
    for count in (1, 2, 3, 5, 20):
        parts = [shard_batches(batches, lengths, i, count) for i in range(count)]
        assert [b for part in parts for b in part] == batches  # whole batches, in plan order
    with pytest.raises(LayerscopeError, match="shard 3 of 3 does not exist"):
        shard_batches(batches, lengths, 3, 3)


def test_gather_refuses_missing_mixed_or_incomplete_shards(bridge, tmp_path):
    paths = [tmp_path / f"{i}-of-3.h5" for i in range(3)]
    for i, p in enumerate(paths):
        _cache(bridge, p, shard=(i, 3))
    with pytest.raises(LayerscopeError, match=r"expected shards 0\.\.2, got \[0, 1\]"):
        gather_store(paths[:2], tmp_path / "a.h5", log=None)
    other = tmp_path / "0-of-2.h5"
    _cache(bridge, other, shard=(0, 2))
    with pytest.raises(LayerscopeError, match=r"n_shards = 3 but .*0-of-2.h5 has 2"):
        gather_store([other, paths[1], paths[2]], tmp_path / "b.h5", log=None)
    with h5py.File(paths[2], "a") as f:
        f.attrs["complete"] = False
    with pytest.raises(LayerscopeError, match="incomplete activation file"):
        gather_store(paths, tmp_path / "c.h5", log=None)
    assert not any(p.exists() for p in (tmp_path / "a.h5", tmp_path / "b.h5", tmp_path / "c.h5"))


def test_more_shards_than_batches_leaves_empty_shards(bridge, unsharded, tmp_path):
    n = 12  # 23 prompts / batch_size 4 = 6 batches
    paths = [tmp_path / f"{i}-of-{n}.h5" for i in range(n)]
    for i, p in enumerate(paths):
        _cache(bridge, p, shard=(i, n))
    gather_store(paths, tmp_path / "store.h5", log=None)
    arrays, _ = _contents(tmp_path / "store.h5")
    assert arrays["resid_post/mean"].tobytes() == unsharded[0]["resid_post/mean"].tobytes()
