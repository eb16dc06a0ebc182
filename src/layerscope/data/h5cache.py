"""HDF5 activation files: the per-(model, dataset) *store* and the per-layer files cut from it.

Both kinds share one layout; only the pooled arrays differ in rank.

Per-layer file ``layer_{L}.h5`` (``kind = "layer"``)::

    prompt_id                  utf-8 strings [n_prompts]         (prompt-table order)
    label                      utf-8 strings [n_prompts]
    group                      utf-8 strings [n_prompts]         (only if the table had groups)
    n_tokens                   int32 [n_prompts]   tokens fed to the model (BOS included)
    n_pooled                   int32 [n_prompts]   tokens pooled (BOS left out when excluded)
    {component}/{pooling}      float [n_prompts, d_model]        pooling in mean | last | max
    {component}/none/values    float [n_pooled_total, d_model]   every pooled token
                                                                 (token-level layers only)
    {component}/none/offsets   int64 [n_prompts + 1]             prompt i is
                                                                 values[offsets[i]:offsets[i+1]]
    token_ids                  int64 [n_pooled_total]            token id of each row of
                                                                 .../none/values

Store ``store.h5`` (``kind = "store"``): the same, except ``{component}/{pooling}`` is
``[n_layers, n_prompts, d_model]`` (all layers of the model) and ``{component}/none/values`` is
``[len(token_level_layers), n_pooled_total, d_model]`` (attribute ``token_level_layers``).

Root attributes (both kinds): ``kind``, ``format_version``, ``model``, ``model_revision``,
``architecture``, ``transformer_lens_version``, ``layerscope_version``, ``n_layers``, ``d_model``,
``n_prompts``, ``hook_names`` (JSON list), ``dtype`` (model dtype), ``out_dtype``, ``bos``
(the configured policy), ``prepend_bos`` (resolved), ``exclude_bos_from_pooling``,
``compatibility_mode``, ``components`` / ``poolings`` / ``token_level_layers`` (JSON lists),
``layer`` (layer files only) and ``complete = True``, written last, just before the temporary
file is renamed into place. Readers refuse a file without it.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from layerscope.errors import LayerscopeError

FORMAT_VERSION = 1
COMPONENTS = ("resid_pre", "resid_mid", "resid_post", "attn_out", "mlp_out")
POOLINGS = ("mean", "last", "max")  # plus "none" (token level) for token_level_layers
TOKEN_POOLING = "none"
# text_sha1: a hash of each prompt's text, so that a cache is keyed by its prompts, not its labels
# (a relabel reuses it; a changed text is refused).
STRING_DATASETS = ("prompt_id", "label", "group", "text_sha1")
REQUIRED_ATTRS = (
    "kind",
    "format_version",
    "model",
    "n_layers",
    "d_model",
    "n_prompts",
    "hook_names",
    "components",
    "poolings",
    "token_level_layers",
    "prepend_bos",
    "exclude_bos_from_pooling",
    "compatibility_mode",
    "complete",
)
JSON_ATTRS = ("hook_names", "components", "poolings", "token_level_layers")
#: Bytes per chunk aimed at for float arrays (rows of d_model floats).
CHUNK_BYTES = 1 << 20
#: Chunk cache per dataset while writing (bounded, so memory does not grow with n_prompts).
CACHE_BYTES = 8 << 20
_LAYER_FILE = re.compile(r"layer_(\d+)\.h5$")


# --------------------------------------------------------------------------------------------
# data classes returned by readers


@dataclass
class LayerData:
    """Pooled vectors of one layer: ``X[i]`` belongs to ``prompt_ids[i]`` / ``labels[i]``."""

    X: np.ndarray
    prompt_ids: list[str]
    labels: list[str]
    attrs: dict[str, Any]
    groups: list[str] | None = None
    path: str | None = None

    @property
    def layer(self) -> int:
        """The layer this file holds."""
        return int(self.attrs["layer"])


@dataclass
class LayerStack:
    """Several layers stacked: ``X[k]`` is layer ``layers[k]``, shape
    [n_layers, n_prompts, d_model]."""

    X: np.ndarray
    layers: list[int]
    prompt_ids: list[str]
    labels: list[str]
    attrs: dict[int, dict[str, Any]]
    groups: list[str] | None = None


@dataclass
class TokenData:
    """Token-level vectors of one layer: prompt ``i`` owns rows ``offsets[i]:offsets[i+1]``."""

    values: np.ndarray
    offsets: np.ndarray
    token_ids: np.ndarray
    prompt_ids: list[str]
    labels: list[str]
    attrs: dict[str, Any] = field(default_factory=dict)

    def prompt(self, i: int) -> np.ndarray:
        """The token vectors of prompt ``i``."""
        return self.values[self.offsets[i] : self.offsets[i + 1]]

    def prompt_token_ids(self, i: int) -> np.ndarray:
        """The token ids of prompt ``i``."""
        return self.token_ids[self.offsets[i] : self.offsets[i + 1]]


# --------------------------------------------------------------------------------------------
# writing helpers (used by layerscope.engine.store)


def _h5py():
    """h5py, imported when first needed."""
    import h5py

    return h5py


def open_for_write(path: str | os.PathLike):
    """Open a fresh HDF5 file for writing with a bounded chunk cache."""
    h5py = _h5py()
    return h5py.File(path, "w", rdcc_nbytes=CACHE_BYTES, rdcc_nslots=10007)


def chunk_rows(d_model: int, itemsize: int, n_rows: int) -> int:
    """Rows per chunk: as many as fit ``CHUNK_BYTES`` (at least 1, at most ``n_rows``)."""
    return int(max(1, min(n_rows, CHUNK_BYTES // max(1, d_model * itemsize))))


def compression_kwargs(compression: str | int | None) -> dict[str, Any]:
    """``None`` | ``"gzip"`` | ``"gzip:N"`` | ``"lzf"`` -> h5py create_dataset keyword arguments."""
    if compression in (None, "", "none", False):
        return {}
    if compression == "lzf":
        return {"compression": "lzf"}
    if isinstance(compression, int) and not isinstance(compression, bool):
        return {"compression": "gzip", "compression_opts": int(compression), "shuffle": True}
    if isinstance(compression, str) and compression.startswith("gzip"):
        level = 4
        if ":" in compression:
            level = int(compression.split(":", 1)[1])
        return {"compression": "gzip", "compression_opts": level, "shuffle": True}
    raise LayerscopeError(
        f"unknown compression {compression!r}; expected null, gzip, gzip:N or lzf"
    )


def write_strings(f, name: str, values: Sequence[Any]) -> None:
    """Write ``values`` as a UTF-8 string dataset (None as "")."""
    h5py = _h5py()
    arr = np.array(["" if v is None else str(v) for v in values], dtype=object)
    f.create_dataset(name, data=arr, dtype=h5py.string_dtype("utf-8"))


def create_float(f, name: str, shape: tuple[int, ...], dtype: str, compression=None):
    """Create a chunked float dataset whose chunks are a block of rows of one layer."""
    rows = shape[-2]
    d = shape[-1]
    chunks = (1,) * (len(shape) - 2) + (chunk_rows(d, np.dtype(dtype).itemsize, max(1, rows)), d)
    if rows == 0:
        chunks = None
    return f.create_dataset(
        name,
        shape=shape,
        dtype=dtype,
        chunks=chunks,
        **(compression_kwargs(compression) if chunks else {}),
    )


def set_attrs(f, attrs: Mapping[str, Any]) -> None:
    """Write root attributes: lists, tuples and dicts as JSON, None as "null"."""
    for key, value in attrs.items():
        if key in JSON_ATTRS or isinstance(value, (list, tuple, dict)):
            value = json.dumps(list(value) if isinstance(value, tuple) else value)
        elif value is None:
            value = "null"
        f.attrs[key] = value


def mark_complete(f) -> None:
    """Set ``complete = True`` (written last: readers refuse a file without it) and flush."""
    f.attrs["complete"] = True
    f.flush()


# --------------------------------------------------------------------------------------------
# reading


def _decode_attr(key: str, value: Any) -> Any:
    """One attribute as written by :func:`set_attrs`, decoded back (JSON lists, "null")."""
    if isinstance(value, bytes):
        value = value.decode("utf-8")
    if isinstance(value, np.generic):
        value = value.item()
    if key in JSON_ATTRS and isinstance(value, str):
        try:
            return json.loads(value)
        except json.JSONDecodeError:
            return value
    if value == "null":
        return None
    return value


def read_attrs(f) -> dict[str, Any]:
    """All root attributes of ``f``, decoded."""
    return {k: _decode_attr(k, v) for k, v in f.attrs.items()}


def _strings(f, name: str) -> list[str]:
    """String dataset ``name`` as a list of str."""
    return [s for s in f[name].asstr()[()]]


def _open(path: str | os.PathLike):
    """Open an activation file for reading; raise naming the file if missing or unreadable."""
    h5py = _h5py()
    path = Path(path)
    if not path.exists():
        raise LayerscopeError(f"{path}: activation file does not exist")
    try:
        return h5py.File(path, "r")
    except OSError as exc:
        raise LayerscopeError(
            f"{path}: not a readable HDF5 file ({exc}); "
            "most likely left by a job that was killed while "
            "writing it - delete it and rerun (snakemake --rerun-incomplete)"
        ) from exc


def check_file(f, path: str | os.PathLike, kind: str | None = None) -> dict[str, Any]:
    """Validate an open activation file; return its decoded attributes.

    Raises LayerscopeError naming ``path`` if the file is incomplete, lacks an attribute or a
    dataset, is of the other kind (store vs layer), or has inconsistent shapes.
    """
    attrs = read_attrs(f)
    if not attrs.get("complete", False):
        raise LayerscopeError(
            f"{path}: incomplete activation file (attribute 'complete' is missing or false); "
            "the job that wrote it did not finish - delete it and rerun"
        )
    missing = [a for a in REQUIRED_ATTRS if a not in attrs]
    if missing:
        raise LayerscopeError(f"{path}: missing attribute(s) {', '.join(missing)}")
    if attrs["format_version"] != FORMAT_VERSION:
        raise LayerscopeError(
            f"{path}: format_version {attrs['format_version']} is not supported "
            f"(expected {FORMAT_VERSION})"
        )
    if kind is not None and attrs["kind"] != kind:
        raise LayerscopeError(f"{path}: expected a {kind} file but this is a {attrs['kind']} file")
    if attrs["kind"] == "layer":
        if "layer" not in attrs:
            raise LayerscopeError(f"{path}: layer file without a 'layer' attribute")
        m = _LAYER_FILE.search(Path(path).name)
        if m and int(m.group(1)) != int(attrs["layer"]):
            raise LayerscopeError(
                f"{path}: file name says layer {m.group(1)} "
                f"but the file holds layer {attrs['layer']}"
            )
        if not 0 <= int(attrs["layer"]) < int(attrs["n_layers"]):
            raise LayerscopeError(
                f"{path}: layer {attrs['layer']} outside 0..{attrs['n_layers'] - 1}"
            )
    for name in ("prompt_id", "label"):
        if name not in f:
            raise LayerscopeError(f"{path}: missing dataset '{name}'")
        if f[name].shape != (attrs["n_prompts"],):
            raise LayerscopeError(
                f"{path}: dataset '{name}' has shape {f[name].shape}, "
                f"expected ({attrs['n_prompts']},)"
            )
    return attrs


def layer_attrs(path: str | os.PathLike) -> dict[str, Any]:
    """Checked attributes of a per-layer file (components, poolings, layer, ...) without its
    arrays."""
    with _open(path) as f:
        return check_file(f, path, kind="layer")


def read_prompt_keys(path: str | os.PathLike) -> tuple[list[str], list[str], list[str] | None]:
    """Prompt ids, labels and groups (None if absent) of a checked activation file, without its
    arrays."""
    with _open(path) as f:
        check_file(f, path)
        return (
            _strings(f, "prompt_id"),
            _strings(f, "label"),
            (_strings(f, "group") if "group" in f else None),
        )


def read_text_hashes(path: str | os.PathLike) -> list[str] | None:
    """The per-prompt text hashes of an activation file (None for files written before they
    were kept)."""
    with _open(path) as f:
        check_file(f, path)
        return _strings(f, "text_sha1") if "text_sha1" in f else None


def _expected_shape(attrs: Mapping[str, Any]) -> tuple[int, ...]:
    """Shape of a pooled dataset: with a layer axis in stores and shards, without in layers."""
    if attrs["kind"] in ("store", "shard"):
        return (int(attrs["n_layers"]), int(attrs["n_prompts"]), int(attrs["d_model"]))
    return (int(attrs["n_prompts"]), int(attrs["d_model"]))


def _pooled_dataset(f, path, attrs, component: str, pooling: str):
    """The ``component/pooling`` dataset of ``f``; raise if absent or of the wrong shape."""
    name = f"{component}/{pooling}"
    if component not in attrs["components"] or pooling not in attrs["poolings"] or name not in f:
        raise LayerscopeError(
            f"{path}: no '{name}' in this file "
            f"(components {attrs['components']}, poolings {attrs['poolings']})"
        )
    ds = f[name]
    if ds.shape != _expected_shape(attrs):
        raise LayerscopeError(
            f"{path}: dataset '{name}' has shape {ds.shape}, expected {_expected_shape(attrs)}"
        )
    return ds


def read_layer(
    path: str | os.PathLike, component: str = "resid_post", pooling: str = "mean"
) -> LayerData:
    """Read one pooled array from a per-layer file (``layer_{L}.h5``)."""
    with _open(path) as f:
        attrs = check_file(f, path, kind="layer")
        X = _pooled_dataset(f, path, attrs, component, pooling)[()]
        prompt_ids = _strings(f, "prompt_id")
        labels = _strings(f, "label")
        groups = _strings(f, "group") if "group" in f else None
    return LayerData(
        X=X, prompt_ids=prompt_ids, labels=labels, attrs=attrs, groups=groups, path=os.fspath(path)
    )


def read_layers(
    paths: Iterable[str | os.PathLike],
    component: str = "resid_post",
    pooling: str = "mean",
    *,
    stack: bool = False,
) -> dict[int, LayerData] | LayerStack:
    """Read several per-layer files of one (model, dataset); keyed by layer (sorted).

    All files must come from the same model/config and hold the same prompts in the same order.
    With ``stack=True`` returns a :class:`LayerStack` (``X`` shaped [n_layers, n_prompts, d_model]).
    """
    out: dict[int, LayerData] = {}
    first: LayerData | None = None
    for path in paths:
        data = read_layer(path, component, pooling)
        if data.layer in out:
            raise LayerscopeError(
                f"{path}: layer {data.layer} given twice (also {out[data.layer].path})"
            )
        if first is None:
            first = data
        else:
            for key in (
                "model",
                "model_revision",
                "n_layers",
                "d_model",
                "dtype",
                "prepend_bos",
                "exclude_bos_from_pooling",
                "compatibility_mode",
            ):
                if first.attrs.get(key) != data.attrs.get(key):
                    raise LayerscopeError(
                        f"{path}: attribute '{key}' = {data.attrs.get(key)!r} differs from "
                        f"{first.path} ({first.attrs.get(key)!r}); "
                        "files from different runs cannot be mixed"
                    )
            if data.prompt_ids != first.prompt_ids:
                raise LayerscopeError(f"{path}: prompts differ from {first.path}")
        out[data.layer] = data
    out = dict(sorted(out.items()))
    if not stack:
        return out
    if not out:
        raise LayerscopeError("read_layers: no files given")
    layers = list(out)
    X = np.stack([out[L].X for L in layers])
    any_ = out[layers[0]]
    return LayerStack(
        X=X,
        layers=layers,
        prompt_ids=any_.prompt_ids,
        labels=any_.labels,
        attrs={L: out[L].attrs for L in layers},
        groups=any_.groups,
    )


def read_tokens(path: str | os.PathLike, component: str = "resid_post") -> TokenData:
    """Read the token-level (pooling ``none``) vectors of a per-layer file."""
    with _open(path) as f:
        attrs = check_file(f, path, kind="layer")
        base = f"{component}/{TOKEN_POOLING}"
        if f"{base}/values" not in f:
            raise LayerscopeError(
                f"{path}: no token-level data for '{component}' (layer {attrs['layer']} is not in "
                f"token_level_layers {attrs['token_level_layers']})"
            )
        values = f[f"{base}/values"][()]
        offsets = f[f"{base}/offsets"][()]
        token_ids = f["token_ids"][()]
        n = int(attrs["n_prompts"])
        if (
            offsets.shape != (n + 1,)
            or offsets[-1] != values.shape[0]
            or token_ids.shape[0] != values.shape[0]
        ):
            raise LayerscopeError(f"{path}: token-level offsets/values/token_ids are inconsistent")
        return TokenData(
            values=values,
            offsets=offsets,
            token_ids=token_ids,
            prompt_ids=_strings(f, "prompt_id"),
            labels=_strings(f, "label"),
            attrs=attrs,
        )


def read_store_layer(
    path: str | os.PathLike, layer: int, component: str = "resid_post", pooling: str = "mean"
) -> LayerData:
    """Read one layer straight from a store (for tools that do not need the per-layer files)."""
    with _open(path) as f:
        attrs = check_file(f, path, kind="store")
        _check_layer(path, attrs, layer)
        X = _pooled_dataset(f, path, attrs, component, pooling)[layer]
        attrs = dict(attrs, layer=layer)
        return LayerData(
            X=X,
            prompt_ids=_strings(f, "prompt_id"),
            labels=_strings(f, "label"),
            attrs=attrs,
            groups=_strings(f, "group") if "group" in f else None,
            path=os.fspath(path),
        )


def _check_layer(path, attrs, layer: int) -> None:
    """Raise unless ``layer`` is an int in ``0..n_layers-1``."""
    n_layers = int(attrs["n_layers"])
    if not isinstance(layer, (int, np.integer)) or not 0 <= int(layer) < n_layers:
        raise LayerscopeError(
            f"{path}: layer {layer} does not exist; the model has layers 0..{n_layers - 1}"
        )


# --------------------------------------------------------------------------------------------
# store -> layer file


def _compression_of(ds) -> str | int | None:
    """A dataset's compression in the form :func:`create_float` takes."""
    if ds.compression == "gzip":
        return int(ds.compression_opts)
    return ds.compression


