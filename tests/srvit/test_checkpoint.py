"""Checkpoints round-trip, and a wrong or unsafe file fails with a message that says what is wrong."""

import pytest
import torch
from safetensors.torch import load_file, save_file

from srvit.checkpoint import CheckpointError, load_checkpoint, read_metadata, save_checkpoint
from srvit.model import SRViT, SRViTConfig

CFG = SRViTConfig(img_size=8, patch_size=4, in_chans=1, num_classes=3, embed_dim=16, num_blocks=1, num_heads=2,
                  mlp_ratio=2.0, max_depth=3, router_hidden=8)  # fmt: skip
META = {"labels": ["a", "b", "c"], "preprocessing": {"input_size": 8}, "model": "tiny"}


@pytest.fixture
def saved(tmp_path):
    torch.manual_seed(0)
    model = SRViT(CFG).eval()
    path = tmp_path / "m.safetensors"
    save_checkpoint(path, model, META)
    return model, path


def test_round_trip_gives_the_same_outputs_and_metadata(saved):
    model, path = saved
    loaded, meta = load_checkpoint(path)
    x = torch.randn(2, 1, 8, 8)
    for d in (1, 2, 3):
        assert torch.equal(loaded(x, d), model(x, d))
    assert meta["labels"] == META["labels"]
    assert meta["config"] == CFG.to_dict()
    assert not loaded.training


def test_missing_and_mis_shaped_keys_are_listed(saved, tmp_path):
    _, path = saved
    state = load_file(str(path))
    meta = {"srvit": __import__("json").dumps(read_metadata(path))}
    del state["head.bias"]
    state["head.weight"] = torch.zeros(4, 16)
    state["extra"] = torch.zeros(1)
    bad = tmp_path / "bad.safetensors"
    save_file(state, str(bad), metadata=meta)
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(bad)
    msg = str(e.value)
    assert "missing keys ['head.bias']" in msg
    assert "unexpected keys ['extra']" in msg
    assert "head.weight: checkpoint (4, 16) vs model (3, 16)" in msg


def test_pickled_checkpoints_are_refused_before_loading(tmp_path):
    path = tmp_path / "model.pt"
    torch.save({"x": torch.zeros(1)}, path)
    with pytest.raises(CheckpointError, match="only .safetensors"):
        load_checkpoint(path)
    disguised = tmp_path / "model.safetensors"
    disguised.write_bytes(path.read_bytes())
    with pytest.raises(CheckpointError, match="pickled"):
        load_checkpoint(disguised)


def test_a_plain_safetensors_file_is_not_taken_for_a_checkpoint(tmp_path):
    path = tmp_path / "w.safetensors"
    save_file({"w": torch.zeros(1)}, str(path))
    with pytest.raises(CheckpointError, match="not an srvit checkpoint"):
        load_checkpoint(path)


@pytest.mark.parametrize(
    ("srvit_meta", "message"),
    [
        ("{not json", "not JSON"),
        ('["a list"]', "format 'list'"),
        ('{"format": "srvit-checkpoint/1"}', "no model 'config'"),
    ],
)
def test_damaged_metadata_is_named(tmp_path, srvit_meta, message):
    path = tmp_path / "w.safetensors"
    save_file({"w": torch.zeros(1)}, str(path), metadata={"srvit": srvit_meta})
    with pytest.raises(CheckpointError, match=message):
        load_checkpoint(path)


def test_srvit_eval_answers_a_bad_checkpoint_with_a_message_not_a_traceback(tmp_path, capsys):
    from cli.main import main

    path = tmp_path / "model.pt"
    torch.save({"x": torch.zeros(1)}, path)
    assert main(["eval", str(path)]) == 2
    assert "srvit eval:" in capsys.readouterr().err
