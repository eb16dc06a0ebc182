"""HDF5 layout and readers: completeness, store/layer checks, extraction, compression, dtypes."""

from __future__ import annotations

import json
import shutil

import h5py
import numpy as np
import pytest

from layerscope.data import h5cache
from layerscope.data.h5cache import (
    LayerData,
    read_layer,
    read_layers,
    read_store_layer,
    read_tokens,
)
from layerscope.errors import LayerscopeError

N_LAYERS, N, D = 4, 5, 6
PIDS = [f"id-{i}" for i in range(N)]
LABELS = ["yes", "no", "yes", "no", "ünïcode"]
COMPONENTS = ["resid_post", "mlp_out"]
POOLINGS = ["mean", "last"]
LENGTHS = [3, 1, 4, 2, 5]  # pooled tokens per prompt


def _attrs(**over):
    attrs = {
        "kind": "store",
        "format_version": h5cache.FORMAT_VERSION,
        "model": "tiny/model",
        "model_revision": "local",
        "architecture": "GPT2LMHeadModel",
        "transformer_lens_version": "4.3.0",
        "layerscope_version": "0.1.0",
        "n_layers": N_LAYERS,
        "d_model": D,
        "n_prompts": N,
        "hook_names": ["blocks.{L}.hook_resid_post", "blocks.{L}.hook_mlp_out"],
        "dtype": "float32",
        "out_dtype": "float32",
        "bos": "auto",
        "prepend_bos": True,
        "exclude_bos_from_pooling": True,
        "compatibility_mode": False,
        "components": COMPONENTS,
        "poolings": POOLINGS,
        "token_level_layers": [2],
    }
    attrs.update(over)
    return attrs


def _values(comp, pooling):
    """Deterministic, distinguishable numbers: [n_layers, n_prompts, d]."""
    base = 1000 * COMPONENTS.index(comp) + 100 * POOLINGS.index(pooling)
    L, i, d = np.meshgrid(np.arange(N_LAYERS), np.arange(N), np.arange(D), indexing="ij")
    return (base + 10 * L + i + d / 10).astype(np.float32)


def _tokens(comp):
    total = sum(LENGTHS)
    return np.arange(total * D, dtype=np.float32).reshape(total, D) + 7 * COMPONENTS.index(comp)


def write_store(path, *, complete=True, compression=None, **over):
    attrs = _attrs(**over)
    with h5cache.open_for_write(path) as f:
        h5cache.set_attrs(f, attrs)
        h5cache.write_strings(f, "prompt_id", PIDS)
        h5cache.write_strings(f, "label", LABELS)
        offsets = np.concatenate([[0], np.cumsum(LENGTHS)]).astype(np.int64)
        f.create_dataset("token_ids", data=np.arange(sum(LENGTHS), dtype=np.int64) + 50)
        for c in COMPONENTS:
            for p in POOLINGS:
                ds = h5cache.create_float(f, f"{c}/{p}", (N_LAYERS, N, D), "float32", compression)
                ds[...] = _values(c, p)
            ds = h5cache.create_float(
                f, f"{c}/none/values", (1, sum(LENGTHS), D), "float32", compression
            )
            ds[0] = _tokens(c)
            f.create_dataset(f"{c}/none/offsets", data=offsets)
        if complete:
            h5cache.mark_complete(f)
    return path


@pytest.fixture
def store(tmp_path):
    return write_store(tmp_path / "store.h5")


def _extract(store, layer, dest):
    from layerscope.engine.store import extract_layer

    return extract_layer(store, layer, dest)


def test_extract_and_read_roundtrip(store, tmp_path):
    for L in range(N_LAYERS):
        p = _extract(store, L, tmp_path / f"layer_{L}.h5")
        for c in COMPONENTS:
            for pooling in POOLINGS:
                d = read_layer(p, c, pooling)
                assert isinstance(d, LayerData)
                np.testing.assert_array_equal(d.X, _values(c, pooling)[L])
                assert d.prompt_ids == PIDS and d.labels == LABELS and d.layer == L
        a = read_layer(p).attrs
        assert a["kind"] == "layer" and a["complete"] is True and a["n_layers"] == N_LAYERS
        assert a["hook_names"] == [f"blocks.{L}.hook_resid_post", f"blocks.{L}.hook_mlp_out"]
        assert a["token_level_layers"] == ([2] if L == 2 else [])
        assert a["components"] == COMPONENTS and a["prepend_bos"] is True
    tk = read_tokens(tmp_path / "layer_2.h5", "mlp_out")
    np.testing.assert_array_equal(tk.values, _tokens("mlp_out"))
    np.testing.assert_array_equal(tk.offsets, np.concatenate([[0], np.cumsum(LENGTHS)]))
    np.testing.assert_array_equal(tk.prompt(2), _tokens("mlp_out")[4:8])
    np.testing.assert_array_equal(tk.prompt_token_ids(1), [53])
    # the layer file layout asked for by downstream code
    with h5py.File(tmp_path / "layer_2.h5") as f:
        assert [x.decode() for x in f["prompt_id"][:]] == PIDS
        assert f["resid_post/mean"].shape == (N, D) and f["resid_post/none/offsets"].shape == (
            N + 1,
        )
        assert f.attrs["layer"] == 2


