"""Store size estimates and the free-space check (shutil.disk_usage monkeypatched)."""

from __future__ import annotations

import re
import shutil
from collections import namedtuple

import pytest

from layerscope.engine import diskspace
from layerscope.engine.diskspace import (
    MARGIN_BYTES,
    OVERHEAD_BYTES,
    PER_PROMPT_BYTES,
    check_free_space,
    estimate_store_bytes,
    existing_ancestor,
    human_bytes,
)
from layerscope.errors import LayerscopeError

GiB = 1 << 30
Usage = namedtuple("Usage", "total used free")


def fake_usage(monkeypatch, free, calls=None):
    def disk_usage(path):
        if calls is not None:
            calls.append(path)
        return Usage(total=10 * free + 1, used=9 * free + 1, free=free)

    monkeypatch.setattr(shutil, "disk_usage", disk_usage)


def test_estimate_counts_pooled_token_and_metadata_bytes():
    pooled = estimate_store_bytes(28, 1000, 1536, 2, 3, itemsize=4)
    assert pooled == 2 * 3 * 28 * 1000 * 1536 * 4 + OVERHEAD_BYTES + PER_PROMPT_BYTES * 1000
    with_tokens = estimate_store_bytes(
        28, 1000, 1536, 2, 3, n_token_rows=50_000, n_token_layers=2, itemsize=2
    )
    half = estimate_store_bytes(28, 1000, 1536, 2, 3, itemsize=2)
    tokens = 2 * (2 * 50_000 * 1536 * 2 + 1001 * 8) + 50_000 * 8
    assert with_tokens == half + tokens
    # token rows without token-level layers store nothing
    assert estimate_store_bytes(28, 1000, 1536, 2, 3, 50_000, 0, 2) == half
    # positional order of the signature
    assert (
        estimate_store_bytes(2, 10, 8, 1, 1, 40, 1, 4)
        == 2 * 10 * 8 * 4 + (40 * 8 * 4 + 11 * 8) + 40 * 8 + OVERHEAD_BYTES + PER_PROMPT_BYTES * 10
    )


@pytest.mark.parametrize("bad", [-1, 1.5, "3", True])
def test_estimate_rejects_bad_counts(bad):
    with pytest.raises(ValueError, match="n_prompts"):
        estimate_store_bytes(2, bad, 8, 1, 1)


def test_human_bytes():
    assert human_bytes(0) == "0 B"
    assert human_bytes(1023) == "1023 B"
    assert human_bytes(1536) == "1.5 KiB"
    assert human_bytes(64 << 20) == "64.0 MiB"
    assert human_bytes(3.3 * GiB) == "3.3 GiB"
    assert human_bytes(2 << 40) == "2.0 TiB"


def test_enough_space_passes_and_returns_free(monkeypatch, tmp_path):
    fake_usage(monkeypatch, free=100 * GiB)
    assert check_free_space(tmp_path, 10 * GiB, "the store") == 100 * GiB


def test_not_enough_space_names_dir_what_and_both_sizes(monkeypatch, tmp_path):
    fake_usage(monkeypatch, free=int(1.5 * GiB))
    with pytest.raises(LayerscopeError) as info:
        check_free_space(tmp_path, 2 * GiB, "the activation store of demo/tasks")
    msg = str(info.value)
    assert msg.startswith(
        f"not enough free space in {tmp_path} for the activation store of demo/tasks: "
    )
    needed = human_bytes(2 * GiB * 1.05 + MARGIN_BYTES)
    assert f"needs ~{needed} (estimated), 1.5 GiB free" in msg
    assert needed == "2.1 GiB"  # 2 GiB plus 5% (and 1 MiB of slack)


def test_margin_is_required(monkeypatch, tmp_path):
    need = 1 * GiB
    fake_usage(monkeypatch, free=need)  # exactly the estimate: no room for the margin
    with pytest.raises(LayerscopeError, match="not enough free space"):
        check_free_space(tmp_path, need, "x")
    fake_usage(monkeypatch, free=int(need * 1.05) + MARGIN_BYTES)
    check_free_space(tmp_path, need, "x")
    fake_usage(monkeypatch, free=MARGIN_BYTES - 1)
    with pytest.raises(LayerscopeError, match=r"needs ~1\.0 MiB \(estimated\), 1024\.0 KiB free"):
        check_free_space(tmp_path, 0, "x")


def test_missing_directory_asks_its_nearest_existing_ancestor(monkeypatch, tmp_path):
    calls = []
    fake_usage(monkeypatch, free=10 * GiB, calls=calls)
    target = tmp_path / "results" / "activations" / "demo" / "tasks"
    check_free_space(target, GiB, "store")
    assert [str(p) for p in calls] == [str(tmp_path)]
    assert not (tmp_path / "results").exists()  # nothing created
    fake_usage(monkeypatch, free=GiB)
    with pytest.raises(
        LayerscopeError,
        match=re.escape(f"in {target} for store") + r".* free on " + re.escape(str(tmp_path)),
    ):
        check_free_space(target, 5 * GiB, "store")


def test_existing_ancestor(tmp_path, monkeypatch):
    (tmp_path / "a").mkdir()
    assert existing_ancestor(tmp_path / "a") == tmp_path / "a"
    assert existing_ancestor(tmp_path / "a" / "b" / "c") == tmp_path / "a"
    monkeypatch.chdir(tmp_path)
    assert existing_ancestor("a/x/y") == tmp_path / "a"


def test_negative_need_is_a_bug(tmp_path):
    with pytest.raises(ValueError):
        check_free_space(tmp_path, -1, "x")


def test_real_disk_usage_on_this_machine(tmp_path):
    free = check_free_space(tmp_path / "new", 0, "nothing")
    assert free > 0
    assert diskspace.required_bytes(0) == MARGIN_BYTES


def test_margin_is_proportional_so_a_small_store_fits_a_small_disk(monkeypatch, tmp_path):
    """A 1.3 MB store on a disk with 3 MB free is fine (a fixed 64 MiB margin used to refuse it);
    a 10 GiB store still needs its 5% on top."""
    store = 1_300_000
    fake_usage(monkeypatch, free=3_000_000)
    check_free_space(tmp_path, store, "a small store")
    assert diskspace.required_bytes(store) < 2 * store
    fake_usage(monkeypatch, free=10 * GiB + 100 * (1 << 20))
    with pytest.raises(LayerscopeError, match="not enough free space"):
        check_free_space(tmp_path, 10 * GiB, "a big store")
