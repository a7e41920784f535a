"""Start-up refuses a damaged repository with a clear message: checksums, missing files, escaping external data."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import onnx
import pytest

from service.repository import RepositoryError, load_repository
from service.runtime import choose_providers

pytestmark = pytest.mark.anyio


def edit_manifest(folder: Path, **changes) -> None:
    path = folder / "manifest.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


def rehash(folder: Path, rel: str) -> None:
    """Make the manifest agree with a file we changed on purpose, so only the check under test can object."""
    import hashlib

    data = (folder / rel).read_bytes()
    files = json.loads((folder / "manifest.json").read_text())["files"]
    files[rel] = {"sha256": hashlib.sha256(data).hexdigest(), "size_bytes": len(data)}
    edit_manifest(folder, files=files)


def test_repository_groups_depths_by_model(tiny_repo):
    (model,) = load_repository(tiny_repo).values()
    assert (model.name, model.depths, model.max_depth, model.version) == ("tiny", [1, 2, 3], 3, 1)
    assert model.labels == ["alpha", "beta", "gamma"] and model.accuracy(2) is None


def test_staging_and_other_dot_folders_are_skipped(repo_copy):
    stage = repo_copy / ".tmp-tiny-abc"
    shutil.copytree(repo_copy / "tiny_d1", stage / "tiny_d1")
    (stage / "tiny_d1" / "1" / "model.onnx").write_bytes(b"half-written")
    shutil.copytree(repo_copy / "tiny_d1", repo_copy / ".old-tiny_d1-1234")
    (repo_copy / ".old-tiny_d1-1234" / "labels.txt").write_text("stale")
    assert load_repository(repo_copy)["tiny"].depths == [1, 2, 3]


def test_checksum_mismatch_names_the_file(repo_copy):
    with open(repo_copy / "tiny_d2" / "1" / "model.onnx", "r+b") as f:
        f.seek(50)
        f.write(b"\x00\x01\x02")
    with pytest.raises(RepositoryError, match=r"tiny_d2/1/model.onnx: checksum mismatch"):
        load_repository(repo_copy)


def test_changed_labels_are_caught_too(repo_copy):
    (repo_copy / "tiny_d1" / "labels.txt").write_text("alpha\nbeta\ndelta\n")
    with pytest.raises(RepositoryError, match="labels.txt: checksum mismatch"):
        load_repository(repo_copy)


def test_missing_file_is_named(repo_copy):
    (repo_copy / "tiny_d3" / "1" / "model.onnx").unlink()
    with pytest.raises(RepositoryError, match=r"tiny_d3/1/model.onnx: listed in manifest.json but missing"):
        load_repository(repo_copy)


def test_external_data_escaping_the_folder_is_refused(repo_copy):
    path = repo_copy / "tiny_d1" / "1" / "model.onnx"
    model = onnx.load(str(path))
    tensor = model.graph.initializer[0]
    tensor.ClearField("raw_data")
    tensor.data_location = onnx.TensorProto.EXTERNAL
    entry = tensor.external_data.add()
    entry.key, entry.value = "location", "../../../../etc/passwd"
    onnx.save(model, str(path))
    rehash(repo_copy / "tiny_d1", "1/model.onnx")
    with pytest.raises(RepositoryError, match="outside"):
        load_repository(repo_copy)


def test_file_list_escaping_the_folder_is_refused(repo_copy):
    files = json.loads((repo_copy / "tiny_d1" / "manifest.json").read_text())["files"]
    edit_manifest(repo_copy / "tiny_d1", files={**files, "../tiny_d2/labels.txt": files["labels.txt"]})
    with pytest.raises(RepositoryError, match="outside its model folder"):
        load_repository(repo_copy)


def test_empty_or_missing_repository_is_refused(tmp_path):
    with pytest.raises(RepositoryError, match="holds no"):
        load_repository(tmp_path)
    with pytest.raises(RepositoryError, match="does not exist"):
        load_repository(tmp_path / "nope")


@pytest.mark.parametrize(
    "changes, fragment",
    [
        ({"format": "something/2"}, "not a srvit manifest of format"),
        ({"depth": 4}, "not within 1..max_depth"),
        ({"platform": "pytorch_libtorch"}, "platform"),
        ({"name": "../evil"}, "bad name"),
        ({"model_file": "1/other.onnx"}, "has no checksum"),
    ],
)
def test_manifest_the_server_cannot_follow_is_refused(repo_copy, changes, fragment):
    edit_manifest(repo_copy / "tiny_d2", **changes)
    with pytest.raises(RepositoryError, match=fragment):
        load_repository(repo_copy)


def test_unreadable_manifest_is_refused(repo_copy):
    (repo_copy / "tiny_d1" / "manifest.json").write_text("{not json")
    with pytest.raises(RepositoryError, match="unreadable manifest"):
        load_repository(repo_copy)


def test_depths_that_disagree_are_refused(repo_copy):
    edit_manifest(repo_copy / "tiny_d3", labels=["a", "b", "c"])
    with pytest.raises(RepositoryError, match=r"differ in \['labels'\]"):
        load_repository(repo_copy)


def test_depths_from_different_checkpoints_are_refused_naming_the_folders(repo_copy):
    """A re-export with fewer depths used to leave an older checkpoint's folder served beside the new ones."""
    manifest = json.loads((repo_copy / "tiny_d3" / "manifest.json").read_text())
    edit_manifest(repo_copy / "tiny_d3", checkpoint={**manifest["checkpoint"], "sha256": "0" * 64})
    with pytest.raises(RepositoryError, match=r"tiny_d1 and tiny_d3 differ in \['checkpoint'\].*re-export all depths"):
        load_repository(repo_copy)


