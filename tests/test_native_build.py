"""Where the native library comes from: a private cache folder (0700), a file name that changes
with the compiler's version, no cached file loaded unless this user owns it and no one else
may write it, one compile at a time across processes, and a cached file that fails to load
rebuilt once. A fake compiler (a shell script) stands in for `cc` except where a real build
is loaded."""

from __future__ import annotations

import multiprocessing
import os
import platform
import shutil
import stat
from pathlib import Path

import pytest

from pangu_fn import native

FAKE_CC = """#!/bin/sh
out=""; prev=""
for a in "$@"; do [ "$prev" = "-o" ] && out="$a"; prev="$a"; done
case " $* " in
  *" --version "*) echo "fakecc $FAKE_CC_VERSION";;
  *" -dM "*) printf "#define __AVX512F__ 1\n#define __AVX2__ 1\n#define __FMA__ 1\n";;
  *) echo compile >> "$FAKE_CC_LOG"; sleep "${FAKE_CC_SLEEP:-0}"; printf 'not a library' > "$out";;
esac
"""


@pytest.fixture
def fake_cc(tmp_path, monkeypatch) -> Path:
    """CC is a script that logs each compile and writes a file that is not a library;
    PANGU_FN_CACHE is a fresh folder. Returns the log."""
    cc = tmp_path / "fakecc"
    cc.write_text(FAKE_CC)
    cc.chmod(0o755)
    log = tmp_path / "compiles.log"
    monkeypatch.setenv("CC", str(cc))
    monkeypatch.setenv("FAKE_CC_VERSION", "1.0")
    monkeypatch.setenv("FAKE_CC_LOG", str(log))
    monkeypatch.setenv("PANGU_FN_CACHE", str(tmp_path / "cache"))
    native.forget()
    yield log
    native.forget()


def identity(path: Path) -> tuple:
    """What a replacement or rewrite of `path` would change (not its access time)."""
    info = path.lstat()
    return info.st_ino, info.st_mode, info.st_uid, info.st_size, info.st_mtime_ns


def compiles(log: Path) -> int:
    return len(log.read_text().splitlines()) if log.exists() else 0


def test_the_cache_folder_is_private_and_the_name_follows_the_compiler_version(fake_cc, tmp_path, monkeypatch):
    lib, origin = native._build()
    assert origin == "built" and lib.parent == tmp_path / "cache"
    assert stat.S_IMODE(lib.parent.stat().st_mode) == 0o700
    assert stat.S_IMODE(lib.stat().st_mode) & 0o077 == 0
    assert native._build() == (lib, "cached") and compiles(fake_cc) == 1
    monkeypatch.setenv("FAKE_CC_VERSION", "2.0")
    other, origin = native._build()
    assert origin == "built" and other != lib and compiles(fake_cc) == 2


def test_a_loose_cache_folder_of_ours_is_tightened_to_0700(fake_cc, tmp_path):
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache").chmod(0o777)
    native._build()
    assert stat.S_IMODE((tmp_path / "cache").stat().st_mode) == 0o700


@pytest.mark.parametrize("change", ["group-writable", "world-writable", "symlink", "other-owner"])
def test_an_untrusted_cached_library_is_not_loaded(fake_cc, tmp_path, change):
    lib, _ = native._build()
    if change == "other-owner":
        if os.geteuid() != 0:
            pytest.skip("changing a file's owner needs root")
        os.chown(lib, 65534, 65534)
    elif change == "symlink":
        target = tmp_path / "elsewhere.so"
        target.write_text("planted")
        lib.unlink()
        lib.symlink_to(target)
    else:
        lib.chmod(0o720 if change == "group-writable" else 0o702)
    before = identity(lib)
    built, origin = native._build()
    assert origin == "private" and built.parent != lib.parent and compiles(fake_cc) == 2
    assert identity(lib) == before  # the suspicious file is left alone
    assert any(lib.name in note for note in native._notes)


def test_a_cache_folder_another_user_owns_is_not_used(fake_cc, tmp_path):
    if os.geteuid() != 0:
        pytest.skip("changing a folder's owner needs root")
    (tmp_path / "cache").mkdir(mode=0o700)
    os.chown(tmp_path / "cache", 65534, 65534)
    built, origin = native._build()
    assert origin == "private" and built.parent != tmp_path / "cache" and not any((tmp_path / "cache").iterdir())


def _build_and_report(queue) -> None:
    queue.put(str(native._build()[0]))


def test_two_processes_compile_once(fake_cc, tmp_path, monkeypatch):
    """Both processes wait on the lock; the second finds the first one's library."""
    monkeypatch.setenv("FAKE_CC_SLEEP", "1")
    fork = multiprocessing.get_context("fork")
    queue = fork.Queue()
    procs = [fork.Process(target=_build_and_report, args=(queue,)) for _ in range(2)]
    for p in procs:
        p.start()
    try:
        paths = [queue.get(timeout=60) for _ in procs]
    finally:
        for p in procs:
            p.join(timeout=10)
            p.kill()
    assert paths[0] == paths[1] and Path(paths[0]).parent == tmp_path / "cache"
    assert compiles(fake_cc) == 1


def test_a_library_that_does_not_load_is_reported_as_such(fake_cc):
    with pytest.raises(native.BuildError, match="load failed: "):  # freshly built: no second try
        native._load()
    assert compiles(fake_cc) == 1
    with pytest.raises(native.BuildError, match="load failed after rebuilding"):  # cached: rebuilt once
        native._load()
    assert compiles(fake_cc) == 2


@pytest.mark.skipif(platform.machine() != "x86_64" or shutil.which("cc") is None, reason="needs cc on x86-64")
def test_a_cached_library_that_fails_to_load_is_rebuilt_once(tmp_path, monkeypatch):
    """A real build for a portable AVX-512 target (loaded, never called, so any x86-64 CPU will
    do), then the cached file is truncated: loading rebuilds it."""
    monkeypatch.setenv("CC", "cc")
    monkeypatch.setenv("PANGU_FN_CACHE", str(tmp_path))
    monkeypatch.setattr(native, "FLAGS", ["-O0", "-march=x86-64-v4", "-mavx512bf16", "-fopenmp", "-shared", "-fPIC"])
    lib, _ = native._build()
    lib.write_bytes(lib.read_bytes()[:100])
    assert native._load() is not None
    assert lib.read_bytes()[:4] == b"\x7fELF" and len(lib.read_bytes()) > 1000
