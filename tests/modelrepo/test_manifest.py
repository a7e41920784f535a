"""The contract both sides read: committed manifests load unchanged, round-trip byte for byte, and bad ones fail."""

from __future__ import annotations

import copy
import gzip
import json
from pathlib import Path

import numpy as np
import pytest

from modelrepo import manifest as contract
from modelrepo.files import file_entries, sha256_file
from modelrepo.idx import find_idx, read_idx
from modelrepo.manifest import BadFileEntry, Manifest, ManifestError, Preprocessing

ROOT = Path(__file__).resolve().parents[2]
COMMITTED = sorted((ROOT / "model_repo").glob("*/manifest.json"))


@pytest.mark.parametrize("path", COMMITTED, ids=lambda p: p.parent.name)
def test_committed_manifests_load_and_dump_back_byte_for_byte(path, tmp_path):
    manifest = contract.load(path)
    assert manifest.triton_name == path.parent.name == contract.folder_name(manifest.name, manifest.depth)
    assert (path.parent / manifest.model_file).is_file() and manifest.chw == (1, 28, 28)
    written = contract.dump(manifest, tmp_path)
    assert written.read_bytes() == path.read_bytes()
    assert contract.load(written) == manifest


def test_there_are_committed_manifests_to_check():
    assert len(COMMITTED) == 4


def raw() -> dict:
    return json.loads(COMMITTED[0].read_text())


@pytest.mark.parametrize(
    "change, fragment",
    [
        (lambda m: m.update(format="srvit-manifest/3"), "not a srvit manifest of format srvit-manifest/1 or /2"),
        (lambda m: m.update(flops=0), "flops 0 is not a positive integer"),
        (lambda m: m.update(calibration=[1.2]), "calibration must each be an object or null"),
        (lambda m: m["adaptive"].update(combine="max"), "adaptive policy must be"),
        (lambda m: m["adaptive"]["stages"].reverse(), "stage depths must be increasing"),
        (lambda m: m["adaptive"]["stages"][0].update(threshold=None), "needs a threshold in"),
        (lambda m: m["adaptive"]["stages"][-1].update(threshold=0.5), "last stage's threshold must be null"),
        (lambda m: m["adaptive"]["stages"][0].update(temperature=0), "temperatures must be positive"),
        (lambda m: m["adaptive"]["stages"][-1].update(depth=9), "go past max_depth"),
        (lambda m: m.pop("labels"), r"missing keys \['labels'\]"),
        (lambda m: m.update(name="../evil"), "bad name"),
        (lambda m: m.update(depth=9), "not within 1..max_depth"),
        (lambda m: m.update(version=True), "version True is not a positive integer"),
        (lambda m: m.update(platform="pytorch_libtorch"), "platform 'pytorch_libtorch'"),
        (lambda m: m["output"].update(shape=[-1, 11]), "input/output must be FP32"),
        (lambda m: m["input"].update(shape=[-1, 1, 0, 28]), "input/output must be FP32"),
        (lambda m: m.update(model_file="1/other.onnx"), "has no checksum in 'files'"),
        (lambda m: m["preprocessing"].update(mean="0.5"), "preprocessing: expected a number"),
        (lambda m: m["preprocessing"].pop("resize_size"), "preprocessing: missing key 'resize_size'"),
        (lambda m: m["preprocessing"].update(channels="RGBA"), "channels must be 'L' or 'RGB'"),
        (lambda m: m["preprocessing"].update(std=[0.0]), "std must not contain 0"),
        (lambda m: m["preprocessing"].update(input_size=32, resize_size=32), r"makes \[1, 32, 32\] but the input"),
        (lambda m: m.update(checkpoint="abc"), "checkpoint, .* must each be an object or null"),
        (lambda m: m.update(triton_name=7), "triton_name must be a string"),
    ],
)
def test_a_manifest_that_breaks_the_contract_is_refused_saying_why(change, fragment):
    m = raw()
    change(m)
    with pytest.raises(ManifestError, match=fragment):
        Manifest.from_dict(m)


def test_a_bad_file_entry_names_its_file():
    m = raw()
    m["files"]["labels.txt"] = "sha256:abc"
    with pytest.raises(BadFileEntry, match="labels.txt: its manifest entry must be") as caught:
        Manifest.from_dict(m)
    assert caught.value.path == "labels.txt"


def test_keys_a_later_exporter_adds_survive_a_round_trip():
    m = raw() | {"provenance": {"pipeline": [1.2, 1.1]}}
    manifest = Manifest.from_dict(m)
    assert manifest.extra == {"provenance": {"pipeline": [1.2, 1.1]}}
    assert manifest.to_dict() == m


