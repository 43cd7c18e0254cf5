"""Refinement: learn, on the labelled reference, what separates its subtypes.

A cell vector is `normalise(W @ A - c)`, where `W` holds each cell's top-gene
weights and `A` the gene vectors. Refinement fits, on the reference alone:

- gene gates and corrections: `A = exp(a) * (E + D)`, with `E` the language-model
  gene vectors (background-transformed), a per-gene log-gate `a` (housekeeping
  genes every cell expresses can be turned down) and a per-gene correction `D`
  kept close to zero by an L2 penalty relative to `E` (the text stays the prior);
- the reference's mean cell vector `c` (the background all cells share);
- a small head (MLP plus a linear skip) on the unit vectors.

All of it is trained end to end with a supervised contrastive loss (`supcon`,
labels as positives) or SimCLR's (`simclr`, two views of a cell as positives).
Views drop a random share of each cell's genes (the share itself drawn per cell,
so the result holds when a query measures fewer genes) and jitter the weights.
Batches draw each class in proportion to the square root of its size, so a 3-cell
subtype is drawn far above its share without its few cells being replayed into
over-fitting. Training runs a fixed number of steps (`default_steps`; no early stopping
on a few dozen held-out cells, which measured as noise) on a cosine-decayed learning
rate, with a fixed seed and thread count, so a
seed gives the same arrays on any machine (Intel x86-64 with AVX2: `cellvec._kernels`
pins the matrix kernels). The result is plain
arrays, applied with numpy: mapping needs no torch.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import time
from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp

from cellvec._progress import progress
from cellvec.cell_index.recipe import Recipe
from cellvec.cell_index.vectors import rows_summing_to_one, weighted_mean
from cellvec.errors import CellvecError
from cellvec.gene_store.embedders.base import normalise_rows

log = logging.getLogger(__name__)

HEAD_KEYS = ("w1", "b1", "w2", "b2", "skip")
TRAIN_THREADS = 1  # fixed: the same seed gives the same arrays whatever the cores (and 2 threads were slower on a shared 2-core machine)


def adapted_basis(basis: np.ndarray, params: dict[str, np.ndarray]) -> np.ndarray:
    """Gene vectors after the learned gates and corrections (`basis` rows = `params` genes)."""
    out = basis
    if "gene_delta" in params:
        out = out + params["gene_delta"]
    if "gene_gate" in params:
        out = out * params["gene_gate"][:, None]
    return np.asarray(out, dtype=np.float32)


def apply_head(params: dict[str, np.ndarray], x: np.ndarray) -> np.ndarray:
    """The refined vectors (unit length) of unit cell vectors `x`; `x` itself without a head."""
    if "w1" not in params:
        return x
    h = np.maximum(x @ params["w1"] + params["b1"], 0)
    out = h @ params["w2"] + params["b2"]
    if "skip" in params:
        out = out + x @ params["skip"]
    return normalise_rows(out.astype(np.float32, copy=False))


def encode_weights(
    w: sp.csr_matrix, basis: np.ndarray, params: dict[str, np.ndarray]
) -> np.ndarray:
    """Final cell vectors of top-gene weights `w` (cells x genes of `basis`) under `params`."""
    return apply_head(
        params, weighted_mean(w, adapted_basis(basis, params), params.get("cell_mean"))
    )


def reference_mean(w: sp.csr_matrix, basis: np.ndarray) -> np.ndarray:
    """The mean unnormalised cell vector of a reference: the background all its cells share."""
    return np.asarray(w.mean(axis=0) @ basis, dtype=np.float32).ravel()


def balanced_sampling_weights(labels: np.ndarray, power: float = 1.0) -> np.ndarray:
    """Per-cell sampling probabilities: with `power` 1 every class gets the same total (a
    3-cell subtype is drawn as often as a 3,000-cell one, with augmentation so its views
    differ); 0 draws cells uniformly; in between, classes are drawn as size**(1 - power)."""
    _, codes, counts = np.unique(labels, return_inverse=True, return_counts=True)
    p = counts[codes].astype(np.float64) ** -power
    return p / p.sum()


def augment_weights(
    w: sp.csr_matrix,
    rng: np.random.Generator,
    *,
    dropout: tuple[float, float] = (0.1, 0.6),
    noise: float = 0.25,
    level_shift: float = 0.0,
) -> sp.csr_matrix:
    """A view of top-gene weights: each cell loses a share of its genes drawn from
    `dropout` (low, high), the weights that stay are jittered (log-normal `noise`)
    and sum to 1 again, as a query's top-gene weights over fewer genes do. With
    `level_shift`, each gene's weight is then multiplied by one log-normal factor (sigma
    `level_shift`) shared by all the cells of `w` (a training batch), as another species
    or protocol moves a gene's level in every cell; rows sum to 1 again."""
    counts = np.diff(w.indptr)
    rate = rng.uniform(dropout[0], dropout[1], size=w.shape[0])
    keep = rng.random(w.data.shape) >= np.repeat(rate, counts)
    v = rows_summing_to_one(w, w.data * rng.lognormal(0.0, noise, size=w.data.shape) * keep)
    if level_shift > 0:
        factor = np.exp(rng.normal(0.0, level_shift, size=w.shape[1]))
        v = rows_summing_to_one(v, v.data * factor[v.indices])
    return v


