"""The streamed scan behind ``attribute`` / ``self_influence``: memory-mapped blocks, the CRC taken on a
background thread, and the grouped top-k prefilter give what an in-memory ``torch.mm`` + ``topk`` of
the raw rows (read here with plain h5py) gives, and a damaged row still fails the scan."""

from __future__ import annotations

import zlib
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from helpers import dense_fc_metadata

from lightning_tda import AttributionStore
from lightning_tda.errors import StoreError
from lightning_tda.methods.scoring import block_top_k
from lightning_tda.store.scan import CrcLane, RowScan
from lightning_tda.store.writer import StoreWriter

N, D_OUT, D_IN = 3001, 8, 16  # one exact linear layer: D = 8 * 16 = 128 columns
D = D_OUT * D_IN
STEP = 5
TRAIN = f"checkpoints/{STEP:010d}/train"


def _write(path: Path, dtype: str, n: int = N) -> None:
    writer = StoreWriter(path, dtype)
    writer.write_run_metadata(dense_fc_metadata(D_OUT, D_IN))
    g = torch.Generator().manual_seed(0)
    with writer.begin_checkpoint(STEP, n, D) as cw:
        for start in range(0, n, 1000):
            stop = min(n, start + 1000)
            cw.write_rows(
                torch.arange(start, stop) * 3 + 1,
                torch.randn(stop - start, D, generator=g),
                torch.zeros(stop - start),
            )
        cw.commit({"epoch": 0, "trigger": "step", "lr_sum": [1.0], "lr_cumsum": [1.0], "steps_since_previous": 1, "seconds": 0.0})  # fmt: skip


def _raw_rows(path: Path) -> torch.Tensor:
    """``[N, D]`` fp32 rows decoded here from the raw dataset (plain h5py, no library reader)."""
    with h5py.File(path, "r") as f:
        ds = f[TRAIN]
        arr, enc = ds[()], str(ds.attrs.get("encoding", f.attrs["storage_dtype"]))
    if enc == "bfloat16":
        return torch.from_numpy(arr.view(np.int16).copy()).view(torch.bfloat16).float()
    return torch.from_numpy(arr).float()


