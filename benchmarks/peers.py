"""Adapters that run peer TDA libraries on a small classification task.

Every runner takes a :class:`ClassificationTask` (plain tensors plus a list of checkpoints) and
returns a dense ``[Q, N]`` score matrix in *our* sign convention: ``score[q, i] > 0`` means that
training example ``i`` is a proponent of test query ``q`` (including it lowers the query's loss /
raises its margin). Signs of the individual libraries were checked against a plain gradient dot
product ``g_test . g_train`` of the cross-entropy loss at the last checkpoint (see the self-check
at the bottom of this file: ``python -m benchmarks.peers``).

Settings are library defaults or the documented-sensible values from
``/work/shared/reference/peer_bench.md``; none was tuned on an evaluation ground truth. Library
bugs are worked around as documented there (dattri TracIn projection, dattri TRAK decorator and
mutable module-level projector defaults, traker on CPU, captum sample-wise grads).

Optional dependencies (``pip install -e .[bench]``): dattri, captum, kronfluence, traker. Each
library is imported lazily inside its runner, so a missing library only fails its own runners.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import json
import logging
import math
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

__all__ = ["PEERS", "ClassificationTask", "PeerResult", "run_peers"]


@dataclass
class ClassificationTask:
    """A classification problem described by tensors and training checkpoints."""

    model_factory: Callable[[], nn.Module]  # plain nn.Module: x [B, F] float -> logits [B, C]
    checkpoints: list[dict[str, torch.Tensor]]  # state_dicts in training order
    lr_weights: list[float]  # TracIn weight of each checkpoint (lr sum of its interval)
    x_train: torch.Tensor
    y_train: torch.Tensor  # [N, F], [N] int64
    x_test: torch.Tensor
    y_test: torch.Tensor  # [Q, F], [Q]


@dataclass
class PeerResult:
    """Scores of one peer method; ``scores[q, i] > 0`` means train ``i`` helps query ``q``."""

    method: str
    library: str
    scores: np.ndarray  # [Q, N] float64, our sign convention
    seconds: float  # wall time of featurize + score
    settings: dict = field(default_factory=dict)
    error: str | None = None


@dataclass(frozen=True)
class _Spec:
    method: str
    library: str
    settings: dict


PEERS: dict[str, Callable[[ClassificationTask], PeerResult]] = {}
_SPECS: dict[str, _Spec] = {}

# Batch sizes only affect speed/memory (every method below sums or concatenates per example);
# large train batches matter on CPU because dattri/traker build a projector per batch.
_TRAIN_BS = 500
_TEST_BS = 500


def make_register(peers: dict, specs: dict, train_batch_size: int):
    """A decorator registering ``fn(task, spec) -> (scores, seconds, extra)`` as a peer runner."""

    def register(name: str, method: str, library: str, **settings):
        def deco(fn: Callable):
            spec = _Spec(method, library, dict(settings))

            def runner(task) -> PeerResult:
                scores, seconds, extra = fn(task, spec)
                return PeerResult(
                    method=spec.method,
                    library=spec.library,
                    scores=np.ascontiguousarray(scores, dtype=np.float64),
                    seconds=float(seconds),
                    settings={**spec.settings, "train_batch_size": train_batch_size, **extra},
                )

            runner.__name__ = f"run_{name}"
            runner.__doc__ = fn.__doc__
            peers[name] = runner
            specs[name] = spec
            return runner

        return deco

    return register


def run_registered(
    peers: dict, specs: dict, task, names: Sequence[str] | None = None
) -> list[PeerResult]:
    """Run the named peers (default: all), turning any failure into ``PeerResult.error``."""
    results = []
    for name in peers if names is None else names:
        t0 = time.perf_counter()
        try:
            results.append(peers[name](task))
        except Exception as exc:  # a broken peer is a result, not a crash
            spec = specs.get(name, _Spec(name, "?", {}))
            tb = traceback.format_exc(limit=3)
            results.append(
                PeerResult(
                    method=spec.method,
                    library=spec.library,
                    scores=np.empty((0, 0), dtype=np.float64),
                    seconds=time.perf_counter() - t0,
                    settings=dict(spec.settings),
                    error=f"{type(exc).__name__}: {exc}\n{tb}",
                )
            )
    return results


_register = make_register(PEERS, _SPECS, _TRAIN_BS)


def run_peers(task: ClassificationTask, names: Sequence[str] | None = None) -> list[PeerResult]:
    """Run the named peers (default: all of :data:`PEERS`), one failure never stops the rest."""
    return run_registered(PEERS, _SPECS, task, names)


# ----------------------------------------------------------------------------- helpers


def _ce_loss(model: nn.Module) -> Callable:
    """Mean CE as a ``torch.func`` function of (params, (x, y)); accepts x of [F], [1, F], [B, F]."""

    def loss(params, data):
        x, y = data
        logits = torch.func.functional_call(model, params, (x.reshape(-1, x.shape[-1]),))
        return F.cross_entropy(logits, y.reshape(-1).long())

    return loss


def _margin_fn(model: nn.Module) -> Callable:
    """TRAK's model output: correct logit minus logsumexp of the others (= log p/(1-p))."""

    def margin(params, data):
        x, y = data
        logits = torch.func.functional_call(model, params, (x.reshape(-1, x.shape[-1]),))
        y = y.reshape(-1).long()
        correct = logits.gather(1, y[:, None])[:, 0]
        is_y = torch.arange(logits.shape[-1], device=y.device) == y[:, None]  # vmap-safe one-hot
        others = logits.masked_fill(is_y, -torch.inf)
        return (correct - others.logsumexp(-1)).sum()

    return margin


