"""The runtime installs without torch: the pangu-runtime wheel built from ./runtime, installed
into a fresh virtual environment (a constraint forbids torch), runs an exported bundle with its
`pangu-run` script and gives the greedy tokens of `pangu_fn.generate`.

This is the suite's one test that installs from the package index (numpy, onnxruntime and the
tokenizer libraries; pip's cache makes repeats quick). It is skipped, saying so, when no index
can be reached."""

from __future__ import annotations

import ast
import json
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from helpers import random_model
from pangu_export import export_bundle

import pangu_fn as pf
from pangu_fn.tokenizer import load_tokenizer

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "models" / "demo" / "target"
PROMPTS = [[5, 17, 42, 9, 5, 17], [3, 88]]
PIP = ["--quiet", "--no-input", "--disable-pip-version-check", "--retries", "2", "--timeout", "60"]
TEXT = "A context manager is an object that"
OFFLINE = ("NewConnectionError", "Failed to establish a new connection", "Temporary failure in name resolution",
           "Network is unreachable", "No route to host", "ConnectTimeout")


def imported_libraries(folder: Path) -> set[str]:
    """Top-level names of the non-standard-library modules the .py files of `folder` import."""
    names = set()
    for path in folder.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names.update(a.name.split(".")[0] for a in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.add(node.module.split(".")[0])
    return {n for n in names if n not in sys.stdlib_module_names and n != "__future__"}


def requirement_names(wheel: Path) -> set[str]:
    """The distribution names of the wheel's Requires-Dist lines."""
    with zipfile.ZipFile(wheel) as z:
        meta = z.read(next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))).decode()
    lines = [line.split(":", 1)[1].strip() for line in meta.splitlines() if line.startswith("Requires-Dist:")]
    return {re.match(r"[A-Za-z0-9._-]+", line).group().lower() for line in lines}


def run(cmd: list[str], cwd: Path, timeout: int = 120) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout, check=False)


def build_wheel(tmp: Path) -> Path:
    """Build pangu-runtime from a copy of ./runtime (so no build folder lands in the clone)."""
    src = tmp / "runtime-src"
    shutil.copytree(ROOT / "runtime", src, ignore=shutil.ignore_patterns("__pycache__", "build", "*.egg-info"))
    proc = run([sys.executable, "-m", "pip", "wheel", *PIP, "--no-deps", "--wheel-dir", str(tmp / "dist"), f"{src}/"],
               tmp, timeout=300)
    skip_if_offline(proc)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (wheel,) = (tmp / "dist").glob("pangu_runtime-*.whl")
    return wheel


def skip_if_offline(proc: subprocess.CompletedProcess) -> None:
    if proc.returncode != 0 and any(s in proc.stderr for s in OFFLINE):
        reason = next(line for line in proc.stderr.splitlines() if any(s in line for s in OFFLINE))
        pytest.skip(f"no package index reachable from here (pip: {reason.strip()[:200]})")


@pytest.mark.heavy
def test_wheel_installs_and_runs_a_bundle_without_torch(tmp_path):
    wheel = build_wheel(tmp_path)
    with zipfile.ZipFile(wheel) as z:
        packages = {n.split("/")[0] for n in z.namelist() if not n.split("/")[0].endswith(".dist-info")}
    assert packages == {"pangu_runtime"}
    needed = imported_libraries(ROOT / "runtime")
    assert needed and "torch" not in needed and "pangu_fn" not in needed
    declared = requirement_names(wheel)
    assert needed <= declared and "torch" not in declared, (needed, declared)

    venv = tmp_path / "venv"
    assert run([sys.executable, "-m", "venv", "--without-pip", str(venv)], tmp_path).returncode == 0
    python = venv / "bin" / "python"
    (tmp_path / "no-torch.txt").write_text("torch<0\n")  # no torch release satisfies it: pip fails instead
    proc = run([sys.executable, "-m", "pip", "--python", str(python), "install", *PIP,
                "--constraint", str(tmp_path / "no-torch.txt"), str(wheel)], tmp_path, timeout=400)
    skip_if_offline(proc)
    assert proc.returncode == 0, proc.stderr[-3000:]

    probe = ("import importlib, importlib.util, json, sys; "
             f"[importlib.import_module(m) for m in {sorted(needed)!r}]; import pangu_runtime.cli; "
             "print(json.dumps({'present': [m for m in ('torch', 'pangu_fn', 'pangu_export', 'pangu_tools') "
             "if importlib.util.find_spec(m) is not None], 'file': pangu_runtime.__file__, "
             "'torch_loaded': 'torch' in sys.modules}))")
    proc = run([str(python), "-c", probe], tmp_path)
    assert proc.returncode == 0, proc.stderr
    found = json.loads(proc.stdout)
    assert found["present"] == [] and not found["torch_loaded"]
    assert Path(found["file"]).is_relative_to(venv)

    params, cfg = random_model("tiny-openpangu")
    export_bundle(params, cfg, tmp_path / "bundle", "ort", progress=False)
    ids = "; ".join(" ".join(map(str, p)) for p in PROMPTS)
    proc = run([str(venv / "bin" / "pangu-run"), str(tmp_path / "bundle"), "--prompt-ids", ids,
                "--max-new-tokens", "8", "--no-eos", "--json", "-"], tmp_path)
    assert proc.returncode == 0, proc.stderr
    got = [r["tokens"] for r in json.loads(proc.stdout)["results"]]
    assert got == [c.tokens for c in pf.generate(params, cfg, PROMPTS, 8, eos_token_ids=())]

    # The SentencePiece library the venv got encodes as pangu_fn's tokenizer does.
    encode = ("import sys; from pathlib import Path; from pangu_runtime.tokenizer import BundleTokenizer; "
              "t = BundleTokenizer(Path(sys.argv[1]), 'sentencepiece', 1, 2, 3); print(t.encode(sys.argv[2], True))")
    proc = run([str(python), "-c", encode, str(DEMO / "tokenizer.model"), TEXT], tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == load_tokenizer(DEMO).encode(TEXT, add_bos=True)

    proc = run([str(venv / "bin" / "pangu-run"), str(tmp_path / "missing"), "--prompt-ids", "1"], tmp_path)
    assert proc.returncode == 2 and proc.stderr.startswith("pangu-run: error:"), proc.stderr