@pytest.fixture(scope="module", params=["float32", "float16", "bfloat16"])
def store_path(request, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp(request.param) / "s.h5"
    _write(path, request.param)
    return path


@pytest.mark.parametrize("block_rows", [None, 1000, 997, 64])
@pytest.mark.parametrize("method", ["graddot", "gradcos"])
def test_streamed_top_k_equals_the_in_memory_product(store_path, block_rows, method):
    q = torch.randn(7, D, generator=torch.Generator().manual_seed(3))
    rows = _raw_rows(store_path)
    if method == "gradcos":  # cosine: unit query and train rows
        rows = rows / rows.norm(dim=1, keepdim=True).clamp_min(1e-30)
        q = q / q.norm(dim=1, keepdim=True)
    ref = q @ rows.T  # [Q, N]
    hi, lo = ref.topk(6, dim=1), ref.topk(6, dim=1, largest=False)
    store = AttributionStore(store_path)
    q = torch.randn(7, D, generator=torch.Generator().manual_seed(3))
    res = store.attribute({STEP: q}, method=method, top_k=6, block_rows=block_rows)
    ids = torch.arange(N) * 3 + 1
    assert torch.equal(res.indices, ids[hi.indices])
    assert torch.equal(res.opponents, ids[lo.indices])
    torch.testing.assert_close(res.scores, hi.values, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(res.opponent_scores, lo.values, rtol=1e-5, atol=1e-5)
    dense = store.attribute({STEP: q}, method=method, top_k=None, block_rows=block_rows)
    torch.testing.assert_close(dense.scores, ref, rtol=1e-5, atol=1e-5)
    # a second scan by the same reader (its checksum verified already) gives the same
    again = store.attribute({STEP: q}, method=method, top_k=6, block_rows=block_rows)
    assert torch.equal(again.indices, res.indices) and torch.equal(again.scores, res.scores)


def test_self_influence_equals_the_in_memory_row_norms(store_path):
    rows = _raw_rows(store_path).double()
    got = AttributionStore(store_path).self_influence(method="graddot", block_rows=500)
    torch.testing.assert_close(got, (rows * rows).sum(1).float(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("b", [31, 4 * 32 * 10 - 1, 4 * 32 * 10, 5000, 50_001])
@pytest.mark.parametrize("k", [1, 10, 40])
def test_block_top_k_equals_torch_topk(b, k):
    g = torch.Generator().manual_seed(b + k)
    s = torch.randn(9, b, generator=g)
    s[2, b // 2] = float("inf")
    s[3, b - 1] = -float("inf")
    s[4, :] = s[4, 0]  # one row of ties: values must still agree
    (hv, hi), (lv, li) = block_top_k(s, k)
    top, low = s.topk(min(k, b), dim=1), s.topk(min(k, b), dim=1, largest=False)
    assert torch.equal(hv, top.values) and torch.equal(lv, low.values)
    rows = [r for r in range(9) if r != 4]
    assert torch.equal(hi[rows], top.indices[rows]) and torch.equal(li[rows], low.indices[rows])
    assert torch.equal(s.gather(1, hi), hv) and torch.equal(
        s.gather(1, li), lv
    )  # ties: right values


def test_block_top_k_with_nan_scores_matches_torch_topk():
    s = torch.randn(4, 6000, generator=torch.Generator().manual_seed(0))
    s[1, 77] = float("nan")
    (hv, hi), (lv, li) = block_top_k(s, 5)
    top, low = s.topk(5, dim=1), s.topk(5, dim=1, largest=False)
    assert torch.equal(hv.nan_to_num(9.0), top.values.nan_to_num(9.0)) and torch.equal(
        hi, top.indices
    )
    assert torch.equal(lv, low.values) and torch.equal(li, low.indices)


def _flip_byte(path: Path, row: int) -> None:
    with h5py.File(path, "r") as f:
        ds = f[TRAIN]
        at = ds.id.get_offset() + row * ds.dtype.itemsize * D + 3
    with open(path, "r+b") as fh:
        fh.seek(at)
        byte = fh.read(1)
        fh.seek(at)
        fh.write(bytes([byte[0] ^ 0x10]))


@pytest.mark.parametrize("row", [0, N // 2, N - 1])
@pytest.mark.parametrize("block_rows", [None, 1000])
def test_a_damaged_row_fails_the_scan(tmp_path, row, block_rows):
    path = tmp_path / "s.h5"
    _write(path, "float16")
    _flip_byte(path, row)
    q = torch.randn(3, D, generator=torch.Generator().manual_seed(0))
    store = AttributionStore(path)  # (opening checks attributes, not the rows)
    with pytest.raises(StoreError, match="does not match its checksum"):
        store.attribute({STEP: q}, method="graddot", top_k=3, block_rows=block_rows)
    with pytest.raises(StoreError, match="does not match its checksum"):
        AttributionStore(path).self_influence(method="graddot", block_rows=block_rows)
    with pytest.raises(StoreError, match="does not match its checksum"):  # reported every time
        store.attribute({STEP: q}, method="graddot", top_k=3, block_rows=block_rows)


def test_row_scan_maps_blocks_copy_on_write_and_checksums_in_order(tmp_path):
    path = tmp_path / "s.h5"
    _write(path, "float32")
    with h5py.File(path, "r") as f, CrcLane() as lane:
        ds = f[TRAIN]
        whole = ds[()]
        scan = RowScan(ds, lane)
        assert scan._offset is not None  # a contiguous dataset of a plain file: mapped
        blocks = [scan[s : s + 700] for s in range(0, N, 700)]
        assert scan.done() and scan.crc() == zlib.crc32(whole.tobytes())
        np.testing.assert_array_equal(np.concatenate(blocks), whole)
        blocks[0][:] = 0.0  # writable, and only this process's copy changes
        np.testing.assert_array_equal(ds[:700], whole[:700])
        out_of_order = RowScan(ds, lane)
        out_of_order[700:1400]
        assert not out_of_order.done()


def test_row_scan_reads_chunked_datasets_through_h5py(tmp_path):
    data = np.random.default_rng(0).standard_normal((1000, 16)).astype(np.float32)
    with h5py.File(tmp_path / "c.h5", "w") as f:
        ds = f.create_dataset("x", data=data, chunks=(100, 16), compression="gzip")
        with CrcLane() as lane:
            scan = RowScan(ds, lane)
            assert scan._offset is None
            got = np.concatenate([scan[s : s + 300] for s in range(0, 1000, 300)])
            np.testing.assert_array_equal(got, data)
            assert scan.crc() == zlib.crc32(data.tobytes())


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_precomputed_queries_with_a_non_finite_entry_are_refused(store_path, bad):
    q = torch.randn(4, D, generator=torch.Generator().manual_seed(0))
    q[2, 17] = bad
    with pytest.raises(ValueError, match="not all finite"):
        AttributionStore(store_path).attribute({STEP: q}, method="graddot", top_k=3)


def test_zero_queries_give_empty_results(store_path):
    store = AttributionStore(store_path)
    res = store.attribute({STEP: torch.zeros(0, D)}, method="graddot", top_k=3)
    assert res.scores.shape == (0, 3) and res.indices.shape == (0, 3)
    assert store.attribute(
        {STEP: torch.zeros(0, D)}, method="graddot", top_k=None
    ).scores.shape == (0, N)
