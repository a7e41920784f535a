"""Publishing swaps whole folders by rename and never leaves staging or old folders behind."""

from __future__ import annotations

import json
import os

import pytest

from export.publish import publish, remove_stale, replace_folder, staging


def test_staging_is_hidden_inside_the_repo_and_removed_after_an_error(tmp_path):
    repo = tmp_path / "repo"
    repo.mkdir()
    with pytest.raises(RuntimeError), staging(repo, "m") as stage:
        assert stage.parent == repo and stage.name.startswith(".tmp-m-")
        (stage / "m_d1").mkdir()
        raise RuntimeError("a step failed")
    assert list(repo.iterdir()) == []


def test_a_repo_created_for_a_failed_export_is_removed(tmp_path):
    with pytest.raises(RuntimeError), staging(tmp_path / "new" / "repo", "m"):
        raise RuntimeError("a step failed")
    assert not (tmp_path / "new" / "repo").exists()


def test_publish_moves_every_folder_and_replaces_old_ones(tmp_path):
    repo = tmp_path / "repo"
    (repo / "m_d1").mkdir(parents=True)
    (repo / "m_d1" / "old.txt").write_text("old")
    with staging(repo, "m") as stage:
        for name in ("m_d1", "m_d2"):
            (stage / name).mkdir()
            (stage / name / "new.txt").write_text(name)
        published = publish(stage, repo)
    assert published == [repo / "m_d1", repo / "m_d2"]
    assert sorted(p.name for p in repo.iterdir()) == ["m_d1", "m_d2"]
    assert [p.name for p in (repo / "m_d1").iterdir()] == ["new.txt"]


def test_stale_folders_of_the_model_are_removed_and_nothing_else(tmp_path):
    names = ["m_d1", "m_d2", "m_d2_trt", "m_d10", "m_d3_trt", "m_dx", "m_d2_old", "mm_d2", "other_d2", ".tmp-m-1"]
    for name in names:
        (tmp_path / name).mkdir()
    (tmp_path / "m_d3").write_text("a file, not a model folder")
    (tmp_path / "m_d4").mkdir()  # the same checkpoint: still valid beside the new folders
    (tmp_path / "m_d4" / "manifest.json").write_text(json.dumps({"checkpoint": {"sha256": "abc"}}))
    (tmp_path / "m_d5").mkdir()  # another checkpoint
    (tmp_path / "m_d5" / "manifest.json").write_text(json.dumps({"checkpoint": {"sha256": "old"}}))
    removed = remove_stale(tmp_path, "m", keep={"m_d1", "m_d2"}, checkpoint_sha256="abc")
    assert removed == [tmp_path / "m_d10", tmp_path / "m_d2_trt", tmp_path / "m_d3_trt", tmp_path / "m_d5"]
    left = ["m_d1", "m_d2", "m_dx", "m_d2_old", "mm_d2", "other_d2", ".tmp-m-1", "m_d3", "m_d4"]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(left)  # no .old-* left behind


def test_a_failed_swap_puts_the_old_folder_back(tmp_path, monkeypatch):
    (tmp_path / "target").mkdir()
    (tmp_path / "target" / "old.txt").write_text("in service")
    (tmp_path / "new").mkdir()
    real_rename = os.rename

    def rename(src, dst):
        if str(src).endswith("new"):
            raise OSError("disk trouble")
        real_rename(src, dst)

    monkeypatch.setattr(os, "rename", rename)
    with pytest.raises(OSError):
        replace_folder(tmp_path / "new", tmp_path / "target")
    assert (tmp_path / "target" / "old.txt").read_text() == "in service"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["new", "target"]
