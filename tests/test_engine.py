"""The native engine's bridge-compatible API (hooks that read and replace, KV-cache decoding), the
BOS
policy from the model's own tokenizer, the parity self-check, and out-of-memory halving."""

from __future__ import annotations

import h5py
import numpy as np
import pytest
import torch

from devkit.tiny_models import TOKENIZER_KINDS, build_tiny_model, mimic_tokenizer
from layerscope.engine import tokens
from layerscope.engine.loading import load_engine, load_model
from layerscope.engine.store import cache_from_table, cache_store
from layerscope.engine.tokens import resolve_bos
from layerscope.errors import LayerscopeError

pytest.importorskip("transformer_lens")

TEXTS = [
    "The capital of France is Paris.",
    "847",
    "Which is larger: 12 or 71? Answer: 71",
    "the quick brown fox jumps over the lazy dog, again and again.",
    "Answer minimally: 25 and 9",
]
PIDS = [f"q{i}" for i in range(len(TEXTS))]
LABELS = ["a", "b", "a", "b", "a"]
PATCHABLE = ["resid_pre", "attn_out", "mlp_out", "resid_post"]


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("engine_models")
    return {
        arch: build_tiny_model(
            root / arch, arch, n_layers=3, d_model=32, n_heads=4, n_positions=256
        )
        for arch in ("gpt2", "qwen2")
    }


@pytest.fixture(scope="module")
def engines(dirs):
    return {
        arch: (load_engine(str(d), engine="native", device="cpu"), load_model(str(d), device="cpu"))
        for arch, d in dirs.items()
    }


def _ids(tok, text):
    return torch.tensor([tokens.tokenize_prompts(tok, [text], prepend_bos=True)[0]])


def test_engine_exposes_the_bridge_subset(engines):
    (native, info), (bridge, _) = engines["gpt2"]
    assert (
        native.cfg.n_layers == bridge.cfg.n_layers == 3
        and native.cfg.d_model == bridge.cfg.d_model == 32
    )
    assert info["engine"] == "native" and info["attn_implementation"] == "sdpa"
    assert (
        "blocks.2.hook_resid_mid" in native.hook_dict
        and "blocks.3.hook_resid_pre" not in native.hook_dict
    )
    with pytest.raises(LayerscopeError, match="layers 0..2"):
        with native.hooks(fwd_hooks=[("blocks.3.hook_resid_post", lambda x, hook=None: None)]):
            pass
    with pytest.raises(LayerscopeError, match="no component 'z'"):
        with native.hooks(fwd_hooks=[("blocks.0.hook_z", lambda x, hook=None: None)]):
            pass


@pytest.mark.parametrize("arch", ["gpt2", "qwen2"])
@pytest.mark.parametrize("component", PATCHABLE)
def test_replacing_a_hook_equals_the_bridge(engines, arch, component):
    """A hook that returns a new tensor changes the forward pass exactly as the bridge's does."""
    (native, _), (bridge, _) = engines[arch]
    ids = _ids(native.tokenizer, TEXTS[3])
    delta = torch.linspace(-1, 1, 32)

    def steer(x, hook=None):
        return x + delta

    name = f"blocks.1.hook_{component}"
    with torch.inference_mode():
        clean = native(ids)
        with native.hooks(fwd_hooks=[(name, steer)]):
            ours = native(ids)
        with bridge.hooks(fwd_hooks=[(name, steer)]):
            theirs = bridge(ids)
    assert (ours - clean).abs().max() > 1e-2
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=0)
    assert not native.model._forward_hooks and all(
        not m._forward_hooks for m in native.model.modules()
    )


def test_resid_mid_reads_but_refuses_replacement(engines):
    (native, _), _ = engines["qwen2"]
    ids = _ids(native.tokenizer, TEXTS[0])
    seen = []
    with (
        torch.inference_mode(),
        native.hooks(fwd_hooks=[("blocks.1.hook_resid_mid", lambda x, hook=None: seen.append(x))]),
    ):
        native(ids)
    assert seen and seen[0].shape == (1, ids.shape[1], 32)
    with pytest.raises(LayerscopeError, match="replacing resid_mid is not supported"):
        with (
            torch.inference_mode(),
            native.hooks(fwd_hooks=[("blocks.1.hook_resid_mid", lambda x, hook=None: x + 1)]),
        ):
            native(ids)


@pytest.mark.parametrize("arch", ["gpt2", "qwen2"])
def test_kv_cache_decoding_with_steering_equals_full_forward(engines, arch):
    """Incremental decoding through past_key_values, with a steering hook on, equals one full
    pass."""
    (native, _), _ = engines[arch]
    ids = _ids(native.tokenizer, TEXTS[2])
    delta = torch.linspace(-0.5, 0.5, 32)
    with (
        torch.inference_mode(),
        native.hooks(fwd_hooks=[("blocks.0.hook_resid_post", lambda x, hook=None: x + delta)]),
    ):
        full = native(ids)
        out = native(ids[:, :-3], use_cache=True, return_type="output")
        steps = [out.logits]
        for t in range(ids.shape[1] - 3, ids.shape[1]):
            out = native(
                ids[:, t : t + 1],
                past_key_values=out.past_key_values,
                use_cache=True,
                return_type="output",
            )
            steps.append(out.logits)
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-4, rtol=0)