def default_steps(n_cells: int, batch_size: int = 256) -> int:
    """40 passes over the reference, at least 400 and at most 2,000 steps.

    Measured: a fixed ~400 steps beat early stopping on small references by
    0.02-0.08 macro-F1 (EVIDENCE.md). The loss still falls until ~800 steps, but 800
    did not generalise better: amacrine 0.929 -> 0.941 and pbmc_3chem 0.884 -> 0.896,
    yet pbmc3k 0.911 -> 0.906 and pbmc68k_reduced 0.690 -> 0.665 (classes of 8-19
    cells overfit); results/steps800/. With the cosine-decayed rate of today's
    defaults, 800 steps still did not beat 400 (mean 0.865 both, 4 sets x 3 seeds,
    results/refine_variants.md). 2,000 steps keep 100k cells within minutes.
    """
    return int(np.clip(40 * np.ceil(n_cells / batch_size), 400, 2000))


@contextlib.contextmanager
def _torch_threads(n: int):
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@functools.cache
def _sparse_product():
    import torch

    class SparseProduct(torch.autograd.Function):
        """`w @ a` for a scipy CSR `w` (no gradient) and a dense tensor `a`: the product
        and its gradient `w.T @ grad` cost one pass over the non-zeros, where a dense
        batch matrix costs cells x genes."""

        @staticmethod
        def forward(ctx, w, a):
            ctx.w = w
            return torch.from_numpy(np.asarray(w @ a.detach().numpy(), dtype=np.float32))

        @staticmethod
        def backward(ctx, grad):
            # the transpose as CSR first: its product is 2x faster than the CSC view's
            out = ctx.w.T.tocsr() @ grad.numpy()
            return None, torch.from_numpy(np.ascontiguousarray(out, dtype=np.float32))

    return SparseProduct