def _correct_prob_fn(model: nn.Module) -> Callable:
    def prob(params, data):
        x, y = data
        logits = torch.func.functional_call(model, params, (x.reshape(-1, x.shape[-1]),))
        return torch.exp(-F.cross_entropy(logits, y.reshape(-1).long()))

    return prob


def _loaders(task: ClassificationTask) -> tuple[DataLoader, DataLoader]:
    train = TensorDataset(task.x_train.float(), task.y_train.long())
    test = TensorDataset(task.x_test.float(), task.y_test.long())
    return (
        DataLoader(train, batch_size=_TRAIN_BS, shuffle=False),
        DataLoader(test, batch_size=_TEST_BS, shuffle=False),
    )


def _fresh_model(task: ClassificationTask, ckpt: dict[str, torch.Tensor] | None = None):
    model = task.model_factory()
    if ckpt is not None:
        model.load_state_dict(ckpt)
    return model.eval()


def _clone_ckpts(ckpts: Sequence[dict[str, torch.Tensor]]) -> list[dict[str, torch.Tensor]]:
    return [{k: v.detach().clone() for k, v in c.items()} for c in ckpts]


def _to_qn(scores, task: ClassificationTask, sign: float, train_first: bool) -> np.ndarray:
    """Convert a library's matrix ([N, Q] if ``train_first``) to [Q, N] float64, our sign."""
    arr = scores.detach().cpu().double().numpy() if torch.is_tensor(scores) else np.asarray(scores)
    arr = arr.astype(np.float64)
    if train_first:
        arr = arr.T
    q, n = len(task.x_test), len(task.x_train)
    if arr.shape != (q, n):
        raise ValueError(f"unexpected score shape {arr.shape}, wanted {(q, n)}")
    return sign * arr


@contextlib.contextmanager
def _dattri_defaults_guard() -> Iterator[None]:
    """dattri 0.3.0 mutates module-level DEFAULT_PROJECTOR_KWARGS dicts; restore them after use."""
    import dattri.algorithm.tracin as _tracin
    import dattri.algorithm.trak as _trak

    saved = [(m, copy.deepcopy(m.DEFAULT_PROJECTOR_KWARGS)) for m in (_tracin, _trak)]
    try:
        yield
    finally:
        for mod, kw in saved:
            mod.DEFAULT_PROJECTOR_KWARGS.clear()
            mod.DEFAULT_PROJECTOR_KWARGS.update(kw)


