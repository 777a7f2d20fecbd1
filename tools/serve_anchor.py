"""`pangu serve-anchor MODEL`: llama.cpp's own `llama-server` beside `pangu serve` on the same
weights, both driven by `pangu serve-bench`'s request set (issue 22's anchor).

For each `--dtypes` entry (fp32 / bf16 / fp16; GGUF f32 / bf16 / f16):

1. a GGUF of MODEL's weights: llama.cpp's `convert_hf_to_gguf.py` reading the output of
   `pangu convert --to hf` (a preset's random weights, from `--weights-seed`, are saved first);
   where that converter fails (a GPT-2 preset has no tokenizer for it), our exporter
   (`pangu export --target gguf`) writes the file and the report keeps the converter's error;
2. llama-server (`-np SLOTS -c SLOTS x context --cont-batching -t THREADS`), whose greedy tokens
   on one prompt are compared with `pangu_fn.generate`'s; its requests carry `ignore_eos`;
3. `pangu serve MODEL --dtype D --threads THREADS --max-batch SLOTS`.

Both servers run at once and take turns, level by level (which goes first alternates), so a
busy machine slows both alike. Every row records the tokens decoded per request.

llama-server is built the first time only, into `--llama-dir`: `pip download` of the
llama-cpp-python sdist (`--llama-version`), whose `vendor/llama.cpp` is configured with cmake
(`GGML_NATIVE=ON`) and built under `nice` (about 10 minutes on two cores).
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from . import serve_bench
from .common import write_json

LLAMA_VERSION = "0.3.36"
GGUF_TYPE = {"fp32": "f32", "bf16": "bf16", "fp16": "f16"}
DEFAULT_DIR = "~/.cache/pangu-fn/llama-server"
BINARY = Path("build", "bin", "llama-server")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve-anchor", help="llama.cpp's llama-server beside pangu serve, same weights and load",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", help="model folder or preset name (random weights)")
    p.add_argument("--dtypes", nargs="+", choices=list(GGUF_TYPE), default=["fp32", "bf16"],
                   help="weights of both servers (default fp32 bf16)")
    p.add_argument("--servers", nargs="+", choices=["llama", "pangu"], default=["llama", "pangu"])
    p.add_argument("--weights-seed", type=int, default=0, help="seed for a preset's random weights")
    p.add_argument("--threads", type=int, default=2, help="CPU threads of each server (default 2)")
    p.add_argument("--slots", type=int, default=16, help="requests decoded together (default 16)")
    p.add_argument("--pangu-arg", action="append", default=[], metavar="ARG",
                   help="an extra argument for pangu serve, e.g. --pangu-arg=--no-invariant (repeatable)")
    p.add_argument("--llama-dir", default=DEFAULT_DIR,
                   help="where llama.cpp's sources and build live (default ~/.cache/pangu-fn/llama-server)")
    p.add_argument("--llama-version", default=LLAMA_VERSION, help=f"llama-cpp-python sdist (default {LLAMA_VERSION})")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16], help="clients at once (default 1 4 16)")
    p.add_argument("--requests", type=int, default=16, help="requests per concurrency level (default 16)")
    p.add_argument("--prompt-len", type=int, default=32, help="prompt tokens (default 32)")
    p.add_argument("--max-tokens", type=int, default=32, help="new tokens per request (default 32)")
    p.add_argument("--vocab", type=int, default=None,
                   help="prompt ids are drawn below this (default: the vocabulary rounded down to a thousand)")
    p.add_argument("--seed", type=int, default=0, help="seed of the request set")
    p.add_argument("--json", default=None, help="write the report here (default: stdout)")
    p.set_defaults(func=run)


# ---- llama.cpp: sources, build, GGUF


def source_folder(root: Path, version: str) -> Path:
    """Where `llama_source` unpacks llama.cpp (built binary: `source_folder(...) / BINARY`)."""
    return root / version / f"llama_cpp_python-{version}" / "vendor" / "llama.cpp"


def llama_source(root: Path, version: str) -> Path:
    """llama.cpp's source folder inside the llama-cpp-python sdist, downloaded and unpacked
    under `root` the first time. Raises ConfigError when pip cannot fetch it."""
    from pangu_fn.errors import ConfigError

    src = source_folder(root, version)
    if (src / "CMakeLists.txt").is_file():
        return src
    with tempfile.TemporaryDirectory() as tmp:
        print(f"serve-anchor: downloading the llama-cpp-python {version} sdist ...", file=sys.stderr, flush=True)
        cmd = [sys.executable, "-m", "pip", "download", f"llama-cpp-python=={version}", "--no-binary", ":all:",
               "--no-deps", "-d", tmp]
        done = subprocess.run(cmd, check=False, capture_output=True, text=True)
        archives = list(Path(tmp).glob("llama_cpp_python-*.tar.gz"))
        if done.returncode != 0 or not archives:
            raise ConfigError(f"serve-anchor: pip could not download llama-cpp-python=={version}: "
                              f"{(done.stderr or done.stdout).strip().splitlines()[-1:]}")
        with tarfile.open(archives[0]) as tar:
            tar.extractall(root / version, filter="data")
    return src


def build_command(src: Path, jobs: int = 2) -> list[list[str]]:
    """cmake configure and build of the `llama-server` target, both under `nice -n 19`."""
    cmake = shutil.which("cmake") or "cmake"
    nice = ["nice", "-n", "19"] if shutil.which("nice") else []
    return [nice + [cmake, "-S", str(src), "-B", str(src / "build"), "-DLLAMA_CURL=OFF", "-DGGML_NATIVE=ON",
                    "-DCMAKE_BUILD_TYPE=Release"],
            nice + [cmake, "--build", str(src / "build"), "--target", "llama-server", "-j", str(jobs)]]


def llama_server_binary(src: Path) -> Path:
    """`build/bin/llama-server` under `src`, built first when missing (a progress bar follows
    cmake's percentages). Raises ConfigError without cmake or when the build fails."""
    from tqdm import tqdm

    from pangu_fn.errors import ConfigError

    binary = src / BINARY
    if binary.is_file():
        return binary
    if shutil.which("cmake") is None:
        raise ConfigError("serve-anchor: building llama-server needs cmake (and a C++ compiler): "
                          "install it with your package manager or `pip install cmake`")
    log = src / "build-llama-server.log"
    with open(log, "w") as out, tqdm(total=100, desc="building llama-server", unit="%") as bar:
        for cmd in build_command(src):
            proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            for line in proc.stdout:
                out.write(line)
                m = re.match(r"\[\s*(\d+)%\]", line)
                if m:
                    bar.update(int(m.group(1)) - bar.n)
            if proc.wait() != 0:
                raise ConfigError(f"serve-anchor: {' '.join(cmd[-6:])} failed (exit {proc.returncode}); see {log}")
    if not binary.is_file():
        raise ConfigError(f"serve-anchor: the build ended without {binary}; see {log}")
    return binary


def hf_folder(model: str, seed: int, work: Path) -> Path:
    """MODEL written by `pangu convert --to hf` (a preset saved as our folder first)."""
    import pangu_fn as pf

    from .common import resolve_model

    src, dst = Path(model), work / "hf"
    if dst.exists():  # written for an earlier dtype
        return dst
    if not src.exists():
        params, cfg, _ = resolve_model(model, seed=seed)
        src = work / "pangu-fn"
        pf.save(src, params, cfg)
        del params
    subprocess.run([sys.executable, "-m", "pangu_tools.cli", "convert", str(src), str(dst), "--to", "hf"],
                   check=True, stdout=subprocess.DEVNULL)
    return dst


def make_gguf(model: str, dtype: str, src: Path, work: Path, seed: int) -> tuple[Path, dict[str, Any]]:
    """(the GGUF file, how it was written). Tries llama.cpp's converter on `pangu convert --to
    hf`'s folder, then our exporter, keeping the converter's last error line."""
    out = work / f"model-{GGUF_TYPE[dtype]}.gguf"
    cmd = [sys.executable, str(src / "convert_hf_to_gguf.py"), str(hf_folder(model, seed, work)),
           "--outtype", GGUF_TYPE[dtype], "--outfile", str(out)]
    print(f"serve-anchor: {GGUF_TYPE[dtype]} GGUF with llama.cpp's converter ...", file=sys.stderr, flush=True)
    done = subprocess.run(cmd, check=False, capture_output=True, text=True)
    if done.returncode == 0 and out.is_file():
        return out, {"writer": "llama.cpp convert_hf_to_gguf.py (on pangu convert --to hf)"}
    error = next((line for line in reversed(done.stderr.splitlines()) if line.strip()), f"exit {done.returncode}")
    print(f"serve-anchor: the converter failed ({error}); using pangu-fn's exporter", file=sys.stderr, flush=True)
    from pangu_export.gguf import export_gguf

    from pangu_fn.tokenizer import find_tokenizer

    from .common import resolve_model

    params, cfg, _ = resolve_model(model, dtype="fp32", seed=seed)
    folder = Path(model)
    how = {"writer": "pangu-fn export_gguf (pangu export --target gguf)", "converter_error": error.strip()}
    if folder.is_dir() and find_tokenizer(folder) is not None:
        tokenizer = folder
    else:
        tokenizer = stand_in_tokenizer(work / "stand-in-tokenizer", cfg.vocab_size, cfg.eos_token_id)
        how["tokenizer"] = "stand-in byte-level BPE (the model has none; llama-server needs one to stream text)"
    summary = export_gguf(params, cfg, out, GGUF_TYPE[dtype], tokenizer=tokenizer, progress=False, overwrite=True)
    return out, {**how, "notes": summary.notes}


def byte_chars() -> list[str]:
    """GPT-2's byte-level alphabet: byte b as one printable character (printable ASCII and
    most of Latin-1 stand for themselves, the other bytes for chr(256 + n) in order)."""
    kept = {*range(33, 127), *range(161, 173), *range(174, 256)}
    others = iter(range(256, 512))
    return [chr(b) if b in kept else chr(next(others)) for b in range(256)]


def stand_in_tokenizer(folder: Path, vocab_size: int, eos_id: int | None) -> Path:
    """A byte-level BPE `tokenizer.json` of `vocab_size` tokens for a model without one (a
    preset): a GGUF without a vocabulary aborts llama-server when it turns a token into text.
    Ids: `<|endoftext|>` at `eos_id`; the others, in order, the 256 byte characters, then 2- and
    3-character strings of printable ASCII (each with its merge), so that nearly every token
    prints as whole UTF-8 text. Returns `folder`."""
    printable = [chr(b) for b in range(33, 127)]
    slots = vocab_size - (eos_id is not None and 0 <= eos_id < vocab_size)
    singles = byte_chars()[:max(1, min(256, slots - 1))]  # at least one merge: llama.cpp requires merges
    pieces = itertools.chain(singles, map("".join, itertools.product(printable, repeat=2)),
                             map("".join, itertools.product(printable, repeat=3)))
    vocab, merges = {}, []
    for i in range(vocab_size):
        if i != eos_id:
            piece = next(pieces)
            vocab[piece] = i
            if len(piece) > 1:
                merges.append(f"{piece[:-1]} {piece[-1]}")
    added = [] if eos_id is None else [{"id": eos_id, "content": "<|endoftext|>", "special": True}]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "tokenizer.json").write_text(json.dumps({
        "model": {"type": "BPE", "vocab": vocab, "merges": merges}, "added_tokens": added,
        "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": False}, "decoder": {"type": "ByteLevel"}}))
    (folder / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|endoftext|>"} if added else {}))
    return folder


# ---- servers


def llama_server_command(binary: Path, gguf: Path, port: int, slots: int, context: int, threads: int) -> list[str]:
    """llama-server with `slots` parallel sequences of `context` positions each."""
    return [str(binary), "-m", str(gguf), "--host", "127.0.0.1", "--port", str(port), "-np", str(slots),
            "-c", str(slots * context), "--cont-batching", "-t", str(threads), "-tb", str(threads), "--no-webui"]


def pangu_server_command(model: str, dtype: str, slots: int, threads: int, seed: int, extra: list[str]) -> list[str]:
    """`pangu serve` on a free port (it prints the URL when ready)."""
    return [sys.executable, "-m", "pangu_tools.cli", "serve", model, "--dtype", dtype, "--port", "0",
            "--max-batch", str(slots), "--threads", str(threads), "--weights-seed", str(seed), *extra]


def shown(cmd: list[str]) -> str:
    """A command as the report shows it: this machine's absolute paths cut to their names."""
    return " ".join(Path(a).name if os.path.isabs(a) else a for a in cmd)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def serving(cmd: list[str], log: Path, url: str | None = None, timeout: float = 600.0) -> Iterator[str]:
    """Runs a server (its output to `log`) until the block ends (SIGTERM, then SIGKILL after
    30 s) and yields its base URL once GET /health answers 200: `url`, or the one the server
    logs as `ready at URL` (`pangu serve --port 0`). Raises ConfigError, with the log's last
    lines, when it exits or is not ready within `timeout` seconds."""
    import httpx

    from pangu_fn.errors import ConfigError

    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, text=True)
        try:
            deadline = time.monotonic() + timeout
            while True:
                if url is None:
                    m = re.search(r"ready at (http://[^\s/]+)", log.read_text())
                    url = m.group(1) if m else None
                if url is not None and _healthy(httpx, url):
                    break
                if proc.poll() is not None or time.monotonic() > deadline:
                    lines = log.read_text().strip().splitlines()
                    tail = " | ".join(([x for x in lines if "error" in x.lower()] or lines)[-3:])
                    raise ConfigError(f"serve-anchor: {shown(cmd[:2])} did not become ready "
                                      f"(exit {proc.poll()}): {tail}")
                time.sleep(0.5)
            yield url
        finally:
            proc.terminate()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def _healthy(httpx: Any, url: str) -> bool:
    try:
        return httpx.get(url + "/health", timeout=5).status_code == 200
    except httpx.HTTPError:
        return False


