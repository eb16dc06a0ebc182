"""The native engine: a plain Hugging Face model with its own attention (SDPA / flash) and norms,
tapped with torch hooks at the points TransformerLens calls ``blocks.L.hook_*``.

Why not the bridge: ``TransformerBridge`` replaces the HF submodules with its own components and
forces eager attention, recomputing attention (and, for fused QKV, LayerNorm) in Python. On
1,000-token prompts that made caching 3-4x slower than the plain model (bench/README.md). Booting
the bridge with SDPA does not help: the swapped-in components ignore it (field notes). So this
engine loads the model separately (``AutoModelForCausalLM``, ``attn_implementation="sdpa"``) and
hooks the HF modules directly.

Tap points follow the component definitions of docs/methods.md ("Component definitions"):
resid_pre is what the block reads, resid_mid what the MLP sublayer reads (after the residual
addition and any norm that sits on the stream), resid_post what the next block reads, attn_out and
mlp_out what is added to the stream. A small explicit table (:data:`LAYOUTS`, adjusted for a
config's placement flags by :func:`layout_for`) is used rather than the bridge adapter's component
mapping: the adapter maps ``attn``/``mlp`` to the HF ``self_attn``/``mlp`` modules, but in
sandwich layouts (Gemma 2/3, OLMo 2) the value added to the residual is the *output of a norm
after* them, in BLOOM the attention and MLP modules add the residual themselves (the value added
is their output projection's), OPT has no MLP module at all, and in post-norm layouts (OPT with
``do_layer_norm_before=False``, BLOOM with ``apply_residual_connection_post_layernorm``) a norm
sits on the stream itself, so resid_mid is that norm's *output*. The matrix test
(tests/test_architectures.py) checks every family and placement against plain ``transformers``
hooks written out independently of this table.

Hook functions follow TransformerLens: ``fn(tensor, hook=None)`` may return a replacement tensor.
Replacement is exact for resid_pre, attn_out, mlp_out and resid_post (the replaced value is the one
the model goes on with). ``blocks.L.attn.hook_z`` is TransformerLens's per-head attention output
before the output projection, ``[batch, pos, head, d_head]``: here the input of the attention's
output projection (``o_proj`` / ``c_proj`` / ``dense`` / ``out_proj``), which is that value with the
heads concatenated; replacing it is exact too. Replacing resid_mid is refused where it is read at
the input of the norm (or MLP) after the attention, as changing that input would not change the
residual the layer adds back; in post-norm layouts, where it is the output of a norm on the stream,
replacing it is exact.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from types import SimpleNamespace
from typing import Any

from layerscope.errors import LayerscopeError

COMPONENTS = ("resid_pre", "attn_out", "resid_mid", "mlp_out", "resid_post")
#: Components that exist for every decoder layer list, whatever the layout.
UNIVERSAL = ("resid_pre", "resid_post")


class StopForward(Exception):
    """Raised by a hook to end the forward pass early (caught by :meth:`NativeEngine.__call__`)."""


@dataclass(frozen=True)
class Layout:
    """Where the components of one block live, relative to the decoder layer module.

    ``attn`` / ``mlp``: the module whose *output* is added to the residual (first element if it
    returns a tuple). ``mid``: the module whose *input* is the residual after attention (None for
    parallel blocks, which have no resid_mid), or with ``mid_out`` whose *output* is (a norm that
    sits on the stream). ``None`` for attn/mlp means not available.

    The stream norms say how the components add up, for the self-check's identities
    (:func:`layerscope.engine.parity.reference_pass`): ``residual_norm``, the norm whose output
    the attention's value is added to (default: the block input); ``attn_norm`` / ``mlp_norm``,
    a norm applied to the stream after the attention / MLP addition.
    """

    layers: str
    attn: str | None = "self_attn"
    mlp: str | None = "mlp"
    mid: str | None = "post_attention_layernorm"
    mlp_inplace: bool = False  # the model adds to the MLP output in place: clone before reading
    note: str = ""
    mid_out: bool = False
    residual_norm: str | None = None
    attn_norm: str | None = None
    mlp_norm: str | None = None
    heads: bool = True  # the attention's output projection is called as a module (per-head z)

    @property
    def parallel(self) -> bool:
        """Attention and MLP read the same input (no resid_mid)."""
        return self.mid is None and self.attn is not None and self.mlp is not None


_LLAMA = Layout("model.layers")
_POST_NORM = Layout(
    "model.layers",
    attn="post_attention_layernorm",
    mlp="post_feedforward_layernorm",
    mid="pre_feedforward_layernorm",
)

#: model_type -> layout (sequential unless the config says parallel, see :func:`layout_for`).
LAYOUTS: dict[str, Layout] = {
    **{
        t: _LLAMA
        for t in (
            "llama",
            "mistral",
            "mixtral",
            "qwen2",
            "qwen3",
            "qwen2_moe",
            "qwen3_moe",
            "gemma",
            "phi3",
            "olmo",
            "stablelm",
            "granite",
        )
    },
    "gemma2": _POST_NORM,
    "gemma3_text": _POST_NORM,
    "olmo2": Layout(
        "model.layers", attn="post_attention_layernorm", mlp="post_feedforward_layernorm", mid="mlp"
    ),
    "phi": Layout("model.layers", mid=None),
    "gpt2": Layout("transformer.h", attn="attn", mid="ln_2"),
    "gpt_neo": Layout("transformer.h", attn="attn", mid="ln_2"),
    "gptj": Layout("transformer.h", attn="attn", mid=None),
    "gpt_neox": Layout("gpt_neox.layers", attn="attention"),
    "opt": Layout("model.decoder.layers", mlp="fc2", mid="final_layer_norm"),
    "falcon": Layout("transformer.h", attn="self_attention", mlp_inplace=True),
    # BLOOM's attention and MLP modules add the residual inside themselves: what they add is the
    # output of their output projections.
    "bloom": Layout("transformer.h", attn="self_attention.dense", mlp="mlp.dense_4h_to_h"),
}


def _no_taps(lay: Layout, note: str, keep_mid: bool = False) -> Layout:
    """``lay`` with no attn/mlp (nor, unless ``keep_mid``, mid) tap point."""
    mid = lay.mid if keep_mid else None
    return replace(lay, attn=None, mlp=None, mid=mid, mlp_inplace=False, heads=False, note=note)


def layout_for(config) -> Layout:
    """The layout of ``config.model_type``, adjusted for the config's norm placement flags:
    parallel attention and MLP, post-norm, a normed residual."""
    mt = getattr(config, "model_type", "")
    if mt not in LAYOUTS:
        raise LayerscopeError(
            f"architecture {mt!r} is not in the native engine's layout table "
            f"({', '.join(sorted(LAYOUTS))}); use engine: bridge for it"
        )
    lay = LAYOUTS[mt]
    parallel = (
        mt in ("gpt_neox", "stablelm") and getattr(config, "use_parallel_residual", False)
    ) or (mt == "falcon" and (config.parallel_attn or config.new_decoder_architecture))
    if parallel:
        lay = replace(lay, mid=None, note="parallel attention and MLP")
    if mt == "opt" and not getattr(config, "do_layer_norm_before", True):
        # post-norm: the stream is self_attn_layer_norm(x + attn), then final_layer_norm(. + mlp)
        lay = replace(
            lay,
            mid="self_attn_layer_norm",
            mid_out=True,
            attn_norm="self_attn_layer_norm",
            mlp_norm="final_layer_norm",
        )
    if mt == "bloom" and getattr(config, "apply_residual_connection_post_layernorm", False):
        # the attention adds to input_layernorm(x); the MLP reads, and adds to,
        # post_attention_layernorm(. + attn): that norm sits on the stream
        lay = replace(
            lay,
            mid_out=True,
            residual_norm="input_layernorm",
            attn_norm="post_attention_layernorm",
        )
    if (
        mt == "bloom"
        and getattr(config, "pretraining_tp", 1) > 1
        and getattr(config, "slow_but_exact", False)
    ):
        lay = _no_taps(
            lay,
            "BLOOM with slow_but_exact and pretraining_tp > 1 applies its output projections "
            "slice by slice, never calling the modules",
            keep_mid=True,
        )
    return lay


def supported_components(config) -> tuple[str, ...]:
    """The components the native engine can tap for ``config``'s layout."""
    lay = layout_for(config)
    have = {
        "resid_pre": True,
        "attn_out": lay.attn is not None,
        "resid_mid": lay.mid is not None,
        "mlp_out": lay.mlp is not None,
        "resid_post": True,
    }
    return tuple(c for c in COMPONENTS if have[c])