class _GeneAdapter:
    """The gene gates and corrections, `A = exp(a) * (E + D)`, trained with their
    gradients written out by hand.

    The corrected vectors `F = E + D` are the trained tensor (the penalty on `D` is
    one on `F - E`), and a gate scales its gene's weights in the batch's sparse matrix
    rather than its 384-d vector. A step then gathers `F` at the batch's genes once,
    as the head alone gathers `E`, and `backward` turns the gradient of those rows
    into the gradients of `F` and `a`. Autograd gave the same gradients but built
    several fresh genes x dim tensors a step (the gather, the gate, the penalty): 3x
    the head's time at 15,000 genes. tests/test_refine_evaluate.py checks the
    gradients against autograd's. AdamW's decoupled weight decay (1e-4 x the rate, on
    `D` before) is not applied to `F`: on `D` it shrank it by < 2e-4 over 2,000 steps,
    next to the L2 penalty that keeps it small."""

    def __init__(self, e, *, delta_penalty: float, gate_penalty: float):
        import torch

        self.e = e
        self.e_scale = float((e**2).sum()) or 1.0
        self.delta_penalty, self.gate_penalty = delta_penalty, gate_penalty
        self.log_gate = torch.zeros(len(e))
        self.vectors = e.clone()  # F = E + D
        self._gate_grad = torch.zeros(len(e))
        self._vector_grad = torch.zeros_like(e)
        self._c = 2 * delta_penalty / self.e_scale  # the penalty's gradient is c * (F - E)
        self._neg_ce = -self._c * e

    def gates(self, genes: np.ndarray) -> np.ndarray:
        """`exp(a)` of the genes at positions `genes`."""
        return np.exp(self.log_gate.numpy()[genes])

    def rows(self, g):
        """`F[g]` for gene positions `g` (unique), as a leaf tensor that takes a gradient."""
        import torch

        self._g = g
        return torch.index_select(self.vectors, 0, g).requires_grad_()

    def penalty(self) -> float:
        """The L2 penalties (D relative to E's scale; the log-gates' mean square)."""
        return float(
            self.delta_penalty * ((self.vectors - self.e) ** 2).sum() / self.e_scale
            + self.gate_penalty * (self.log_gate**2).mean()
        )

    def backward(self, rows) -> None:
        """Set the gradients of `F` and `a` from that of `rows` = `rows(g)`, which a
        product with the gate-scaled weights used, plus the penalties'. The gradient of
        a log-gate is its gene's rows' gradient . F (the gate is already in it)."""
        import torch

        with torch.no_grad():
            # c * (F - E) in one pass, as -cE + c * F
            torch.add(self._neg_ce, self.vectors, alpha=self._c, out=self._vector_grad)
            self._vector_grad.index_add_(0, self._g, rows.grad)
            torch.mul(
                self.log_gate, 2 * self.gate_penalty / len(self.log_gate), out=self._gate_grad
            )
            self._gate_grad.index_add_(0, self._g, torch.linalg.vecdot(rows.grad, rows))
        self.vectors.grad, self.log_gate.grad = self._vector_grad, self._gate_grad

    def arrays(self) -> tuple[np.ndarray, np.ndarray]:
        """The trained gates and corrections `D` (over the trained genes)."""
        return np.exp(self.log_gate.numpy()), (self.vectors - self.e).numpy()


def _contrastive_loss(z, labels, temperature: float):
    """SupCon loss; with `labels` = cell ids it is SimCLR's NT-Xent."""
    import torch

    sim = z @ z.T / temperature
    n = z.shape[0]
    eye = torch.eye(n, dtype=torch.bool, device=z.device)
    sim = sim.masked_fill(eye, -1e9)
    pos = (labels[:, None] == labels[None, :]) & ~eye
    log_prob = sim - torch.logsumexp(sim, dim=1, keepdim=True)
    has_pos = pos.any(1)
    npos = pos.sum(1).clamp(min=1)
    per_cell = -(log_prob * pos).sum(1) / npos
    return per_cell[has_pos].mean() if bool(has_pos.any()) else per_cell.sum() * 0


# The range each number of `RefineOptions` must lie in: a refinement that runs in minutes
# to hours, so that options read back from an atlas's metadata (an imported bundle's too)
# cannot ask for days of training or terabytes of memory.
_BOUNDS = {
    "steps": (1, 100_000),
    "batch_size": (2, 65_536),
    "out_dim": (1, 4_096),
    "hidden": (1, 16_384),
    "temperature": (1e-3, 10.0),
    "lr": (0.0, 1.0),
    "delta_penalty": (0.0, 1e3),
    "gate_penalty": (0.0, 1e3),
    "noise": (0.0, 3.0),
    "balance": (0.0, 1.0),
    "level_shift": (0.0, 3.0),
}
_HINTS = {
    "level_shift": " (a log-normal sigma: 0 is off, about 1 for an atlas that maps another species)"
}


