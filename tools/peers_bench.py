"""`pangu bench --peers [DIR]`: pangu-fn against llama.cpp and ONNX Runtime on the same weights,
in one run, each engine in its own process.

Rows per `--peers-schemes` entry (what each engine loads is written first, to DIR or a
temporary folder, as a user deploys it):

| scheme | pangu-fn | llama.cpp (llama-cpp-python) | ONNX Runtime (`ort_bench.export_hf_onnx`) |
|---|---|---|---|
| fp32 | the fp32 tree | GGUF f32 | transformers' graph exported, ORT fusions |
| bf16 | the bf16 recipe | - | - |
| int8 | the `pangu quantize` int8 recipe | GGUF q8_0 | `quantize_dynamic` W8A8 |
| int4 | the int4 recipe (`--group-size`, `--asym`, `--quant-head`) | GGUF q4_0 | MatMulNBits |

The bench process saves the fp32 tree once (`prepare`, DIR/pangu-fp32), and the caller drops
its model; every other file is built from that folder by a child process of its own
(`peers_build`: pangu-fn trees quantized with the recipes `pangu bench --scheme` uses, saved
with `pangu_fn.save`; GGUF files from `gguf_bench.our_tree` + `export_gguf`; one fp32 ONNX export
quantized by ONNX Runtime's own tools, `ort_bench.quantize_plain`), so the peak memory of a run
is about its largest single step. Rows whose file a child built carry that child's peak RSS
(`build_peak_rss_mb`).

Each engine runs in a fresh process (`python -m pangu_tools.peers_bench JOB`, the loop of
`ort_bench.serve`) that loads its file, warms up and then times one generation each time it is
asked; the engines of one scheme take turns, who goes first rotating (`measure_interleaved`),
and only one scheme's processes are alive at a time. Every row has decode tok/s and prefill ms
(medians over `--repeats`), the peak RSS of its process (`ort_bench.peak_rss_kib`: interpreter,
libraries, load, warmup and every run), the size of what it loaded, and whether its greedy
tokens equal pangu-fn's fp32 tokens computed in the parent (`same_tokens_as_fp32`: expected for
the fp32 rows; quantized rows may part). pangu-fn rows get `vs_best_peer` (our tok/s over the
fastest peer of the scheme) and `meets_goal` (the issue's pass / fail: at least as fast); peer
rows get `vs_pangu_fn`. llama.cpp rows are left out, with a note, when llama-cpp-python is not
installed; PanGu-α has no transformers layout, so it gets no ONNX Runtime rows.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

PEER_SCHEMES = ("fp32", "bf16", "int8", "int4")
GGUF_TYPE = {"fp32": "f32", "int8": "q8_0", "int4": "q4_0"}  # the schemes the peers have
ENGINES = ("pangu-fn", "llama.cpp", "onnxruntime")  # the order of a scheme's rows


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--peers", nargs="?", const="", default=None, metavar="DIR",
                   help="also time pangu-fn, llama.cpp and ONNX Runtime on the same weights, each engine in its "
                        "own process (files written to DIR, default a temporary folder); see --peers-schemes")
    p.add_argument("--peers-schemes", default=",".join(PEER_SCHEMES), metavar="LIST",
                   help=f"--peers rows: comma list of {', '.join(PEER_SCHEMES)}")


def llama_cpp_installed() -> bool:
    import importlib.util

    return importlib.util.find_spec("llama_cpp") is not None


@dataclass
class Peers:
    """What `peer_rows` builds from (made by `prepare`): the folder of the files, the schemes,
    the fp32 tree saved there (pangu-fn's format), pangu-fn's fp32 greedy tokens on the prompt."""

    root: Path
    schemes: list[str]
    cfg: Any
    fp32: Path
    fp32_mb: float
    reference: list[int]
    tmp: tempfile.TemporaryDirectory[str] | None  # removed by peer_rows when DIR was not given


def prepare(params: Any, cfg: Any, args: argparse.Namespace, prompt: list[int]) -> Peers | None:
    """With --peers: check --peers-schemes, save the tree as fp32 to DIR/pangu-fp32 (what every
    peer's files are built from) and compute pangu-fn's fp32 greedy tokens on `prompt`. None
    without --peers. The caller then drops `params`, so that no model is held in this process
    while `peer_rows` runs. Raises ConfigError for an unknown scheme."""
    if args.peers is None:
        return None
    import pangu_fn as pf
    from pangu_fn.errors import ConfigError

    wanted = [s.strip() for s in args.peers_schemes.split(",") if s.strip()]
    if not wanted or any(s not in PEER_SCHEMES for s in wanted):
        raise ConfigError(f"--peers-schemes {args.peers_schemes!r}: expected a comma list of {list(PEER_SCHEMES)}")
    tmp = None if args.peers else tempfile.TemporaryDirectory()
    try:
        root = Path(args.peers or tmp.name)  # type: ignore[union-attr]
        root.mkdir(parents=True, exist_ok=True)
        fp32 = pf.astype(params, "fp32")
        reference = [e.token for e in pf.stream(fp32, cfg, [prompt], args.new_tokens, eos_token_ids=())]
        print(f"bench: saving the fp32 tree to {root / 'pangu-fp32'} (the peers' source) ...", file=sys.stderr, flush=True)
        pf.save(root / "pangu-fp32", fp32, cfg, overwrite=True)
        return Peers(root, wanted, cfg, root / "pangu-fp32", round(pf.nbytes(fp32) / 2**20, 1), reference, tmp)
    except BaseException:
        if tmp is not None:
            tmp.cleanup()
        raise


def peer_rows(peers: Peers | None, args: argparse.Namespace, prompt: list[int]) -> list[dict[str, Any]]:
    """The rows described in the module docstring ([] without --peers): every scheme's files
    built from `peers.fp32` by child processes (`build_jobs`), then each scheme's engines timed."""
    if peers is None:
        return []
    if not llama_cpp_installed():
        print("bench: llama-cpp-python is not installed; no llama.cpp rows", file=sys.stderr)
    _release_memory()
    print(f"bench: this process holds {_rss_mb():.0f} MB while the peers' files are built", file=sys.stderr, flush=True)
    rows = []
    try:
        jobs = build_jobs(peers, args, len(prompt))
        for scheme in peers.schemes:
            scheme_jobs = [(name, jobs[name, scheme]) for name in ENGINES if (name, scheme) in jobs]
            rows += scheme_rows(scheme, scheme_jobs, args, prompt, peers.reference)
    finally:
        if peers.tmp is not None:
            peers.tmp.cleanup()
    return rows


def build_jobs(peers: Peers, args: argparse.Namespace, prompt_len: int) -> dict[tuple[str, str], dict[str, Any]]:
    """{(engine, scheme): its child's job} after building every file in child processes, one
    at a time (see peers_build): pangu-fn's quantized trees, llama.cpp's GGUF files (when
    llama-cpp-python is installed), the fp32 ONNX export and its quantized graphs (not for
    PanGu-α). Each job but pangu-fn fp32 (saved by `prepare`) has `build_peak_rss_mb`."""
    from .peers_build import build_in_child, options
    from .quant_bench import recipe

    root, source, opts = peers.root, str(peers.fp32), options(args)
    jobs = {}
    if "fp32" in peers.schemes:
        jobs["pangu-fn", "fp32"] = {**_job("pangu", peers.fp32, args), "scheme": "fp32", "weights_mb": peers.fp32_mb}
    quantized = [s for s in peers.schemes if s != "fp32"]
    if quantized:
        print(f"bench: pangu-fn {', '.join(quantized)} trees to {root} (child process) ...", file=sys.stderr, flush=True)
        built = build_in_child({"step": "pangu", "source": source, "out": str(root), "schemes": quantized,
                                "options": opts})
        for scheme in quantized:
            jobs["pangu-fn", scheme] = {**_job("pangu", root / f"pangu-{scheme}", args),
                                        "scheme": recipe(scheme, args).summary(),
                                        "weights_mb": built["weights_mb"][scheme],
                                        "build_peak_rss_mb": built["build_peak_rss_mb"]}
    peer_schemes = [s for s in peers.schemes if s in GGUF_TYPE]
    if peer_schemes and llama_cpp_installed():
        types = [GGUF_TYPE[s] for s in peer_schemes]
        print(f"bench: GGUF {', '.join(types)} files to {root} (child process) ...", file=sys.stderr, flush=True)
        built = build_in_child({"step": "gguf", "source": source, "out": str(root), "types": types})
        for scheme, type in zip(peer_schemes, types):
            path = root / f"model-{type}.gguf"
            jobs["llama.cpp", scheme] = {**_job("llama", path, args), "scheme": type,
                                         "n_ctx": prompt_len + args.new_tokens + 8,
                                         "weights_mb": round(path.stat().st_size / 2**20, 1),
                                         "build_peak_rss_mb": built["build_peak_rss_mb"]}
    if peer_schemes and peers.cfg.family != "alpha":
        print(f"bench: ONNX Runtime fp32 export to {root / 'onnx-fp32'} (child process) ...", file=sys.stderr, flush=True)
        export_peak = build_in_child({"step": "onnx", "source": source, "out": str(root / "onnx-fp32")})["build_peak_rss_mb"]
        for scheme in peer_schemes:  # a quantized graph's peak: the larger of the export's and its own
            peak = export_peak
            if scheme != "fp32":
                print(f"bench: ONNX Runtime {scheme} graph in {root / f'onnx-{scheme}'} (child process) ...",
                      file=sys.stderr, flush=True)
                peak = max(peak, build_in_child({"step": "onnx-quant", "source": str(root / "onnx-fp32" / "model.onnx"),
                                                 "out": str(root / f"onnx-{scheme}"), "scheme": scheme,
                                                 "options": opts})["build_peak_rss_mb"])
            jobs["onnxruntime", scheme] = onnx_job(peers, scheme, args, root / f"onnx-{scheme}" / "model.onnx", peak)
    return jobs


def _release_memory() -> None:
    """Free what the caller dropped (and the fused step's last tree): collect cycles, then ask glibc to hand freed heap pages back
    to the kernel (it keeps them otherwise: ~400 MB of a dropped GPT-2-small tree stayed
    resident). Elsewhere only the collection."""
    import ctypes
    import gc

    from pangu_fn import native_step

    native_step.clear_plans()  # the fused step holds the last tree it planned
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _rss_mb() -> float:
    """This process's resident memory now (MiB; 0 where /proc is missing)."""
    status = Path("/proc/self/status")
    for line in status.read_text().splitlines() if status.exists() else []:
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def _job(kind: str, path: Path, args: argparse.Namespace) -> dict[str, Any]:
    """What a child needs besides the prompt: the engine kind, its file, threads, tokens, warmups."""
    return {"kind": kind, "path": str(path), "threads": args.threads, "new_tokens": args.new_tokens,
            "warmup": args.warmup}


def onnx_job(peers: Peers, scheme: str, args: argparse.Namespace, path: Path, build_peak_rss_mb: float) -> dict[str, Any]:
    """The ONNX Runtime child's job on the graph `path` of `scheme`."""
    size = sum(f.stat().st_size for f in path.parent.iterdir())
    names = {"fp32": "fp32", "int8": "W8A8 quantize_dynamic", "int4": f"MatMulNBits g{args.group_size}"}
    cfg = peers.cfg
    return {**_job("ort", path, args), "scheme": names[scheme], "weights_mb": round(size / 2**20, 1),
            "build_peak_rss_mb": build_peak_rss_mb, "cache": [cfg.num_layers, cfg.num_kv_heads, cfg.head_dim]}


def scheme_rows(scheme: str, jobs: list[tuple[str, dict[str, Any]]], args: argparse.Namespace, prompt: list[int],
                reference: list[int]) -> list[dict[str, Any]]:
    """Start one process per job, time them in turns, ask each its peak RSS, stop them; one row
    each with the ratios described in the module docstring."""
    from .bench import measure_interleaved
    from .ort_bench import _Worker

    print(f"bench: {scheme}: {', '.join(name for name, _ in jobs)}, each in its own process ...",
          file=sys.stderr, flush=True)
    workers: list[_Worker] = []
    try:
        for _, job in jobs:  # one after another: each loads about the model's size
            workers.append(_Worker({**job, "prompt": prompt}, module="pangu_tools.peers_bench"))
        timed = measure_interleaved(workers, prompt, args.new_tokens, args.repeats, 0, rotate=True)
        peaks = [w.ask({"maxrss": True})["maxrss_mb"] for w in workers]
    finally:
        for worker in workers:
            worker.close()
    rows = [{"engine": name, "peers_scheme": scheme, "dtype": job["scheme"], "weights_mb": job["weights_mb"],
             "peak_rss_mb": peak, **{k: job[k] for k in ("build_peak_rss_mb",) if k in job},
             "same_tokens_as_fp32": worker.ready["tokens"] == reference, **result}
            for (name, job), worker, peak, result in zip(jobs, workers, peaks, timed)]
    ours, peers = rows[0], rows[1:]
    if peers:
        best = max(r["decode_tok_s"] for r in peers)
        ours["vs_best_peer"] = round(ours["decode_tok_s"] / best, 3)
        ours["meets_goal"] = ours["decode_tok_s"] >= best
        for row in peers:
            row["vs_pangu_fn"] = round(row["decode_tok_s"] / ours["decode_tok_s"], 3)
    return rows


def _engine(job: dict[str, Any]) -> tuple[Any, list[int]]:
    """In the child: (the job's engine, its greedy tokens on the job's prompt)."""
    kind, path, threads, prompt, n = job["kind"], Path(job["path"]), job["threads"], job["prompt"], job["new_tokens"]
    if kind == "pangu":
        import torch

        import pangu_fn as pf

        from .bench import pangu_engine

        torch.set_num_threads(threads)
        params, cfg = pf.load(path)
        return pangu_engine(params, cfg), [e.token for e in pf.stream(params, cfg, [prompt], n, eos_token_ids=())]
    if kind == "llama":
        import llama_cpp

        from .gguf_bench import greedy_tokens_llama, llama_engine

        llm = llama_cpp.Llama(model_path=str(path), n_ctx=job["n_ctx"], n_batch=512, n_threads=threads,
                              n_threads_batch=threads, verbose=False)
        return llama_engine(llm), greedy_tokens_llama(llm, prompt, n)
    from types import SimpleNamespace

    from .ort_bench import plain_engine

    layers, kv_heads, head_dim = job["cache"]
    tokens: list[int] = []
    engine = plain_engine(path, SimpleNamespace(num_layers=layers, num_kv_heads=kv_heads, head_dim=head_dim),
                          threads, tokens)
    engine(prompt, n)
    return engine, list(tokens)


def _child(job: dict[str, Any]) -> None:
    from .ort_bench import serve

    engine, tokens = _engine(job)
    serve(engine, job, tokens=tokens)


if __name__ == "__main__":
    _child(json.loads(sys.argv[1]))
