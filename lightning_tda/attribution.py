"""``AttributionStore``: open a store, attribute queries, compute self-influence."""

from __future__ import annotations

import contextlib
import json
import os
from typing import Any

import torch
from torch import nn

from lightning_tda.capture.ensemble import dropout_member
from lightning_tda.capture.layers import check_layers_match, discover_layers
from lightning_tda.capture.losses import LossFn
from lightning_tda.capture.query_spec import QuerySpec
from lightning_tda.capture.replay import Quantity, featurize_data, loaded_state, model_device
from lightning_tda.capture.task import Task, recorded_task
from lightning_tda.data.ids import ExampleIds
from lightning_tda.errors import ConfigError, ProjectionMismatchError, StoreError
from lightning_tda.methods import AttributionMethod, get_method
from lightning_tda.methods.auto import AUTO, auto_method, method_settings
from lightning_tda.methods.base import self_influence_refusal
from lightning_tda.methods.influence import QueryVectors
from lightning_tda.methods.row_index import IndexConfig, RowIndex, build_row_index, row_terms
from lightning_tda.methods.scoring import stream_scores, stream_self_influence
from lightning_tda.methods.sharding import sharded_scores
from lightning_tda.progress import progress_bar
from lightning_tda.results import AttributionResult
from lightning_tda.store import schema
from lightning_tda.store.fingerprints import check_model_matches
from lightning_tda.store.members import (
    member_dataset,
    member_loss_dataset,
    order_rows,
    write_checkpoint_rows,
)
from lightning_tda.store.reader import StoreReader


