"""The load generator's arithmetic and inputs: percentiles, run summaries, the IDX reader, PNG uploads."""

from __future__ import annotations

import gzip
import io
import math

import numpy as np
import pytest
from PIL import Image

from bench.images import encode_png, load_pngs
from bench.loadgen import Result, Run, percentile, summarize
from modelrepo.idx import FASHION_MNIST_DIR, fashion_mnist, read_idx


def idx_bytes(array: np.ndarray) -> bytes:
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(n.to_bytes(4, "big") for n in array.shape)
    return header + array.astype(np.uint8).tobytes()


@pytest.mark.parametrize(("p", "expected"), [(0, 1), (1, 1), (50, 50), (95, 95), (99, 99), (99.5, 100), (100, 100)])
def test_percentile_is_nearest_rank(p, expected):
    assert percentile(list(range(1, 101)), p) == expected


def test_percentile_of_few_values_is_one_of_them():
    assert percentile([10.0, 20.0, 30.0], 50) == 20.0
    assert percentile([10.0, 20.0, 30.0], 99) == 30.0  # not interpolated past the worst seen
    assert percentile([7.0], 50) == 7.0


def test_percentile_of_nothing_is_nan_and_bad_p_is_refused():
    assert math.isnan(percentile([], 50))
    with pytest.raises(ValueError, match="percentile"):
        percentile([1.0], 101)


def test_summary_counts_throughput_latency_errors_and_depth_mix():
    ok = [Result(i * 0.1, i * 0.1 + 0.010 * (i + 1), 200, depth_used=1 if i < 6 else 4, index=0) for i in range(8)]
    failed = [Result(1.0, 1.001, 503), Result(1.0, 1.002, 503), Result(1.0, 31.0, "error:ReadTimeout")]
    s = summarize(Run(ok + failed, window=(0.0, 2.0), client_cpu_s=0.5))
    assert (s["requests"], s["ok"]) == (11, 8)
    assert s["images_per_s"] == pytest.approx(4.0)  # 8 answered in a 2 s window
    assert s["errors"] == {"503": 2, "error:ReadTimeout": 1}
    assert s["latency_ms"]["p50"] == pytest.approx(40.0)  # latencies 10..80 ms, errors excluded
    assert s["latency_ms"]["p99"] == pytest.approx(80.0)
    assert s["latency_ms"]["mean"] == pytest.approx(45.0)
    assert s["depth_mix"] == {"1": 0.75, "4": 0.25}


def test_summary_of_a_run_with_no_answers_has_no_latency():
    s = summarize(Run([Result(0.0, 0.1, 503)], window=(0.0, 1.0)))
    assert s["ok"] == 0 and s["images_per_s"] == 0.0 and s["depth_mix"] == {}
    assert math.isnan(s["latency_ms"]["p99"])


def test_throughput_of_a_server_that_fell_behind_spans_until_its_last_answer():
    """Open loop: 10 requests due in a 1 s window but answered over 4 s is 2.5 images/s, not 10."""
    results = [Result(i / 10, 4.0 * (i + 1) / 10, 200, 1, 0) for i in range(10)]
    assert summarize(Run(results, window=(0.0, 1.0)))["images_per_s"] == pytest.approx(2.5)


def test_open_loop_lateness_counts_as_latency():
    """A request due at 1.0 s but sent at 1.3 s: its latency runs from 1.0 (no coordinated omission)."""
    s = summarize(Run([Result(1.0, 1.4, 200, 1, 0, sent=1.3)], window=(0.0, 2.0)))
    assert s["latency_ms"]["p50"] == pytest.approx(400.0)
    assert s["send_lag_ms_p99"] == pytest.approx(300.0)


@pytest.mark.parametrize("compress", [True, False])
def test_read_idx_round_trips_gzipped_and_plain(tmp_path, compress):
    array = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    path = tmp_path / ("x.idx.gz" if compress else "x.idx")
    path.write_bytes(gzip.compress(idx_bytes(array)) if compress else idx_bytes(array))
    np.testing.assert_array_equal(read_idx(path), array)


def test_read_idx_refuses_wrong_type_and_truncated_files(tmp_path):
    bad_type = tmp_path / "float.idx"
    bad_type.write_bytes(bytes([0, 0, 0x0D, 1]) + (1).to_bytes(4, "big") + b"\0\0\0\0")
    with pytest.raises(ValueError, match="unsigned-byte IDX"):
        read_idx(bad_type)
    truncated = tmp_path / "short.idx"
    truncated.write_bytes(idx_bytes(np.zeros((4, 2), np.uint8))[:-3])
    with pytest.raises(ValueError, match="declares shape"):
        read_idx(truncated)


def test_missing_dataset_says_how_to_get_it(tmp_path):
    with pytest.raises(FileNotFoundError, match="dataset-fashion-mnist"):
        load_pngs(tmp_path)


@pytest.mark.skipif(not FASHION_MNIST_DIR.exists(), reason="Fashion-MNIST is not installed")
def test_fashion_mnist_test_split_is_10k_labelled_images():
    images, labels = fashion_mnist(FASHION_MNIST_DIR, "test")
    assert images.shape == (10000, 28, 28) and images.dtype == np.uint8
    assert labels.shape == (10000,) and set(np.unique(labels)) == set(range(10))


def test_png_upload_decodes_to_the_same_pixels():
    image = np.random.default_rng(0).integers(0, 256, (28, 28), dtype=np.uint8)
    png = encode_png(image)
    assert png.startswith(b"\x89PNG")
    np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(png))), image)
