"""Peer TDA libraries at their defaults and over a small settings grid on the realistic tasks (issue 12).

``python -m benchmarks.peer_sweep --task clf_adamw [--task gpt_adamw ...] [--family dattri_trak ...]``

For each task the model is trained once (``benchmarks.run.fit_logged``, seed 0, default logger) and every
peer runs on the logged checkpoints. Each setting of a grid is one row of
``benchmarks/results/peers_<task>.json`` with its LDS on the *choosing* and on the *reporting* half of the
queries (:class:`benchmarks.defaults.BankView`), so a peer's tuned setting is picked on the choosing half
only (``best_on_choose``) and reported on the other half, exactly as our own defaults are.

Families (``--family``):

- ``dattri_trak``: dattri ``TRAKAttributor`` over all checkpoints; its defaults (proj 512, regularization 0)
  and proj_dim {512, 2048} x regularization {0.01, 0.1, 1, 10}. Output function: the margin for the
  classifier (:mod:`benchmarks.peers`), the summed token loss for LMs (:mod:`benchmarks.peers_lm`).
  dattri's per-example gradients are computed ONCE per task: the 2048 attributor runs ``cache()`` with
  its ``random_project`` wrapped so that the gradients are also projected with the 512 attributor's
  kwargs; each (proj_dim, λ) then gets ``(XᵀX + λI)⁻¹Xᵀ`` re-solved from the captured ``X`` (what
  ``cache()`` computes) and runs dattri's own ``attribute()`` (bit-identical to separate dattri runs,
  checked on clf_adamw). ``seconds`` = the gradient pass + this projection + this solve + scoring.
  Like traker's λ, a proj_dim's regularization list is extended by a decade (up to 3 times) while its
  edge is best on the choosing half (re-solves only, no new gradient pass).
- ``kronfluence_ekfac``: kronfluence EK-FAC at the last checkpoint, factors fitted once, pairwise scores
  for damping_factor {1e-8 (the library's ``ScoreArguments`` default in 1.0.1), 1e-4, 1e-3, 1e-2, 1e-1,
  None (its heuristic 0.1 x mean eigenvalue, what benchmarks/peers.py passes)}; ``seconds`` = factor fit
  + this damping's scoring.
- ``dattri_tracin``: TracIn-CP over all checkpoints weighted by the lr sums, as benchmarks/peers.py (exact,
  classifier) and benchmarks/peers_lm.py (projected to 2048, LMs) run ``TracInAttributor``. One setting.
  On gpt_single_pass it is computed from the TRAK pass's captured 2048-dim features instead (same loss,
  same projector; equal to ``TracInAttributor`` up to a constant, checked on gpt_adamw), to fit the budget.
- ``traker_trak``: traker ``TRAKer`` over all checkpoints, fp32 ``BasicProjector``; its defaults (proj 2048,
  lambda_reg 0) and lambda_reg {1e2, 1e3, 1e4, 1e5} at proj 2048, extended by a decade (up to 3 times)
  while the grid's edge is best on the choosing half. Featurized once; each λ re-runs traker's own
  ``finalize_features()`` and scoring (bit-identical to separate runs, checked on clf_adamw). LMs use a
  small ``AbstractModelOutput`` (log-prob of the supervised next tokens, out-to-loss ``1 - p``).

LoRA (``lora_ft``): every peer sees the PEFT model, whose only trainable parameters are the adapters:
dattri differentiates ``requires_grad`` parameters only, traker gets them as ``grad_wrt``, kronfluence
tracks the ``lora_A``/``lora_B`` ``nn.Linear`` modules only (the frozen ``Conv1D`` base layers are not
converted or tracked). The loss is the summed next-token CE on completion bytes (labels -100 on prompt
and padding), as the task trains.

Every score matrix is ``[Q, N]`` in our sign (positive = the training example lowers the query's loss /
raises its margin). A setting that fails is a row with its ``error``. A (re-)run family replaces that
family's rows in the JSON and keeps the other families' rows.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import logging
import math
import tempfile
import time
import traceback
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from benchmarks.banks_build import TASKS, bank_path
from benchmarks.common import GPTLogits, fit_logged
from benchmarks.defaults import BankView
from benchmarks.peers import (
    ClassificationTask,
    _clone_ckpts,
    _correct_prob_fn,
    _dattri_defaults_guard,
    _kronfluence_task_cls,
    _margin_fn,
    _seeded,
    run_peers,
)
from benchmarks.peers_lm import (
    _conv1d_to_linear,
    _kronfluence_lm_task_cls,
    _kronfluence_tracked,
    _lm_loss_fn,
    _seq_prob_fn,
)

RESULTS = Path(__file__).parent / "results"
LOG = logging.getLogger("peer_sweep")

TRAK_PROJ = (512, 2048)
TRAK_REGS = (0.01, 0.1, 1.0, 10.0)
KFAC_DAMPINGS = (1e-8, 1e-4, 1e-3, 1e-2, 1e-1, None)
KFAC_LIBRARY_DEFAULT = 1e-8  # kronfluence 1.0.1 ScoreArguments.damping_factor
TRAKER_LAMBDAS = (1e2, 1e3, 1e4, 1e5)
FAMILIES = ("dattri_trak", "kronfluence_ekfac", "dattri_tracin", "traker_trak")

# speed/memory only (every method sums or concatenates per example)
TRAIN_BS = 500
TEST_BS = 500


# ----------------------------------------------------------------------------- problem description


class Problem:
    """What every peer needs: a plain ``nn.Module``, checkpoints, lr weights, loaders and loss functions.

    ``kind`` is ``"clf"`` (batches ``(x, y)``), ``"lm"`` (``(tokens,)``) or ``"lora"`` (``(tokens, labels)``).
    """

    def __init__(self, kind, model_factory, checkpoints, lr_weights, train, test, n_train, n_test):
        self.kind = kind
        self.model_factory = model_factory
        self.checkpoints = checkpoints
        self.lr_weights = lr_weights
        self.train = train  # tuple of tensors
        self.test = test
        self.n_train, self.n_test = n_train, n_test
        self.ctask: ClassificationTask | None = None

    def model(self, ckpt=None) -> nn.Module:
        m = self.model_factory()
        if ckpt is not None:
            m.load_state_dict(ckpt)
        return m.eval()

    def loaders(self, train_bs: int = TRAIN_BS) -> tuple[DataLoader, DataLoader]:
        return (
            DataLoader(TensorDataset(*self.train), batch_size=train_bs, shuffle=False),
            DataLoader(TensorDataset(*self.test), batch_size=TEST_BS, shuffle=False),
        )

    def trak_functions(self, model: nn.Module) -> tuple[Callable, Callable, str]:
        """(output function, correct-probability function, description) of dattri TRAK."""
        if self.kind == "clf":
            return _margin_fn(model), _correct_prob_fn(model), "margin (logit_y - logsumexp others)"
        if self.kind == "lm":
            return _lm_loss_fn(model), _seq_prob_fn(model), "summed next-token CE; p = exp(-CE)"
        loss = _labeled_loss_fn(model)
        return (
            loss,
            lambda p, d: torch.exp(-loss(p, d)),
            "summed next-token CE on completion bytes; p = exp(-CE)",
        )

    def loss_fn(self, model: nn.Module) -> Callable:
        """The training loss as a ``torch.func`` function (TracIn)."""
        from benchmarks.peers import _ce_loss

        return {"clf": _ce_loss, "lm": _lm_loss_fn, "lora": _labeled_loss_fn}[self.kind](model)


def _labeled_seq_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Next-token CE summed over positions whose (shifted) label is not -100: [B, T, V], [B, T] -> [B].

    Masking by multiplication (no boolean indexing), so it runs under ``torch.func.vmap``.
    """
    tgt = labels[:, 1:]
    mask = (tgt != -100).to(logits.dtype)
    logp = torch.log_softmax(logits[:, :-1].float(), -1)
    nll = -logp.gather(-1, tgt.clamp_min(0).unsqueeze(-1)).squeeze(-1)
    return (nll * mask).sum(1)