@contextlib.contextmanager
def _seeded(seed: int) -> Iterator[None]:
    """Deterministic torch CPU RNG inside, caller's RNG state restored afterwards."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


# ----------------------------------------------------------------------------- dattri

# Signs (checked with the self-check): dattri's TracIn/GradDot return sum_c w_c g_train . g_test,
# its IF attributors return g_train^T H^-1 g_test, its TRAK returns phi_test (X^T X)^-1 phi_train
# * (1 - p_train) with phi = margin gradients. All are positive for proponents already (sign +1);
# dattri returns [N, Q], which is transposed.


def _dattri_tracin(task: ClassificationTask, ckpts, weights) -> tuple[np.ndarray, float]:
    from dattri.algorithm.tracin import TracInAttributor
    from dattri.task import AttributionTask

    with _dattri_defaults_guard():
        train_dl, test_dl = _loaders(task)
        t0 = time.perf_counter()
        model = _fresh_model(task, ckpts[-1])
        at = AttributionTask(loss_func=_ce_loss(model), model=model, checkpoints=ckpts)
        att = TracInAttributor(
            task=at, weight_list=torch.tensor(weights, dtype=torch.float32), normalized_grad=False
        )
        # dattri always merges its default projector kwargs (proj_dim=512) into
        # projector_kwargs, so passing None still projects; force exact gradients.
        att.projector_kwargs = None
        scores = att.attribute(train_dl, test_dl)
        seconds = time.perf_counter() - t0
    return _to_qn(scores, task, +1.0, train_first=True), seconds


@_register(
    "dattri_tracin",
    "TracIn-CP (exact)",
    "dattri",
    checkpoints="all",
    weights="lr_weights",
    loss="cross-entropy",
    projection=None,
    normalized_grad=False,
)
def _run_dattri_tracin(task: ClassificationTask, spec: _Spec):
    """dattri TracInAttributor over all checkpoints, exact per-example gradients."""
    scores, sec = _dattri_tracin(task, _clone_ckpts(task.checkpoints), list(task.lr_weights))
    return scores, sec, {"n_checkpoints": len(task.checkpoints)}


@_register(
    "dattri_graddot",
    "GradDot (last ckpt)",
    "dattri",
    checkpoints="last",
    weights=[1.0],
    loss="cross-entropy",
    projection=None,
)
def _run_dattri_graddot(task: ClassificationTask, spec: _Spec):
    """dattri GradDot = TracInAttributor with one checkpoint and weight 1."""
    scores, sec = _dattri_tracin(task, _clone_ckpts(task.checkpoints[-1:]), [1.0])
    return scores, sec, {}


def _dattri_trak(task: ClassificationTask, proj_dim: int | None, reg: float):
    from dattri.algorithm.trak import TRAKAttributor
    from dattri.task import AttributionTask

    with _dattri_defaults_guard():
        train_dl, test_dl = _loaders(task)
        t0 = time.perf_counter()
        model = _fresh_model(task, task.checkpoints[-1])
        margin = _margin_fn(model)
        at = AttributionTask(
            loss_func=margin,
            model=model,
            checkpoints=_clone_ckpts(task.checkpoints),
            target_func=margin,
        )
        # correct_probability_func gets an *unflattened* param dict in 0.3.0: no @flatten_func.
        kwargs = {} if proj_dim is None else {"projector_kwargs": {"proj_dim": proj_dim}}
        att = TRAKAttributor(
            task=at,
            correct_probability_func=_correct_prob_fn(model),
            device="cpu",
            regularization=reg,
            **kwargs,
        )
        att.projector_kwargs = dict(att.projector_kwargs)  # detach from the module-level dict
        used = dict(att.projector_kwargs)
        att.cache(train_dl)
        scores = att.attribute(test_dl)
        seconds = time.perf_counter() - t0
    return _to_qn(scores, task, +1.0, train_first=True), seconds, {"projector_kwargs": used}


@_register(
    "dattri_trak",
    "TRAK-allckpt proj2048 reg1",
    "dattri",
    checkpoints="all",
    proj_dim=2048,
    regularization=1.0,
    output_fn="margin (logit_y - logsumexp others), train and test",
    note="reg=1.0 instead of the default 0: with reg 0 and proj_dim > N the kernel is "
    "singular and TRAK collapses (peer_bench.md); value not tuned here",
)
def _run_dattri_trak(task: ClassificationTask, spec: _Spec):
    """dattri TRAKAttributor over all checkpoints (as an ensemble), proj 2048, reg 1."""
    scores, sec, extra = _dattri_trak(task, proj_dim=2048, reg=1.0)
    return scores, sec, extra


@_register(
    "dattri_trak_default",
    "TRAK-allckpt proj512 reg0 (defaults)",
    "dattri",
    checkpoints="all",
    proj_dim="default (512)",
    regularization=0.0,
    output_fn="margin (logit_y - logsumexp others), train and test",
)
def _run_dattri_trak_default(task: ClassificationTask, spec: _Spec):
    """dattri TRAKAttributor at its defaults (proj 512, no regularisation)."""
    return _dattri_trak(task, proj_dim=None, reg=0.0)


@_register(
    "dattri_if_arnoldi",
    "IF-Arnoldi (last ckpt)",
    "dattri",
    checkpoints="last",
    workaround="Ritz directions with eigenvalue(H + reg I) <= 0 dropped (dattri returns NaN)",
    regularization=0.1,
    proj_dim="default (100)",
    max_iter="default (100)",
    loss="cross-entropy (mean over train set for the Hessian)",
)
def _run_dattri_if_arnoldi(task: ClassificationTask, spec: _Spec):
    """dattri IFAttributorArnoldi at the last checkpoint, damping 0.1.

    dattri 0.3.0 keeps the top-k Ritz pairs by |eigenvalue| and scales by 1/sqrt(eigenvalue), so
    any negative eigenvalue of H + damping*I turns its column into NaN and with it every score.
    Those directions are dropped (negative curvature clipped, as in an exact-Hessian IF); the
    number dropped is recorded. With a PSD Hessian this is a no-op.
    """
    from dattri.algorithm.influence_function import IFAttributorArnoldi
    from dattri.task import AttributionTask

    class _PositiveArnoldi(IFAttributorArnoldi):
        def cache(self, full_train_dataloader):
            super().cache(full_train_dataloader)
            probe_dim = self.arnoldi_probe_dim
            self.keep = [
                torch.isfinite(proj(torch.ones(1, probe_dim)))[0]
                for proj in self.arnoldi_projectors
            ]

        def transform_test_rep(self, ckpt_idx, test_rep):
            return super().transform_test_rep(ckpt_idx, test_rep)[:, self.keep[ckpt_idx]]

        def transform_train_rep(self, ckpt_idx, train_rep):
            return super().transform_train_rep(ckpt_idx, train_rep)[:, self.keep[ckpt_idx]]

    train_dl, test_dl = _loaders(task)
    t0 = time.perf_counter()
    model = _fresh_model(task, task.checkpoints[-1])
    at = AttributionTask(
        loss_func=_ce_loss(model), model=model, checkpoints=_clone_ckpts(task.checkpoints[-1:])
    )
    att = _PositiveArnoldi(task=at, device="cpu", regularization=0.1, seed=0)
    att.arnoldi_probe_dim = sum(p.numel() for p in model.parameters() if p.requires_grad)
    att.cache(train_dl)
    scores = att.attribute(train_dl, test_dl)
    seconds = time.perf_counter() - t0
    kept = int(att.keep[0].sum())
    extra = {"eigen_directions_kept": kept, "eigen_directions_dropped": len(att.keep[0]) - kept}
    return _to_qn(scores, task, +1.0, train_first=True), seconds, extra


@_register(
    "dattri_if_ekfac",
    "IF-EK-FAC (last ckpt)",
    "dattri",
    checkpoints="last",
    damping=0.01,
    fisher="empirical (true labels; dattri's loss-based estimate)",
    modules="all nn.Linear",
    known_issue="dattri 0.3.0 EK-FAC projects with q @ G @ q.T where q comes from eigh "
    "(eigenvectors in columns), i.e. it works in the basis of Q's rows, not the eigenbasis; "
    "and for layers with bias it reshapes cat(W.flatten(), b) to [out, in+1] instead of "
    "cat(W, b[:, None]). Run as shipped (not patched); on digits it stays close to GradDot.",
)
def _run_dattri_if_ekfac(task: ClassificationTask, spec: _Spec):
    """dattri IFAttributorEKFAC at the last checkpoint, damping 0.01."""
    from dattri.algorithm.influence_function import IFAttributorEKFAC
    from dattri.task import AttributionTask

    train_dl, test_dl = _loaders(task)
    t0 = time.perf_counter()
    model = _fresh_model(task, task.checkpoints[-1])
    at = AttributionTask(
        loss_func=_ce_loss(model), model=model, checkpoints=_clone_ckpts(task.checkpoints[-1:])
    )
    att = IFAttributorEKFAC(task=at, device="cpu", damping=0.01)
    att.cache(train_dl)
    scores = att.attribute(train_dl, test_dl)
    seconds = time.perf_counter() - t0
    return _to_qn(scores, task, +1.0, train_first=True), seconds, {}


# ----------------------------------------------------------------------------- kronfluence


def _kronfluence_task_cls():
    from kronfluence import Task

    class _CETask(Task):
        """Sum-reduced CE for training (sampled labels -> true Fisher), query loss as measurement."""

        def compute_train_loss(self, batch, model, sample=False):
            x, y = batch
            logits = model(x)
            if sample:
                with torch.no_grad():
                    y = torch.multinomial(F.softmax(logits.detach(), -1), 1).flatten()
            return F.cross_entropy(logits, y, reduction="sum")

        def compute_measurement(self, batch, model):
            x, y = batch
            return F.cross_entropy(model(x), y, reduction="sum")

    return _CETask


@_register(
    "kronfluence_ekfac",
    "EK-FAC (last ckpt)",
    "kronfluence",
    checkpoints="last",
    strategy="ekfac",
    damping_factor="None (library heuristic: 0.1 x mean eigenvalue)",
    fisher="true Fisher (library default use_empirical_fisher=False; sampled labels, seed 0)",
    measurement="query CE loss",
)
def _run_kronfluence_ekfac(task: ClassificationTask, spec: _Spec):
    """kronfluence EK-FAC at the last checkpoint with the library's damping heuristic.

    Sign: with measurement = query loss, kronfluence returns grad_q^T (G + lambda I)^-1 grad_i;
    upweighting train i moves the query loss by minus that, so positive = helpful (sign +1).
    """
    from kronfluence import prepare_model

    train_ds = TensorDataset(task.x_train.float(), task.y_train.long())
    test_ds = TensorDataset(task.x_test.float(), task.y_test.long())
    with tempfile.TemporaryDirectory(prefix="kronfluence_") as out, _seeded(0):
        t0 = time.perf_counter()
        ktask = _kronfluence_task_cls()()
        model = prepare_model(_fresh_model(task, task.checkpoints[-1]), ktask)
        scores = kronfluence_ekfac_scores(model, ktask, train_ds, test_ds, out, "peer")
        seconds = time.perf_counter() - t0
    return _to_qn(scores, task, +1.0, train_first=False), seconds, {}


# ----------------------------------------------------------------------------- captum


@_register(
    "captum_tracincp",
    "TracIn-CP (exact)",
    "captum",
    checkpoints="all",
    weights="lr_weights (returned by checkpoints_load_func)",
    loss="CrossEntropyLoss(reduction='sum')",
    sample_wise_grads_per_batch=True,
    layers="all",
)
def _run_captum_tracincp(task: ClassificationTask, spec: _Spec):
    """captum TracInCP over all checkpoints with exact per-example gradients.

    Sign: captum returns sum_c lr_c g_test . g_train, positive = proponent (sign +1).
    """
    from captum.influence import TracInCP

    ckpts = _clone_ckpts(task.checkpoints)
    weights = list(task.lr_weights)
    train_dl, _ = _loaders(task)

    def load(model: nn.Module, idx: int) -> float:
        model.load_state_dict(ckpts[idx])
        return float(weights[idx])

    t0 = time.perf_counter()
    model = _fresh_model(task, ckpts[-1])
    tracin = TracInCP(
        model,
        train_dl,
        checkpoints=list(range(len(ckpts))),  # non-str items: captum keeps the order as given
        checkpoints_load_func=load,
        loss_fn=nn.CrossEntropyLoss(reduction="sum"),
        batch_size=_TRAIN_BS,
        sample_wise_grads_per_batch=True,
    )
    scores = tracin.influence((task.x_test.float(), task.y_test.long()), k=None)
    seconds = time.perf_counter() - t0
    return _to_qn(scores, task, +1.0, train_first=False), seconds, {}


# ----------------------------------------------------------------------------- traker


@_register(
    "traker_trak",
    "TRAK-allckpt proj2048 lambda1e4",
    "traker",
    checkpoints="all",
    proj_dim=2048,
    projector="BasicProjector rademacher fp32, seed 0 (CPU)",
    lambda_reg=1e4,
    use_half_precision=False,
    task="image_classification (margin output)",
    note="lambda_reg 1e4 as in peer_bench.md (traker does not scale grads by 1/sqrt(P), so "
    "1e4 ~ dattri reg 1 on that model); the default 0 collapses when N < proj_dim",
)
def _run_traker_trak(task: ClassificationTask, spec: _Spec):
    """traker TRAKer on CPU with a BasicProjector; checkpoints of one run used as the ensemble.

    Sign: traker returns phi_train (X^T X + lambda I)^-1 phi_test * (1 - p_train) with margin
    gradients, positive = proponent (sign +1); its [N, Q] output is transposed.
    """
    from trak import TRAKer
    from trak.projectors import BasicProjector, ProjectionType

    ckpts = _clone_ckpts(task.checkpoints)
    x_tr, y_tr = task.x_train.float(), task.y_train.long()
    x_te, y_te = task.x_test.float(), task.y_test.long()
    n, q = len(x_tr), len(x_te)
    logging.getLogger("TRAK").setLevel(logging.WARNING)
    with tempfile.TemporaryDirectory(prefix="traker_") as save_dir:
        t0 = time.perf_counter()
        model = _fresh_model(task, ckpts[-1])
        grad_dim = sum(p.numel() for p in model.parameters())
        projector = BasicProjector(
            grad_dim=grad_dim,
            proj_dim=2048,
            seed=0,
            proj_type=ProjectionType.rademacher,
            device="cpu",
            dtype=torch.float32,
        )
        traker = TRAKer(
            model=model,
            task="image_classification",
            train_set_size=n,
            save_dir=save_dir,  # fresh temp dir; load_from_save_dir=False breaks scoring in 0.3.2
            device="cpu",
            projector=projector,
            proj_dim=2048,
            use_half_precision=False,
            lambda_reg=1e4,
            logging_level=logging.WARNING,
        )
        for mid, ckpt in enumerate(ckpts):
            traker.load_checkpoint(ckpt, model_id=mid)
            for s in range(0, n, _TRAIN_BS):
                xb, yb = x_tr[s : s + _TRAIN_BS], y_tr[s : s + _TRAIN_BS]
                traker.featurize(batch=[xb, yb], num_samples=len(xb))
        traker.finalize_features()
        for mid, ckpt in enumerate(ckpts):
            traker.start_scoring_checkpoint(
                exp_name="queries", checkpoint=ckpt, model_id=mid, num_targets=q
            )
            for s in range(0, q, _TEST_BS):
                xb, yb = x_te[s : s + _TEST_BS], y_te[s : s + _TEST_BS]
                traker.score(batch=[xb, yb], num_samples=len(xb))
        scores = np.array(traker.finalize_scores(exp_name="queries"))  # copy out of the memmap
        seconds = time.perf_counter() - t0
    return _to_qn(scores, task, +1.0, train_first=True), seconds, {"grad_dim": grad_dim}


# ----------------------------------------------------------------------------- self-check


def _flat_grads(model: nn.Module, ckpt, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Exact per-example CE-loss gradients [B, P] at ``ckpt`` via torch.func."""
    params = {k: v.detach() for k, v in ckpt.items() if k in dict(model.named_parameters())}

    def loss(p, xi, yi):
        logits = torch.func.functional_call(model, p, (xi[None],))
        return F.cross_entropy(logits, yi[None])

    g = torch.func.vmap(torch.func.grad(loss), in_dims=(None, 0, 0))(params, x, y)
    return torch.cat([g[k].reshape(len(x), -1) for k in params], dim=1)