@dataclass(frozen=True)
class RefineOptions:
    """How refinement trains; the recipe says whether, and what (`refine`, `adapt_genes`,
    `center`). `steps` None: `default_steps` of the reference's size.

    Defaults measured over 4 labelled sets x 3 seeds (`benchmarks/refine_variants.py`,
    results/refine_variants.md): a cosine-decayed learning rate, classes drawn as
    size**0.5 (`balance` 0.5: rare classes still drawn far above their share, but
    their few cells are not replayed into over-fitting) and temperature 0.2 gave
    mean macro-F1 0.865 against 0.850 for constant rate, full balance and 0.1.

    `level_shift` (0: off): training views whose genes' levels shift together across a
    batch (`augment_weights`), so that the head does not key on a gene's level where a
    species moves it. For an atlas that maps another species: on the Baron pancreas
    pair with `--weighting softmax`, 1.0 gained in both directions over 3 seeds
    (README, "A real pair").
    """

    steps: int | None = None
    batch_size: int = 256
    out_dim: int = 128
    hidden: int = 512
    temperature: float = 0.2
    lr: float = 1e-3
    delta_penalty: float = 1.0
    gate_penalty: float = 0.01
    dropout: tuple[float, float] = (0.1, 0.6)
    noise: float = 0.25
    balance: float = 0.5
    schedule: str = "cosine"
    level_shift: float = 0.0

    def __post_init__(self):
        if self.schedule not in ("constant", "cosine"):
            raise CellvecError(f"Unknown schedule {self.schedule!r}; choose constant or cosine.")
        if not (isinstance(self.dropout, tuple) and len(self.dropout) == 2):
            raise CellvecError(f"Refinement dropout {self.dropout!r}: give (low, high).")
        given = {name: getattr(self, name) for name in _BOUNDS}
        given.update(dropout_low=self.dropout[0], dropout_high=self.dropout[1])
        for name, value in given.items():
            low, high = _BOUNDS.get(name, (0.0, 1.0))
            if value is None and name == "steps":
                continue  # default_steps of the reference's size
            try:
                ok = low <= float(value) <= high  # False for NaN
            except (TypeError, ValueError):
                ok = False
            if not ok:
                raise CellvecError(
                    f"Refinement option {name} {value!r} is not a number from {low:g} to "
                    f"{high:g}{_HINTS.get(name, '')}."
                )
        if self.dropout[0] > self.dropout[1]:
            raise CellvecError(f"Refinement dropout {self.dropout!r}: give (low, high).")

    @classmethod
    def from_dict(cls, options: dict | None) -> RefineOptions:
        """Options given by name (`BuildOptions.refine_options`, an atlas's
        `meta["refine_options"]`, read back from JSON); a name that is not an option is
        refused with the ones that are."""
        if options is not None and not isinstance(options, dict):
            raise CellvecError(f"refine_options {options!r}: give them by name, as a dict.")
        options = dict(options or {})
        known = sorted(cls.__dataclass_fields__)
        unknown = sorted(set(options) - set(known))
        if unknown:
            raise CellvecError(
                f"refine_options {', '.join(unknown)}: not refinement options; choose from "
                f"{', '.join(known)}."
            )
        if isinstance(options.get("dropout"), list):  # JSON has no tuples
            options["dropout"] = tuple(options["dropout"])
        return cls(**options)


def fit_refinement(
    w: sp.csr_matrix,
    basis: np.ndarray,
    labels: np.ndarray | None,
    *,
    recipe: Recipe | None = None,
    options: RefineOptions | None = None,
    seed: int = 0,
    head: dict[str, np.ndarray] | None = None,
) -> tuple[dict[str, np.ndarray], dict]:
    """Fit refinement on top-gene weights `w` (cells x genes) over gene vectors `basis`.

    Returns (arrays for `encode_weights`, report). The recipe (default `Recipe()`) says
    what is fitted: `refine` none fits only the reference mean (when `center`),
    `adapt_genes=False` trains the head alone; `options` how (`RefineOptions`). `head`
    (arrays of `HEAD_KEYS`, e.g. a pre-trained prior's): the head starts from them
    rather than from a random draw.
    """
    recipe = recipe or Recipe()
    options = options or RefineOptions()
    mode, center = recipe.refine, recipe.center
    mean0 = reference_mean(w, basis) if center else None
    if mode == "none":
        return ({"cell_mean": mean0} if center else {}), {"mode": "none"}
    supervised = mode == "supcon"
    if supervised and labels is None:
        raise CellvecError(
            "Supervised refinement (supcon) needs cell labels: give a --label-key, "
            "or use --refine simclr, which learns from the cells alone."
        )
    import torch

    t0 = time.perf_counter()
    ref = _Reference.of(w, labels, supervised=supervised, balance=options.balance)
    steps = options.steps or default_steps(ref.n_cells, options.batch_size)
    with _torch_threads(TRAIN_THREADS):
        torch.manual_seed(seed)
        e = torch.from_numpy(np.ascontiguousarray(basis[ref.used], dtype=np.float32))
        model = _Model(e, mean0, adapt_genes=recipe.adapt_genes, options=options, steps=steps)
        if head is not None:
            model.start_head(head)
        history = _train(model, ref, options, mode=mode, steps=steps, seed=seed)
        out = model.arrays(ref.used, n_genes=w.shape[1])
    secs = time.perf_counter() - t0
    report = {
        "mode": mode,
        "steps": steps,
        "batch_size": options.batch_size,
        "adapt_genes": recipe.adapt_genes,
        "genes_trained": int(len(ref.used)),
        "n_cells": int(ref.n_cells),
        "temperature": options.temperature,
        "lr": options.lr,
        "schedule": options.schedule,
        "balance": options.balance,
        "dropout": list(options.dropout),
        "noise": options.noise,
        "level_shift": options.level_shift,
        "seed": seed,
        "seconds": round(secs, 1),
        "history": history,
    }
    log.info(
        "Refinement (%s%s): %d steps on %s cells and %s genes in %.1f s, final loss %.3f",
        mode,
        ", gene adapter" if recipe.adapt_genes else "",
        steps,
        f"{ref.n_cells:,}",
        f"{len(ref.used):,}",
        secs,
        history[-1]["loss"],
    )
    return out, report