def _copy_slice(sds, index: int, dst, name: str, block_rows: int) -> None:
    """Copy ``sds[index]`` (a 2-D slice of a 3-D dataset) to ``dst[name]`` in row blocks,
    keeping the source's dtype and compression."""
    rows = sds.shape[1]
    dds = create_float(dst, name, (rows, sds.shape[2]), sds.dtype.str, _compression_of(sds))
    for start in range(0, rows, block_rows):
        stop = min(rows, start + block_rows)
        dds[start:stop] = sds[index, start:stop]


def text_hashes(texts: Sequence[Any]) -> list[str]:
    """A short hash of each prompt text (stored beside the prompt ids as ``text_sha1``)."""
    return [hashlib.sha1(str(t).encode("utf-8")).hexdigest()[:16] for t in texts]


def copy_layer(
    store_path: str | os.PathLike,
    layer: int,
    out_path: str | os.PathLike,
    tmp_path: str | os.PathLike,
    *,
    block_rows: int = 4096,
    table: Any = None,
) -> None:
    """Write layer ``layer`` of the store at ``store_path`` to ``tmp_path`` (renamed by the caller).

    Streams in blocks of ``block_rows`` rows, so memory stays bounded for large datasets.
    ``out_path`` is only used for checks and messages. With ``table`` (the current prompt table,
    a path or :class:`layerscope.data.consistency.PromptTable`), the store's prompts and texts
    must be the table's, and the layer file takes its labels and groups from the table: a
    relabel re-extracts layers on the CPU instead of rerunning the forward pass.
    """
    m = _LAYER_FILE.search(Path(out_path).name)
    if m and int(m.group(1)) != int(layer):
        raise LayerscopeError(
            f"{out_path}: file name says layer {m.group(1)} but layer {layer} was asked for"
        )
    with _open(store_path) as src:
        attrs = check_file(src, store_path, kind="store")
        _check_layer(store_path, attrs, layer)
        layer = int(layer)
        token_layers = [int(x) for x in attrs["token_level_layers"]]
        out_attrs = {k: v for k, v in attrs.items() if k not in ("complete", "kind")}
        out_attrs["kind"] = "layer"
        out_attrs["layer"] = layer
        out_attrs["hook_names"] = [h.replace("{L}", str(layer)) for h in attrs["hook_names"]]
        out_attrs["token_level_layers"] = [layer] if layer in token_layers else []
        with open_for_write(tmp_path) as dst:
            set_attrs(dst, out_attrs)
            labels_from = None
            if table is not None:
                from layerscope.data.consistency import check_store_texts

                labels_from = check_store_texts(store_path, table)
            for name in ("prompt_id", "label", "group", "text_sha1", "n_tokens", "n_pooled"):
                if labels_from is not None and name in ("label", "group"):
                    if getattr(labels_from, name + "s") is not None:
                        write_strings(dst, name, getattr(labels_from, name + "s"))
                elif name in src:
                    src.copy(src[name], dst, name=name)
            for component in attrs["components"]:
                for pooling in attrs["poolings"]:
                    sds = _pooled_dataset(src, store_path, attrs, component, pooling)
                    _copy_slice(sds, layer, dst, f"{component}/{pooling}", block_rows)
                if layer in token_layers:
                    k = token_layers.index(layer)
                    base = f"{component}/{TOKEN_POOLING}"
                    _copy_slice(src[f"{base}/values"], k, dst, f"{base}/values", block_rows)
                    src.copy(src[f"{base}/offsets"], dst, name=f"{base}/offsets")
            if token_layers and layer in token_layers and "token_ids" in src:
                src.copy(src["token_ids"], dst, name="token_ids")
            mark_complete(dst)