def _spearman_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    from scipy.stats import rankdata

    ra, rb = rankdata(a, axis=1), rankdata(b, axis=1)
    ra -= ra.mean(1, keepdims=True)
    rb -= rb.mean(1, keepdims=True)
    den = np.sqrt((ra**2).sum(1) * (rb**2).sum(1))
    with np.errstate(invalid="ignore", divide="ignore"):
        return (ra * rb).sum(1) / den


def kronfluence_ekfac_scores(model, ktask, train_ds, test_ds, out: str, name: str) -> torch.Tensor:
    """kronfluence EK-FAC pairwise scores ``[Q, N]`` (factors fitted on ``train_ds``, damping heuristic)."""
    from kronfluence.analyzer import Analyzer
    from kronfluence.arguments import FactorArguments, ScoreArguments

    analyzer = Analyzer(
        analysis_name=name,
        model=model,
        task=ktask,
        cpu=True,
        log_level=logging.WARNING,
        disable_tqdm=True,
        output_dir=out,
    )
    analyzer.fit_all_factors(
        factors_name="ekfac",
        dataset=train_ds,
        per_device_batch_size=_TRAIN_BS,
        factor_args=FactorArguments(strategy="ekfac"),
        overwrite_output_dir=True,
    )
    analyzer.compute_pairwise_scores(
        scores_name="pairwise",
        factors_name="ekfac",
        query_dataset=test_ds,
        train_dataset=train_ds,
        per_device_query_batch_size=min(_TEST_BS, len(test_ds)),
        per_device_train_batch_size=_TRAIN_BS,
        score_args=ScoreArguments(damping_factor=None),
        overwrite_output_dir=True,
    )
    return analyzer.load_pairwise_scores("pairwise")["all_modules"]