@dataclass(frozen=True)
class _Reference:
    """The reference as trained on: weights over the genes some cell uses (the others get
    no gradient anyway), class codes, and each cell's sampling probability (None:
    uniform, for SimCLR)."""

    w: sp.csr_matrix
    used: np.ndarray
    y: np.ndarray
    p: np.ndarray | None

    @property
    def n_cells(self) -> int:
        return self.w.shape[0]

    @classmethod
    def of(cls, w, labels, *, supervised: bool, balance: float) -> _Reference:
        y = np.zeros(w.shape[0], dtype=np.int64)
        if labels is not None:
            _, y = np.unique(np.asarray(labels).astype(str), return_inverse=True)
        used = np.flatnonzero(np.bincount(w.indices, minlength=w.shape[1]) > 0)
        w_used = sp.csr_matrix(w[:, used], dtype=np.float32)
        p = balanced_sampling_weights(y, balance) if supervised else None
        return cls(w_used, used, y, p)


class _Model:
    """What refinement trains, over the reference's used genes `e` (torch, rows of the
    basis): the gene adapter (or `e` as it is), the reference mean (trained when
    given), and the head (MLP plus a linear skip); with their optimiser and schedule."""

    def __init__(self, e, mean0, *, adapt_genes: bool, options: RefineOptions, steps: int):
        import torch

        d = e.shape[1]
        center = mean0 is not None
        self.e, self.center = e, center
        self.adapter = (
            _GeneAdapter(e, delta_penalty=options.delta_penalty, gate_penalty=options.gate_penalty)
            if adapt_genes
            else None
        )
        self.cell_mean = torch.tensor(
            mean0 if center else np.zeros(d, np.float32), requires_grad=center
        )
        self.mlp = torch.nn.Sequential(
            torch.nn.Linear(d, options.hidden),
            torch.nn.ReLU(),
            torch.nn.Linear(options.hidden, options.out_dim),
        )
        self.skip = torch.nn.Linear(d, options.out_dim, bias=False)
        self.opt, self.sched = self._optimiser(options, steps)
        self.product = _sparse_product()
        self.position = np.zeros(len(e), dtype=np.int32)  # a gene's column in the batch
        self.rows = None

    def start_head(self, head: dict[str, np.ndarray]) -> None:
        """Copy `head`'s arrays (as `arrays` gives them) into the head, refusing other shapes."""
        import torch

        layers = ((self.mlp[0], "w1", "b1"), (self.mlp[2], "w2", "b2"), (self.skip, "skip", None))
        for layer, wk, _ in layers:
            want = tuple(layer.weight.shape[::-1])
            if head[wk].shape != want:
                d, hidden = self.mlp[0].in_features, self.mlp[0].out_features
                raise CellvecError(
                    f"The prior's head maps {head['w1'].shape[0]} -> {head['w1'].shape[1]} -> "
                    f"{head['w2'].shape[1]}; this refinement's maps {d} -> {hidden} -> "
                    f"{self.mlp[2].out_features}. Build the prior with the same refine "
                    "options (hidden, out_dim) as its atlases."
                )
        with torch.no_grad():
            for layer, wk, bk in layers:
                layer.weight.copy_(torch.from_numpy(np.ascontiguousarray(head[wk].T)))
                if bk is not None:
                    layer.bias.copy_(torch.from_numpy(head[bk]))

    def _optimiser(self, options: RefineOptions, steps: int):
        import torch

        adapter = self.adapter
        params = list(self.mlp.parameters()) + list(self.skip.parameters())
        params += [adapter.log_gate] if adapter else []
        params += [self.cell_mean] if self.center else []
        groups = [{"params": params}]
        groups += [{"params": [adapter.vectors], "weight_decay": 0.0}] if adapter else []
        opt = torch.optim.AdamW(groups, lr=options.lr, weight_decay=1e-4, fused=True)
        sched = (
            torch.optim.lr_scheduler.LambdaLR(
                opt, lambda s: 0.5 * (1.0 + np.cos(np.pi * min(s, steps) / steps))
            )
            if options.schedule == "cosine"
            else None
        )
        return opt, sched

    def forward(self, wb: sp.csr_matrix):
        """Refined unit vectors of a batch's weights. Only the genes this batch's cells
        use take part: their adapted vectors are gathered, and the weights act on them
        as a sparse product."""
        import torch

        adapter, position = self.adapter, self.position
        genes = np.unique(wb.indices)
        position[genes] = np.arange(len(genes), dtype=np.int32)
        columns = position[wb.indices]
        data = wb.data * adapter.gates(genes)[columns] if adapter else wb.data
        local = sp.csr_matrix((data, columns, wb.indptr), shape=(wb.shape[0], len(genes)))
        g = torch.from_numpy(genes)
        self.rows = adapter.rows(g) if adapter else torch.index_select(self.e, 0, g)
        v = self.product.apply(local, self.rows) - self.cell_mean
        v = torch.nn.functional.normalize(v, dim=1)
        return torch.nn.functional.normalize(self.mlp(v) + self.skip(v), dim=1)

    def arrays(self, used: np.ndarray, *, n_genes: int) -> dict[str, np.ndarray]:
        """The trained arrays, gene gates and corrections over all `n_genes` genes."""
        mlp = self.mlp
        out = {
            "w1": mlp[0].weight.detach().numpy().T.copy(),
            "b1": mlp[0].bias.detach().numpy().copy(),
            "w2": mlp[2].weight.detach().numpy().T.copy(),
            "b2": mlp[2].bias.detach().numpy().copy(),
            "skip": self.skip.weight.detach().numpy().T.copy(),
        }
        if self.center:
            out["cell_mean"] = self.cell_mean.detach().numpy().copy()
        if self.adapter:
            gate = np.ones(n_genes, dtype=np.float32)
            full_delta = np.zeros((n_genes, self.e.shape[1]), dtype=np.float32)
            gate[used], full_delta[used] = self.adapter.arrays()
            out["gene_gate"], out["gene_delta"] = gate, full_delta
        return out


