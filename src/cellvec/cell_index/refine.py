"""Contrastive refinement: a small head that sharpens cell vectors into subtypes.

`supcon` (supervised contrastive, labels as positives) or `simclr` (self-supervised:
two augmented views of the same cell are the positives). Views are made from the
cell's top-gene weights: gene dropout, top-N subsampling and expression noise,
then re-aggregated over the gene vectors. Class-balanced sampling keeps rare
subtypes in every epoch; early stopping watches a held-out split; a seed fixes
the result. The trained head is plain arrays, applied with numpy at mapping time,
so mapping needs no torch.
"""

from __future__ import annotations

import logging

import numpy as np
import scipy.sparse as sp

from cellvec._progress import progress
from cellvec.cell_index.vectors import weighted_mean
from cellvec.errors import CellvecError
from cellvec.gene_store.embedders.base import normalise_rows

log = logging.getLogger(__name__)


def apply_head(params: dict[str, np.ndarray], x: np.ndarray) -> np.ndarray:
    """The refined vectors (unit length) of cell vectors `x`."""
    if not params:
        return x
    h = np.maximum(x @ params["w1"] + params["b1"], 0)
    out = h @ params["w2"] + params["b2"]
    if "skip" in params:
        out = out + x @ params["skip"]
    return normalise_rows(out.astype(np.float32, copy=False))


def augment(
    w: sp.csr_matrix,
    basis: np.ndarray,
    rng: np.random.Generator,
    *,
    dropout: float = 0.2,
    noise: float = 0.25,
) -> np.ndarray:
    """An augmented view: drop genes, jitter weights, re-aggregate, normalise."""
    data = w.data * rng.lognormal(0.0, noise, size=w.data.shape).astype(np.float32)
    data = data * (rng.random(w.data.shape) >= dropout)
    return weighted_mean(
        sp.csr_matrix((data.astype(np.float32), w.indices, w.indptr), shape=w.shape), basis
    )


def balanced_sampling_weights(labels: np.ndarray) -> np.ndarray:
    """Per-cell sampling probabilities giving every class the same total: a 3-cell subtype
    is drawn as often as a 3,000-cell one (with augmentation, so its views differ)."""
    _, codes, counts = np.unique(labels, return_inverse=True, return_counts=True)
    p = 1.0 / counts[codes]
    return p / p.sum()


def _contrastive_loss(z, labels, temperature: float):
    """SupCon loss; with `labels` = cell ids it is SimCLR's NT-Xent."""
    import torch

    sim = z @ z.T / temperature
    n = z.shape[0]
    eye = torch.eye(n, dtype=torch.bool, device=z.device)
    sim = sim.masked_fill(eye, -1e9)
    pos = (labels[:, None] == labels[None, :]) & ~eye
    log_prob = sim - torch.logsumexp(sim, dim=1, keepdim=True)
    npos = pos.sum(1).clamp(min=1)
    return -((log_prob * pos).sum(1) / npos).mean()


def _knn_macro_f1(ref, ref_y, q, q_y, k=15) -> float:
    """Macro-F1 of the same distance-weighted kNN vote that mapping uses."""
    from sklearn.metrics import f1_score

    from cellvec.cell_index.knn import exact_knn, vote

    idx, sim = exact_knn(q, ref, k)
    pred = vote(idx, sim, ref_y, int(max(ref_y.max(), q_y.max())) + 1).argmax(1)
    return float(f1_score(q_y, pred, average="macro"))


