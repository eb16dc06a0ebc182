"""Causal test of probe directions (issue 20): a constructed model whose answer reads one planted
direction; a second planted direction carries the label too (decodable) but nothing reads it."""

from __future__ import annotations

from contextlib import contextmanager

import numpy as np
import pytest
import torch

from layerscope.interventions import probe_causal as C
from layerscope.interventions.steering import SteeringPrompts

D, V = 32, 8
HOOK = "blocks.0.hook_resid_post"


class _Toy:
    """Residual = running mean of token embeddings, one hook point, logits = residual @ U.T.

    The answer tokens' unembedding differs only along ``u_causal`` (the model reads it); every
    prompt token carries ``+u_causal + u_unused`` for the positive class and the opposite for the
    negative class, so both directions decode the label from the residual."""

    def __init__(self, seed=0):
        g = torch.Generator().manual_seed(seed)
        q, _ = torch.linalg.qr(torch.randn(D, D, generator=g, dtype=torch.float64))
        self.u_causal, self.u_unused = q[:, 0], q[:, 1]
        noise = 0.3 * torch.randn(V, D, generator=g, dtype=torch.float64) @ q[:, 2:] @ q[:, 2:].T
        self.E = noise
        self.E[1] += self.u_causal + self.u_unused  # token 1: the "true" token
        self.E[2] -= self.u_causal + self.u_unused  # token 2: the "false" token
        self.U = 0.1 * torch.randn(V, D, generator=g, dtype=torch.float64) @ q[:, 2:] @ q[:, 2:].T
        self.U[5] += 3 * self.u_causal  # answer a
        self.U[6] -= 3 * self.u_causal  # answer b
        self.model = torch.nn.Linear(1, 1)  # where model_device looks for the device
        self._hooks = []

    @contextmanager
    def hooks(self, fwd_hooks=()):
        self._hooks = list(fwd_hooks)
        try:
            yield self
        finally:
            self._hooks = []

    def __call__(self, ids, attention_mask=None, return_type="logits"):
        x = self.E[ids]
        x = x.cumsum(1) / torch.arange(1, ids.shape[1] + 1, dtype=x.dtype)[None, :, None]
        for name, fn in self._hooks:
            if name == HOOK:
                x = fn(x, hook=None)
        return x @ self.U.T


def _prompts():
    rng = np.random.default_rng(0)
    # held-out prompts that "know" the answer: mostly true tokens, the correct answer is a (5)
    ids = [[0, *rng.choice([1, 1, 3, 4], size=4).tolist()] for _ in range(12)]
    return SteeringPrompts(
        [f"p{i}" for i in range(12)], ids, np.full(12, 5), np.full(12, 6), [], True
    )


def test_planted_causal_direction_is_causal_and_unused_one_is_not():
    toy = _Toy()
    table = C.causal_test(
        toy,
        _prompts(),
        0,
        {"causal": toy.u_causal.numpy(), "unused": toy.u_unused.numpy()},
        hook=HOOK,
        alpha=1.0,
        scale=1.0,
        n_random=20,
    )
    got = {(r.direction, r.effect): r for r in table.itertuples()}
    for eff in ("ablation", "addition"):
        assert got[("causal", eff)].outcome == "intended"
        assert got[("unused", eff)].outcome == "inside"
        # the unused direction changes nothing the readout sees
        assert got[("unused", eff)].value == pytest.approx(0.0, abs=1e-9)
    assert got[("causal", "ablation")].value < got[("causal", "ablation")].band_low
    assert C.verdict(table[table.direction == "causal"].outcome) == "causal"
    assert C.verdict(table[table.direction == "unused"].outcome) == "correlational only"
    # the negated direction is the opposite on both effects
    neg = C.causal_test(
        toy, _prompts(), 0, {"neg": -toy.u_causal.numpy()}, hook=HOOK, alpha=1.0, scale=1.0
    )
    assert C.verdict(neg.outcome) in ("opposite", "mixed")
    assert (neg[neg.effect == "addition"].outcome == "opposite").all()


def test_ablation_hook_equals_an_independent_projection():
    toy = _Toy()
    p = _prompts()
    u = toy.u_causal
    ids = torch.tensor(p.ids)
    with toy.hooks([(HOOK, C.ablation_hook(u))]):
        hooked = toy(ids)
    x = toy.E[ids].cumsum(1) / torch.arange(1, ids.shape[1] + 1, dtype=torch.float64)[None, :, None]
    x = x - torch.einsum("btd,d->bt", x, u)[..., None] * u[None, None, :]
    assert torch.allclose(hooked, x @ toy.U.T, atol=1e-12)


def test_verdict_words():
    assert C.verdict(["inside", "inside"]) == "correlational only"
    assert C.verdict(["intended", "inside"]) == "causal"
    assert C.verdict(["opposite", "inside"]) == "opposite"
    assert C.verdict(["opposite", "intended"]) == "mixed"


def test_batched_directions_equal_one_at_a_time():
    """All directions share the batches; each must get exactly what it gets alone."""
    toy = _Toy()
    sp = _prompts()
    from layerscope.interventions.steering import forward_logits, logit_diffs

    ld0 = logit_diffs(forward_logits(toy, sp.ids, batch_size=5), sp.positive_id, sp.negative_id)
    rng = np.random.default_rng(1)
    U = rng.standard_normal((4, D))
    U /= np.linalg.norm(U, axis=1, keepdims=True)
    kw = dict(alpha=0.7, scale=1.3, ld0=ld0, batch_size=24, pad_id=0)  # 2 directions a batch
    together = C.direction_effects(toy, sp, HOOK, U, **kw)
    alone = [C.direction_effects(toy, sp, HOOK, U[i : i + 1], **kw)[0] for i in range(4)]
    for t, a in zip(together, alone):
        assert t == pytest.approx(a, rel=1e-12, abs=1e-12)
