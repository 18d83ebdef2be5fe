"""Smoke test of the performance suite's measurement functions at toy sizes (no timing assertions)."""

from __future__ import annotations

import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root holds `benchmarks`
from benchmarks import perf  # noqa: E402


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    w = tmp_path_factory.mktemp("perf")
    fp16 = perf.synthetic_store(w / "fp16.h5", 1000, w, width=256, dtype="float16", block=300)
    fp32 = perf.synthetic_store(w / "fp32.h5", 700, w, width=256, dtype="float32", seed=3)
    return fp16, fp32


def test_synthetic_store_rows_and_bytes(stores):
    fp16, fp32 = stores
    assert (fp16.num_examples, fp16.width, fp16.storage_dtype) == (1000, 256, "float16")
    assert torch.equal(fp16.example_ids, torch.arange(1000))
    # dense rows: exactly D x itemsize bytes per example (independent of the h5py reading)
    assert perf.row_bytes_per_example(fp16) == 256 * 2 == perf.expected_row_bytes(fp16)
    assert perf.row_bytes_per_example(fp32) == 256 * 4 == perf.expected_row_bytes(fp32)
    # the rows are the seeded normal draws, stored in the store's dtype
    g = torch.Generator().manual_seed(3)
    first = torch.randn(700, 256, generator=g)
    assert torch.equal(fp32.read(fp32.steps[-1], "train").float(), first)


def test_query_throughput_ratio_and_scores(stores):
    _, fp32 = stores
    r = perf.query_throughput(fp32, num_queries=5, repeats=3)
    assert (r["rows"], r["queries"], r["width"]) == (700, 5, 256)
    assert r["seconds_store"] == float(np.median(r["all_seconds_store"]))
    assert r["ratio"] == pytest.approx(r["seconds_matmul"] / r["seconds_store"])
    assert r["store_rows_queries_per_s"] == pytest.approx(700 * 5 / r["seconds_store"])
    assert r["ratio"] == pytest.approx(
        r["store_rows_queries_per_s"] / r["matmul_rows_queries_per_s"]
    )


def test_hdf5_read_bytes(stores):
    fp16, _ = stores
    r = perf.hdf5_read_bandwidth(fp16, block_rows=128, repeats=3)
    assert r["bytes"] == 1000 * 256 * 2
    assert r["gb_per_s"] == pytest.approx(r["bytes"] / r["seconds"] / 1e9)


def test_in_flight_style_rows_counted_per_row(stores, tmp_path):
    """Bytes per row sum every checkpoint's row datasets and divide by all rows stored."""
    fp16, _ = stores
    with h5py.File(fp16.path, "r") as f:
        name = f"{perf.schema.checkpoint_name(fp16.steps[-1])}/train"
        stored = f[name].id.get_storage_size()
    assert perf.row_bytes_per_example(fp16) == stored / 1000


def _fake_results(ratio_in_flight: float, feat: float, scoring: float, mem: float) -> dict:
    ov = {"plain": 10.0, "sweep": 11.0, "in_flight": 10.0 * ratio_in_flight}
    over = {
        "task": "tinygpt",
        "describe": "toy",
        "seconds": ov,
        "ratio_sweep": 1.1,
        "ratio_in_flight": ratio_in_flight,
        "all_seconds": {k: [v] for k, v in ov.items()},
    }
    ours = {"library": "lightning_tda", "method": "sweep", "examples": 10, "examples_per_s": 30.0}
    peer = {"library": "p", "method": "m", "examples": 10, "examples_per_s": 30.0 / feat}
    return {
        "logging_overhead": [over],
        "featurization": [
            {
                "task": "tinygpt",
                "ours": ours,
                "peers": [peer, {"library": "q", "method": "n", "examples": 10, "error": "boom"}],
                "fastest_peer": "p m",
                "ratio_vs_fastest": feat,
            }
        ],
        "query_throughput": {
            "ratio": scoring,
            "rows": 10,
            "width": 4,
            "dtype": "float32",
            "queries": 2,
            "method": "graddot",
            "store_rows_queries_per_s": 1e6,
            "matmul_rows_queries_per_s": 2e6,
        },
        "hdf5_read": {"block_rows": 8, "gb_per_s": 1.0, "bytes": 1024},
        "scoring_memory": {
            "ratio_large_small": mem,
            "width": 4,
            "block_rows": 8,
            "queries": 2,
            "runs": [
                {"rows": 10, "store_bytes": 100, "growth_bytes": 1000},
                {"rows": 40, "store_bytes": 400, "growth_bytes": 1000 * mem},
            ],
        },
        "bytes_per_example": [
            {
                "task": "digits",
                "mode": "dense",
                "width": 4,
                "dtype": "float16",
                "bytes_per_row": 8.0,
                "expected_bytes_per_row": 8.0,
            }
        ],
        "repeats": 3,
        "machine": {
            "date": "d",
            "machine": "m",
            "cpus": 2,
            "torch_threads": 2,
            "torch": "t",
        },
    }


def test_targets_and_markdown():
    good = _fake_results(1.1, 3.5, 0.8, 1.0)
    t = perf.targets(good)
    assert all(v["met"] for v in t.values())
    assert t["featurization"]["value"] == 3.5
    bad = _fake_results(1.3, 2.0, 0.3, 4.0)
    tb = perf.targets(bad)
    assert not any(v["met"] for v in tb.values())
    bad["targets"] = tb
    md = perf.write_markdown(bad, "python -m benchmarks.perf")
    assert md.count("not met") == 4 and "failed: boom" in md and "3.00×" not in md
    assert "| 1.300 | not met |" in md


def test_partial_results_still_render():
    """A run stopped after (iii) reports only the targets it measured and names the others."""
    full = _fake_results(1.1, 3.5, 0.8, 1.0)
    part = {k: full[k] for k in ("query_throughput", "hdf5_read", "repeats", "machine")}
    part["scoring_memory"] = {"error": "boom"}
    part["targets"] = perf.targets(part)
    assert set(part["targets"]) == {"scoring"}
    md = perf.write_markdown(part, "python -m benchmarks.perf")
    assert (
        md.count("not measured (the run stopped early)") == len(perf.TARGETS) - 1
    )  # all but scoring
    assert "the measurement failed (boom)" in md


def test_overhead_ratio_is_median_of_per_repeat_ratios():
    times = {"plain": [10.0, 1.0, 20.0], "sweep": [1.0, 1.5, 30.0], "in_flight": [2.0, 2.0, 44.0]}
    r = perf.overhead_ratios(times)  # per repeat: sweep 0.1, 1.5, 1.5; in-flight 0.2, 2.0, 2.2
    assert r == {"ratio_sweep": pytest.approx(1.5), "ratio_in_flight": pytest.approx(2.0)}


def test_fsync_cost_counts_the_commit_fsyncs_and_renders(tmp_path):
    from benchmarks.durability import fsync_cost

    f = fsync_cost(tmp_path, flushes=2, steps=2, rows=4, width=64, repeats=2)
    assert f["nondurable_fsyncs_per_commit"] == 0
    assert 1 <= f["fsyncs_per_commit"] <= 4  # journal, store, directory: at most 4 per commit
    md = "\n".join(perf._fsync_lines(f))
    assert "| 2 in-flight steps × 4 rows × D = 64" in md and f"{f['fsyncs_per_commit']:.0f} |" in md