def _labeled_loss_fn(model: nn.Module) -> Callable:
    def loss(params, data):
        x, labels = data
        x, labels = x.reshape(-1, x.shape[-1]), labels.reshape(-1, labels.shape[-1])
        return _labeled_seq_loss(torch.func.functional_call(model, params, (x,)), labels).sum()

    return loss


def problem_from_store(task, store) -> Problem:
    """The task's data and the logged run's checkpoints as a :class:`Problem`."""
    weights = [c.lr_sum[0] for c in store.checkpoints]
    if task.name == "clf_adamw":
        x, y = task.train.dataset.tensors
        qx = torch.stack([task.queries[i].data[0] for i in range(len(task.queries))])
        qy = torch.stack([task.queries[i].data[1] for i in range(len(task.queries))])
        cks = [{k.removeprefix("net."): v for k, v in store.state(s).items()} for s in store.steps]
        factory = lambda: task.factory().net  # noqa: E731
        p = Problem(
            "clf",
            factory,
            cks,
            weights,
            (x.float(), y.long()),
            (qx.float(), qy.long()),
            len(x),
            len(qx),
        )
        p.ctask = ClassificationTask(factory, cks, weights, x, y, qx, qy)
        return p

    def full_state(step: int) -> dict[str, torch.Tensor]:
        # the store keeps trainable tensors; tied (GPT) or frozen (LoRA base) ones come back here
        model = GPTLogits(task)
        res = model.load_state_dict(store.state(step), strict=False)
        if res.unexpected_keys:
            raise ValueError(f"store state has keys the model lacks: {res.unexpected_keys[:5]}")
        return {k: v.detach().clone() for k, v in model.state_dict().items()}

    cks = [full_state(s) for s in store.steps]
    train = tuple(
        torch.stack([task.train[i].data[j] for i in range(len(task.train))])
        for j in range(len(task.train[0].data))
    )
    test = tuple(
        torch.stack([task.queries[i].data[j] for i in range(len(task.queries))])
        for j in range(len(task.queries[0].data))
    )
    kind = "lora" if task.name == "lora_ft" else "lm"
    return Problem(
        kind, lambda: GPTLogits(task), cks, weights, train, test, len(train[0]), len(test[0])
    )


def _to_qn(scores, p: Problem, train_first: bool) -> np.ndarray:
    arr = (
        scores.detach().cpu().double().numpy()
        if torch.is_tensor(scores)
        else np.asarray(scores, dtype=np.float64)
    )
    if train_first:
        arr = arr.T
    if arr.shape != (p.n_test, p.n_train):
        raise ValueError(f"unexpected score shape {arr.shape}, wanted {(p.n_test, p.n_train)}")
    return np.ascontiguousarray(arr)


# ----------------------------------------------------------------------------- dattri TRAK


