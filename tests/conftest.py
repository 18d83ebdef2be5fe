"""Fixtures and hooks only; the models, data and fits they use live in ``helpers.py``."""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers import LoggedRun, fit_logged_gpt, fit_logged_mlp, make_classification


def _tmp(factory: pytest.TempPathFactory, tmp: str | Path) -> Path:
    """``tmp`` itself if it is a path (a test's ``tmp_path``), else ``factory.mktemp(tmp)``."""
    return tmp if isinstance(tmp, Path) else factory.mktemp(tmp)


@pytest.fixture
def cls_data():
    return make_classification()


@pytest.fixture(scope="session")
def logged_mlp_store(tmp_path_factory):
    """Factory ``(tmp, name="s.h5", **kw) -> LoggedRun``: a TinyMLP fitted with the logger.

    ``tmp`` is a directory name for ``tmp_path_factory.mktemp`` (module fixtures) or a test's
    ``tmp_path``; ``kw`` goes to :func:`helpers.fit_logged_mlp` (``n``, ``n_queries``, ``mlp``,
    ``log_queries``, ``logger_cls``, ``epochs``, ``train_batch_size``, ``callbacks``, logger kwargs).
    """

    def make(tmp: str | Path, name: str = "s.h5", **kw) -> LoggedRun:
        return fit_logged_mlp(_tmp(tmp_path_factory, tmp), name, **kw)

    return make


@pytest.fixture(scope="session")
def logged_gpt_store(tmp_path_factory):
    """Factory ``(tmp, name="s.h5", **kw) -> LoggedRun``: a TinyGPT fitted with the logger
    (``kw`` goes to :func:`helpers.fit_logged_gpt`: ``n``, ``gpt``, then as for the MLP)."""

    def make(tmp: str | Path, name: str = "s.h5", **kw) -> LoggedRun:
        return fit_logged_gpt(_tmp(tmp_path_factory, tmp), name, **kw)

    return make