# --------------------------------------------------------------------------------------------
# shards -> store

#: Attributes that differ between the shards of one store (everything else must agree).
SHARD_ATTRS = (
    "kind",
    "complete",
    "shard_index",
    "n_shards",
    "n_prompts",
    "n_prompts_total",
    "batch_size",
    "max_tokens_per_batch",
    "self_check_max_diff",
)


def _runs(rows: np.ndarray, starts: np.ndarray, stops: np.ndarray, max_len: int):
    """Group consecutive table rows into runs: yields (first, last) positions into ``rows``,
    each run's token rows contiguous in both the shard and the store, at most ~``max_len`` long."""
    first = 0
    for k in range(1, len(rows) + 1):
        if k == len(rows) or rows[k] != rows[k - 1] + 1 or stops[k - 1] - starts[first] >= max_len:
            yield first, k
            first = k


def gather_shards(
    shard_paths: Sequence[str | os.PathLike],
    tmp_path: str | os.PathLike,
    *,
    out_path: str | os.PathLike | None = None,
    block_rows: int = 4096,
) -> dict[str, Any]:
    """Write the store made of ``shard_paths`` (all shards of one caching job) to ``tmp_path``.

    Checks that the shards come from one configuration and batch plan and cover every prompt
    exactly once, then copies their rows into table order in blocks of ``block_rows`` prompts,
    so memory does not grow with the dataset. Attributes and arrays equal those of an
    unsharded :func:`layerscope.engine.store.cache_store` run.
    """
    out_path = out_path or tmp_path
    if not shard_paths:
        raise LayerscopeError(f"{out_path}: no shard files to gather")
    handles = []
    try:
        for path in shard_paths:
            f = _open(path)
            handles.append(f)
        metas = [check_file(f, path, kind="shard") for f, path in zip(handles, shard_paths)]
        first = metas[0]
        n_shards = int(first["n_shards"])
        common = _check_shard_attrs(shard_paths, metas, out_path)
        n = int(first["n_prompts_total"])
        rows = _shard_rows(handles, shard_paths, n, out_path)
        # Per-prompt metadata in table order (small: ids and counts, not vectors).
        meta_strings = {name: _assemble(handles, rows, n, name, True) for name in STRING_DATASETS}
        n_tokens = _assemble(handles, rows, n, "n_tokens", False)
        n_pooled = _assemble(handles, rows, n, "n_pooled", False)
        offsets = np.zeros(n + 1, dtype=np.int64)
        np.cumsum(n_pooled, out=offsets[1:])
        attrs = dict(common, kind="store", n_prompts=n)
        with open_for_write(tmp_path) as dst:
            set_attrs(dst, {k: v for k, v in attrs.items() if k != "complete"})
            for name in STRING_DATASETS:
                if meta_strings[name] is not None:
                    write_strings(dst, name, meta_strings[name].tolist())
            dst.create_dataset("n_tokens", data=n_tokens)
            dst.create_dataset("n_pooled", data=n_pooled)
            _gather_pooled(dst, handles, rows, first, n, block_rows)
            if first["token_level_layers"]:
                _gather_tokens(dst, handles, rows, first, offsets, block_rows)
            mark_complete(dst)
    finally:
        for f in handles:
            f.close()
    return {"n_prompts": n, "n_shards": n_shards}