def dattri_trak_sweep(
    p: Problem,
    grid: dict[int, list[float]],
    tracin_weights=None,
    choose: Callable[[np.ndarray], float] | None = None,
    max_extend: int = 3,
) -> dict:
    """dattri TRAK over all checkpoints for every ``proj_dim -> [regularization, ...]`` of ``grid``,
    from ONE pass of dattri's per-example gradients.

    One ``TRAKAttributor`` per proj_dim (each with dattri's own projector kwargs). The largest one runs
    ``cache()``; its ``random_project`` is wrapped so that the (norm-scaled) training gradients dattri
    projects are also projected with the other attributors' kwargs, and every projection is kept.
    For each proj_dim and regularization the attributor gets ``inv_XTX_XT_list = solve(XᵀX + reg I, Xᵀ)``
    (what its ``cache()`` computes) and the cached ``Q`` (independent of the projection), then runs its
    own ``attribute()``. Checked bit-identical to separate dattri runs on clf_adamw.

    Returns ``{(proj_dim, reg): (scores [Q, N], seconds, projector_kwargs)}`` and, with
    ``tracin_weights``, ``"tracin"``: TracIn-CP ``Σ_c w_c Y_c X_cᵀ`` of the largest projection's train
    (``X_c``) and query (``Y_c``) features (dattri's TracIn projector kwargs are the same; equal to
    ``TracInAttributor`` up to the constant 1/P of dattri TRAK's gradient scaling).
    ``seconds`` of a setting = the shared pass minus the other projections' time + this solve + scoring.
    With ``choose`` (scores -> choosing-half LDS), a proj_dim whose best positive regularization is at an
    edge of its list gets one more decade beyond that edge, up to ``max_extend`` times.
    """
    import dattri.algorithm.trak as trak_mod
    from dattri.algorithm.trak import TRAKAttributor
    from dattri.task import AttributionTask

    projs = sorted(grid)
    main = projs[-1]
    out: dict = {}
    with _dattri_defaults_guard():
        train_dl, test_dl = p.loaders()
        t0 = time.perf_counter()
        model = p.model(p.checkpoints[-1])
        target, prob, _ = p.trak_functions(model)
        at = AttributionTask(
            loss_func=target,
            model=model,
            checkpoints=_clone_ckpts(p.checkpoints),
            target_func=target,
        )
        atts = {}
        for d in projs:
            # correct_probability_func gets an *unflattened* param dict in 0.3.0: no @flatten_func.
            atts[d] = TRAKAttributor(
                task=at,
                correct_probability_func=prob,
                device="cpu",
                regularization=grid[d][0],
                projector_kwargs={"proj_dim": d},
            )
            # detach from the module-level dict the next constructor mutates
            atts[d].projector_kwargs = dict(atts[d].projector_kwargs)
        captured: dict[int, dict[int, list[torch.Tensor]]] = {d: {} for d in projs}
        proj_s = dict.fromkeys(projs, 0.0)
        original = trak_mod.random_project

        def capturing(feature, batch_size, **kw):
            t = time.perf_counter()
            proj = original(feature, batch_size, **kw)
            proj_s[main] += time.perf_counter() - t

            def call(grad, ensemble_id=0):
                t = time.perf_counter()
                res = proj(grad, ensemble_id=ensemble_id)
                proj_s[main] += time.perf_counter() - t
                captured[main].setdefault(ensemble_id, []).append(res.detach().clone())
                for d in projs[:-1]:
                    t = time.perf_counter()
                    side = original(grad, batch_size, **atts[d].projector_kwargs)
                    side = side(grad, ensemble_id=ensemble_id).detach().clone()
                    proj_s[d] += time.perf_counter() - t
                    captured[d].setdefault(ensemble_id, []).append(side)
                return res

            return call

        trak_mod.random_project = capturing
        try:
            atts[main].cache(train_dl)
        finally:
            trak_mod.random_project = original
        pass_s = time.perf_counter() - t0 - sum(proj_s.values())  # gradients, Q, first solve
        test_feats: dict[int, list[torch.Tensor]] = {}
        for d in projs:
            xs = [torch.cat(captured[d][c]) for c in sorted(captured[d])]
            assert len(xs) == len(p.checkpoints) and all(len(x) == p.n_train for x in xs)
            att = atts[d]
            att.full_train_dataloader = train_dl
            att.Q = atts[main].Q
            regs, extended, chosen = list(grid[d]), 0, {}
            while regs:
                reg = regs.pop(0)
                t1 = time.perf_counter()
                inv = []
                for x in xs:
                    kernel = x.T @ x
                    kernel.diagonal().add_(reg)
                    inv.append(torch.linalg.solve(kernel, x.T))
                att.inv_XTX_XT_list = inv
                att.regularization = reg
                if d == main and tracin_weights is not None and not test_feats:
                    trak_mod.random_project = _recording(original, test_feats)
                try:
                    scores = att.attribute(test_dl)
                finally:
                    trak_mod.random_project = original
                sec = pass_s + proj_s[d] + time.perf_counter() - t1
                qn = _to_qn(scores, p, train_first=True)
                out[(d, reg)] = (qn, sec, dict(att.projector_kwargs), extended > 0)
                if choose is None or reg <= 0:
                    continue
                chosen[reg] = choose(qn)
                if not regs and extended < max_extend:
                    pos = sorted(chosen)
                    best = max(pos, key=lambda k: chosen[k])
                    if len(pos) > 1 and best == pos[0]:
                        regs.append(pos[0] / 10)
                        extended += 1
                    elif len(pos) > 1 and best == pos[-1]:
                        regs.append(pos[-1] * 10)
                        extended += 1
            if d == main and tracin_weights is not None:
                ys = [torch.cat(test_feats[c]) for c in sorted(test_feats)]
                tr = sum(
                    w * (y.double() @ x.double().T)
                    for w, x, y in zip(tracin_weights, xs, ys, strict=True)
                )
                out["tracin"] = (tr.numpy(), pass_s + proj_s[d])
    return out