def test_committed_manifests_carry_the_calibrated_policy_and_agree_on_it():
    manifests = [contract.load(path) for path in COMMITTED]
    policy = manifests[0].adaptive
    assert policy is not None and policy.depths[0] == 1 and policy.depths[-1] <= 4
    assert all(m.adaptive == policy and m.format == contract.FORMAT for m in manifests)
    assert [m.flops for m in manifests] == sorted(m.flops for m in manifests)  # deeper costs more
    for m in manifests:
        assert m.calibration["temperature"] > 0
        assert m.calibration["ece_after"]["check"] < m.calibration["ece_before"]["check"]


def test_a_format_1_manifest_still_loads_without_a_policy_and_dumps_back_unchanged(tmp_path):
    """What an export before format /2 wrote: no flops, calibration or adaptive keys."""
    added = ("flops", "calibration", "adaptive")
    m = {k: v for k, v in raw().items() if k not in added} | {"format": "srvit-manifest/1"}
    manifest = Manifest.from_dict(m)
    assert (manifest.adaptive, manifest.flops, manifest.calibration, manifest.extra) == (None, None, None, {})
    assert json.loads(contract.dump(manifest, tmp_path).read_text()) == m


def test_manifests_are_frozen_and_compare_by_value():
    a, b = Manifest.from_dict(raw()), Manifest.from_dict(copy.deepcopy(raw()))
    assert a == b and a.shared() == b.shared()
    with pytest.raises(AttributeError):
        a.depth = 2  # type: ignore[misc]


def test_preprocessing_no_server_could_follow_cannot_even_be_built():
    with pytest.raises(ManifestError, match="mean/std need 3 values"):
        Preprocessing(224, "RGB", (0.5,), (0.5,), 256)


def test_preprocessing_defaults_to_bilinear_and_refuses_wrong_types():
    p = Preprocessing.from_dict({"input_size": 8, "channels": "L", "mean": [0.5], "std": [0.5], "resize_size": 8})
    assert p.interpolation == "bilinear" and p.mean == (0.5,)
    with pytest.raises(ManifestError, match="expected an integer"):
        Preprocessing.from_dict({**p.to_dict(), "input_size": "8"})


def test_folder_names_and_their_pattern_agree():
    pattern = contract.folder_pattern("m")
    for depth in (1, 12):
        for platform in contract.PLATFORMS:
            assert pattern.fullmatch(contract.folder_name("m", depth, platform))
    assert contract.folder_name("m", 2, contract.TENSORRT) == "m_d2_trt"
    assert not any(pattern.fullmatch(n) for n in ("mm_d2", "m_dx", "m_d2_old", "other_d2"))
    assert contract.model_file(3, contract.ONNX) == "3/model.onnx"


def test_manifest_paths_skip_dot_folders(tmp_path):
    for folder in ("a_d1", ".tmp-a-1", "b_d1"):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "manifest.json").write_text("{}")
    assert [p.parent.name for p in contract.manifest_paths(tmp_path)] == ["a_d1", "b_d1"]


def test_file_entries_hash_what_is_on_disk(tmp_path):
    (tmp_path / "1").mkdir()
    (tmp_path / "1" / "model.onnx").write_bytes(b"\0" * 3_000_000)  # more than one hashing chunk
    (tmp_path / "labels.txt").write_text("a\n")
    entries = file_entries(tmp_path, ["labels.txt", "1/model.onnx"])
    assert list(entries) == ["1/model.onnx", "labels.txt"]
    assert entries["1/model.onnx"].size_bytes == 3_000_000
    assert entries["labels.txt"].sha256 == sha256_file(tmp_path / "labels.txt")
    assert entries["labels.txt"].sha256 == "87428fc522803d31065e7bce3cf03fe475096631e5e07bbd7a0fde60c4cf25c7"


def _idx(shape: tuple[int, ...], data: bytes) -> bytes:
    return bytes([0, 0, 8, len(shape)]) + b"".join(d.to_bytes(4, "big") for d in shape) + data


def test_read_idx_reads_plain_and_gzipped_files_and_refuses_short_ones(tmp_path):
    (tmp_path / "x-idx2").write_bytes(_idx((2, 3), bytes(range(6))))
    (tmp_path / "y-idx2.gz").write_bytes(gzip.compress(_idx((2, 3), bytes(range(6)))))
    (tmp_path / "short").write_bytes(_idx((2, 3), bytes(5)))
    assert np.array_equal(read_idx(find_idx(tmp_path, "x-idx2")), np.arange(6).reshape(2, 3))
    assert np.array_equal(read_idx(find_idx(tmp_path, "y-idx2")), np.arange(6).reshape(2, 3))
    with pytest.raises(ValueError, match="declares shape"):
        read_idx(tmp_path / "short")
    with pytest.raises(FileNotFoundError, match="dataset-fashion-mnist"):
        find_idx(tmp_path, "missing")
