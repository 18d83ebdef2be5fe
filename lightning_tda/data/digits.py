"""scikit-learn's 8x8 digits (ships with scikit-learn, works offline) as indexed train/test sets."""

from __future__ import annotations

from dataclasses import dataclass

import lightning.pytorch as pl
import numpy as np
import torch
from torch.utils.data import DataLoader, TensorDataset

from lightning_tda.data.indexed import IndexedDataset


@dataclass
class DigitsSplits:
    """Standardised digits: ``train``/``test`` are :class:`IndexedDataset` s of ``(x [64], y)``.

    Example ids are the row numbers in ``sklearn.datasets.load_digits()``, so they stay stable
    across splits and runs. ``x * std + mean`` (``mean``, ``std``: ``[64]`` float32 training-set
    statistics) gives back the raw pixels; ``image_shape`` is ``(8, 8)``.
    """

    train: IndexedDataset
    test: IndexedDataset
    images: np.ndarray  # [1797, 8, 8] raw pixel values 0..16, indexed by example id
    labels: np.ndarray  # [1797]
    mean: np.ndarray | None = None  # [64] per-pixel training mean
    std: np.ndarray | None = None  # [64] per-pixel training std (1 where it is 0)
    image_shape: tuple[int, int] = (8, 8)


def load_digits_splits(n_train: int = 1000, n_test: int = 200, seed: int = 0) -> DigitsSplits:
    """Split the 1797 digits with ``RandomState(seed).permutation`` and standardise with train stats."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x, y = d.data.astype(np.float32), d.target.astype(np.int64)
    if n_train + n_test > len(x):
        raise ValueError(f"n_train + n_test must be <= {len(x)}")
    perm = np.random.RandomState(seed).permutation(len(x))
    tr, te = perm[:n_train], perm[n_train : n_train + n_test]
    mean, std = x[tr].mean(0), x[tr].std(0)
    std[std == 0] = 1.0
    xs = (x - mean) / std

    def make(idx: np.ndarray) -> IndexedDataset:
        return IndexedDataset(
            TensorDataset(torch.from_numpy(xs[idx]), torch.from_numpy(y[idx])), ids=idx.tolist()
        )

    return DigitsSplits(make(tr), make(te), d.images, y, mean, std)


class DigitsDataModule(pl.LightningDataModule):
    """Digits as a LightningDataModule (for recipes): indexed train set, held-out test set.

    After ``setup``, ``mean`` and ``std`` (``[64]``) are the standardisation statistics and
    ``image_shape`` is ``(8, 8)``: ``x * std + mean`` reshaped is the digit as drawn (``lightning-tda
    report`` renders examples this way).

    Args:
        n_train: training examples.
        n_test: held-out examples.
        batch_size: training batch size.
        seed: split seed.
    """

    def __init__(
        self, n_train: int = 1000, n_test: int = 200, batch_size: int = 64, seed: int = 0
    ) -> None:
        super().__init__()
        self.n_train, self.n_test, self.batch_size, self.seed = n_train, n_test, batch_size, seed

    image_shape: tuple[int, int] = (8, 8)

    def setup(self, stage: str | None = None) -> None:
        self.splits = load_digits_splits(self.n_train, self.n_test, self.seed)

    @property
    def mean(self) -> np.ndarray | None:
        """``[64]`` per-pixel training mean (``None`` before ``setup``)."""
        splits = getattr(self, "splits", None)
        return None if splits is None else splits.mean

    @property
    def std(self) -> np.ndarray | None:
        """``[64]`` per-pixel training std, 1 where it is 0 (``None`` before ``setup``)."""
        splits = getattr(self, "splits", None)
        return None if splits is None else splits.std

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.splits.train, batch_size=self.batch_size, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.splits.test, batch_size=256)