def _recording(original, store: dict) -> Callable:
    def wrapped(feature, batch_size, **kw):
        proj = original(feature, batch_size, **kw)

        def call(grad, ensemble_id=0):
            res = proj(grad, ensemble_id=ensemble_id)
            store.setdefault(ensemble_id, []).append(res.detach().clone())
            return res

        return call

    return wrapped


def run_dattri_trak(p: Problem, ctx) -> None:
    _, _, output = p.trak_functions(p.model())
    base = {"checkpoints": f"all ({len(p.checkpoints)})", "output_fn": output}
    grid = {d: list(ctx.trak_regs) for d in ctx.trak_proj}
    grid[512] = [0.0, *grid.get(512, [])]  # the library default: proj 512, regularization 0
    weights = p.lr_weights if ctx.tracin_from_trak or ctx.tracin_check else None

    def choose(scores: np.ndarray) -> float:
        return ctx.bank.halves(torch.from_numpy(np.nan_to_num(scores)))["choose"]

    try:
        res = dattri_trak_sweep(p, grid, tracin_weights=weights, choose=choose)
    except Exception as exc:
        for d, regs in grid.items():
            for reg in regs:
                ctx.add(
                    "dattri",
                    "TRAK",
                    {**base, "proj_dim": d, "regularization": reg},
                    is_default=(d, reg) == (512, 0.0),
                    error=exc,
                )
        return
    ctx.trak_tracin = res.pop("tracin", None)
    for (d, reg), (scores, sec, used, extension) in res.items():
        settings = {
            **base,
            "proj_dim": used["proj_dim"],
            "regularization": reg,
            "projector_kwargs": used,
        }
        default = (d, reg) == (512, 0.0)
        if default:
            settings["note"] = (
                "library defaults (projector_kwargs=None -> proj_dim 512, regularization 0.0)"
            )
        if extension:
            settings["grid_extension"] = (
                "the grid's edge was best on the choosing half: one decade further"
            )
        ctx.add("dattri", "TRAK", settings, is_default=default, scores=scores, seconds=sec)
    for d in ctx.dropped_trak_proj:
        for reg in ctx.trak_regs:
            ctx.add(
                "dattri",
                "TRAK",
                {**base, "proj_dim": d, "regularization": reg},
                is_default=False,
                error=f"not run: dropped to fit the time budget ({ctx.task.name})",
            )
    LOG.info("dattri TRAK done")


# ----------------------------------------------------------------------------- kronfluence EK-FAC


def _lora_kron_task_cls():
    from kronfluence import Task

    class _LabeledLMTask(Task):
        """Summed next-token CE over supervised (label != -100) bytes; sampled labels when ``sample``
        (true Fisher, the library default); measurement = the query's summed completion CE."""

        def __init__(self, tracked: list[str]) -> None:
            super().__init__()
            self._tracked = list(tracked)

        def compute_train_loss(self, batch, model, sample=False):
            x, labels = batch
            logits = model(x)
            if sample:
                with torch.no_grad():
                    probs = F.softmax(logits[:, :-1].detach().float(), -1)
                    drawn = torch.multinomial(probs.reshape(-1, probs.shape[-1]), 1).view(
                        probs.shape[:2]
                    )
                    keep = labels[:, 1:] != -100
                    labels = labels.clone()
                    labels[:, 1:] = torch.where(keep, drawn, labels[:, 1:])
            return _labeled_seq_loss(logits, labels).sum()

        def compute_measurement(self, batch, model):
            x, labels = batch
            return _labeled_seq_loss(model(x), labels).sum()

        def get_influence_tracked_modules(self):
            return self._tracked

    return _LabeledLMTask


def kronfluence_sweep(p: Problem, dampings) -> tuple[dict, dict]:
    """EK-FAC factors at the last checkpoint once, pairwise scores per damping.

    Returns ``({damping: (scores [Q, N], seconds)}, extra settings)``; a damping whose scoring
    raises maps to the exception.
    """
    from kronfluence import prepare_model
    from kronfluence.analyzer import Analyzer
    from kronfluence.arguments import FactorArguments, ScoreArguments

    train_ds, test_ds = TensorDataset(*p.train), TensorDataset(*p.test)
    extra: dict = {}
    out: dict = {}
    with tempfile.TemporaryDirectory(prefix="kronfluence_") as tmp, _seeded(0):
        t0 = time.perf_counter()
        model = p.model(p.checkpoints[-1])
        if p.kind == "clf":
            ktask = _kronfluence_task_cls()()
        else:
            if p.kind == "lm":
                extra["conv1d_converted"] = len(_conv1d_to_linear(model))
            tracked, tied = _kronfluence_tracked(model)  # LoRA: only lora_A / lora_B are nn.Linear
            if not tracked:
                raise ValueError("no nn.Linear module kronfluence could track")
            extra["tracked_modules"] = len(tracked)
            extra["untracked_tied"] = tied
            if p.kind == "lora":
                bad = [n for n in tracked if "lora_" not in n]
                if bad:
                    raise ValueError(f"non-adapter nn.Linear modules would be tracked: {bad[:3]}")
                ktask = _lora_kron_task_cls()(tracked)
            else:
                ktask = _kronfluence_lm_task_cls()(tracked)
        model = prepare_model(model, ktask)
        analyzer = Analyzer(
            analysis_name="sweep",
            model=model,
            task=ktask,
            cpu=True,
            log_level=logging.WARNING,
            disable_tqdm=True,
            output_dir=tmp,
        )
        analyzer.fit_all_factors(
            factors_name="ekfac",
            dataset=train_ds,
            per_device_batch_size=TRAIN_BS,
            factor_args=FactorArguments(strategy="ekfac"),
            overwrite_output_dir=True,
        )
        fit_s = time.perf_counter() - t0
        extra["factor_fit_seconds"] = round(fit_s, 2)
        for i, d in enumerate(dampings):
            t1 = time.perf_counter()
            try:
                analyzer.compute_pairwise_scores(
                    scores_name=f"pairwise_{i}",
                    factors_name="ekfac",
                    query_dataset=test_ds,
                    train_dataset=train_ds,
                    per_device_query_batch_size=min(TEST_BS, len(test_ds)),
                    per_device_train_batch_size=TRAIN_BS,
                    score_args=ScoreArguments(damping_factor=d),
                    overwrite_output_dir=True,
                )
                s = analyzer.load_pairwise_scores(f"pairwise_{i}")["all_modules"]
                out[d] = (_to_qn(s, p, train_first=False), fit_s + time.perf_counter() - t1)
            except Exception as exc:
                out[d] = exc
    return out, extra