def test_providers_auto_prefers_tensorrt_then_cuda_then_cpu():
    available = ["CPUExecutionProvider", "CUDAExecutionProvider", "AzureExecutionProvider"]
    assert choose_providers(["auto"], available) == ["CUDAExecutionProvider", "CPUExecutionProvider"]
    assert choose_providers(["cpu"], available) == ["CPUExecutionProvider"]
    with pytest.raises(RepositoryError, match="TensorrtExecutionProvider"):
        choose_providers(["tensorrt", "cpu"], available)


async def test_app_start_up_fails_on_a_damaged_repository(serving, repo_copy):
    (repo_copy / "tiny_d1" / "config.pbtxt").write_text("tampered")
    with pytest.raises(RepositoryError, match="config.pbtxt: checksum mismatch"):
        async with serving(repo=repo_copy):
            pass


async def test_graph_that_onnxruntime_cannot_load_fails_start_up(serving, repo_copy):
    (repo_copy / "tiny_d1" / "1" / "model.onnx").write_bytes(
        b"\x08\x07"
    )  # ir_version 7 and no graph: well-formed protobuf, no model
    rehash(repo_copy / "tiny_d1", "1/model.onnx")
    with pytest.raises(RepositoryError, match="ONNX Runtime cannot load it"):
        async with serving(repo=repo_copy):
            pass


def test_a_file_entry_that_is_not_an_object_is_refused(repo_copy):
    files = json.loads((repo_copy / "tiny_d1" / "manifest.json").read_text())["files"]
    edit_manifest(repo_copy / "tiny_d1", files={**files, "1/model.onnx": "sha256:abc"})
    with pytest.raises(RepositoryError, match=r"tiny_d1/1/model.onnx: its manifest entry must be"):
        load_repository(repo_copy)


async def test_graph_that_loads_but_fails_to_run_fails_start_up(serving, monkeypatch):
    import service.loading

    def broken_warm_up(*args):
        raise RuntimeError("[ONNXRuntimeError] : 6 : RUNTIME_EXCEPTION : Non-zero status code")

    monkeypatch.setattr(service.loading, "warm_up", broken_warm_up)
    with pytest.raises(RepositoryError, match=r"tiny depth \d: warm-up failed \(RuntimeError: .*RUNTIME_EXCEPTION"):
        async with serving():
            pass


@pytest.mark.parametrize("spinning", [False, True])
def test_intra_op_spinning_setting_reaches_the_session(tiny_repo, spinning):
    from service.runtime import open_runtime

    runtime = open_runtime(load_repository(tiny_repo)["tiny"].artifacts[1], ("cpu",), 1, spinning)
    options = runtime.session.get_session_options()
    assert options.get_session_config_entry("session.intra_op.allow_spinning") == ("1" if spinning else "0")