def train_head(
    w: sp.csr_matrix,
    basis: np.ndarray,
    labels: np.ndarray | None,
    *,
    mode: str = "supcon",
    out_dim: int = 128,
    hidden: int = 512,
    epochs: int = 60,
    batch_size: int = 256,
    temperature: float = 0.1,
    lr: float = 1e-3,
    patience: int = 8,
    val_fraction: float = 0.1,
    seed: int = 0,
    device: str | None = None,
    max_steps_per_epoch: int = 200,
    max_val_reference: int = 20_000,
) -> tuple[dict[str, np.ndarray], dict]:
    """Train a refinement head; returns (arrays for `apply_head`, training report).

    An epoch is at most `max_steps_per_epoch` batches and the held-out score uses at
    most `max_val_reference` training cells as kNN reference, so 100k cells train in
    minutes on a CPU.
    """
    import torch

    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    n, d = w.shape[0], basis.shape[1]
    supervised = mode == "supcon"
    if supervised and labels is None:
        raise CellvecError(
            "Supervised refinement (supcon) needs cell labels: give a --label-key, "
            "or use --refine simclr, which learns from the cells alone."
        )
    y = np.zeros(n, dtype=np.int64)
    if labels is not None:
        _, y = np.unique(np.asarray(labels).astype(str), return_inverse=True)

    # Held-out split for early stopping: stratified, classes with < 5 cells stay in training.
    val = np.zeros(n, dtype=bool)
    for c in np.unique(y):
        idx = np.flatnonzero(y == c)
        if len(idx) >= 5:
            val[rng.choice(idx, max(1, int(round(len(idx) * val_fraction))), replace=False)] = True
    tr = np.flatnonzero(~val)
    va = np.flatnonzero(val)
    clean = weighted_mean(w, basis) if supervised else None

    p = balanced_sampling_weights(y[tr]) if supervised else np.full(len(tr), 1.0 / len(tr))

    model = torch.nn.Sequential(
        torch.nn.Linear(d, hidden), torch.nn.ReLU(), torch.nn.Linear(hidden, out_dim)
    ).to(device)
    skip = torch.nn.Linear(d, out_dim, bias=False).to(device)
    params = list(model.parameters()) + list(skip.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=1e-4)

    def forward(x):
        return torch.nn.functional.normalize(model(x) + skip(x), dim=1)

    def snapshot():
        lin1, lin2 = model[0], model[2]
        return {
            "w1": lin1.weight.detach().cpu().numpy().T.copy(),
            "b1": lin1.bias.detach().cpu().numpy().copy(),
            "w2": lin2.weight.detach().cpu().numpy().T.copy(),
            "b2": lin2.bias.detach().cpu().numpy().copy(),
            "skip": skip.weight.detach().cpu().numpy().T.copy(),
        }

    steps = min(max_steps_per_epoch, max(1, int(np.ceil(len(tr) / batch_size))))
    val_ref = (
        tr
        if len(tr) <= max_val_reference
        else np.sort(rng.choice(tr, max_val_reference, replace=False))
    )
    va = (
        va
        if len(va) <= max_val_reference // 2
        else np.sort(rng.choice(va, max_val_reference // 2, replace=False))
    )
    best, best_score, since, history = None, -np.inf, 0, []
    with progress(total=epochs, desc=f"refine ({mode})", unit="epoch") as bar:
        for epoch in range(epochs):
            model.train()
            total = 0.0
            for _ in range(steps):
                b = rng.choice(tr, size=min(batch_size, len(tr)), replace=True, p=p)
                v1 = torch.from_numpy(augment(w[b], basis, rng)).to(device)
                v2 = torch.from_numpy(augment(w[b], basis, rng)).to(device)
                z = forward(torch.cat([v1, v2]))
                lab = torch.from_numpy(
                    np.concatenate([y[b], y[b]])
                    if supervised
                    else np.concatenate([np.arange(len(b))] * 2)
                ).to(device)
                loss = _contrastive_loss(z, lab, temperature)
                opt.zero_grad()
                loss.backward()
                opt.step()
                total += loss.item()
            model.eval()
            with torch.no_grad():
                if len(va) and supervised:
                    idx = np.concatenate([val_ref, va])
                    emb = forward(torch.from_numpy(clean[idx]).to(device)).cpu().numpy()
                    score = _knn_macro_f1(
                        emb[: len(val_ref)], y[val_ref], emb[len(val_ref) :], y[va]
                    )
                elif len(va):
                    v1 = torch.from_numpy(augment(w[va], basis, rng)).to(device)
                    v2 = torch.from_numpy(augment(w[va], basis, rng)).to(device)
                    lab = torch.from_numpy(np.concatenate([np.arange(len(va))] * 2)).to(device)
                    score = -float(
                        _contrastive_loss(forward(torch.cat([v1, v2])), lab, temperature)
                    )
                else:
                    score = -total / steps
            history.append(
                {"epoch": epoch + 1, "loss": round(total / steps, 4), "val": round(score, 4)}
            )
            bar.set_postfix(loss=f"{total / steps:.3f}", val=f"{score:.3f}")
            bar.update(1)
            if score > best_score + 1e-4:
                best, best_score, since = snapshot(), score, 0
                if supervised and score >= 1.0:
                    break  # a perfect held-out score leaves nothing to gain
            else:
                since += 1
                if since >= patience:
                    break
    report = {
        "mode": mode,
        "epochs_run": len(history),
        "best_val": round(float(best_score), 4),
        "n_train": int(len(tr)),
        "n_val": int(len(va)),
        "seed": seed,
        "history": history,
    }
    log.info("Refinement (%s): %d epochs, best held-out score %.3f", mode, len(history), best_score)
    return best, report
