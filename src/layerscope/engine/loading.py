"""Load the model a job runs: the native engine (:mod:`layerscope.engine.native`) or the
TransformerLens ``TransformerBridge``, on its device and in its dtype, and describe it (the ``info``
written into every cache file). Also the hook point names every sweep taps.
"""

from __future__ import annotations

import importlib.metadata
import os
from collections.abc import Callable, Sequence
from typing import Any

from layerscope.errors import LayerscopeError
from layerscope.settings import ModelSettings

#: component -> TransformerLens hook name (legacy aliases kept by TransformerLens 4).
HOOKS = {
    "resid_pre": "blocks.{L}.hook_resid_pre",
    "attn_out": "blocks.{L}.hook_attn_out",
    "resid_mid": "blocks.{L}.hook_resid_mid",
    "mlp_out": "blocks.{L}.hook_mlp_out",
    "resid_post": "blocks.{L}.hook_resid_post",
}
_DTYPES = {
    "float32": "float32",
    "fp32": "float32",
    "float": "float32",
    "float16": "float16",
    "fp16": "float16",
    "half": "float16",
    "bfloat16": "bfloat16",
    "bf16": "bfloat16",
    "float64": "float64",
}


def tl_version() -> str:
    """The installed TransformerLens version ("unknown" if it is not installed)."""
    try:
        return importlib.metadata.version("transformer-lens")
    except importlib.metadata.PackageNotFoundError:  # pragma: no cover
        return "unknown"


