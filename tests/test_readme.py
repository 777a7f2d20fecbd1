"""The README's examples run as written (Python block, then each `pangu` line)."""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()
# Benchmarks run shortened and on a tiny shape here (the README shows the real command).
SHORTEN = {"bench": ["--repeats", "1", "--warmup", "0", "--new-tokens", "4", "--prompt-len", "8"]}
SMALLER = {"gpt2-small": "tiny-gpt"}


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


def test_python_example_then_cli_examples(tmp_path):
    code = "\n".join(blocks("python"))
    assert "pf.generate" in code
    (tmp_path / "models").symlink_to(ROOT / "models")  # the examples run from a clone's root
    subprocess.run([sys.executable, "-c", code], cwd=tmp_path, check=True)
    assert (tmp_path / "out" / "tiny" / "config.json").is_file()
    lines = pangu_lines()
    assert len(lines) >= 4
    for line in lines:
        argv = shlex.split(line)[1:]
        if argv[0] in SHORTEN:
            argv = [SMALLER.get(a, a) for a in argv] + SHORTEN[argv[0]]
        proc = subprocess.run([sys.executable, "-m", "pangu_tools.cli", *argv], cwd=tmp_path,
                              capture_output=True, text=True, timeout=300, check=False)
        assert proc.returncode == 0, f"{line}\n{proc.stderr}"
        if "--json" in argv and argv[argv.index("--json") + 1:][:1] in ([], ["--stream"]):
            json.loads(proc.stdout)
    bench = json.loads((tmp_path / "out" / "bench.json").read_text())
    assert [r["engine"] for r in bench["results"]][:2] == ["pangu-fn", "transformers"]
