"""No writer destroys data: an existing destination is replaced only with overwrite, never
when it is not one of ours, never when it holds the source; a failed final swap puts the
previous folder back; the process umask is never changed."""

from __future__ import annotations

import os
import stat

import pytest
import torch
from helpers import random_model
from pangu_tools.cli import main

import pangu_fn as pf
from pangu_fn.errors import ConfigError
from pangu_fn.io import atomic


def tree_of(folder) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def tiny():
    return random_model("tiny-gpt")


def test_save_refuses_a_folder_of_unrelated_files_even_with_overwrite(tmp_path, tiny):
    params, cfg = tiny
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "thesis.tex").write_text("years of work")
    for overwrite in (False, True):
        with pytest.raises(ConfigError, match="thesis.tex" if overwrite else "exists; pass --overwrite"):
            pf.save(tmp_path / "d", params, cfg, overwrite=overwrite)
        assert tree_of(tmp_path / "d") == {"thesis.tex": b"years of work"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d"]  # no temporary folder left


def test_save_replaces_a_model_only_with_overwrite(tmp_path, tiny):
    params, cfg = tiny
    other, _ = random_model("tiny-gpt", seed=5)
    (tmp_path / "empty").mkdir()
    pf.save(tmp_path / "empty", params, cfg)  # an empty folder is no data
    pf.save(tmp_path / "m", params, cfg)
    before = tree_of(tmp_path / "m")
    with pytest.raises(ConfigError, match="exists; pass --overwrite"):
        pf.save(tmp_path / "m", other, cfg)
    assert tree_of(tmp_path / "m") == before
    pf.save(tmp_path / "m", other, cfg, overwrite=True)
    assert torch.equal(pf.load(tmp_path / "m")[0]["tok_embed"]["weight"], other["tok_embed"]["weight"])
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigError, match="exists"):
        pf.save(tmp_path / "file", params, cfg)


@pytest.mark.parametrize("command", [["quantize", "--scheme", "int8", "--no-eval", "--no-progress"],
                                     ["prune", "--method", "magnitude", "--no-eval", "--no-progress"],
                                     ["export", "--no-genai"]])
def test_commands_refuse_the_source_its_parents_and_existing_outputs(tmp_path, tiny, capsys, command):
    params, cfg = tiny
    src = pf.save(tmp_path / "demo" / "target", params, cfg)
    (tmp_path / "demo" / "notes.txt").write_text("keep me")
    (tmp_path / "link").symlink_to(tmp_path / "demo")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "config.json").write_text('{"format": "pangu-fn", "version": 1, "config": {}}')
    before = tree_of(tmp_path)
    name, *options = command
    for dst in (src, tmp_path / "demo", tmp_path / "link", tmp_path):
        for overwrite in ([], ["--overwrite"]):
            assert main([name, str(src), str(dst), *options, *overwrite]) == 2
            err = capsys.readouterr().err
            assert err.count("\n") == 1 and ("is the source" in err or "contains the source" in err), err
    assert main([name, str(src), str(tmp_path / "out"), *options]) == 2
    assert "exists; pass --overwrite" in capsys.readouterr().err
    assert tree_of(tmp_path) == before


def test_overwrite_replaces_our_output(tmp_path, tiny):
    params, cfg = tiny
    src = pf.save(tmp_path / "src", params, cfg)
    dst = tmp_path / "q"
    args = ["prune", str(src), str(dst), "--method", "magnitude", "--no-eval", "--no-progress"]
    assert main([*args, "--sparsity", "0.25"]) == 0
    assert main(args) == 2
    assert main([*args, "--sparsity", "0.75", "--overwrite"]) == 0
    up = pf.load(dst)[0]["blocks"][0]["mlp"]["up"]["weight"]
    assert (up == 0).float().mean().item() == pytest.approx(0.75, abs=0.01)


def test_a_failed_swap_puts_the_old_folder_back(tmp_path, tiny, monkeypatch):
    params, cfg = tiny
    path = pf.save(tmp_path / "m", params, cfg)
    before = tree_of(path)
    real_replace = os.replace

    def failing_replace(src, dst):
        if str(src).endswith(".tmp"):  # the final rename of the new folder onto the destination
            raise OSError(28, "No space left on device")
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", failing_replace)
    other, _ = random_model("tiny-gpt", seed=3)
    with pytest.raises(OSError, match="No space left"):
        pf.save(path, other, cfg, overwrite=True)
    assert tree_of(path) == before
    assert [p.name for p in tmp_path.iterdir()] == ["m"]  # neither the new nor the old folder left hidden


def test_atomic_writers_never_change_the_umask(tmp_path, monkeypatch):
    mask = os.umask(0o027)
    try:
        assert atomic.process_umask() == 0o027
        monkeypatch.setattr(os, "umask", lambda *a: pytest.fail("os.umask called: it races with other threads"))
        with atomic.atomic_dir(tmp_path / "d") as tmp:
            (tmp / "f").write_text("x")
        with atomic.atomic_file(tmp_path / "f") as tmp:
            tmp.write_text("x")
    finally:
        monkeypatch.undo()
        os.umask(mask)
    assert stat.S_IMODE((tmp_path / "d").stat().st_mode) == 0o750
    assert stat.S_IMODE((tmp_path / "f").stat().st_mode) == 0o640