def check_runners(
    peers: dict,
    run: Callable,
    task,
    exact: np.ndarray,
    graddot: np.ndarray,
    tracin_runners: Sequence[str],
    tracin_ok: Callable[[np.ndarray], bool],
    tracin_rule: str,
) -> bool:
    """Self-check table: each runner's per-query Spearman against exact TracIn and GradDot.

    Returns ``True`` when a runner failed, a TracIn runner broke ``tracin_ok``, or a sign looks wrong.
    """
    hdr = f"{'runner':22s} {'method':36s} {'lib':11s} {'sec':>6s} {'rho_TracIn':>10s} "
    print(hdr + f"{'min_q':>7s} {'rho_GD':>7s}  error")
    failed = False
    for name in peers:
        (res,) = run(task, [name])
        json.dumps(res.settings)  # settings must stay JSON-serialisable (benchmark tables)
        if res.error is None and res.scores.shape == exact.shape:
            rho = _spearman_rows(res.scores, exact)
            rho_gd = np.nanmean(_spearman_rows(res.scores, graddot))
            line = f"{np.nanmean(rho):10.4f} {np.nanmin(rho):7.4f} {rho_gd:7.3f}  -"
            if name in tracin_runners and not tracin_ok(rho):
                failed = True
                line += f"  FAIL ({tracin_rule})"
            if not rho_gd > 0:
                failed = True
                line += "  SIGN? (not positively correlated with GradDot)"
        else:
            failed = True
            first = (res.error or "bad shape").strip().splitlines()[0]
            line = f"{'-':>10s} {'-':>7s} {'-':>7s}  {first[:200]}"
        print(f"{name:22s} {res.method:36s} {res.library:11s} {res.seconds:6.2f} {line}")
    return failed