# --- BOS from the model's own tokenizer files -----------------------------------------------------


@pytest.mark.parametrize(
    "kind, expected",
    [
        ("deepseek_r1_qwen", True),
        ("qwen2_5_instruct", False),
        ("gpt2", True),
        ("bos_not_added", False),
    ],
)
def test_bos_auto_follows_the_models_own_tokenizer(tmp_path, kind, expected):
    from transformers import AutoTokenizer

    mimic_tokenizer(kind).save_pretrained(tmp_path)
    tok = AutoTokenizer.from_pretrained(tmp_path)
    assert resolve_bos(tok, "auto") is expected
    assert TOKENIZER_KINDS[kind][0] == tok.bos_token


@pytest.mark.parametrize(
    "kind, expected", [("deepseek_r1_qwen", True), ("qwen2_5_instruct", False)]
)
@pytest.mark.parametrize("engine", ["native", "bridge"])
def test_qwen_bos_auto_on_both_engines(tmp_path, kind, expected, engine):
    """The bridge sets a Qwen2.5 tokenizer's BOS to its EOS; the BOS decision ignores that."""
    d = build_tiny_model(tmp_path / "m", "qwen2", tokenizer_kind=kind)
    model, info = load_engine(str(d), engine=engine, device="cpu")
    if engine == "bridge" and kind == "qwen2_5_instruct":
        assert model.tokenizer.bos_token == "<|im_end|>"  # what the bridge did to it
    cache_store(model, PIDS, TEXTS, LABELS, tmp_path / "s.h5", model_info=info, log=None)
    with h5py.File(tmp_path / "s.h5") as f:
        assert bool(f.attrs["prepend_bos"]) is expected
        assert f.attrs["self_check_max_diff"] < 1e-4


# --- the parity self-check ------------------------------------------------------------------------


def _table(tmp_path):
    import pandas as pd

    path = tmp_path / "prompts.csv"
    pd.DataFrame({"prompt_id": PIDS, "text": TEXTS, "label": LABELS}).to_csv(path, index=False)
    return path


def _perturb_attn_out(monkeypatch, layer=1, by=0.05):
    """Every engine hook on ``blocks.{layer}.hook_attn_out`` sees slightly wrong values."""
    from layerscope.engine.native import NativeEngine

    real = NativeEngine.hooks

    def hooks(self, fwd_hooks=()):
        name = f"blocks.{layer}.hook_attn_out"
        return real(
            self,
            [
                (
                    n,
                    (lambda f: lambda x, hook=None: f(x * (1 + by), hook=hook))(fn)
                    if n == name
                    else fn,
                )
                for n, fn in fwd_hooks
            ],
        )

    monkeypatch.setattr(NativeEngine, "hooks", hooks)


def test_self_check_fails_the_job_on_one_perturbed_hook(dirs, tmp_path, monkeypatch):
    table = _table(tmp_path)
    act = {"components": ["resid_post", "attn_out"], "poolings": ["mean", "last"]}
    cache_from_table(
        table,
        tmp_path / "ok.h5",
        model={"source": str(dirs["gpt2"])},
        activations=act,
        device="cpu",
        log=None,
    )
    with h5py.File(tmp_path / "ok.h5") as f:
        assert 0 <= f.attrs["self_check_max_diff"] < 1e-4 and f.attrs["self_check"] == 4
        assert (
            len(f.attrs["self_check_prompts"]) > 2 and '"q1"' in f.attrs["self_check_prompts"]
        )  # the shortest
    _perturb_attn_out(monkeypatch)
    logs = []
    with pytest.raises(
        LayerscopeError, match=r"architecture GPT2LMHeadModel, component attn_out, layer 1.*by \d"
    ):
        cache_from_table(
            table,
            tmp_path / "bad.h5",
            model={"source": str(dirs["gpt2"])},
            activations=act,
            device="cpu",
            log=logs.append,
        )
    assert not (tmp_path / "bad.h5").exists()  # nothing that looks complete
    assert any("parity self-check on 4 prompt(s)" in m for m in logs)
    # the switch turns it off: the (perturbed) job then completes
    cache_from_table(
        table,
        tmp_path / "off.h5",
        model={"source": str(dirs["gpt2"])},
        activations=act,
        device="cpu",
        log=None,
        self_check=0,
    )
    with h5py.File(tmp_path / "off.h5") as f:
        assert "self_check_max_diff" not in f.attrs