def _check_shard_attrs(shard_paths, metas, out_path) -> dict[str, Any]:
    """The attributes the shards share; raise unless they come from one run and one batch plan
    and are shards ``0..n_shards - 1`` exactly once each."""
    first = metas[0]
    n_shards = int(first["n_shards"])
    common = {k: v for k, v in first.items() if k not in SHARD_ATTRS}
    for path, meta in zip(shard_paths, metas):
        for key in set(common) | {k for k in meta if k not in SHARD_ATTRS}:
            if meta.get(key) != common.get(key):
                raise LayerscopeError(
                    f"{path}: attribute '{key}' = {meta.get(key)!r} differs from "
                    f"{shard_paths[0]} ({common.get(key)!r}); "
                    "shards of different runs cannot be gathered"
                )
        for key in ("n_shards", "n_prompts_total", "batch_size", "max_tokens_per_batch"):
            if meta[key] != first[key]:
                raise LayerscopeError(
                    f"{path}: {key} = {meta[key]} but {shard_paths[0]} has {first[key]}; "
                    "all shards must come from one batch plan - rerun the shards"
                )
    indices = sorted(int(m["shard_index"]) for m in metas)
    if indices != list(range(n_shards)):
        raise LayerscopeError(f"{out_path}: expected shards 0..{n_shards - 1}, got {indices}")
    return common