def run_kronfluence(p: Problem, ctx) -> None:
    base = {
        "checkpoints": "last",
        "strategy": "ekfac",
        "fisher": "true Fisher (library default; sampled labels, seed 0)",
        "measurement": "query loss (CE / summed token CE)",
    }
    if p.kind == "lm":
        base["modules"] = "Conv1D converted to nn.Linear; every untied nn.Linear tracked"
    if p.kind == "lora":
        base["modules"] = "LoRA adapters only (lora_A / lora_B nn.Linear); frozen base untracked"
    try:
        res, extra = kronfluence_sweep(p, ctx.dampings)
    except Exception as exc:
        for d in ctx.dampings:
            ctx.add(
                "kronfluence",
                "EK-FAC",
                {**base, "damping_factor": _dname(d)},
                is_default=d == KFAC_LIBRARY_DEFAULT,
                error=exc,
            )
        return
    for d in ctx.dampings:
        settings = {**base, "damping_factor": _dname(d), **extra}
        if d == KFAC_LIBRARY_DEFAULT:
            settings["note"] = "kronfluence 1.0.1 ScoreArguments default"
        if d is None:
            settings["note"] = (
                "library heuristic 0.1 x mean eigenvalue (what benchmarks/peers.py runs)"
            )
        r = res[d]
        if isinstance(r, Exception):
            ctx.add(
                "kronfluence", "EK-FAC", settings, is_default=d == KFAC_LIBRARY_DEFAULT, error=r
            )
        else:
            ctx.add(
                "kronfluence",
                "EK-FAC",
                settings,
                is_default=d == KFAC_LIBRARY_DEFAULT,
                scores=r[0],
                seconds=r[1],
            )
    LOG.info("kronfluence done")


def _dname(d) -> str | float:
    return "None (heuristic)" if d is None else d


# ----------------------------------------------------------------------------- dattri TracIn


def dattri_tracin(
    p: Problem, proj_dim: int | None, train_bs: int
) -> tuple[np.ndarray, float, dict]:
    """dattri TracInAttributor over all checkpoints, lr-sum weights; exact when ``proj_dim`` is None."""
    from dattri.algorithm.tracin import TracInAttributor
    from dattri.task import AttributionTask

    with _dattri_defaults_guard():
        train_dl, test_dl = p.loaders(train_bs)
        t0 = time.perf_counter()
        model = p.model(p.checkpoints[-1])
        at = AttributionTask(
            loss_func=p.loss_fn(model), model=model, checkpoints=_clone_ckpts(p.checkpoints)
        )
        kwargs = {} if proj_dim is None else {"projector_kwargs": {"proj_dim": proj_dim}}
        att = TracInAttributor(
            task=at,
            weight_list=torch.tensor(p.lr_weights, dtype=torch.float32),
            normalized_grad=False,
            **kwargs,
        )
        if proj_dim is None:
            # dattri merges its default projector kwargs (proj_dim=512) in: force exact gradients
            att.projector_kwargs = None
            used = None
        else:
            att.projector_kwargs = dict(att.projector_kwargs)
            used = dict(att.projector_kwargs)
        scores = att.attribute(train_dl, test_dl)
        seconds = time.perf_counter() - t0
    grad_dim = sum(q.numel() for q in model.parameters() if q.requires_grad)
    return (
        _to_qn(scores, p, train_first=True),
        seconds,
        {"projector_kwargs": used, "grad_dim": grad_dim},
    )