class AttributionStore(StoreReader):
    """An attribution store written by :class:`~lightning_tda.GradientLogger`.

    Example::

        store = AttributionStore("runs/tda.h5")
        res = store.attribute(queries, model=model, method="tracin", top_k=10)
        res.indices, res.scores          # [Q, k] example ids and scores of the top proponents
    """

    def attribute(
        self,
        queries: Any,
        model: nn.Module | None = None,
        method: str | AttributionMethod = "auto",
        top_k: int | None = 10,
        *,
        task: Task | None = None,
        query_spec: QuerySpec | None = None,
        loss_fn: LossFn | None = None,
        batch_size: int | None = None,
        collate_fn: Any = None,
        block_rows: int | None = None,
        check_model: bool = True,
        distributed: bool = False,
        index: RowIndex | str | os.PathLike | None = None,
        **method_kwargs: Any,
    ) -> AttributionResult:
        """Score every training example for every query.

        Args:
            queries: a Dataset, DataLoader or collated batch of query examples (their gradients are
                recomputed at each checkpoint's saved state); ``"logged"`` for the query rows logged
                during training; or ``{global_step: Tensor[Q, D]}`` of precomputed projected gradients.
            model: the model class that was trained (any weights; each checkpoint's state is loaded
                temporarily and the model is left as it was). Needed unless queries are logged/precomputed.
            method: ``"auto"`` (default: the best method for what the store holds, see
                :mod:`lightning_tda.methods.auto`; the choice is recorded in ``result.settings``), a name
                (``"graddot"``, ``"gradcos"``, ``"tracin"``, ``"tracin_adam"``, ``"influence"``, ``"source"``,
                ...; see ``lightning_tda.methods.METHODS``) or a method instance.
            top_k: keep the ``k`` strongest proponents and opponents per query; ``None`` for dense ``[Q, N]``.
            task: what a query measures (:class:`~lightning_tda.capture.task.Task`): the gradient of
                ``task.measurement(model, batch)`` is taken, e.g.
                ``ClassificationTask(measurement_kind="margin")``. Default: the built-in task recorded
                in the store (``task`` attribute), else the module's own (``query_measurement`` if
                defined, else ``per_example_loss``); a store logged with a ``loss_fn`` needs it again.
            query_spec: how query data is batched and which task describes it
                (:class:`~lightning_tda.capture.query_spec.QuerySpec`); ``task`` and the three
                keywords below are shorthands that override its fields.
            loss_fn: per-example loss ``loss_fn(model, batch) -> Tensor[B]`` (shorthand of a task).
            batch_size: batch size of the query sweep when ``queries`` is a Dataset (default 64).
            collate_fn: collate function for a query Dataset.
            block_rows: rows read per block (default: about 256 MB of fp32 per block).
            check_model: first compare ``model``'s frozen weights and architecture with the store's
                fingerprints (a ``StoreError`` naming what differs); ``False`` skips it.
            distributed: split the scan of the stored rows across the processes of the initialised
                ``torch.distributed`` group (every rank calls ``attribute`` with the same arguments,
                computes the query vectors, scans its block-aligned shard; every rank gets the
                merged result, equal to one process's; :mod:`lightning_tda.methods.sharding`).
            index: an approximate top-k instead of the exact scan: a
                :class:`~lightning_tda.methods.row_index.RowIndex` from :meth:`build_index` (or its
                path) built for the same method and settings; ``top_k`` must be set.
            **method_kwargs: hyper-parameters of the method (e.g. ``checkpoints=[...]``, ``interval="next"``).

        Returns:
            An :class:`AttributionResult`; ``indices``/``opponents`` hold example ids.
        """
        _check_queries_and_top_k(queries, top_k)
        spec = QuerySpec.resolve(
            query_spec, task=task, loss_fn=loss_fn, batch_size=batch_size, collate_fn=collate_fn
        )
        m, settings = _method(method, block_rows, method_kwargs, self)
        _check_scan_options(m, top_k, distributed, index)
        steps = [c.global_step for c in m.used_checkpoints(self)]
        if m.kind == "model":  # e.g. STRIDE: measures the queries with the model itself
            if check_model and model is not None:
                check_model_matches(self, model)
            dense, qids = m.scores(self, queries, model, spec)
            return _result(m.name, dense, top_k, self.example_ids, qids, steps, settings)
        qvecs, qids = self.query_vectors(
            queries, model, m.query_steps(self), query_spec=spec, check_model=check_model
        )
        scan = {"block_rows": block_rows, "distributed": distributed, "index": index}
        return self._scored_rows(m, settings, m.score_terms(self, qvecs), qids, steps, top_k, scan)

    def _scored_rows(self, m, settings, terms, qids, steps, top_k, scan) -> AttributionResult:
        """``attribute`` for a row method: the exact scan (one process or ``distributed``) or
        the ``index``'s approximate top-k of the score ``terms``."""
        label, index = f"scoring {m.name}", scan["index"]
        if index is not None:
            index = index if isinstance(index, RowIndex) else RowIndex.load(index)
            out = _indexed_top_k(self, m, settings, terms, index, top_k)
            config = index.config
            settings = {**settings, "index": {"factory": config.factory, "nprobe": config.nprobe,
                                              "refine": config.refine, "whiten": config.whiten}}  # fmt: skip
        elif scan["distributed"]:
            out = sharded_scores(self, terms, top_k, scan["block_rows"], description=label)
        else:
            out = stream_scores(self, terms, top_k, scan["block_rows"], description=label)
        ids = self.example_ids
        if top_k is None:
            return AttributionResult(m.name, out, None, None, None, ids, qids, steps, settings)
        high, low = _ids_at(ids, out.rows), _ids_at(ids, out.low_rows)
        return AttributionResult(
            m.name, out.values, high, out.low_values, low, ids, qids, steps, settings
        )

    def build_index(
        self,
        method: str | AttributionMethod = "auto",
        config: IndexConfig | None = None,
        path: str | os.PathLike | None = None,
        **method_kwargs: Any,
    ) -> RowIndex:
        """A FAISS index over the stored rows for approximate top-k with ``method``
        (:mod:`lightning_tda.methods.row_index`; needs ``pip install faiss-cpu``).

        Args:
            method: as for :meth:`attribute` (its settings are recorded; ``attribute`` checks them).
            config: :class:`~lightning_tda.methods.row_index.IndexConfig` (factory, nprobe, ...).
            path: where to save it (``<path>`` and ``<path>.json``); ``None``: not saved.
            **method_kwargs: hyper-parameters of the method.

        Example::

            index = store.build_index(method="tracin", path="runs/tda.tracin.faiss")
            res = store.attribute(queries, model=model, method="tracin", top_k=10, index=index)
        """
        m, settings = _method(method, None, method_kwargs, self)
        settings = {"name": m.name, **settings}
        built = build_row_index(self, m, settings, config or IndexConfig())
        if path is not None:
            built.save(path)
        return built

    def self_influence(
        self,
        model: nn.Module | None = None,
        method: str | AttributionMethod = "tracin",
        *,
        task: Task | None = None,
        query_spec: QuerySpec | None = None,
        block_rows: int | None = None,
        **method_kwargs: Any,
    ) -> torch.Tensor:
        """``[N]`` self-influence of every training example (store row order; ids in ``example_ids``).

        High values flag examples the model finds hard or inconsistent, e.g. mislabelled ones. Only
        stored rows are read, so neither ``model`` nor ``task`` / ``query_spec`` is needed; they are
        accepted (and type-checked) for symmetry with ``attribute``. ``block_rows``: rows read per block (default: about 256 MB of
        fp32 per block). A method that declares ``supports_self_influence = False`` (``gradcos``,
        ``stride``) is refused with a :class:`~lightning_tda.errors.ConfigError` naming alternatives.
        """
        QuerySpec.resolve(query_spec, task=task)  # type check only
        m, _ = _method(method, block_rows, method_kwargs, self)
        if not m.supports_self_influence or m.kind != "rows":
            raise ConfigError(self_influence_refusal(m))
        return stream_self_influence(
            self, m.self_terms(self), block_rows, description=f"self-influence {m.name}"
        )

    def add_dropout_ensemble(
        self,
        model: nn.Module,
        data: Any,
        members: int = 4,
        p: float = 0.1,
        seed: int = 0,
        steps: list[int] | None = None,
        *,
        task: Task | None = None,
        query_spec: QuerySpec | None = None,
        loss_fn: LossFn | None = None,
        batch_size: int | None = None,
        collate_fn: Any = None,
        overwrite: bool = False,
        check_model: bool = True,
    ) -> None:
        """Add dropout-ensemble members (methods.md §10) to checkpoints of this store.

        At each checkpoint (from its saved state) the attribution data is featurized through ``members``
        seeded sub-networks (:func:`~lightning_tda.capture.ensemble.dropout_member`: each captured
        layer's input units kept with probability ``1 - p``) and stored next to ``train``. Methods use them
        with e.g. ``Influence(dropout_members=members)``; query gradients are recomputed through the same
        sub-networks.

        Args:
            model: the trained model class (each checkpoint's state is loaded temporarily).
            data: the attribution data that was logged (every example once, with ids).
            members: number of sub-networks.
            p: drop probability per input unit.
            seed: mask seed (recorded with the rows).
            steps: checkpoints to extend (default: the last one).
            task: the task whose TRAINING loss (``task.per_example_loss``) the member rows are
                gradients of; default: the store's recorded task, as for :meth:`attribute`.
            query_spec: batching and task of the sweep (``task``, ``loss_fn``, ``batch_size``,
                ``collate_fn``: shorthands overriding its fields, as for :meth:`attribute`).
            check_model: compare ``model`` with the store's fingerprints first, as for :meth:`attribute`.
        """
        if not isinstance(members, int) or members < 1:
            raise ValueError(f"members must be a positive int, got {members!r}")
        if not 0.0 < p < 1.0:
            raise ValueError(f"p must be in (0, 1), got {p!r}")
        spec = self._bound_spec(model, query_spec, task, loss_fn, batch_size, collate_fn)
        self._check_model(model, check_model)
        steps = [self.checkpoint(None).global_step] if steps is None else [int(s) for s in steps]
        jobs = [(step, m) for step in steps for m in range(members)]
        with progress_bar("dropout ensemble", len(jobs), unit="members") as bar:
            for step, m in jobs:
                with (
                    loaded_state(model, self.state(step)),
                    dropout_member(model, self.layers, p, seed, m),
                ):
                    rows, ids, losses = self._featurize(
                        model, data, spec, f"member {m + 1}/{members} @ step {step}", of="loss",
                        ids=self.recorded_ids(),
                    )  # fmt: skip
                attrs = {"dropout_p": p, "dropout_seed": seed, "member": m}
                for name, values in ((member_dataset(m), rows), (member_loss_dataset(m), losses)):
                    write_checkpoint_rows(
                        self.path,
                        step,
                        name,
                        order_rows(values, ids, self.example_ids),
                        attrs,
                        overwrite,
                    )
                bar.advance()
        with self._h5() as f:
            self._read_meta(f)

    def dataset_attrs(self, step: int, name: str) -> dict[str, Any]:
        """Attributes of one checkpoint dataset."""
        with self._h5() as f:
            ds = self._dataset(f, step, name)
            return {k: ds.attrs[k] for k in ds.attrs}

    def _featurize(
        self,
        model: nn.Module,
        data: Any,
        spec: QuerySpec,
        description: str = "query gradients",
        of: Quantity = "measurement",
        ids: tuple[ExampleIds, bool] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """``(rows [Q, D], ids, values [Q])`` of ``data`` at the model's current weights: gradients
        of the task's query measurement (``of="loss"``: its training loss); ``ids`` as for
        :func:`~lightning_tda.capture.replay.featurize_data`."""
        return featurize_data(
            model,
            data,
            self.layers,
            self.projection,
            bases=self.bases,
            query_spec=spec,
            of=of,
            description=description,
            ids=ids,
        )

    def recorded_task(self) -> Task:
        """The task an entry point uses when given neither ``task=`` nor ``loss_fn=``: the built-in
        task recorded in the store's ``task`` attribute, else the module's own
        (:func:`~lightning_tda.capture.task.recorded_task`; raises for a recorded ``loss_fn``)."""
        return recorded_task(self.record("task"), where=str(self.path))

    def _bound_spec(
        self,
        model: nn.Module,
        spec: QuerySpec | None,
        task: Task | None,
        loss_fn: LossFn | None,
        batch_size: int | None,
        collate_fn: Any,
    ) -> QuerySpec:
        """``spec`` with the shorthands applied and its task resolved (the store's recorded task
        when none is described); fails early when the module default has no loss to differentiate."""
        spec = QuerySpec.resolve(
            spec, task=task, loss_fn=loss_fn, batch_size=batch_size, collate_fn=collate_fn
        )
        spec = spec.with_task(None if spec.described else self.recorded_task())
        spec.measurement_for(model)  # the module default without per_example_loss raises here
        return spec

    def _check_model(self, model: nn.Module, check_model: bool = True) -> None:
        selection = json.loads(self.attrs.get("capture_selection", "{}"))
        layers, _ = discover_layers(
            model, self.projection, selection.get("modules"), selection.get("exclude")
        )
        check_layers_match(self.layers, layers)
        if check_model:  # the same layout: is it the logged model (frozen weights, classes)?
            check_model_matches(self, model, layers)

    def query_vectors(
        self,
        queries: Any,
        model: nn.Module | None,
        steps: list[int],
        *,
        task: Task | None = None,
        query_spec: QuerySpec | None = None,
        loss_fn: LossFn | None = None,
        batch_size: int | None = None,
        collate_fn: Any = None,
        check_model: bool = True,
    ) -> tuple[dict[int, torch.Tensor], torch.Tensor | None]:
        """Projected query gradients ``{step: [Q, D]}`` at the given checkpoints, and query ids.

        ``queries`` as for :meth:`attribute`: query data (gradients of ``task.measurement``,
        featurised with ``query_spec``; ``task``, ``loss_fn``, ``batch_size``, ``collate_fn`` are
        shorthands overriding its fields; default task as for :meth:`attribute`), ``"logged"``, or
        precomputed ``{step: Tensor[Q, D]}`` (checked and passed through). A ``(step, member)`` entry
        of ``steps`` asks for a dropout-ensemble member's gradients. ``check_model``: as for
        :meth:`attribute`.

        Returns a :class:`~lightning_tda.methods.influence.QueryVectors` (a dict that also carries the
        query losses per step when they are known)."""
        if isinstance(queries, str):
            return self._logged_query_vectors(queries, steps)
        if _is_precomputed(queries):
            return self._precomputed_query_vectors(queries, steps), None
        if model is None:
            raise ValueError(
                "pass model= (the trained model class) so query gradients can be recomputed"
            )
        self._check_model(model, check_model)
        spec = self._bound_spec(model, query_spec, task, loss_fn, batch_size, collate_fn)
        return self._recomputed_query_vectors(queries, model, steps, spec)

    def _logged_query_vectors(
        self, queries: str, steps: list[int]
    ) -> tuple[QueryVectors, torch.Tensor | None]:
        """The query rows (and losses) logged during training at ``steps``."""
        if queries != "logged":
            raise ValueError(
                f"queries must be data, a dict of vectors or 'logged', got {queries!r}"
            )
        if any(isinstance(s, tuple) for s in steps):
            raise ValueError(
                "dropout-ensemble members need their own query gradients; pass the queries as data"
            )
        missing = [s for s in steps if not self.checkpoint(s).has_queries]
        if missing:
            raise ValueError(
                f"checkpoints {missing} logged no queries; pass query_data= to GradientLogger"
            )
        return QueryVectors(
            {s: self.read(s, schema.QUERY) for s in steps},
            {s: self.read(s, schema.QUERY_LOSS) for s in steps},
        ), self.query_ids

    def _precomputed_query_vectors(
        self, queries: dict, steps: list[int]
    ) -> dict[int, torch.Tensor]:
        """``queries[step]`` for every step, checked against the store's width and each other."""
        out: dict[int, torch.Tensor] = {}
        for s in steps:
            if s not in queries:
                raise KeyError(
                    f"precomputed query vectors lack checkpoint {s}; give one [Q, D] tensor per step"
                )
            v = queries[s].float()
            if v.dim() != 2 or v.shape[1] != self.width:
                raise ProjectionMismatchError(
                    f"query vectors for step {s} have shape {tuple(v.shape)} but the store's rows have D={self.width}; "
                    "compute them with the store's projection (AttributionStore.query_vectors)."
                )
            lo, hi = torch.aminmax(v) if v.numel() else (v.new_zeros(()), v.new_zeros(()))
            if not (torch.isfinite(lo) & torch.isfinite(hi)):  # (NaN propagates to both)
                raise ValueError(
                    f"precomputed query vectors for step {s} are not all finite (NaN or Inf); "
                    "check the query gradients"
                )
            first = next(iter(out.items()), None)
            if first is not None and v.shape[0] != first[1].shape[0]:
                raise ValueError(
                    f"precomputed query vectors must hold the same queries at every checkpoint: "
                    f"{first[1].shape[0]} rows at step {first[0]} but {v.shape[0]} at step {s}"
                )
            out[s] = v
        return out

    def _recomputed_query_vectors(
        self, queries: Any, model: nn.Module, steps: list, spec: QuerySpec
    ) -> tuple[QueryVectors, torch.Tensor | None]:
        """Query gradients of query data at each step's saved state (a member's sub-network for a
        ``(step, member)`` entry)."""
        if self.projection.basis == "pca" and self.bases is None:
            raise StoreError(
                f"{self.path} uses a PCA projection basis but stores none; the file is incomplete"
            )
        out: dict[int, torch.Tensor] = {}
        losses: dict[int, torch.Tensor] = {}
        ids = None
        device = model_device(model)
        done: dict[tuple[int, int | None], Any] = {}  # in-flight steps sharing one saved state
        for i, s in enumerate(steps):
            step, member = s if isinstance(s, tuple) else (s, None)
            key = (self.state_step(step), member)
            if key in done:
                out[s], losses[s] = done[key]
                continue
            sub = contextlib.nullcontext()
            if member is not None:
                a = self.dataset_attrs(step, member_dataset(member))
                sub = dropout_member(
                    model, self.layers, float(a["dropout_p"]), int(a["dropout_seed"]), member
                )
            with loaded_state(model, self.state(step)), sub:
                rows, ids, losses[s] = self._featurize(
                    model, queries, spec, f"query gradients: checkpoint {i + 1}/{len(steps)}"
                )
            out[s] = rows.to(device)
            done[key] = (out[s], losses[s])
        return QueryVectors(out, losses), ids

    def summary(self) -> str:
        """Human-readable description of the store: checkpoints, shapes, dtypes and sizes."""
        lines = [
            f"store: {self.path} ({os.path.getsize(self.path) / 2**20:.1f} MiB, schema {schema.SCHEMA_VERSION}, "
            f"lightning_tda {self.attrs.get('library_version', '?')})",
            f"examples: {self.num_examples}   row width D: {self.width}   storage: {self.storage_dtype}   "
            f"projection: {self.projection.kind} rank {self.projection.rank} ({self.projection.distribution}, "
            f"seed {self.projection.seed})",
            f"layers ({len(self.layers)}): "
            + ", ".join(
                f"{s.name} {s.out_features}x{s.in_features}->{s.k_out}x{s.k_in}"
                for s in self.layers[:8]
            )
            + (" ..." if len(self.layers) > 8 else ""),
        ]
        skipped = json.loads(self.attrs.get("other_params", "[]"))
        if skipped:
            lines.append(
                f"not captured ({len(skipped)} params): {', '.join(skipped[:6])}{' ...' if len(skipped) > 6 else ''}"
            )
        opt = json.loads(self.attrs.get("optimizers", "[]"))
        if opt:
            lines.append("optimizer: " + ", ".join(o["class"] for o in opt))
        lines.append(f"checkpoints ({len(self.checkpoints)} complete):")
        lines.append(f"  {'step':>8} {'epoch':>5} {'trigger':<12} {'lr_sum':>10}  datasets")
        with self._h5() as f:
            for c in self.checkpoints:
                g = f[schema.checkpoint_name(c.global_step)]
                ds = [
                    f"{k} {list(g[k].shape)} {schema.dataset_encoding(g[k], self.storage_dtype)} "
                    f"{g[k].id.get_storage_size() / 2**20:.2f}MiB"
                    for k in (
                        schema.TRAIN,
                        schema.TRAIN_FACTORS,
                        schema.TRAIN_PRECOND,
                        schema.TRAIN_PRECOND_FACTORS,
                        schema.QUERY,
                    )
                    if k in g
                ]
                if schema.STATE_PACKED in g:
                    nbytes = g[schema.STATE_PACKED].id.get_storage_size()
                    n = len(json.loads(g.attrs[schema.STATE_INDEX]))
                    ds.append(f"state {n} tensors {nbytes / 2**20:.2f}MiB")
                elif schema.STATE in g:
                    nbytes = sum(d.id.get_storage_size() for d in g[schema.STATE].values())
                    ds.append(f"state {len(g[schema.STATE])} tensors {nbytes / 2**20:.2f}MiB")
                lr = ",".join(f"{x:.3g}" for x in c.lr_sum) or "-"
                lines.append(
                    f"  {c.global_step:>8} {c.epoch:>5} {c.trigger:<12} {lr:>10}  " + "; ".join(ds)
                )
        if self.incomplete:
            lines.append(
                f"incomplete (ignored, rewritten on resume): steps {sorted(self.incomplete)}"
            )
        return "\n".join(lines)


def _method(
    method: str | AttributionMethod,
    block_rows: int | None,
    kwargs: dict[str, Any],
    store: StoreReader,
) -> tuple[AttributionMethod, dict[str, Any]]:
    """Check ``method``, ``block_rows`` and ``checkpoints=`` up front, then resolve the method
    (``"auto"`` from what ``store`` holds); returns it with its settings."""
    if not isinstance(method, (str, AttributionMethod)):
        raise ValueError(
            f"method must be a method name (e.g. 'tracin') or an AttributionMethod instance, "
            f"got {method!r}"
        )
    if block_rows is not None and (
        isinstance(block_rows, bool) or not isinstance(block_rows, int) or block_rows < 1
    ):
        raise ValueError(f"block_rows must be a positive int or None, got {block_rows!r}")
    steps = kwargs.get("checkpoints")
    if steps is not None:
        if isinstance(steps, (int, float)):  # a bare step: list(4) would be a TypeError later
            raise ValueError(
                f"checkpoints must be a list of global steps (e.g. checkpoints=[{steps!r}] for one), "
                f"got {steps!r}"
            )
        seq = list(steps) if isinstance(steps, (list, tuple, range)) else []
        repeated = sorted({repr(s) for i, s in enumerate(seq) if s in seq[:i]})
        if repeated:
            raise ValueError(
                f"checkpoints lists {', '.join(repeated)} more than once; each checkpoint counts once"
            )
    if isinstance(method, str) and method == AUTO:
        if kwargs:
            raise ValueError(
                f"method='auto' takes no hyper-parameters (got {sorted(kwargs)}); name the method, "
                "e.g. method='influence', checkpoints=[...]"
            )
        m, reason = auto_method(store)
        return m, {**method_settings(m), "chosen_by": AUTO, "reason": reason}
    m = get_method(method, **kwargs)
    return m, method_settings(m)


def _check_queries_and_top_k(queries: Any, top_k: int | None) -> None:
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
        raise ValueError(f"top_k must be a positive int or None, got {top_k!r}")
    if isinstance(queries, dict) and not queries:
        raise ValueError(
            "queries is empty ({}); pass a Dataset/DataLoader/batch of query examples, "
            "'logged', or {global_step: Tensor[Q, D]}"
        )


def _is_precomputed(queries: Any) -> bool:
    """``{step: Tensor[Q, D]}`` (int or ``(step, member)`` keys); a collated batch has str keys."""
    return (
        isinstance(queries, dict)
        and bool(queries)
        and all(isinstance(k, (int, tuple)) for k in queries)
        and all(isinstance(v, torch.Tensor) for v in queries.values())
    )


def _result(name, dense, top_k, ids, qids, steps, settings=None) -> AttributionResult:
    """An :class:`AttributionResult` from dense ``[Q, N]`` scores (top-k when ``top_k`` is set)."""
    settings = settings or {}
    if top_k is None:
        return AttributionResult(name, dense, None, None, None, ids, qids, steps, settings)
    k = min(int(top_k), dense.shape[1])
    hi, lo = dense.topk(k, dim=1), dense.topk(k, dim=1, largest=False)
    return AttributionResult(
        name, hi.values, ids[hi.indices], lo.values, ids[lo.indices], ids, qids, steps, settings
    )


def _indexed_top_k(store, method, settings, terms, index: RowIndex, top_k):
    """The approximate top-k of ``terms``' queries from ``index`` (checked against the method)."""
    want = {"name": method.name, **settings}
    got = {k: v for k, v in index.method.items() if k in want}
    if json.loads(json.dumps(want, default=str)) != json.loads(json.dumps(got, default=str)):
        raise ConfigError(
            f"the index was built for {index.method}, not {want}: rebuild it with "
            "store.build_index(method=..., **same settings)"
        )
    if index.num_rows != store.num_examples:
        raise ConfigError(
            f"the index holds {index.num_rows} rows, the store {store.num_examples}: rebuild it"
        )
    return index.search(terms, row_terms(store, method, index.config.whiten, terms), top_k)


def _check_scan_options(method, top_k, distributed: bool, index) -> None:
    if index is not None and (top_k is None or distributed):
        raise ConfigError(
            "index= gives an approximate top-k: set top_k (dense scores need the exact scan) "
            "and leave distributed=False (one process searches the whole index)"
        )
    if distributed and method.kind == "model":
        raise ConfigError(
            f"distributed=True splits the scan of stored rows; {method.name} measures the queries "
            "with the model instead: run it on one process (distributed=False)"
        )


def _ids_at(ids: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """Example ids of row positions ``rows``; ``-1`` stays ``-1`` (no row found by an index)."""
    return ids[rows.clamp_min(0)].where(rows >= 0, -1)