def _shard_rows(handles, shard_paths, n: int, out_path) -> list[np.ndarray]:
    """Each shard's table rows; raise unless together they hold every row ``0..n-1`` once."""
    rows = [f["shard_rows"][()] for f in handles]
    owner = np.full(n, -1, dtype=np.int64)
    for s, (path, r) in enumerate(zip(shard_paths, rows)):
        if r.size and (r.min() < 0 or r.max() >= n):
            raise LayerscopeError(f"{path}: shard rows outside 0..{n - 1}")
        clash = r[owner[r] >= 0]
        if clash.size:
            raise LayerscopeError(
                f"{path}: prompt row(s) {clash[:5].tolist()} also in another shard"
            )
        owner[r] = s
    if (owner < 0).any():
        raise LayerscopeError(
            f"{out_path}: no shard holds prompt row(s) {np.flatnonzero(owner < 0)[:5].tolist()}"
        )
    return rows


def _assemble(handles, rows, n: int, name: str, strings: bool):
    """Per-prompt dataset ``name`` of all shards in table order (None if the shards lack it)."""
    if name not in handles[0]:
        return None
    out = np.empty(n, dtype=object if strings else handles[0][name].dtype)
    for f, r in zip(handles, rows):
        out[r] = np.asarray(_strings(f, name), dtype=object) if strings else f[name][()]
    return out