def run_tracin(p: Problem, ctx) -> None:
    settings = {
        "checkpoints": f"all ({len(p.checkpoints)})",
        "weights": "lr sums of the logged intervals",
        "normalized_grad": False,
    }
    if p.kind == "clf":  # benchmarks.peers' runner as is (exact per-example gradients)
        (r,) = run_peers(p.ctask, ["dattri_tracin"])
        settings.update(loss="cross-entropy", projection=None)
        if r.error:
            ctx.add("dattri", "TracIn-CP", settings, is_default=True, error=r.error)
        else:
            ctx.add(
                "dattri", "TracIn-CP", settings, is_default=True, scores=r.scores, seconds=r.seconds
            )
        return
    loss = "next-token CE summed over " + ("completion bytes" if p.kind == "lora" else "tokens")
    if ctx.tracin_from_trak and ctx.trak_tracin is not None:
        scores, sec = ctx.trak_tracin
        settings.update(
            loss=loss,
            projection=f"dattri random_project, proj_dim {max(ctx.trak_proj)}, seed 0 (TracIn's defaults "
            "but proj_dim, as benchmarks/peers_lm.py)",
            computed_from="dattri TRAK's captured projected gradients of the same loss and projector: "
            "sum_c w_c Y_c X_c^T (equal to TracInAttributor up to a constant; checked on gpt_adamw); "
            "TracInAttributor itself was not run, to fit the time budget",
            seconds_note="the shared gradient pass + this projection (TracInAttributor would also "
            "recompute the query gradients for every train batch)",
        )
        ctx.add("dattri", "TracIn-CP", settings, is_default=True, scores=scores, seconds=sec)
        return
    settings.update(
        loss=loss,
        projection=f"dattri random_project, proj_dim {ctx.tracin_proj} (as benchmarks/peers_lm.py)",
        train_batch_size=ctx.tracin_bs,
    )
    try:
        scores, sec, extra = dattri_tracin(p, ctx.tracin_proj, ctx.tracin_bs)
    except Exception as exc:
        ctx.add("dattri", "TracIn-CP", settings, is_default=True, error=exc)
        return
    if ctx.tracin_check and ctx.trak_tracin is not None:
        from benchmarks.peers import _spearman_rows

        rho = _spearman_rows(scores, ctx.trak_tracin[0])
        extra["check_rho_vs_trak_features"] = [float(np.nanmean(rho)), float(np.nanmin(rho))]
        LOG.info(
            "TracInAttributor vs TRAK-feature TracIn: mean rho %.6f min %.6f",
            *extra["check_rho_vs_trak_features"],
        )
    ctx.add(
        "dattri", "TracIn-CP", {**settings, **extra}, is_default=True, scores=scores, seconds=sec
    )


# ----------------------------------------------------------------------------- traker TRAK


def _traker_lm_output():
    from trak.modelout_functions import AbstractModelOutput

    class CausalLMOutput(AbstractModelOutput):
        """Model output = log-probability of the supervised next tokens of one sequence (minus the summed
        CE the task trains on); out-to-loss term ``1 - p`` with ``p`` that sequence probability, the
        same output and weighting as the dattri TRAK rows (benchmarks/peers_lm.py)."""

        def __init__(self) -> None:  # abstract in traker
            super().__init__()

        @staticmethod
        def get_output(model, weights, buffers, tokens, labels=None):
            labels = tokens if labels is None else labels
            logits = torch.func.functional_call(model, (weights, buffers), (tokens.unsqueeze(0),))
            return -_labeled_seq_loss(logits, labels.unsqueeze(0)).sum()

        def get_out_to_loss_grad(self, model, weights, buffers, batch):
            tokens = batch[0]
            labels = batch[1] if len(batch) > 1 else tokens
            logits = torch.func.functional_call(model, (weights, buffers), (tokens,))
            p = torch.exp(-_labeled_seq_loss(logits, labels))
            return (1 - p).clone().detach().unsqueeze(-1)

    return CausalLMOutput()


class TrakerSweep:
    """traker ``TRAKer`` on CPU (fp32 ``BasicProjector``, seed 0) over all checkpoints, featurized ONCE;
    each ``lambda_reg`` then re-runs traker's own ``finalize_features()`` (its score computer's
    ``lambda_reg`` set and the models' ``is_finalized`` flags cleared) and scoring. Checked bit-identical to
    separate TRAKer runs on clf_adamw. ``seconds`` of a λ = featurization + this finalize + scoring."""

    def __init__(self, p: Problem, proj_dim: int, save_dir: str) -> None:
        from trak import TRAKer
        from trak.projectors import BasicProjector, ProjectionType

        self.p = p
        logging.getLogger("TRAK").setLevel(logging.WARNING)
        t0 = time.perf_counter()
        self.ckpts = _clone_ckpts(p.checkpoints)
        model = p.model(self.ckpts[-1])
        trainable = [n for n, q in model.named_parameters() if q.requires_grad]
        self.grad_wrt = trainable if p.kind == "lora" else None  # LoRA: adapter parameters only
        self.grad_dim = sum(
            q.numel() for q in model.parameters() if q.requires_grad or p.kind != "lora"
        )
        projector = BasicProjector(
            grad_dim=self.grad_dim,
            proj_dim=proj_dim,
            seed=0,
            proj_type=ProjectionType.rademacher,
            device="cpu",
            dtype=torch.float32,
        )
        self.traker = TRAKer(
            model=model,
            task="image_classification" if p.kind == "clf" else _traker_lm_output(),
            train_set_size=p.n_train,
            save_dir=save_dir,  # fresh temp dir; load_from_save_dir=False breaks scoring in 0.3.2
            device="cpu",
            projector=projector,
            proj_dim=proj_dim,
            use_half_precision=False,
            lambda_reg=0.0,
            logging_level=logging.WARNING,
            grad_wrt=self.grad_wrt,
        )
        for mid, ck in enumerate(self.ckpts):
            self.traker.load_checkpoint(ck, model_id=mid)
            for s in range(0, p.n_train, TRAIN_BS):
                batch = [t[s : s + TRAIN_BS] for t in p.train]
                self.traker.featurize(batch=batch, num_samples=len(batch[0]))
        self.featurize_s = time.perf_counter() - t0
        self.calls = 0

    def scores(self, lambda_reg: float) -> tuple[np.ndarray, float]:
        tr = self.traker
        t0 = time.perf_counter()
        tr.lambda_reg = lambda_reg
        tr.score_computer.lambda_reg = lambda_reg
        for meta in tr.saver.model_ids.values():
            meta["is_finalized"] = 0
        tr.finalize_features()
        exp = f"queries_{self.calls}"
        self.calls += 1
        for mid, ck in enumerate(self.ckpts):
            tr.start_scoring_checkpoint(
                exp_name=exp, checkpoint=ck, model_id=mid, num_targets=self.p.n_test
            )
            for s in range(0, self.p.n_test, TEST_BS):
                batch = [t[s : s + TEST_BS] for t in self.p.test]
                tr.score(batch=batch, num_samples=len(batch[0]))
        scores = np.array(tr.finalize_scores(exp_name=exp))  # [N, Q], copied out of the memmap
        return _to_qn(scores, self.p, train_first=True), self.featurize_s + time.perf_counter() - t0