def _digits_task(n_train: int = 300, n_test: int = 20, epochs: int = 5) -> ClassificationTask:
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x, dtype=torch.float32)
    y = torch.tensor(y, dtype=torch.long)
    x_tr, y_tr = x[:n_train], y[:n_train]
    x_te, y_te = x[n_train : n_train + n_test], y[n_train : n_train + n_test]
    mu, sd = x_tr.mean(0), x_tr.std(0)
    sd[sd == 0] = 1.0
    x_tr, x_te = (x_tr - mu) / sd, (x_te - mu) / sd

    def factory() -> nn.Module:
        return nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))

    torch.manual_seed(0)
    model = factory()
    lr, bs = 0.1, 32
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(0)
    steps = math.ceil(n_train / bs)
    ckpts = []
    for _ in range(epochs):
        perm = torch.randperm(n_train, generator=gen)
        for s in range(0, n_train, bs):
            idx = perm[s : s + bs]
            opt.zero_grad()
            F.cross_entropy(model(x_tr[idx]), y_tr[idx]).backward()
            opt.step()
        ckpts.append({k: v.detach().clone() for k, v in model.state_dict().items()})
    return ClassificationTask(
        model_factory=factory,
        checkpoints=ckpts,
        lr_weights=[steps * lr] * epochs,
        x_train=x_tr,
        y_train=y_tr,
        x_test=x_te,
        y_test=y_te,
    )