def _train(
    model: _Model, ref: _Reference, options: RefineOptions, *, mode: str, steps: int, seed: int
) -> list[dict]:
    """`steps` optimiser steps on batches of augmented views; the loss history (every
    50 steps and the last)."""
    import torch

    rng = np.random.default_rng(seed)
    n, supervised = ref.n_cells, mode == "supcon"
    views = functools.partial(
        augment_weights,
        rng=rng,
        dropout=options.dropout,
        noise=options.noise,
        level_shift=options.level_shift,
    )
    history = []
    with progress(total=steps, desc=f"refine ({mode})", unit="step") as bar:
        for step in range(steps):
            b = rng.choice(n, size=min(options.batch_size, n), replace=True, p=ref.p)
            if supervised:
                z = model.forward(views(ref.w[b]))
                lab = torch.from_numpy(ref.y[b])
            else:
                wb = ref.w[b]
                z = model.forward(sp.vstack([views(wb), views(wb)], format="csr"))
                lab = torch.from_numpy(np.concatenate([np.arange(len(b))] * 2))
            loss = _contrastive_loss(z, lab, options.temperature)
            model.opt.zero_grad()
            loss.backward()
            if model.adapter:
                model.adapter.backward(model.rows)
            # logged before opt.step(): the loss the gradients were taken at
            if step % 50 == 0 or step == steps - 1:
                value = loss.item() + (model.adapter.penalty() if model.adapter else 0.0)
                history.append({"step": step + 1, "loss": round(value, 4)})
                bar.set_postfix(loss=f"{value:.3f}")
            model.opt.step()
            if model.sched is not None:
                model.sched.step()
            bar.update(1)
    return history
