"""Adapters that run peer TDA libraries on a small causal language model.

The counterpart of :mod:`benchmarks.peers` for next-token prediction. Every runner takes an
:class:`LMTask` (token tensors plus a list of checkpoints) and returns a dense ``[Q, N]`` score
matrix in *our* sign convention: ``score[q, i] > 0`` means that including training sequence ``i``
lowers the loss of query sequence ``q``. The loss is the same everywhere: next-token
cross-entropy (logits at position ``t`` predict token ``t + 1``) *summed* over the ``T - 1``
predicted tokens of a sequence. Signs were checked against an exact TracIn-CP and a plain gradient
dot product at the last checkpoint (self-check at the bottom: ``python -m benchmarks.peers_lm``).

Library-specific notes (details in each runner's docstring and ``settings``):

- dattri: loss functions in ``torch.func`` style on one ``[T]`` sequence; module-level projector
  defaults are restored after use (``peers._dattri_defaults_guard``).
- kronfluence only tracks ``nn.Linear``/``nn.Conv2d``. GPT-2 uses transformers' ``Conv1D``
  (a linear layer with a transposed weight), so those modules are converted to ``nn.Linear``
  (same function and same parameters, transposed), as kronfluence's own GPT-2 example does.
  Embeddings, LayerNorms and a head tied to the token embedding are not tracked.
- captum: ``sample_wise_grads_per_batch=True`` only covers ``nn.Linear``/``nn.Conv2d`` layers,
  so the per-example path (one backward per sequence, all parameters) is used.

Optional dependencies (``pip install -e .[bench]``): dattri, captum, kronfluence. Each library is
imported lazily inside its runner, so a missing library only fails its own runners.
"""

from __future__ import annotations

import functools
import logging
import math
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from benchmarks.peers import (
    PeerResult,
    _clone_ckpts,
    _dattri_defaults_guard,
    _seeded,
    _Spec,
    check_runners,
    kronfluence_ekfac_scores,
    make_register,
    run_registered,
)

__all__ = ["PEERS_LM", "LMTask", "run_peers_lm"]


@dataclass
class LMTask:
    """A causal-LM problem described by token tensors and training checkpoints."""

    model_factory: Callable[[], nn.Module]  # plain nn.Module: input_ids [B, T] long -> [B, T, V]
    checkpoints: list[dict[str, torch.Tensor]]  # state_dicts of model_factory(), training order
    lr_weights: list[float]  # TracIn weight of each checkpoint (lr sum of its interval)
    train_tokens: torch.Tensor  # [N, T] long
    test_tokens: torch.Tensor  # [Q, T] long


PEERS_LM: dict[str, Callable[[LMTask], PeerResult]] = {}
_SPECS_LM: dict[str, _Spec] = {}

# Batch sizes only affect speed/memory (every method below sums or concatenates per example).
# Per-example gradients of a [T]=64 sequence for ~120k parameters: 500 x 0.5 MB per batch.
_TRAIN_BS = 500
_TEST_BS = 500
_PROJ_DIM = 2048
# captum's per-example path runs one backward per sequence through the *whole batch's* graph
# (cost ~ batch size per example), so its train batches stay small.
_CAPTUM_BS = 4


_register = make_register(PEERS_LM, _SPECS_LM, _TRAIN_BS)


def run_peers_lm(task: LMTask, names: Sequence[str] | None = None) -> list[PeerResult]:
    """Run the named LM peers (default: all of :data:`PEERS_LM`); a failure never stops the rest."""
    return run_registered(PEERS_LM, _SPECS_LM, task, names)


# ----------------------------------------------------------------------------- helpers