def test_read_store_layer_equals_extracted(store, tmp_path):
    p = _extract(store, 3, tmp_path / "layer_3.h5")
    np.testing.assert_array_equal(
        read_store_layer(store, 3, "mlp_out", "last").X, read_layer(p, "mlp_out", "last").X
    )


def test_read_layers_dict_and_stack(store, tmp_path):
    paths = [_extract(store, L, tmp_path / f"layer_{L}.h5") for L in (3, 0, 2)]
    got = read_layers(paths, "resid_post", "last")
    assert list(got) == [0, 2, 3]
    stack = read_layers(paths, "resid_post", "last", stack=True)
    assert stack.layers == [0, 2, 3] and stack.X.shape == (3, N, D)
    np.testing.assert_array_equal(stack.X, _values("resid_post", "last")[[0, 2, 3]])
    with pytest.raises(LayerscopeError, match="given twice"):
        read_layers([paths[0], paths[0]])


def test_incomplete_file_is_rejected(store, tmp_path):
    p = _extract(store, 1, tmp_path / "layer_1.h5")
    with h5py.File(p, "a") as f:
        del f.attrs["complete"]
    with pytest.raises(LayerscopeError, match=r"layer_1\.h5.*incomplete"):
        read_layer(p)
    # an incomplete store cannot be extracted from, and nothing is left behind
    bad = write_store(tmp_path / "bad_store.h5", complete=False)
    with pytest.raises(LayerscopeError, match=r"bad_store\.h5.*incomplete"):
        _extract(bad, 0, tmp_path / "out" / "layer_0.h5")
    assert not (tmp_path / "out" / "layer_0.h5").exists()
    assert list((tmp_path / "out").iterdir()) == []


def test_store_layer_mismatches_are_rejected(store, tmp_path):
    with pytest.raises(LayerscopeError, match="expected a layer file but this is a store"):
        read_layer(store)
    p = _extract(store, 1, tmp_path / "layer_1.h5")
    with pytest.raises(LayerscopeError, match="expected a store file"):
        _extract(p, 1, tmp_path / "x" / "layer_1.h5")
    renamed = tmp_path / "layer_2.h5"
    shutil.copy(p, renamed)
    with pytest.raises(LayerscopeError, match="file name says layer 2 but the file holds layer 1"):
        read_layer(renamed)
    with pytest.raises(LayerscopeError, match="layer 4 does not exist"):
        _extract(store, N_LAYERS, tmp_path / "layer_4.h5")
    with pytest.raises(LayerscopeError, match="file name says layer 3"):
        _extract(store, 1, tmp_path / "layer_3.h5")
    with pytest.raises(LayerscopeError, match="no 'attn_out/mean'"):
        read_layer(p, "attn_out", "mean")
    with pytest.raises(LayerscopeError, match="not in token_level_layers"):
        read_tokens(p)
    with pytest.raises(LayerscopeError, match="does not exist"):
        read_layer(tmp_path / "nope" / "layer_0.h5")


def test_shape_and_attribute_checks(tmp_path):
    # wrong d_model in the attributes vs the data
    bad = write_store(tmp_path / "store.h5", d_model=D + 1)
    with pytest.raises(LayerscopeError, match="has shape"):
        read_store_layer(bad, 0)
    # a required attribute missing
    p = write_store(tmp_path / "store2.h5")
    with h5py.File(p, "a") as f:
        del f.attrs["n_layers"]
    with pytest.raises(LayerscopeError, match="missing attribute.*n_layers"):
        read_store_layer(p, 0)
    # files from different runs are not mixed
    a = _extract(write_store(tmp_path / "a.h5"), 0, tmp_path / "a" / "layer_0.h5")
    b = _extract(
        write_store(tmp_path / "b.h5", compatibility_mode=True), 1, tmp_path / "b" / "layer_1.h5"
    )
    with pytest.raises(LayerscopeError, match="compatibility_mode"):
        read_layers([a, b])


def test_compression_and_json_attrs(tmp_path):
    store = write_store(tmp_path / "store.h5", compression="gzip")
    p = _extract(store, 2, tmp_path / "layer_2.h5")
    with h5py.File(p) as f:
        assert f["resid_post/mean"].compression == "gzip"
        assert f["resid_post/none/values"].compression == "gzip"
        assert json.loads(f.attrs["components"]) == COMPONENTS
    np.testing.assert_array_equal(read_layer(p, "mlp_out", "mean").X, _values("mlp_out", "mean")[2])
    with pytest.raises(LayerscopeError, match="unknown compression"):
        h5cache.compression_kwargs("zstd")
    assert h5cache.compression_kwargs("gzip:9")["compression_opts"] == 9
    assert h5cache.compression_kwargs("lzf") == {"compression": "lzf"}


def test_chunks_are_rows_of_one_layer(tmp_path):
    with h5cache.open_for_write(tmp_path / "x.h5") as f:
        ds = h5cache.create_float(f, "a/b", (28, 10000, 1536), "float32")
        assert ds.chunks[0] == 1 and ds.chunks[2] == 1536
        assert ds.chunks[1] * 1536 * 4 <= h5cache.CHUNK_BYTES
        small = h5cache.create_float(f, "c/d", (3, 2, 8), "float16")
        assert small.chunks == (1, 2, 8)