# --- out-of-memory halving ------------------------------------------------------------------------


def test_cuda_oom_halves_the_batch_and_keeps_results(engines, tmp_path, monkeypatch):
    (native, info), _ = engines["qwen2"]
    comps = ["resid_pre", "mlp_out", "resid_post"]
    kw = dict(
        components=comps,
        poolings=["mean", "last", "max"],
        token_level_layers=[1],
        batch_size=4,
        model_info=info,
        self_check=0,
    )
    cache_store(native, PIDS, TEXTS, LABELS, tmp_path / "ref.h5", log=None, **kw)
    real_call = type(native).__call__
    sizes = []

    def flaky(self, input_ids, *a, **k):
        sizes.append(input_ids.shape[0])
        if input_ids.shape[0] > 1:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real_call(self, input_ids, *a, **k)

    monkeypatch.setattr(type(native), "__call__", flaky)
    logs = []
    cache_store(native, PIDS, TEXTS, LABELS, tmp_path / "oom.h5", log=logs.append, **kw)
    assert any(
        "CUDA out of memory on a batch of 4 prompts" in m and "retrying it as 2 + 2" in m
        for m in logs
    )
    assert sizes.count(1) == len(TEXTS)
    with h5py.File(tmp_path / "ref.h5") as a, h5py.File(tmp_path / "oom.h5") as b:
        for c in comps:
            for p in ["mean", "last", "max"]:
                np.testing.assert_allclose(b[f"{c}/{p}"][()], a[f"{c}/{p}"][()], atol=1e-6, rtol=0)
        np.testing.assert_allclose(
            b["resid_pre/none/values"][()], a["resid_pre/none/values"][()], atol=1e-6
        )

    def always(self, input_ids, *a, **k):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(type(native), "__call__", always)
    with pytest.raises(
        LayerscopeError, match=r"CUDA out of memory on prompt q\d \(\d+ tokens\) alone"
    ):
        cache_store(native, PIDS, TEXTS, LABELS, tmp_path / "never.h5", log=None, **kw)
    assert not (tmp_path / "never.h5").exists()


# --- config ---------------------------------------------------------------------------------------


def test_engine_settings_in_the_config():
    import copy

    import yaml
    from conftest import REPO

    from layerscope.config import validate_config
    from layerscope.errors import ConfigError

    schema = REPO / "workflow/schemas/config.schema.yaml"
    demo = yaml.safe_load((REPO / "config/config.yaml").read_text())
    cfg = copy.deepcopy(demo)
    validate_config(cfg, schema, base_dir=REPO)
    m = cfg["models"]["demo"]
    assert (m["engine"], m["self_check"], m["max_tokens_per_batch"]) == ("auto", 4, None)
    for key, value, msg in [
        ("engine", "fast", "models.demo.engine"),
        ("self_check", -1, "models.demo.self_check"),
        ("max_tokens_per_batch", 0, "models.demo.max_tokens_per_batch"),
    ]:
        bad = copy.deepcopy(demo)
        bad["models"]["demo"][key] = value
        with pytest.raises(ConfigError, match=msg.replace(".", r"\.")):
            validate_config(bad, schema, base_dir=REPO)


def test_self_check_of_a_layout_the_native_table_does_not_know(dirs, tmp_path, monkeypatch):
    """Bridge-only architectures are still checked: resid_pre/resid_post against plain
    transformers; a component with no plain-transformers reference there is refused before any
    forward pass (never written unverified) unless the self-check is turned off."""
    from layerscope.engine import native as engine

    monkeypatch.delitem(engine.LAYOUTS, "gpt2")
    logs = []
    model, info = load_engine(
        str(dirs["gpt2"]), components=["resid_post", "attn_out"], device="cpu", log=logs.append
    )
    assert info["engine"] == "bridge" and "not in the native engine's layout table" in logs[0]

    def cache(comps, path, **kw):
        cache_store(
            model,
            PIDS,
            TEXTS,
            LABELS,
            path,
            components=comps,
            model_info=info,
            log=logs.append,
            **kw,
        )

    with pytest.raises(
        LayerscopeError,
        match=r"self-check cannot verify attn_out on architecture GPT2LMHeadModel.*self_check: 0",
    ):
        cache(["resid_post", "attn_out"], tmp_path / "refused.h5")
    assert not (tmp_path / "refused.h5").exists()
    cache(["resid_post"], tmp_path / "s.h5")
    with h5py.File(tmp_path / "s.h5") as f:
        assert f.attrs["self_check_max_diff"] < 1e-4
    cache(["resid_post", "attn_out"], tmp_path / "unchecked.h5", self_check=0)
    with h5py.File(tmp_path / "unchecked.h5") as f:
        assert "attn_out" in f and "self_check_max_diff" not in f.attrs