def _seq_loss(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Next-token CE summed over the T-1 predicted tokens: logits [B, T, V], tokens [B, T] -> [B]."""
    b, t, v = logits.shape
    ce = F.cross_entropy(
        logits[:, :-1].reshape(-1, v), tokens[:, 1:].reshape(-1).long(), reduction="none"
    )
    return ce.view(b, t - 1).sum(1)


def _lm_loss_fn(model: nn.Module) -> Callable:
    """Summed LM loss as a ``torch.func`` function of (params, (tokens,)); tokens [T] or [B, T]."""

    def loss(params, data):
        (x,) = data
        x = x.reshape(-1, x.shape[-1])
        logits = torch.func.functional_call(model, params, (x,))
        return _seq_loss(logits, x).sum()

    return loss


def _seq_prob_fn(model: nn.Module) -> Callable:
    """exp(-summed loss) = probability of the whole sequence (TRAK's ``p``)."""
    loss = _lm_loss_fn(model)

    def prob(params, data):
        return torch.exp(-loss(params, data))

    return prob


def _loaders(task: LMTask) -> tuple[DataLoader, DataLoader]:
    train = TensorDataset(task.train_tokens.long())
    test = TensorDataset(task.test_tokens.long())
    return (
        DataLoader(train, batch_size=_TRAIN_BS, shuffle=False),
        DataLoader(test, batch_size=_TEST_BS, shuffle=False),
    )


def _fresh_model(task: LMTask, ckpt: dict[str, torch.Tensor] | None = None) -> nn.Module:
    model = task.model_factory()
    if ckpt is not None:
        model.load_state_dict(ckpt)
    return model.eval()


def _to_qn(scores, task: LMTask, sign: float, train_first: bool) -> np.ndarray:
    """Convert a library's matrix ([N, Q] if ``train_first``) to [Q, N] float64, our sign."""
    arr = scores.detach().cpu().double().numpy() if torch.is_tensor(scores) else np.asarray(scores)
    arr = arr.astype(np.float64)
    if train_first:
        arr = arr.T
    q, n = len(task.test_tokens), len(task.train_tokens)
    if arr.shape != (q, n):
        raise ValueError(f"unexpected score shape {arr.shape}, wanted {(q, n)}")
    return sign * arr


# ----------------------------------------------------------------------------- dattri

# Signs: dattri's TracIn/GradDot return sum_c w_c g_train . g_test of the summed LM loss, which
# is positive for proponents (sign +1). Its TRAK returns phi_test (X^T X + reg I)^-1 phi_train
# * (1 - p_train); with the same output function on both sides the sign of that function cancels,
# and positive = proponent (sign +1). dattri returns [N, Q], which is transposed.


def _dattri_tracin(
    task: LMTask, ckpts, weights, proj_dim: int | None
) -> tuple[np.ndarray, float, dict]:
    from dattri.algorithm.tracin import TracInAttributor
    from dattri.task import AttributionTask

    with _dattri_defaults_guard():
        train_dl, test_dl = _loaders(task)
        t0 = time.perf_counter()
        model = _fresh_model(task, ckpts[-1])
        at = AttributionTask(loss_func=_lm_loss_fn(model), model=model, checkpoints=ckpts)
        kwargs = {} if proj_dim is None else {"projector_kwargs": {"proj_dim": proj_dim}}
        att = TracInAttributor(
            task=at,
            weight_list=torch.tensor(weights, dtype=torch.float32),
            normalized_grad=False,
            **kwargs,
        )
        if proj_dim is None:
            # dattri always merges its default projector kwargs (proj_dim=512) into
            # projector_kwargs, so passing None still projects; force exact gradients.
            att.projector_kwargs = None
            used = None
        else:
            att.projector_kwargs = dict(att.projector_kwargs)  # detach from the module dict
            used = dict(att.projector_kwargs)
        scores = att.attribute(train_dl, test_dl)
        seconds = time.perf_counter() - t0
    n_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    extra = {"projector_kwargs": used, "grad_dim": n_params}
    return _to_qn(scores, task, +1.0, train_first=True), seconds, extra


@_register(
    "dattri_tracin_lm",
    "TracIn-CP proj2048",
    "dattri",
    checkpoints="all",
    weights="lr_weights",
    loss="next-token CE summed over tokens",
    projection="dattri random_project, normal, proj_dim 2048, seed 0 (per checkpoint ensemble id)",
    normalized_grad=False,
)
def _run_dattri_tracin_lm(task: LMTask, spec: _Spec):
    """dattri TracInAttributor over all checkpoints, gradients randomly projected to 2048 dims."""
    ckpts = _clone_ckpts(task.checkpoints)
    scores, sec, extra = _dattri_tracin(task, ckpts, list(task.lr_weights), _PROJ_DIM)
    return scores, sec, {"n_checkpoints": len(ckpts), **extra}


@_register(
    "dattri_graddot_lm",
    "GradDot (last ckpt, exact)",
    "dattri",
    checkpoints="last",
    weights=[1.0],
    loss="next-token CE summed over tokens",
    projection=None,
)
def _run_dattri_graddot_lm(task: LMTask, spec: _Spec):
    """dattri GradDot = TracInAttributor with the last checkpoint, weight 1, exact gradients."""
    return _dattri_tracin(task, _clone_ckpts(task.checkpoints[-1:]), [1.0], None)


@_register(
    "dattri_trak_lm",
    "TRAK-allckpt proj2048 reg1",
    "dattri",
    checkpoints="all",
    proj_dim=2048,
    regularization=1.0,
    output_fn="summed next-token CE (train and test side)",
    correct_probability="exp(-summed CE) = sequence probability (so 1 - p ~ 1 here)",
    note="reg=1.0 instead of the default 0 (singular kernel when N < proj_dim, peer_bench.md); "
    "not tuned here",
)
def _run_dattri_trak_lm(task: LMTask, spec: _Spec):
    """dattri TRAKAttributor over all checkpoints (as an ensemble) with the LM loss as output."""
    from dattri.algorithm.trak import TRAKAttributor
    from dattri.task import AttributionTask

    with _dattri_defaults_guard():
        train_dl, test_dl = _loaders(task)
        t0 = time.perf_counter()
        model = _fresh_model(task, task.checkpoints[-1])
        loss = _lm_loss_fn(model)
        at = AttributionTask(
            loss_func=loss,
            model=model,
            checkpoints=_clone_ckpts(task.checkpoints),
            target_func=loss,
        )
        # correct_probability_func gets an *unflattened* param dict in 0.3.0: no @flatten_func.
        att = TRAKAttributor(
            task=at,
            correct_probability_func=_seq_prob_fn(model),
            device="cpu",
            regularization=1.0,
            projector_kwargs={"proj_dim": _PROJ_DIM},
        )
        att.projector_kwargs = dict(att.projector_kwargs)  # detach from the module-level dict
        used = dict(att.projector_kwargs)
        att.cache(train_dl)
        scores = att.attribute(test_dl)
        seconds = time.perf_counter() - t0
    return _to_qn(scores, task, +1.0, train_first=True), seconds, {"projector_kwargs": used}


# ----------------------------------------------------------------------------- kronfluence


@torch.no_grad()
def _conv1d_to_linear(model: nn.Module) -> list[str]:
    """Replace transformers' ``Conv1D`` modules in place by equivalent ``nn.Linear`` modules.

    ``Conv1D(nf, nx)`` computes ``x @ W + b`` with ``W`` of shape [nx, nf]; ``nn.Linear`` with
    weight ``W.T`` computes the same. Returns the qualified names of the converted modules.
    """
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # no transformers: nothing to convert
        return []
    converted = []
    for name, module in list(model.named_modules()):
        if not isinstance(module, Conv1D):
            continue
        nx, nf = module.weight.shape
        lin = nn.Linear(nx, nf, bias=module.bias is not None)
        lin = lin.to(dtype=module.weight.dtype, device=module.weight.device)
        lin.weight.copy_(module.weight.T)
        if module.bias is not None:
            lin.bias.copy_(module.bias)
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, lin)
        converted.append(name)
    return converted


def _kronfluence_tracked(model: nn.Module) -> tuple[list[str], list[str]]:
    """Every ``nn.Linear`` except those whose weight is shared with another module (a head tied
    to the token embedding: kronfluence would only see part of its gradient)."""
    owners: dict[int, int] = {}
    for mod in model.modules():
        for p in mod.parameters(recurse=False):
            owners[id(p)] = owners.get(id(p), 0) + 1
    tracked, tied = [], []
    for name, mod in model.named_modules():
        if isinstance(mod, nn.Linear):
            (tied if owners[id(mod.weight)] > 1 else tracked).append(name)
    return tracked, tied


def _kronfluence_lm_task_cls():
    from kronfluence import Task

    class _LMTask(Task):
        """LanguageModelingTask-style: summed token CE; sampled labels when ``sample`` (true
        Fisher, the library default); measurement = the query's summed token CE."""

        def __init__(self, tracked: list[str]) -> None:
            super().__init__()
            self._tracked = list(tracked)

        def compute_train_loss(self, batch, model, sample=False):
            (x,) = batch
            logits = model(x)[:, :-1]
            v = logits.shape[-1]
            if sample:
                with torch.no_grad():
                    probs = F.softmax(logits.detach().reshape(-1, v).float(), -1)
                    labels = torch.multinomial(probs, 1).flatten()
            else:
                labels = x[:, 1:].reshape(-1)
            return F.cross_entropy(logits.reshape(-1, v), labels, reduction="sum")

        def compute_measurement(self, batch, model):
            (x,) = batch
            return _seq_loss(model(x), x).sum()

        def get_influence_tracked_modules(self):
            return self._tracked

    return _LMTask


@_register(
    "kronfluence_ekfac_lm",
    "EK-FAC (last ckpt)",
    "kronfluence",
    checkpoints="last",
    strategy="ekfac",
    damping_factor="None (library heuristic: 0.1 x mean eigenvalue)",
    fisher="true Fisher (library default use_empirical_fisher=False; sampled labels, seed 0)",
    train_loss="next-token CE summed over tokens",
    measurement="query's summed next-token CE",
    modules="transformers Conv1D converted to nn.Linear (kronfluence supports only nn.Linear/"
    "nn.Conv2d); tracked: every nn.Linear not tied to another module (as in kronfluence's GPT-2 "
    "example: attn c_attn/c_proj, mlp c_fc/c_proj); embeddings, LayerNorms and a tied lm_head "
    "are not tracked",
)
def _run_kronfluence_ekfac_lm(task: LMTask, spec: _Spec):
    """kronfluence EK-FAC at the last checkpoint with the library's damping heuristic.

    Sign: with measurement = query loss, kronfluence returns grad_q^T (G + lambda I)^-1 grad_i;
    upweighting train i moves the query loss by minus that, so positive = helpful (sign +1).
    """
    from kronfluence import prepare_model

    train_ds = TensorDataset(task.train_tokens.long())
    test_ds = TensorDataset(task.test_tokens.long())
    with tempfile.TemporaryDirectory(prefix="kronfluence_") as out, _seeded(0):
        t0 = time.perf_counter()
        model = _fresh_model(task, task.checkpoints[-1])
        converted = _conv1d_to_linear(model)
        tracked, tied = _kronfluence_tracked(model)
        if not tracked:
            raise ValueError("no nn.Linear module kronfluence could track")
        ktask = _kronfluence_lm_task_cls()(tracked)
        model = prepare_model(model, ktask)
        scores = kronfluence_ekfac_scores(model, ktask, train_ds, test_ds, out, "peer_lm")
        seconds = time.perf_counter() - t0
    extra = {"conv1d_converted": converted, "tracked_modules": tracked, "untracked_tied": tied}
    return _to_qn(scores, task, +1.0, train_first=False), seconds, extra


# ----------------------------------------------------------------------------- captum


class _SeqLoss(nn.Module):
    """Per-sequence summed next-token CE; ``reduction='none'`` tells captum it is per-example."""

    reduction = "none"

    def forward(self, logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        return _seq_loss(logits, tokens)


@_register(
    "captum_tracincp_lm",
    "TracIn-CP (exact)",
    "captum",
    checkpoints="all",
    weights="lr_weights (returned by checkpoints_load_func)",
    loss="next-token CE summed over tokens, per-example (reduction 'none')",
    sample_wise_grads_per_batch=False,
    layers="all",
    note="sample_wise_grads_per_batch=True only supports nn.Linear/nn.Conv2d (GPT-2 has Conv1D, "
    "Embedding, LayerNorm), so captum's per-example loop is used: one backward per sequence",
)
def _run_captum_tracincp_lm(task: LMTask, spec: _Spec):
    """captum TracInCP over all checkpoints with exact per-example gradients.

    Inputs are ``(tokens, tokens)``: captum calls ``model(*batch[:-1])`` and passes ``batch[-1]``
    as labels to the loss, which shifts them itself. Sign: captum returns
    sum_c lr_c g_test . g_train, positive = proponent (sign +1).
    """
    from captum.influence import TracInCP

    ckpts = _clone_ckpts(task.checkpoints)
    weights = list(task.lr_weights)
    train = TensorDataset(task.train_tokens.long(), task.train_tokens.long())
    train_dl = DataLoader(train, batch_size=_CAPTUM_BS, shuffle=False)

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
        loss_fn=_SeqLoss(),
        batch_size=_CAPTUM_BS,
        sample_wise_grads_per_batch=False,
    )
    test = task.test_tokens.long()
    scores = tracin.influence((test, test), k=None)
    seconds = time.perf_counter() - t0
    return _to_qn(scores, task, +1.0, train_first=False), seconds, {"train_batch_size": _CAPTUM_BS}


# ----------------------------------------------------------------------------- self-check


class _TinyGPTLogits(nn.Module):
    """``benchmarks.tasks.TinyByteGPT``'s GPT2LMHeadModel as input_ids -> logits."""

    def __init__(self) -> None:
        super().__init__()
        from benchmarks.tasks import TinyByteGPT

        self.lm = TinyByteGPT().lm

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.lm(input_ids=input_ids).logits


def _tinygpt_task(num_train: int = 200, num_queries: int = 10, epochs: int = 3) -> LMTask:
    from benchmarks.tasks import pydoc_blocks

    train, test = pydoc_blocks(num_train=num_train, num_queries=num_queries)
    torch.manual_seed(0)
    model = _TinyGPTLogits()
    lr, bs = 3e-3, 32
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(0)
    steps = math.ceil(num_train / bs)
    ckpts = []
    model.train()
    for _ in range(epochs):
        perm = torch.randperm(num_train, generator=gen)
        for s in range(0, num_train, bs):
            x = train[perm[s : s + bs]]
            opt.zero_grad()
            (_seq_loss(model(x), x).mean() / (x.shape[1] - 1)).backward()
            opt.step()
        ckpts.append({k: v.detach().clone() for k, v in model.state_dict().items()})
    return LMTask(
        model_factory=_TinyGPTLogits,
        checkpoints=ckpts,
        lr_weights=[steps * lr] * epochs,
        train_tokens=train,
        test_tokens=test,
    )


def _flat_grads(model: nn.Module, ckpt, tokens: torch.Tensor, chunk: int = 100) -> torch.Tensor:
    """Exact per-sequence gradients [B, P] of the summed LM loss at ``ckpt`` via torch.func."""
    model.load_state_dict(ckpt)
    params = {k: v.detach() for k, v in model.named_parameters()}  # tied weights appear once

    def loss(p, x):
        return _seq_loss(torch.func.functional_call(model, p, (x[None],)), x[None])[0]

    grad_fn = torch.func.vmap(torch.func.grad(loss), in_dims=(None, 0))
    out = []
    for s in range(0, len(tokens), chunk):
        g = grad_fn(params, tokens[s : s + chunk])
        out.append(torch.cat([g[k].reshape(g[k].shape[0], -1) for k in params], dim=1))
    return torch.cat(out)


def _self_check() -> int:
    import warnings

    import tqdm

    warnings.filterwarnings("ignore")
    logging.getLogger("transformers").setLevel(logging.ERROR)
    # the libraries' progress bars would drown the table (self-check only, not the runners)
    tqdm.tqdm.__init__ = functools.partialmethod(tqdm.tqdm.__init__, disable=True)
    torch.set_num_threads(2)
    t_all = time.perf_counter()
    task = _tinygpt_task()
    t_train = time.perf_counter() - t_all
    model = _fresh_model(task, task.checkpoints[-1])
    with torch.no_grad():
        test_loss = (_seq_loss(model(task.test_tokens), task.test_tokens).mean() / 63).item()
        train_loss = (_seq_loss(model(task.train_tokens), task.train_tokens).mean() / 63).item()
    t0 = time.perf_counter()
    exact = np.zeros((len(task.test_tokens), len(task.train_tokens)))
    for w, ck in zip(task.lr_weights, task.checkpoints, strict=True):
        gq = _flat_grads(model, ck, task.test_tokens)
        gi = _flat_grads(model, ck, task.train_tokens)
        graddot = (gq.double() @ gi.double().T).numpy()  # ends at the last checkpoint
        exact += w * graddot
    t_exact = time.perf_counter() - t0
    print(
        f"tinygpt task: N={len(task.train_tokens)} Q={len(task.test_tokens)} "
        f"ckpts={len(task.checkpoints)} lr_weights={task.lr_weights} params={gi.shape[1]} "
        f"train/test loss per token={train_loss:.3f}/{test_loss:.3f} "
        f"(train {t_train:.1f}s, exact TracIn {t_exact:.1f}s)"
    )
    # warm-up: library imports are not part of any runner's time
    import captum.influence  # noqa: F401
    import dattri.algorithm.tracin  # noqa: F401
    import dattri.algorithm.trak  # noqa: F401
    import kronfluence  # noqa: F401

    failed = check_runners(
        PEERS_LM,
        run_peers_lm,
        task,
        exact,
        graddot,
        tracin_runners=("dattri_tracin_lm", "captum_tracincp_lm"),
        tracin_ok=lambda rho: np.nanmean(rho) > 0.9,
        tracin_rule="TracIn runner needs mean rho > 0.9",
    )
    print(f"total self-check time {time.perf_counter() - t_all:.1f}s")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(_self_check())