def llama_greedy(url: str, prompt: list[int], n: int) -> list[int]:
    """llama-server's first `n` greedy token ids after `prompt` (its native /completion)."""
    import httpx

    body = {"prompt": prompt, "n_predict": n, "temperature": 0, "top_k": 1, "ignore_eos": True,
            "return_tokens": True, "cache_prompt": False}
    return httpx.post(url + "/completion", json=body, timeout=600).json()["tokens"]


def pangu_greedy(model: str, dtype: str, seed: int, prompt: list[int], n: int) -> list[int]:
    import pangu_fn as pf

    from .common import resolve_model

    params, cfg, _ = resolve_model(model, dtype=dtype, seed=seed)
    return pf.generate(params, cfg, [prompt], n, eos_token_ids=())[0].tokens


# ---- the comparison


def summary(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per run: tokens/s at the last level over the first and ITL p50 likewise, against the
    issue's goals (>= 4x, <= 3x), and pangu-fn's last-level tokens/s over llama-server's."""
    out = []
    for r in runs:
        first, last = r["levels"][0], r["levels"][-1]
        row = {"server": r["server"], "dtype": r["dtype"], "concurrency": [first["concurrency"], last["concurrency"]],
               "tokens_per_s": [first["output_tokens_per_s"], last["output_tokens_per_s"]],
               "tokens_per_s_ratio": last.get("tokens_per_s_vs_first"), "itl_p50_ratio": last.get("itl_p50_vs_first")}
        row["goals_met"] = bool(row["tokens_per_s_ratio"] and row["tokens_per_s_ratio"] >= 4
                                and row["itl_p50_ratio"] and row["itl_p50_ratio"] <= 3)
        llama = next((x for x in runs if x["server"] == "llama-server" and x["dtype"] == r["dtype"]), None)
        theirs = llama["levels"][-1]["output_tokens_per_s"] if llama else None
        if r["server"] == "pangu serve" and theirs:
            row["vs_llama_server_last_level"] = round(last["output_tokens_per_s"] / theirs, 2)
        out.append(row)
    return out


def bench_args(args: argparse.Namespace, vocab: int, extra: dict[str, Any] | None) -> argparse.Namespace:
    return argparse.Namespace(requests=args.requests, prompt_len=args.prompt_len, shared_prefix=0,
                              max_tokens=args.max_tokens, vocab=vocab, seed=args.seed, extra_body=extra)


def run_dtype(args: argparse.Namespace, dtype: str, src: Path, cfg: Any, vocab: int,
              work: Path) -> list[dict[str, Any]]:
    """Both servers at `dtype`, level by level in turns; one run dict per server."""
    runs: dict[str, dict[str, Any]] = {}
    with contextlib.ExitStack() as stack:
        if "llama" in args.servers:
            binary = llama_server_binary(src)
            gguf, how = make_gguf(args.model, dtype, src, work, args.weights_seed)
            port = free_port()
            cmd = llama_server_command(binary, gguf, port, args.slots, cfg.max_seq_len, args.threads)
            url = stack.enter_context(serving(cmd, work / f"llama-server-{dtype}.log", f"http://127.0.0.1:{port}"))
            probe = serve_bench.requests(bench_args(args, vocab, None), "greedy check")[0]
            theirs, ours = llama_greedy(url, probe, 16), pangu_greedy(args.model, dtype, args.weights_seed, probe, 16)
            runs["llama-server"] = {"server": "llama-server", "dtype": dtype, "gguf": {"file": gguf.name, **how},
                                    "command": shown(cmd), "same_greedy_tokens_as_pangu_fn": theirs == ours,
                                    "url": url, "bench": bench_args(args, vocab, {"ignore_eos": True})}
        if "pangu" in args.servers:
            cmd = pangu_server_command(args.model, dtype, args.slots, args.threads, args.weights_seed, args.pangu_arg)
            url = stack.enter_context(serving(cmd, work / f"pangu-serve-{dtype}.log"))
            runs["pangu serve"] = {"server": "pangu serve", "dtype": dtype, "command": "pangu " + shown(cmd[3:]),
                                   "url": url, "bench": bench_args(args, vocab, None)}
        for r in runs.values():
            r["model_name"] = serve_bench.served_model(serve_bench.api_url(r["url"]))
            r["levels"] = []
        for i, c in enumerate(args.concurrency):
            for r in list(runs.values())[:: 1 if i % 2 == 0 else -1]:
                print(f"serve-anchor: {r['server']} {dtype}, concurrency {c}", file=sys.stderr, flush=True)
                r["levels"].append(serve_bench.measure_level(r["bench"], serve_bench.api_url(r["url"]), r["model_name"],
                                                             {}, i, c))
    for r in runs.values():
        r["model_name"] = shown([r["model_name"]])  # llama-server names the model by its file's path
        serve_bench.with_ratios(r["levels"])
        r["extra_body"] = r.pop("bench").extra_body
        del r["url"]
    return list(runs.values())


def run(args: argparse.Namespace) -> int:
    import pangu_fn as pf
    from pangu_fn.errors import InputError
    from pangu_fn.io.checkpoint import load_config

    if min(args.concurrency) < 1 or args.slots < 1 or args.threads < 1:
        raise InputError(f"serve-anchor: expected --concurrency, --slots, --threads >= 1, found "
                         f"{args.concurrency}, {args.slots}, {args.threads}")
    cfg = load_config(args.model) if Path(args.model).exists() else pf.ModelConfig.preset(args.model)
    vocab = args.vocab or max(1000, cfg.vocab_size // 1000 * 1000)
    serve_bench.check(bench_args(args, vocab, None))
    if args.prompt_len + args.max_tokens > cfg.max_seq_len:
        raise InputError(f"serve-anchor: --prompt-len + --max-tokens = {args.prompt_len + args.max_tokens} "
                         f"exceeds the model's context {cfg.max_seq_len}")
    root = Path(args.llama_dir).expanduser()
    src = llama_source(root, args.llama_version) if "llama" in args.servers else root
    start = os.getloadavg()[0]
    runs = []
    with tempfile.TemporaryDirectory(prefix="serve-anchor-") as tmp:
        for k, dtype in enumerate(args.dtypes):
            runs += run_dtype(args, dtype, src, cfg, vocab, Path(tmp))
            if args.json is not None or k == len(args.dtypes) - 1:  # a file is rewritten after each dtype
                write_json({"command": "pangu " + " ".join(sys.argv[1:]), "model": args.model,
                            "llama_cpp_python_sdist": args.llama_version, "threads": args.threads,
                            "slots": args.slots, "requests": args.requests, "prompt_len": args.prompt_len,
                            "max_tokens": args.max_tokens, "vocab": vocab, "seed": args.seed,
                            "load_average_1min": {"start": round(start, 2), "end": round(os.getloadavg()[0], 2)},
                            "cpus": os.cpu_count(), "summary": summary(runs), "runs": runs}, args.json)
    return 0
