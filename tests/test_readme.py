"""The README's examples run as written (the Python block, then each `pangu` line).

Steps that name the same path under out/ run in README order in one test (the Python block
writes out/tiny, which `generate --model out/tiny` reads; `export ... out/demo-ort` comes before
`run out/demo-ort`); every other line is a test of its own, so the xdist workers share them."""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()
# Benchmarks run shortened, on one thread and on a tiny shape here (the README shows the real command).
SHORTEN = {"bench": ["--repeats", "1", "--warmup", "0", "--new-tokens", "4", "--prompt-len", "8", "--threads", "1"]}
SMALLER = {"gpt2-small": "tiny-gpt"}
OUT_PATH = re.compile(r"""(?:^|[\s"'])(out/[^\s"'/]+)""")


def blocks(lang: str) -> list[str]:
    """The bodies of the fenced blocks opened with ```<lang> (lang "" = no language)."""
    out, body, keep = [], None, False
    for line in README.splitlines():
        if line.startswith("```"):
            if body is None:
                body, keep = [], line[3:].strip() == lang
            else:
                if keep:
                    out.append("\n".join(body))
                body = None
        elif body is not None:
            body.append(line)
    return out


def pangu_lines() -> list[str]:
    return [line for block in blocks("") for line in block.splitlines() if line.startswith("pangu ")]


def steps() -> list[str]:
    """The Python block's code, then the `pangu` lines, in README order."""
    return ["\n".join(blocks("python")), *pangu_lines()]


def groups() -> list[list[int]]:
    """Indices into `steps()`, split into groups that share no path under out/: a step joins
    every earlier group that names one of its paths. Each group keeps README order."""
    found: list[tuple[set[str], list[int]]] = []
    for i, step in enumerate(steps()):
        paths = set(OUT_PATH.findall(step))
        joined = [g for g in found if g[0] & paths]
        found = [g for g in found if not g[0] & paths]
        found.append((paths.union(*(g[0] for g in joined)), sorted(j for g in joined for j in g[1]) + [i]))
    return sorted((g[1] for g in found), key=lambda g: g[0])


def group_id(group: list[int]) -> str:
    names = ["python" if i == 0 else shlex.split(steps()[i])[1] for i in group]
    return f"{group[0]:02d}-" + "+".join(dict.fromkeys(names))


def run_line(line: str, cwd: Path) -> None:
    """One `pangu` line in a child process (bench lines shortened); its --json output must parse."""
    argv = shlex.split(line)[1:]
    if argv[0] in SHORTEN:
        argv = [SMALLER.get(a, a) for a in argv] + SHORTEN[argv[0]]
    proc = subprocess.run([sys.executable, "-m", "pangu_tools.cli", *argv], cwd=cwd,
                          capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, f"{line}\n{proc.stderr}"
    if "--json" in argv and argv[argv.index("--json") + 1:][:1] in ([], ["--stream"]):
        json.loads(proc.stdout)


def test_every_example_runs_in_one_group():
    assert "pf.generate" in steps()[0]
    assert len(pangu_lines()) >= 4
    assert sorted(i for g in groups() for i in g) == list(range(len(steps())))
    first = next(g for g in groups() if g[0] == 0)
    assert any("--model out/tiny " in steps()[i] for i in first)  # what the Python block saved is read back
    assert any("--json out/bench.json" in line for line in pangu_lines())


@pytest.mark.heavy  # child processes that import torch; the demo-model lines score held-out text
@pytest.mark.parametrize("group", groups(), ids=group_id)
def test_examples(group, tmp_path):
    (tmp_path / "models").symlink_to(ROOT / "models")  # the examples run from a clone's root
    for i in group:
        if i == 0:
            subprocess.run([sys.executable, "-c", steps()[0]], cwd=tmp_path, check=True)
            assert (tmp_path / "out" / "tiny" / "config.json").is_file()
        else:
            run_line(steps()[i], tmp_path)
    if any("--json out/bench.json" in steps()[i] for i in group):
        bench = json.loads((tmp_path / "out" / "bench.json").read_text())
        assert [r["engine"] for r in bench["results"]][:2] == ["pangu-fn", "transformers"]