def _self_check() -> int:
    import warnings

    import tqdm

    warnings.filterwarnings("ignore")
    # the libraries' progress bars would drown the table (self-check only, not the runners)
    tqdm.tqdm.__init__ = functools.partialmethod(tqdm.tqdm.__init__, disable=True)
    torch.set_num_threads(2)
    t_all = time.perf_counter()
    task = _digits_task()
    model = task.model_factory()
    model.load_state_dict(task.checkpoints[-1])
    with torch.no_grad():
        acc = (model(task.x_test).argmax(-1) == task.y_test).float().mean().item()
    exact = np.zeros((len(task.x_test), len(task.x_train)))
    for w, ck in zip(task.lr_weights, task.checkpoints, strict=True):
        gq = _flat_grads(model, ck, task.x_test, task.y_test)
        gi = _flat_grads(model, ck, task.x_train, task.y_train)
        exact += w * (gq @ gi.T).double().numpy()
        graddot = (gq @ gi.T).double().numpy()  # ends at the last checkpoint
    print(
        f"digits task: N={len(task.x_train)} Q={len(task.x_test)} ckpts={len(task.checkpoints)} "
        f"lr_weights={task.lr_weights} test acc={acc:.3f}"
    )
    run_peers(task, ["dattri_graddot"])  # warm-up (imports, torch.func), not reported
    failed = check_runners(
        PEERS,
        run_peers,
        task,
        exact,
        graddot,
        tracin_runners=("dattri_tracin", "captum_tracincp"),
        tracin_ok=lambda rho: np.nanmin(rho) > 0.999,
        tracin_rule="needs rho > 0.999 on every query",
    )
    print(f"total self-check time {time.perf_counter() - t_all:.1f}s")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(_self_check())
