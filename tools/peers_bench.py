"""`pangu bench --peers [DIR]`: pangu-fn against llama.cpp and ONNX Runtime on the same weights,
in one run, each engine in its own process.

Rows per `--peers-schemes` entry (what each engine loads is written first, to DIR or a
temporary folder, as a user deploys it):

| scheme | pangu-fn | llama.cpp (llama-cpp-python) | ONNX Runtime (`ort_bench.plain_onnx_model`) |
|---|---|---|---|
| fp32 | the fp32 tree | GGUF f32 | transformers' graph exported, ORT fusions |
| bf16 | the bf16 recipe | - | - |
| int8 | the `pangu quantize` int8 recipe | GGUF q8_0 | `quantize_dynamic` W8A8 |
| int4 | the int4 recipe (`--group-size`, `--asym`, `--quant-head`) | GGUF q4_0 | MatMulNBits |

pangu-fn trees are quantized with the recipes `pangu bench --scheme` uses (`quant_bench.recipe`,
`pangu quantize`'s defaults), saved with `pangu_fn.save` and loaded by the child with
`pangu_fn.load`; GGUF files come from `gguf_bench.our_tree` + `export_gguf`; the ONNX graphs are
one fp32 export quantized by ONNX Runtime's own tools (`ort_bench.quantize_plain`).

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
from pathlib import Path
from typing import Any

PEER_SCHEMES = ("fp32", "bf16", "int8", "int4")
GGUF_TYPE = {"fp32": "f32", "int8": "q8_0", "int4": "q4_0"}


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--peers", nargs="?", const="", default=None, metavar="DIR",
                   help="also time pangu-fn, llama.cpp and ONNX Runtime on the same weights, each engine in its "
                        "own process (files written to DIR, default a temporary folder); see --peers-schemes")
    p.add_argument("--peers-schemes", default=",".join(PEER_SCHEMES), metavar="LIST",
                   help=f"--peers rows: comma list of {', '.join(PEER_SCHEMES)}")


def llama_cpp_installed() -> bool:
    import importlib.util

    return importlib.util.find_spec("llama_cpp") is not None


def peer_rows(params: Any, cfg: Any, args: argparse.Namespace, prompt: list[int]) -> list[dict[str, Any]]:
    """The rows described in the module docstring ([] without --peers). Raises ConfigError for
    an unknown scheme."""
    if args.peers is None:
        return []
    import pangu_fn as pf
    from pangu_fn.errors import ConfigError

    wanted = [s.strip() for s in args.peers_schemes.split(",") if s.strip()]
    if not wanted or any(s not in PEER_SCHEMES for s in wanted):
        raise ConfigError(f"--peers-schemes {args.peers_schemes!r}: expected a comma list of {list(PEER_SCHEMES)}")
    if not llama_cpp_installed():
        print("bench: llama-cpp-python is not installed; no llama.cpp rows", file=sys.stderr)
    fp32 = pf.astype(params, "fp32")
    reference = [e.token for e in pf.stream(fp32, cfg, [prompt], args.new_tokens, eos_token_ids=())]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.peers) if args.peers else Path(tmp)
        root.mkdir(parents=True, exist_ok=True)
        onnx_fp32 = None
        for scheme in wanted:
            jobs = [("pangu-fn", pangu_job(fp32, cfg, scheme, root, args))]
            if scheme in GGUF_TYPE and llama_cpp_installed():
                jobs.append(("llama.cpp", llama_job(fp32, cfg, scheme, root, args, len(prompt))))
            if scheme in GGUF_TYPE and cfg.family != "alpha":
                if onnx_fp32 is None:
                    onnx_fp32 = onnx_model(fp32, cfg, "fp32", root, args, None)
                jobs.append(("onnxruntime", onnx_job(fp32, cfg, scheme, root, args, onnx_fp32)))
            rows += scheme_rows(scheme, jobs, args, prompt, reference)
    return rows


def _job(kind: str, path: Path, args: argparse.Namespace) -> dict[str, Any]:
    """What a child needs besides the prompt: the engine kind, its file, threads, tokens, warmups."""
    return {"kind": kind, "path": str(path), "threads": args.threads, "new_tokens": args.new_tokens,
            "warmup": args.warmup}


def pangu_job(fp32: Any, cfg: Any, scheme: str, root: Path, args: argparse.Namespace) -> dict[str, Any]:
    """Quantize (bf16 / int8 / int4: `quant_bench.recipe`) and save the tree to root/pangu-SCHEME."""
    import pangu_fn as pf
    from pangu_fn.quant import quantize

    from .quant_bench import recipe

    tree = fp32 if scheme == "fp32" else quantize(fp32, recipe(scheme, args))
    folder = root / f"pangu-{scheme}"
    print(f"bench: saving pangu-fn {scheme} to {folder} ...", file=sys.stderr, flush=True)
    pf.save(folder, tree, cfg, overwrite=True)
    label = "fp32" if scheme == "fp32" else recipe(scheme, args).summary()
    return {**_job("pangu", folder, args), "scheme": label, "weights_mb": round(pf.nbytes(tree) / 2**20, 1)}


def llama_job(fp32: Any, cfg: Any, scheme: str, root: Path, args: argparse.Namespace,
              prompt_len: int) -> dict[str, Any]:
    """The GGUF of `scheme`'s llama.cpp type (see gguf_bench), written to root/model-TYPE.gguf."""
    from pangu_export.gguf import export_gguf

    from .gguf_bench import our_tree

    type = GGUF_TYPE[scheme]
    path = root / f"model-{type}.gguf"
    print(f"bench: writing {path} ...", file=sys.stderr, flush=True)
    export_gguf(our_tree(fp32, type)[0], cfg, path, type, progress=False, overwrite=True)
    return {**_job("llama", path, args), "scheme": type, "n_ctx": prompt_len + args.new_tokens + 8,
            "weights_mb": round(path.stat().st_size / 2**20, 1)}


def onnx_model(fp32: Any, cfg: Any, scheme: str, root: Path, args: argparse.Namespace, src: Path | None) -> Path:
    """root/onnx-SCHEME/model.onnx: the fp32 export, or `src` (that export) quantized."""
    from .ort_bench import plain_onnx_model, quantize_plain

    folder = root / f"onnx-{scheme}"
    print(f"bench: ONNX Runtime {scheme} graph in {folder} ...", file=sys.stderr, flush=True)
    if src is None:
        return plain_onnx_model(fp32, cfg, folder, "fp32", args)
    folder.mkdir(parents=True, exist_ok=True)
    quantize_plain(src, folder / "model.onnx", scheme, args)
    return folder / "model.onnx"


def onnx_job(fp32: Any, cfg: Any, scheme: str, root: Path, args: argparse.Namespace, onnx_fp32: Path) -> dict[str, Any]:
    """The ONNX graph of `scheme` (the fp32 export itself, or quantized from it)."""
    path = onnx_fp32 if scheme == "fp32" else onnx_model(fp32, cfg, scheme, root, args, onnx_fp32)
    size = sum(f.stat().st_size for f in path.parent.iterdir())
    names = {"fp32": "fp32", "int8": "W8A8 quantize_dynamic", "int4": f"MatMulNBits g{args.group_size}"}
    return {**_job("ort", path, args), "scheme": names[scheme], "weights_mb": round(size / 2**20, 1),
            "cache": [cfg.num_layers, cfg.num_kv_heads, cfg.head_dim]}


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
             "peak_rss_mb": peak, "same_tokens_as_fp32": worker.ready["tokens"] == reference, **result}
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