def run_traker(p: Problem, ctx) -> None:
    base = {
        "checkpoints": f"all ({len(p.checkpoints)})",
        "task": "image_classification (margin output)"
        if p.kind == "clf"
        else "custom AbstractModelOutput: log-prob of the supervised next tokens, out-to-loss 1 - p",
        "projector": "BasicProjector rademacher fp32, seed 0 (CPU)",
        "use_half_precision": False,
        "proj_dim": 2048,
    }
    if p.kind == "lora":
        base["grad_wrt"] = "LoRA adapter parameters only"

    def settings(lam):
        s = {**base, "lambda_reg": lam}
        if lam == 0.0:
            s["note"] = (
                "library defaults proj_dim 2048, lambda_reg 0 (fp32 and an explicit CPU projector "
                "instead of use_half_precision=True / the CUDA projector)"
            )
        return s

    with tempfile.TemporaryDirectory(prefix="traker_") as save_dir:
        try:
            sweep = TrakerSweep(p, 2048, save_dir)
        except Exception as exc:
            for lam in (0.0, *ctx.traker_lambdas):
                ctx.add("traker", "TRAK", settings(lam), is_default=lam == 0.0, error=exc)
            return
        choose = {}
        lams = [0.0, *ctx.traker_lambdas]
        extended = 0
        while lams:
            lam = lams.pop(0)
            s = settings(lam)
            if extended and lam not in (0.0, *ctx.traker_lambdas):
                s["grid_extension"] = (
                    "the grid's edge was best on the choosing half: one decade further"
                )
            try:
                scores, sec = sweep.scores(lam)
            except Exception as exc:
                ctx.add("traker", "TRAK", s, is_default=lam == 0.0, error=exc)
                continue
            ctx.add("traker", "TRAK", s, is_default=lam == 0.0, scores=scores, seconds=sec)
            choose[lam] = ctx.rows[-1]["choose"]
            if not lams and extended < 3:  # best at an edge of the λ grid: extend by a decade
                grid = sorted(k for k in choose if k > 0)
                best = max(grid, key=lambda k: choose[k])
                if best == grid[0]:
                    lams.append(grid[0] / 10)
                    extended += 1
                elif best == grid[-1]:
                    lams.append(grid[-1] * 10)
                    extended += 1
    LOG.info("traker done")


# ----------------------------------------------------------------------------- bookkeeping


class Context:
    """Grid choices of one task, the bank, and the rows so far (saved after every row)."""

    def __init__(self, task, bank: BankView, out: Path, fit_s: float) -> None:
        self.task, self.bank, self.out = task, bank, out
        self.rows: list[dict] = []
        self.fit_s = fit_s
        self.trak_proj = TRAK_PROJ
        self.trak_regs = TRAK_REGS
        self.dampings = KFAC_DAMPINGS
        self.traker_lambdas = TRAKER_LAMBDAS
        self.tracin_proj = 2048
        self.tracin_bs = TRAIN_BS
        self.tracin_from_trak = (
            False  # TracIn-CP from dattri TRAK's captured features (time budget)
        )
        self.tracin_check = False  # compare TracInAttributor with those features
        self.trak_tracin = None
        self.dropped_trak_proj: list[int] = []

    def add(
        self, library, method, settings, is_default, scores=None, seconds=None, error=None
    ) -> None:
        row = {
            "task": self.task.name,
            "library": library,
            "method": method,
            "settings": settings,
            "is_default": bool(is_default),
            "choose": None,
            "report": None,
            "report_ci": None,
            "all": None,
            "seconds": None if seconds is None else round(float(seconds), 2),
            "error": None,
        }
        if error is not None:
            row["error"] = (
                error if isinstance(error, str) else f"{type(error).__name__}: {error}"[:500]
            )
            if not isinstance(error, str):
                LOG.info("%s", "".join(traceback.format_exception(error))[-2000:])
        else:
            finite = bool(np.isfinite(scores).all())
            if not finite:
                row["nonfinite_scores"] = int((~np.isfinite(scores)).sum())
                scores = np.nan_to_num(scores, nan=0.0, posinf=0.0, neginf=0.0)
            res = self.bank.halves(torch.from_numpy(scores))
            row.update({k: res[k] for k in ("choose", "report", "report_ci", "all")})
        self.rows.append(row)
        LOG.info(
            "%s %s %s -> choose %s report %s (%s s) %s",
            library,
            method,
            {
                k: v
                for k, v in settings.items()
                if k in ("proj_dim", "regularization", "damping_factor", "lambda_reg")
            },
            _f(row["choose"]),
            _f(row["report"]),
            row["seconds"],
            row["error"] or "",
        )
        self.save()

    def save(self) -> None:
        old = json.loads(self.out.read_text()) if self.out.exists() else []
        # a (re-)run family replaces all of that family's old rows (its grid may have changed)
        fams = {(r["library"], r["method"]) for r in self.rows}
        rows = [r for r in old if (r["library"], r["method"]) not in fams] + self.rows
        mark_best(rows)
        self.out.write_text(json.dumps(rows, indent=1, default=float))