def resolve_device(device: str | None = "auto") -> str:
    """``auto`` -> cuda if available, else cpu; refuse a cuda device on a machine without one."""
    import torch

    if device in (None, "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    if str(device).startswith("cuda") and not torch.cuda.is_available():
        raise LayerscopeError(
            f"device {device!r} requested but CUDA is not available on this machine"
        )
    return str(device)


def torch_dtype(dtype: str | Any):
    """The torch dtype named by ``dtype`` (float32, fp16, bf16, ...; a torch dtype passes)."""
    import torch

    if isinstance(dtype, torch.dtype):
        return dtype
    name = _DTYPES.get(str(dtype).lower())
    if name is None:
        raise LayerscopeError(
            f"unknown dtype {dtype!r}; expected one of float32, float16, bfloat16, float64"
        )
    return getattr(torch, name)


def load_model(
    source: str,
    *,
    dtype: str = "float32",
    device: str = "auto",
    compatibility_mode: bool = False,
    revision: str | None = None,
):
    """Boot ``source`` (hub id or local ``save_pretrained`` directory) as a ``TransformerBridge``.

    Returns ``(bridge, info)``; ``info`` describes what was loaded and is written into every cache
    file (model, revision, n_layers, d_model, dtype, device, compatibility_mode, versions, ...).
    """
    from transformer_lens.model_bridge import TransformerBridge

    dev = resolve_device(device)
    tdtype = torch_dtype(dtype)
    kwargs: dict[str, Any] = {"device": dev, "dtype": tdtype}
    if revision:
        kwargs["revision"] = revision
    refusal = bridge_refusal(source, revision)
    if refusal:
        raise LayerscopeError(f"engine: bridge cannot run {source}: {refusal}")
    try:
        bridge = TransformerBridge.boot_transformers(os.fspath(source), **kwargs)
    except (OSError, ValueError) as exc:
        raise LayerscopeError(f"could not load model {source!r}: {exc}") from exc
    except Exception as exc:  # an adapter that cannot map this layout: name it, no raw traceback
        raise LayerscopeError(
            f"TransformerBridge {tl_version()} cannot boot {source!r} "
            f"({_arch_name(source, revision)}): {type(exc).__name__}: {exc}; "
            "use engine: native"
        ) from exc
    if compatibility_mode:
        bridge.enable_compatibility_mode(disable_warnings=True)
    bridge.eval()
    bridge.original_model.eval()
    # The bridge rewrites the tokenizer (Qwen: BOS := EOS); BOS decisions use the model's own files.
    bridge.layerscope_tokenizer = _own_tokenizer(source, revision, fallback=bridge.tokenizer)
    info = describe_model(
        bridge,
        source=source,
        revision=revision,
        dtype=tdtype,
        device=dev,
        compatibility_mode=compatibility_mode,
    )
    info["engine"] = "bridge"
    return bridge, info


def _hf_config(source, revision):
    """The transformers config of ``source`` at ``revision``."""
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(
        os.fspath(source), **({"revision": revision} if revision else {})
    )


def _arch_name(source, revision) -> str:
    """The architecture name of ``source`` for messages ("unknown architecture" if unreadable)."""
    try:
        config = _hf_config(source, revision)
    except (OSError, ValueError):
        return "unknown architecture"
    return (getattr(config, "architectures", None) or [config.model_type])[0]


def bridge_refusal(source, revision=None) -> str | None:
    """Layouts where the TransformerBridge (4.3) is known to be wrong or not to boot, found by the
    architecture matrix (tests/test_architectures.py); None where it is fine or unknown."""
    try:
        config = _hf_config(source, revision)
    except (OSError, ValueError):
        return None  # let the boot itself report it
    if config.model_type == "falcon" and config.new_decoder_architecture:
        return (
            "Falcon with new_decoder_architecture: the bridge's joint-QKV split does not fit its "
            "grouped K/V heads and it cannot boot"
        )
    if config.model_type == "falcon" and config.alibi:
        return (
            "Falcon with ALiBi: the bridge's activations differ from transformers' "
            "(relative 0.04-0.17 on a tiny random model)"
        )
    return None


def _own_tokenizer(source, revision, fallback):
    """The model's own tokenizer from its files (``fallback`` if it cannot be loaded)."""
    from transformers import AutoTokenizer

    try:
        kw = {"revision": revision} if revision else {}
        return AutoTokenizer.from_pretrained(os.fspath(source), **kw)
    except (OSError, ValueError):
        return fallback


ENGINES = ("auto", "native", "bridge")


def load_engine(
    source: str,
    *,
    engine: str = "auto",
    components: Sequence[str] = (),
    dtype: str = "float32",
    device: str = "auto",
    compatibility_mode: bool = False,
    revision: str | None = None,
    log: Callable[[str], Any] | None = None,
):
    """The model to cache with: the native engine (plain HF model, SDPA, hooks on its modules;
    see :mod:`layerscope.engine.native`) or the TransformerBridge. ``engine: auto`` takes the
    native one unless compatibility_mode is on (folded LayerNorm exists only in the bridge) or the
    architecture is not in the native layout table. A requested component that the native layout
    has no tap point for is refused by name, whatever the engine asked for (not handed to the
    bridge, which may not boot the layout, or compute it differently: docs/methods.md, "Component
    definitions"); per-head values are the bridge's only where the native engine has no output
    projection (:func:`layerscope.jobs.stages.load_for_sweep`). ``native`` refuses the other cases
    by name too. Returns ``(model, info)``.
    """
    from layerscope.engine import native

    if engine not in ENGINES:
        raise LayerscopeError(f"engine {engine!r} not understood; expected one of {list(ENGINES)}")
    reason, missing = (
        _native_refusal(source, revision, components, compatibility_mode)
        if engine != "bridge"
        else (None, None)
    )
    if missing:
        raise LayerscopeError(
            f"engine: {engine} cannot serve {source}: {missing}; "
            "remove it from the requested components"
        )
    if engine == "native" and reason:
        raise LayerscopeError(f"engine: native cannot run {source}: {reason}")
    if engine == "bridge" or reason:
        if reason and log:
            log(f"engine: bridge ({reason})")
        return load_model(
            source,
            dtype=dtype,
            device=device,
            compatibility_mode=compatibility_mode,
            revision=revision,
        )
    dev = resolve_device(device)
    tdtype = torch_dtype(dtype)
    model = native.load_native(source, dtype=tdtype, device=dev, revision=revision)
    info = describe_model(
        model, source=source, revision=revision, dtype=tdtype, device=dev, compatibility_mode=False
    )
    info.update(engine="native", attn_implementation=str(model.attn_implementation))
    return model, info


def load_from_settings(
    model: ModelSettings,
    components: Sequence[str],
    *,
    engine: str,
    device: str,
    log: Callable[[str], Any] | None,
):
    """:func:`load_engine` for a model's typed settings (source, revision, dtype, compatibility
    mode): what every job that runs a model loads it with."""
    return load_engine(
        model.source,
        engine=engine,
        components=list(components),
        dtype=model.dtype,
        device=device,
        compatibility_mode=model.compatibility_mode,
        revision=model.revision,
        log=log,
    )


def _native_refusal(
    source, revision, components, compatibility_mode
) -> tuple[str | None, str | None]:
    """``(why the native engine cannot run the model at all, why it cannot serve a requested
    component)``, each None where it can."""
    from layerscope.engine import native

    if compatibility_mode:
        return "compatibility_mode (folded LayerNorm) exists only in the bridge", None
    try:
        config = _hf_config(source, revision)
        have = native.supported_components(config)
    except (OSError, ValueError, LayerscopeError) as exc:
        return str(exc), None
    missing = [c for c in components if c not in have]
    return None, ("; ".join(native.why_unsupported(config, c) for c in missing) or None)


def describe_model(
    bridge,
    *,
    source: str | None = None,
    revision: str | None = None,
    dtype=None,
    device: str | None = None,
    compatibility_mode: bool | None = None,
) -> dict[str, Any]:
    """The ``info`` dict of :func:`load_model` for an already booted bridge (or native engine)."""
    hf = getattr(bridge, "original_model", None) or getattr(bridge, "model", None)
    config = getattr(hf, "config", None)
    name_or_path = getattr(config, "_name_or_path", None) or ""
    source = source if source is not None else (name_or_path or "unknown")
    if not revision:
        revision = getattr(config, "_commit_hash", None)
    if not revision:
        revision = "local" if os.path.isdir(os.fspath(source)) else None
    if dtype is None:
        try:
            dtype = next(hf.parameters()).dtype
        except (StopIteration, AttributeError):
            dtype = "unknown"
    arch = getattr(bridge.cfg, "architecture", None)
    if not arch and config is not None and getattr(config, "architectures", None):
        arch = config.architectures[0]
    if compatibility_mode is None:
        compatibility_mode = bool(getattr(bridge, "compatibility_mode", False))
    return {
        "model": os.fspath(source),
        "model_revision": revision,
        "architecture": arch or "unknown",
        "n_layers": int(bridge.cfg.n_layers),
        "d_model": int(bridge.cfg.d_model),
        "n_ctx": int(getattr(bridge.cfg, "n_ctx", 0) or 0),
        "dtype": str(dtype).replace("torch.", ""),
        "device": str(device if device is not None else getattr(bridge.cfg, "device", "cpu")),
        "compatibility_mode": bool(compatibility_mode),
        "transformer_lens_version": tl_version(),
    }


def model_device(model):
    """The device of a model's weights: a TransformerBridge's (its original_model) or the native
    engine's (its HF model); every sweep places its inputs there."""
    hf = getattr(model, "original_model", None) or getattr(model, "model", None)
    return next(iter(hf.parameters())).device


def hook_name(component: str, layer: int) -> str:
    """The hook point name of ``component`` in ``layer`` (``blocks.L.hook_<component>``)."""
    return HOOKS[component].format(L=layer)