def why_unsupported(config, component: str) -> str:
    """The message saying why ``component`` cannot be tapped for ``config``'s architecture."""
    lay = layout_for(config)
    arch = (getattr(config, "architectures", None) or [getattr(config, "model_type", "?")])[0]
    if component == "resid_mid" and lay.parallel:
        why = (
            "parallel attention and MLP: both read the block input, so no residual lies "
            "between them"
        )
    else:
        why = lay.note or "no such module"
    return f"component '{component}' is not available for architecture {arch} ({why})"


#: Attention modules and their output projections, by the names the supported families use.
ATTN_NAMES = ("self_attn", "attn", "attention", "self_attention")
OUT_PROJ_NAMES = ("o_proj", "c_proj", "dense", "out_proj")


def attention_taps(block) -> tuple[Any, Any] | None:
    """``(attention module, output projection)`` of a decoder layer, or None where it has none
    by those names (then per-head values cannot be read natively)."""
    attn = next((getattr(block, n) for n in ATTN_NAMES if hasattr(block, n)), None)
    if attn is None:
        return None
    proj = next((getattr(attn, n) for n in OUT_PROJ_NAMES if hasattr(attn, n)), None)
    return None if proj is None else (attn, proj)


def n_heads_of(config) -> int:
    """The number of query heads of a HF config (0 if it names none)."""
    for key in ("num_attention_heads", "n_head", "num_heads"):
        if isinstance(getattr(config, key, None), int):
            return int(getattr(config, key))
    return 0