def mark_best(rows: list[dict]) -> None:
    """``best_on_choose``: per (library, method), the successful row with the highest choose-half LDS."""
    fams: dict = {}
    for r in rows:
        r["best_on_choose"] = False
        if r.get("error") is None and r.get("choose") is not None and math.isfinite(r["choose"]):
            fams.setdefault((r["library"], r["method"]), []).append(r)
    for members in fams.values():
        max(members, key=lambda r: r["choose"])["best_on_choose"] = True


def _f(v) -> str:
    return "-" if v is None else f"{v:.3f}"


RUNNERS = {
    "dattri_trak": run_dattri_trak,
    "kronfluence_ekfac": run_kronfluence,
    "dattri_tracin": run_tracin,
    "traker_trak": run_traker,
}


def configure(ctx: Context) -> None:
    """Task-specific choices (each recorded in the rows' settings)."""
    if ctx.task.name == "gpt_adamw":
        ctx.tracin_check = True
    if ctx.task.name == "gpt_single_pass":
        # 10,000 training blocks on 2 shared cores: one dattri gradient pass (~4 checkpoints x 10k
        # per-example gradients) costs ~10 minutes, so TracIn-CP reuses TRAK's pass (same loss,
        # same projector) instead of a second one.
        ctx.tracin_from_trak = True


def run_task(name: str, families, workdir: Path) -> None:
    task = TASKS[name]()
    if not (bank_path(name) / f"outputs_{task.primary}.npy").exists():
        print(f"{name}: bank not ready ({bank_path(name)}), skipped", flush=True)
        return
    bank = BankView.load(task)
    t0 = time.perf_counter()
    model, store, fit_s = fit_logged(task, workdir / f"{name}.h5")
    LOG.info(
        "%s: fit_logged %.1f s (%d checkpoints at steps %s, lr sums %s)",
        name,
        fit_s,
        len(store.steps),
        store.steps,
        [c.lr_sum[0] for c in store.checkpoints],
    )
    p = problem_from_store(task, store)
    del model
    ctx = Context(task, bank, RESULTS / f"peers_{name}.json", fit_s)
    configure(ctx)
    for fam in families:
        t1 = time.perf_counter()
        try:
            RUNNERS[fam](p, ctx)
        except Exception as exc:  # never lose the other families
            LOG.info("family %s crashed: %s", fam, "".join(traceback.format_exception(exc))[-3000:])
            ctx.add(*_FAMILY_NAMES[fam], {}, is_default=True, error=exc)
        print(f"{name}: {fam} {time.perf_counter() - t1:.0f}s", flush=True)
    print(f"{name}: done in {time.perf_counter() - t0:.0f}s -> {ctx.out}", flush=True)
    summarize(ctx.out)


_FAMILY_NAMES = {
    "dattri_trak": ("dattri", "TRAK"),
    "kronfluence_ekfac": ("kronfluence", "EK-FAC"),
    "dattri_tracin": ("dattri", "TracIn-CP"),
    "traker_trak": ("traker", "TRAK"),
}


def summarize(path: Path) -> None:
    rows = json.loads(path.read_text())
    for fam in dict.fromkeys((r["library"], r["method"]) for r in rows):
        members = [r for r in rows if (r["library"], r["method"]) == fam]
        d = next((r for r in members if r["is_default"]), None)
        b = next((r for r in members if r.get("best_on_choose")), None)
        dflt = f"default report {_f(d['report'])}" if d and not d["error"] else "default failed"
        best = (
            (
                f"best {_brief(b['settings'])} choose {_f(b['choose'])} report {_f(b['report'])} "
                f"({b['seconds']} s)"
            )
            if b
            else "no successful setting"
        )
        print(f"  {fam[0]:11s} {fam[1]:10s} {dflt:22s} {best}", flush=True)


def _brief(s: dict) -> str:
    keys = ("proj_dim", "regularization", "damping_factor", "lambda_reg")
    return ",".join(f"{k}={s[k]}" for k in keys if k in s) or "-"


@contextlib.contextmanager
def _quiet():
    import tqdm

    init = tqdm.tqdm.__init__
    tqdm.tqdm.__init__ = functools.partialmethod(init, disable=True)
    try:
        yield
    finally:
        tqdm.tqdm.__init__ = init


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "--task",
        action="append",
        required=True,
        choices=["clf_adamw", "gpt_adamw", "gpt_single_pass", "lora_ft"],
    )
    ap.add_argument("--family", action="append", choices=FAMILIES, help="default: all")
    ap.add_argument("--log", default="/tmp/peer_sweep.log")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    warnings.filterwarnings("ignore")
    logging.basicConfig(filename=args.log, level=logging.INFO, format="%(asctime)s %(message)s")
    LOG.setLevel(logging.INFO)  # kronfluence lowers the root logger's level to its log_level
    for name in ("lightning.pytorch", "lightning.fabric", "transformers", "kronfluence", "TRAK"):
        logging.getLogger(name).setLevel(logging.ERROR)
    torch.set_num_threads(args.threads)
    RESULTS.mkdir(exist_ok=True)
    with _quiet(), tempfile.TemporaryDirectory() as tmp:
        for name in args.task:
            run_task(name, args.family or FAMILIES, Path(tmp))


if __name__ == "__main__":
    main()