def _gather_pooled(dst, handles, rows, first, n: int, block_rows: int) -> None:
    """Copy every pooled dataset of the shards into ``dst``, ``block_rows`` prompts at a time."""
    pooled = [f"{c}/{p}" for c in first["components"] for p in first["poolings"]]
    for name in pooled:
        src0 = handles[0][name]
        dds = create_float(
            dst,
            name,
            (int(first["n_layers"]), n, int(first["d_model"])),
            src0.dtype.str,
            _compression_of(src0),
        )
        for f, r in zip(handles, rows):
            sds = f[name]
            for start in range(0, len(r), block_rows):
                stop = min(len(r), start + block_rows)
                # h5py point selection wants increasing indices: shard rows are sorted.
                dds[:, r[start:stop], :] = sds[:, start:stop, :]


def _gather_tokens(dst, handles, rows, first, offsets: np.ndarray, block_rows: int) -> None:
    """Copy the token-level values (and token ids) of the shards into ``dst`` in runs of
    consecutive prompts."""
    token_layers = [int(x) for x in first["token_level_layers"]]
    n_tok = int(offsets[-1])
    token_ids = dst.create_dataset("token_ids", shape=(n_tok,), dtype=np.int64)
    for c in first["components"]:
        base = f"{c}/{TOKEN_POOLING}"
        src0 = handles[0][f"{base}/values"]
        vds = create_float(
            dst,
            f"{base}/values",
            (len(token_layers), n_tok, int(first["d_model"])),
            src0.dtype.str,
            _compression_of(src0),
        )
        dst.create_dataset(f"{base}/offsets", data=offsets)
        for f, r in zip(handles, rows):
            soff = f[f"{base}/offsets"][()]
            for a, b in _runs(r, offsets[r], offsets[r + 1], block_rows * 16):
                g0, g1 = int(offsets[r[a]]), int(offsets[r[b - 1] + 1])
                s0, s1 = int(soff[a]), int(soff[b])
                vds[:, g0:g1, :] = f[f"{base}/values"][:, s0:s1, :]
                if c == first["components"][0]:
                    token_ids[g0:g1] = f["token_ids"][s0:s1]
