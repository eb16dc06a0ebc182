"""Tuned lens (Belrose et al. 2023): one affine translator per layer, ``h -> h @ A.T + b``, trained
so that the final norm and unembedding of the translated residual match the model's final
distribution (loss: KL(final || lens), averaged over token positions of the training prompts).

Translators start at the identity (the logit lens) and are trained by Adam on minibatches of token
positions; the target distribution is recomputed from the last layer's residual for each minibatch,
so vocabulary-sized arrays exist for ``batch_tokens`` positions only. The held-out KL per layer,
beside the logit lens's, is the lens's own check (results/trajectories/.../lens_kl.csv).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import numpy as np


def train_translators(
    resid: Mapping[int, object],
    final_h,
    readout: Callable,
    *,
    steps: int,
    lr: float,
    batch_tokens: int,
    seed: int = 0,
) -> tuple[dict[int, tuple[np.ndarray, np.ndarray]], dict[int, float]]:
    """Translators ``{layer: (A [d, d], b [d])}`` for the token-level residuals ``resid[layer]``
    ``[N, d]`` against the final-layer residuals ``final_h`` ``[N, d]`` (same positions), and the
    last step's training KL per layer."""
    import torch

    gen = torch.Generator().manual_seed(int(seed))
    layers = sorted(resid)
    d = final_h.shape[-1]
    dev = final_h.device
    A = {L: torch.zeros((d, d), device=dev, requires_grad=True) for L in layers}
    b = {L: torch.zeros(d, device=dev, requires_grad=True) for L in layers}
    opt = torch.optim.Adam([*A.values(), *b.values()], lr=lr)
    eye = torch.eye(d, device=dev)
    n = final_h.shape[0]
    last: dict[int, float] = {}
    for _ in range(int(steps)):
        idx = torch.randint(0, n, (min(batch_tokens, n),), generator=gen).to(dev)
        with torch.no_grad():
            target = torch.log_softmax(readout(final_h[idx]).float(), dim=-1)
        opt.zero_grad()
        total = 0.0
        for L in layers:
            h = resid[L][idx].float()
            lp = torch.log_softmax(readout(h @ (eye + A[L]).T + b[L]).float(), dim=-1)
            kl = (target.exp() * (target - lp)).sum(-1).mean()
            total = total + kl
            last[L] = float(kl.detach())
        total.backward()
        opt.step()
    out = {L: ((eye + A[L]).detach().cpu().numpy(), b[L].detach().cpu().numpy()) for L in layers}
    return out, last


def translator_fn(translators: Mapping[int, tuple[np.ndarray, np.ndarray]], device) -> Callable:
    """``f(layer, h) = h @ A.T + b`` of trained translators (float32 on ``device``)."""
    import torch

    mats = {
        int(L): (
            torch.as_tensor(A, dtype=torch.float32, device=device),
            torch.as_tensor(b, dtype=torch.float32, device=device),
        )
        for L, (A, b) in translators.items()
    }

    def apply(layer: int, h):
        A, b = mats[layer]
        return h.float() @ A.T + b

    return apply


def save_translators(path, translators, meta: Mapping[str, object]) -> None:
    """Write translators to an ``.npz`` (``A_{L}``, ``b_{L}`` and JSON ``meta``) atomically."""
    import json

    from layerscope.atomic import atomic_path

    arrays = {}
    for L, (A, b) in translators.items():
        arrays[f"A_{L}"], arrays[f"b_{L}"] = A, b
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, meta=np.asarray(json.dumps(dict(meta), sort_keys=True)), **arrays)


def load_translators(path) -> tuple[dict[int, tuple[np.ndarray, np.ndarray]], dict]:
    """Translators and meta written by :func:`save_translators`."""
    import json

    with np.load(path) as z:
        meta = json.loads(str(z["meta"]))
        layers = sorted(int(k[2:]) for k in z.files if k.startswith("A_"))
        return {L: (z[f"A_{L}"], z[f"b_{L}"]) for L in layers}, meta