def submodule(module, path: str):
    """The submodule at dotted ``path`` (``"model.layers"``) of ``module``."""
    for part in path.split("."):
        module = getattr(module, part)
    return module


def first_output(out):
    """A module's main output: the first element of a tuple output, else the output itself."""
    return out[0] if isinstance(out, tuple) else out


def _replace_first(out, new):
    """``out`` with its main output (see :func:`first_output`) replaced by ``new``."""
    return (new,) + tuple(out[1:]) if isinstance(out, tuple) else new


class NativeEngine:
    """A plain HF causal LM with TransformerLens-named hooks (the bridge subset layerscope uses).

    ``cfg.n_layers`` / ``cfg.d_model`` / ``cfg.n_ctx`` / ``cfg.architecture``, ``tokenizer`` (the
    model's own), ``hook_dict`` (the supported hook names), ``hooks(fwd_hooks=...)`` and
    ``engine(input_ids, attention_mask=..., return_type="logits" | None | "output")``.
    """

    stop_exception = StopForward
    compatibility_mode = False

    def __init__(self, model, tokenizer, *, attn_implementation: str | None = None):
        self.model = model
        self.tokenizer = tokenizer
        config = model.config
        self.layout = layout_for(config)
        self.layers = submodule(model, self.layout.layers)
        n_ctx = next(
            (
                getattr(config, k)
                for k in ("max_position_embeddings", "n_positions", "n_ctx")
                if isinstance(getattr(config, k, None), int)
            ),
            0,
        )
        self.cfg = SimpleNamespace(
            n_layers=len(self.layers),
            d_model=int(config.hidden_size),
            n_ctx=int(n_ctx or 0),
            architecture=(getattr(config, "architectures", None) or [type(model).__name__])[0],
            model_type=config.model_type,
            device=str(self.device),
            n_heads=n_heads_of(config),
        )
        self.attn_implementation = attn_implementation or getattr(
            config, "_attn_implementation", None
        )
        self.components = supported_components(config)
        self.hook_dict = {
            f"blocks.{L}.hook_{c}": None for L in range(self.cfg.n_layers) for c in self.components
        }
        # Per-head z only where every layer has an output projection to read it at.
        if (
            self.layout.heads
            and self.cfg.n_heads
            and all(attention_taps(layer) for layer in self.layers)
        ):
            n = len(self.layers)
            self.hook_dict.update({f"blocks.{L}.attn.hook_z": None for L in range(n)})

    @property
    def device(self):
        """The device of the model's parameters."""
        return next(self.model.parameters()).device

    # -- hooks ------------------------------------------------------------------------------------
    def _parse(self, name: str) -> tuple[int, str]:
        """``(layer, component)`` of a ``blocks.L.hook_<component>`` name; raise if not served."""
        parts = name.split(".")
        if len(parts) == 4 and parts[2] == "attn" and parts[3] == "hook_z" and parts[1].isdigit():
            if name not in self.hook_dict:
                raise LayerscopeError(
                    f"hook {name!r}: the native engine cannot read per-head values of "
                    f"{self.cfg.architecture} (no attention output projection among "
                    f"{', '.join(OUT_PROJ_NAMES)})"
                )
            return int(parts[1]), "z"
        if (
            len(parts) != 3
            or parts[0] != "blocks"
            or not parts[1].isdigit()
            or not parts[2].startswith("hook_")
        ):
            raise LayerscopeError(
                f"hook {name!r} is not a blocks.L.hook_<component> name the native engine knows"
            )
        L, comp = int(parts[1]), parts[2][len("hook_") :]
        if comp not in COMPONENTS:
            raise LayerscopeError(
                f"hook {name!r}: the native engine has no component {comp!r} "
                f"({', '.join(COMPONENTS)})"
            )
        if not 0 <= L < self.cfg.n_layers:
            raise LayerscopeError(f"hook {name!r}: the model has layers 0..{self.cfg.n_layers - 1}")
        if comp not in self.components:
            raise LayerscopeError(why_unsupported(self.model.config, comp))
        return L, comp

    def _register(self, L: int, comp: str, fn: Callable, name: str):
        """Register ``fn`` as the torch hook that reads (or replaces) ``comp`` of layer ``L``."""
        layer = self.layers[L]
        hook = SimpleNamespace(name=name)
        lay = self.layout
        if comp == "z":
            return self._register_z(L, fn, hook)
        if comp == "resid_pre":

            def pre(module, args, kwargs):
                x = args[0] if args else kwargs["hidden_states"]
                new = fn(x, hook=hook)
                if new is None:
                    return None
                if args:
                    return (new,) + tuple(args[1:]), kwargs
                return args, {**kwargs, "hidden_states": new}

            return layer.register_forward_pre_hook(pre, with_kwargs=True)
        if comp == "resid_mid" and lay.mid_out:
            comp = "mid_out"  # the output of a norm on the stream: read and replaced as attn_out
        elif comp == "resid_mid":

            def mid(module, args, kwargs):
                x = args[0] if args else next(iter(kwargs.values()))
                if x.dim() == 2:  # OPT normalises [batch * positions, d]
                    x = x.view(*self._batch_shape, x.shape[-1])
                if fn(x, hook=hook) is not None:
                    raise LayerscopeError(
                        f"{name}: replacing resid_mid is not supported by the native engine "
                        "(it is read at the input of the norm before the MLP; "
                        "a new value there would not reach the residual)"
                    )
                return None

            return submodule(layer, lay.mid).register_forward_pre_hook(mid, with_kwargs=True)
        where = {"attn_out": lay.attn, "mlp_out": lay.mlp, "mid_out": lay.mid}
        target = layer if comp == "resid_post" else submodule(layer, where[comp])
        clone = comp == "mlp_out" and lay.mlp_inplace

        def post(module, args, out):
            x = first_output(out)
            flat = x.dim() == 2  # OPT runs its MLP on [batch * positions, d]
            if flat:
                x = x.view(*self._batch_shape, x.shape[-1])
            new = fn(x.clone() if clone else x, hook=hook)
            if new is None:
                return None
            return _replace_first(out, new.reshape(-1, new.shape[-1]) if flat else new)

        return target.register_forward_hook(post)

    def _register_z(self, L: int, fn: Callable, hook):
        """``fn`` on the output projection's input viewed as ``[batch, pos, head, d_head]``."""
        n_heads = self.cfg.n_heads

        def pre(module, args, kwargs):
            flat = args[0] if args else kwargs["hidden_states"]
            z = flat.view(*flat.shape[:-1], n_heads, flat.shape[-1] // n_heads)
            new = fn(z, hook=hook)
            if new is None:
                return None
            new = new.reshape(flat.shape)
            if args:
                return (new,) + tuple(args[1:]), kwargs
            return args, {**kwargs, "hidden_states": new}

        return attention_taps(self.layers[L])[1].register_forward_pre_hook(pre, with_kwargs=True)

    @contextlib.contextmanager
    def hooks(self, fwd_hooks: Sequence[tuple[str, Callable]] = ()) -> Iterator[NativeEngine]:
        """Register ``(hook_name, fn)`` pairs for the duration of the block (in order per point)."""
        parsed = [(self._parse(name), name, fn) for name, fn in fwd_hooks]
        handles = []
        try:
            for (L, comp), name, fn in parsed:
                handles.append(self._register(L, comp, fn, name))
            yield self
        finally:
            for h in handles:
                h.remove()

    # -- forward ----------------------------------------------------------------------------------
    def __call__(
        self, input_ids, attention_mask=None, *, return_type: str | None = "logits", **kwargs: Any
    ):
        """Forward pass. ``return_type``: "logits" (tensor), "output" (the HF output, e.g. with
        ``cache`` when ``use_cache=True``) or None (runs the base model, no LM head).
        A hook raising :class:`StopForward` ends the pass; the call then returns None."""
        self._batch_shape = tuple(input_ids.shape[:2])
        try:
            if return_type is None:
                base = getattr(self.model, self.model.base_model_prefix)
                base(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
                return None
            out = self.model(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        except StopForward:
            return None
        if return_type == "logits":
            return out.logits
        if return_type == "output":
            return out
        raise LayerscopeError(
            f"return_type {return_type!r} not understood; expected 'logits', 'output' or None"
        )

    def eval(self) -> NativeEngine:
        """Put the model in eval mode (as torch modules do); returns the engine."""
        self.model.eval()
        return self


def load_native(
    source: str | os.PathLike,
    *,
    dtype,
    device: str,
    revision: str | None = None,
    attn_implementation: str = "sdpa",
) -> NativeEngine:
    """Load ``source`` as a plain HF causal LM (SDPA attention, falling back to eager where a model
    has no SDPA kernel) plus its own tokenizer, and wrap it in a :class:`NativeEngine`."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    kw: dict[str, Any] = {"revision": revision} if revision else {}
    try:
        config = AutoConfig.from_pretrained(os.fspath(source), **kw)
        layout_for(config)  # refuse unknown layouts before loading any weights
        try:
            model = AutoModelForCausalLM.from_pretrained(
                os.fspath(source), dtype=dtype, attn_implementation=attn_implementation, **kw
            )
        except ValueError as exc:
            if "attn_implementation" not in str(exc) and "sdpa" not in str(exc).lower():
                raise
            attn_implementation = "eager"
            model = AutoModelForCausalLM.from_pretrained(
                os.fspath(source), dtype=dtype, attn_implementation="eager", **kw
            )
        tokenizer = AutoTokenizer.from_pretrained(os.fspath(source), **kw)
    except (OSError, ValueError) as exc:
        raise LayerscopeError(f"could not load model {source!r}: {exc}") from exc
    model.to(device)
    model.eval()
    return NativeEngine(model, tokenizer, attn_implementation=attn_implementation)
