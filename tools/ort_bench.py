"""`pangu bench --bundle`: the same weights exported and run by ONNX Runtime, in the same run.

Rows, for each `--bundle-scheme` (fp32, int4):
- `pangu-runtime`: our bundle (`pangu export --target ort`) run by `pangu_runtime.Session`
  (IO-bound preallocated KV buffers).
- `onnx plain loop`: the baseline. The same weights in transformers (GPT-2 or LLaMA layout),
  exported with a plain `torch.onnx.export(dynamo=True)`, onnxscript's ORT fusions applied
  (`optimize_for_ort`), int4 through ONNX Runtime's own `MatMulNBitsQuantizer` (same group
  size and symmetry), run by a numpy loop that feeds `present` back as `past` each step.
- `onnxruntime-genai`: our bundle run by onnxruntime-genai's own loop (when installed).

All sessions use `--threads` intra-op threads. Each engine lives in its own process, started
fresh, that never imports torch (as `pangu run` does) and holds only that engine; it warms up
(`--warmup` runs, at least one) and then times one generation each time it is asked. The
engines take turns (each decodes once per repeat, who goes first rotating), so a slow spell of
the machine, which here lasts seconds and moves decode speed by up to 30%, hits them alike.
One process per engine matters: with several sessions alive in one process, the one created
first decoded 5-12% slower than the same bundle opened second (measured with two sessions of
one bundle), and in a process that had run torch the runtime was about 10% slower. PanGu-α has
no transformers layout, so it gets no baseline row.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

BUNDLE_SCHEMES = ("fp32", "int4")


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--bundle", nargs="?", const="", default=None, metavar="DIR",
                   help="also export the weights (to DIR, default a temporary folder) and time pangu_runtime, "
                        "a plain torch.onnx.export + onnxruntime loop and onnxruntime-genai on them")
    p.add_argument("--bundle-scheme", default="fp32,int4", metavar="LIST",
                   help="--bundle rows: comma list of fp32, int4 (int4: --group-size, --asym; head int4 too)")
    p.add_argument("--bundle-in-process", action="store_true",
                   help="also export an fp32 bundle and time pangu_runtime on it in this process, in turns with "
                        "pangu-fn (and each --compile backend), with the ratio to the runtime")
    p.add_argument("--accuracy-level", type=int, default=0, choices=[0, 1, 2, 3, 4],
                   help="--bundle int4 rows: MatMulNBits accuracy_level for ours and the baseline (4 = int8 activations)")


def bundle_rows(params: Any, cfg: Any, args: argparse.Namespace, prompt: list[int]) -> list[dict[str, Any]]:
    """The rows described in the module docstring ([] without --bundle)."""
    if args.bundle is None:
        return []
    from pangu_fn.errors import ConfigError

    wanted = [s.strip() for s in args.bundle_scheme.split(",") if s.strip()]
    if not wanted or any(s not in BUNDLE_SCHEMES for s in wanted):
        raise ConfigError(f"--bundle-scheme {args.bundle_scheme!r}: expected a comma list of {list(BUNDLE_SCHEMES)}")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.bundle) if args.bundle else Path(tmp)
        for scheme in wanted:
            rows += _scheme_rows(params, cfg, args, prompt, scheme, root / f"bundle-{scheme}", Path(tmp))
    return rows


def in_process_rows(params: Any, cfg: Any, args: argparse.Namespace, prompt: list[int],
                    pangu_engine: Callable[..., Any]) -> list[dict[str, Any]]:
    """With --bundle-in-process: the weights exported as an fp32 bundle and run by
    `pangu_runtime` in this process, timed in turns with pangu-fn at the model's dtype (eager,
    and compiled with each `--compile` backend name): one row each, pangu-fn rows with
    `vs_runtime_in_process` (their tok/s over the runtime's). Both libraries' thread pools live
    in one process here, which is how the issue's demo figures were taken."""
    if not args.bundle_in_process:
        return []
    from pangu_export import export_bundle

    import pangu_fn as pf

    from .bench import compile_names, compile_options, measure_interleaved

    dtype = str(pf.cache.compute_dtype(params)).replace("torch.", "")
    engines = [(f"pangu-fn {dtype}", pangu_engine(params, cfg))]
    for name in compile_names(args):
        engines.append((f"pangu-fn {dtype} compiled {name}", pangu_engine(params, cfg, compile=compile_options(name))))
    with tempfile.TemporaryDirectory() as tmp:
        print("bench: exporting an fp32 bundle for pangu_runtime in this process ...", file=sys.stderr, flush=True)
        export_bundle(pf.astype(params, "fp32"), cfg, Path(tmp) / "bundle", "ort")
        engines.append(("pangu-runtime fp32 (same process)", runtime_engine(Path(tmp) / "bundle", args.threads)))
        print(f"bench: {', '.join(n for n, _ in engines)} in turns ...", file=sys.stderr, flush=True)
        results = measure_interleaved([e for _, e in engines], prompt, args.new_tokens, args.repeats,
                                      max(1, args.warmup), rotate=True)
    rows = [{"engine": name, "dtype": dtype if i < len(engines) - 1 else "fp32", "in_process": True, **r}
            for i, ((name, _), r) in enumerate(zip(engines, results))]
    runtime = rows[-1]["decode_tok_s"]
    for row in rows[:-1]:
        row["vs_runtime_in_process"] = round(row["decode_tok_s"] / runtime, 3)
    return rows


def _scheme_rows(params: Any, cfg: Any, args: argparse.Namespace, prompt: list[int], scheme: str, folder: Path, tmp: Path) -> list[dict[str, Any]]:
    from pangu_export import export_bundle

    import pangu_fn as pf

    tree = pf.astype(params, "fp32")
    if scheme == "int4":
        from pangu_fn.quant import QuantRecipe, quantize

        tree = quantize(tree, QuantRecipe("int4", group_size=args.group_size, symmetric=not args.asym,
                                          head="int4", compute_dtype="fp32"))
    print(f"bench: exporting the {scheme} bundle to {folder} ...", file=sys.stderr, flush=True)
    export_bundle(tree, cfg, folder, "ort", accuracy_level=args.accuracy_level)
    job: dict[str, Any] = {"scheme": scheme, "bundle": str(folder), "threads": args.threads, "prompt": prompt,
                           "new_tokens": args.new_tokens, "repeats": args.repeats, "warmup": args.warmup}
    if cfg.family != "alpha":
        print(f"bench: onnx plain loop {scheme} (export, fusions) ...", file=sys.stderr, flush=True)
        job["baseline"] = str(plain_onnx_model(params, cfg, tmp / f"plain-{scheme}", scheme, args))
        job["cache"] = [cfg.num_layers, cfg.num_kv_heads, cfg.head_dim]
    job["genai_copy"] = str(tmp / f"genai-{scheme}")
    names, results = _measure_in_child(job)
    kept = {"bundle": str(folder)} if args.bundle else {}  # a temporary folder is not worth recording
    rows = [{"engine": name, "dtype": scheme, **(kept if i == 0 else {}), **result}
            for i, (name, result) in enumerate(zip(names, results))]
    ours = rows[0]["decode_tok_s"]
    for row in rows[1:]:
        row["runtime_decode_vs_this"] = round(ours / row["decode_tok_s"], 3)
        pairs = zip(rows[0]["runs"]["decode_tok_s"], row["runs"]["decode_tok_s"])  # the same repeat
        row["runtime_decode_vs_this_per_repeat"] = [round(a / b, 3) for a, b in pairs]
    return rows


def _measure_in_child(job: dict[str, Any]) -> tuple[list[str], list[dict[str, Any]]]:
    """Time the ONNX Runtime engines of `job` in turns, each in its own torch-free process
    (see the module docstring)."""
    from .bench import measure_interleaved

    scheme = job["scheme"]
    kinds = {f"pangu-runtime {scheme}": "pangu-runtime"}
    if "baseline" in job:
        kinds[f"onnx plain loop {scheme}"] = "plain"
    if _genai_installed():
        kinds[f"onnxruntime-genai {scheme}"] = "genai"
        _genai_copy(Path(job["bundle"]), Path(job["genai_copy"]), job["threads"])
    else:
        print("bench: onnxruntime-genai is not installed; no genai row", file=sys.stderr)
    print(f"bench: ONNX Runtime engines ({scheme}), each in its own torch-free process ...",
          file=sys.stderr, flush=True)
    workers = []
    try:
        for kind in kinds.values():  # started one after another: each loads ~the model's size
            workers.append(_Worker({**job, "engine": kind}))
        results = measure_interleaved(workers, job["prompt"], job["new_tokens"], job["repeats"], 0, rotate=True)
    finally:
        for worker in workers:
            worker.close()
    return list(kinds), results


class _Worker:
    """One engine in a child process (`python -m pangu_tools.ort_bench JOB`), called like an
    `Engine`: each call asks the child for one timed generation."""

    def __init__(self, job: dict[str, Any], module: str = "pangu_tools.ort_bench") -> None:
        import subprocess

        self._stderr = tempfile.TemporaryFile(mode="w+")  # noqa: SIM115 (closed in close(); a pipe could stall the child)
        self._proc = subprocess.Popen([sys.executable, "-m", module, json.dumps(job)],
                                      stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._stderr, text=True)
        self.ready = self._reply()  # built and warmed up (what `serve` said then)

    def __call__(self, prompt: list[int], n: int) -> tuple[float, list[float]]:
        out = self.ask({"prompt": prompt, "new_tokens": n})
        return out["start"], out["stamps"]

    def ask(self, request: dict[str, Any]) -> dict[str, Any]:
        """Send one request line to the child and return its reply."""
        assert self._proc.stdin is not None
        self._proc.stdin.write(json.dumps(request) + "\n")
        self._proc.stdin.flush()
        return self._reply()

    def _reply(self) -> dict[str, Any]:
        assert self._proc.stdout is not None
        line = self._proc.stdout.readline()
        if not line:
            code = self._proc.wait()
            self._stderr.seek(0)
            said = self._stderr.read().strip().splitlines()
            self._stderr.close()
            raise RuntimeError(f"bench: the ONNX Runtime child process failed: {said[-1] if said else f'exit code {code}'}")
        return json.loads(line)

    def close(self) -> None:
        if self._proc.stdin is not None:
            self._proc.stdin.close()
        self._proc.wait()
        self._stderr.close()


def _serve(job: dict[str, Any]) -> None:
    """The child's side of `_Worker`: build one engine, warm it up, then for each request line
    time one generation and print its start time and token timestamps as JSON."""
    from types import SimpleNamespace

    kind, threads = job["engine"], job["threads"]
    if kind == "pangu-runtime":
        engine = runtime_engine(Path(job["bundle"]), threads)
    elif kind == "plain":
        layers, kv_heads, head_dim = job["cache"]
        shape = SimpleNamespace(num_layers=layers, num_kv_heads=kv_heads, head_dim=head_dim)
        engine = plain_engine(Path(job["baseline"]), shape, threads)
    else:
        engine = genai_engine(Path(job["genai_copy"]))
    serve(engine, job, torch_free=True)


def serve(engine: Callable[[list[int], int], tuple[float, list[float]]], job: dict[str, Any],
          torch_free: bool = False, **ready: Any) -> None:
    """A child's loop (see `_Worker`): warm `engine` up on the job's prompt, say ready (with
    `ready`'s fields), then answer each request line: a generation's start time and token
    timestamps, or with {"maxrss": true} this process's peak RSS so far (MiB). With
    `torch_free`, raises RuntimeError if torch was imported."""
    for _ in range(max(1, job["warmup"])):
        engine(job["prompt"], job["new_tokens"])
    if torch_free and "torch" in sys.modules:
        raise RuntimeError("bench: the ONNX Runtime engines imported torch; they must run without it")
    print(json.dumps({"ready": True, **ready}), flush=True)
    for line in sys.stdin:
        request = json.loads(line)
        if request.get("maxrss"):
            print(json.dumps({"maxrss_mb": round(peak_rss_kib() / 1024, 1)}), flush=True)
            continue
        start, stamps = engine(request["prompt"], request["new_tokens"])
        print(json.dumps({"start": start, "stamps": stamps}), flush=True)


def peak_rss_kib() -> int:
    """This process's peak RSS in KiB: Linux's VmHWM, which starts afresh at exec, where
    `getrusage`'s maxrss carries over the RSS of the parent that forked it (a child of a
    500 MB parent reports at least 500 MB); elsewhere `getrusage` (KiB on Linux, bytes on macOS)."""
    import resource

    status = Path("/proc/self/status")
    if status.exists():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak // 1024 if sys.platform == "darwin" else peak


def _genai_installed() -> bool:
    import importlib.util

    return importlib.util.find_spec("onnxruntime_genai") is not None


def runtime_engine(folder: Path, threads: int) -> Callable[[list[int], int], tuple[float, list[float]]]:
    from pangu_runtime import Session

    session = Session(folder, threads=threads)

    def run(prompt: list[int], n: int) -> tuple[float, list[float]]:
        start = time.perf_counter()
        return start, [time.perf_counter() for _ in session.stream([prompt], n, eos_token_ids=())]

    return run


def plain_onnx_model(params: Any, cfg: Any, folder: Path, scheme: str, args: argparse.Namespace) -> Path:
    """The baseline graph: transformers' model on these weights (`hf_model`), exported
    (`export_hf_onnx`), and for int4 / int8 ONNX Runtime's quantizer (`quantize_plain`)."""
    model, hf_cfg = hf_model(params, cfg)
    if scheme == "fp32":
        return export_hf_onnx(model, hf_cfg, cfg, folder)
    quantize_plain(export_hf_onnx(model, hf_cfg, cfg, folder / "fp32"), folder / "model.onnx", scheme, args)
    return folder / "model.onnx"


def export_hf_onnx(model: Any, hf_cfg: Any, cfg: Any, folder: Path) -> Path:
    """folder/model.onnx: transformers' `model` (from `hf_model`) through a plain
    torch.onnx.export(dynamo=True) with a dynamic past, onnxscript's ORT fusions applied; the
    weights go to model.onnx.data when the graph passes protobuf's 2 GB."""
    import torch
    from onnxscript.rewriter.ort_fusions import optimize_for_ort
    from pangu_export.onnx_export import _quiet

    wrapper = hf_wrapper(model, hf_cfg)
    n = cfg.num_layers
    B, T, P, heads = 1, 3, 4, cfg.num_kv_heads
    past = [(torch.zeros(B, heads, P, cfg.head_dim), torch.zeros(B, heads, P, cfg.head_dim)) for _ in range(n)]
    seq, past_len, total = torch.export.Dim("seq"), torch.export.Dim("past"), torch.export.Dim("total")
    names = ["input_ids", "attention_mask", "position_ids"] + [f"past.{i}.{kv}" for i in range(n) for kv in "kv"]
    args_ = (torch.zeros(B, T, dtype=torch.int64), torch.ones(B, P + T, dtype=torch.int64),
             (P + torch.arange(T))[None], past)
    shapes = ({1: seq}, {1: total}, {1: seq}, [({2: past_len}, {2: past_len})] * n)
    folder.mkdir(parents=True, exist_ok=True)
    with _quiet():
        program = torch.onnx.export(wrapper, args_, dynamo=True, dynamic_shapes=shapes, input_names=names,
                                    output_names=["logits"] + [f"present.{i}.{kv}" for i in range(n) for kv in "kv"],
                                    verbose=False)
        optimize_for_ort(program.model)
    path = folder / "model.onnx"
    program.save(path)
    return path


def quantize_plain(src: Path, dst: Path, scheme: str, args: argparse.Namespace) -> None:
    """ONNX Runtime's own quantizers on the fp32 plain graph `src`, written to `dst` with its
    weights beside it in DST.data (external data: no 2 GB protobuf to build or parse; onnx
    appends to an existing DST.data, so `dst` belongs in a fresh folder other than `src`'s):
    "int4" MatMulNBitsQuantizer (`args.group_size`, symmetric unless `args.asym`,
    `args.accuracy_level`), "int8" `quantize_dynamic` (W8A8: int8 weights per output channel,
    activations quantized per call)."""
    import onnx

    if scheme == "int4":
        from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

        quantizer = MatMulNBitsQuantizer(onnx.load(str(src)), block_size=args.group_size,
                                         is_symmetric=not args.asym,
                                         accuracy_level=args.accuracy_level or None)
        quantizer.process()
        quantizer.model.save_model_to_file(str(dst), use_external_data_format=True)
    else:
        from onnxruntime.quantization import QuantType, quantize_dynamic

        quantize_dynamic(str(src), str(dst), weight_type=QuantType.QInt8, per_channel=True,
                         use_external_data_format=True)


def hf_model(params: Any, cfg: Any) -> tuple[Any, Any]:
    """transformers' GPT2LMHeadModel / LlamaForCausalLM holding these weights (fp32), sharing
    the tree's memory where `to_hf` gives views (fp32 trees): its own parameters are made without
    random initialisation and replaced by the tree's tensors, so building it costs about the
    copies `to_hf` makes (GPT-2's fused q/k/v), not a second model (at pangu-1b that was 14.4 GB
    of anonymous memory beside the 5 GB tree)."""
    import transformers

    from pangu_fn.io.hf import to_hf

    state, hf_cfg = to_hf(params, cfg)
    gpt = hf_cfg["model_type"] == "gpt2"
    config_cls = transformers.GPT2Config if gpt else transformers.LlamaConfig
    model_cls = transformers.GPT2LMHeadModel if gpt else transformers.LlamaForCausalLM
    config = config_cls(**{k: v for k, v in hf_cfg.items() if k not in ("model_type", "architectures")})
    config._attn_implementation = "sdpa"
    with _no_init_weights():  # built on the CPU: buffers such as RoPE's inv_freq get real values
        model = model_cls(config)
    missing = model.load_state_dict(state, strict=False, assign=True).missing_keys
    names = {name for name, _ in model.named_parameters()}
    if any(name in names for name in missing):  # an uninitialised parameter would go unnoticed
        raise RuntimeError(f"hf_model: to_hf gave no tensor for {[n for n in missing if n in names]}")
    if cfg.tie_embeddings:
        model.tie_weights()
    if gpt:
        _conv1d_to_linear(model)
    return model.float().eval(), config


def _conv1d_to_linear(model: Any) -> None:
    """GPT-2's Conv1D (x @ W + b on a 2-D view) as nn.Linear: the same numbers, exported as a
    MatMul on [B, T, H] (onnxscript 0.7's attention fusion breaks the Conv1D graph's Gemms)."""
    import torch
    from transformers.pytorch_utils import Conv1D

    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, Conv1D):  # the Linear's weight is a view of the Conv1D's: no copy
                linear = torch.nn.Linear(child.weight.shape[0], child.nf, device="meta")
                linear.weight = torch.nn.Parameter(child.weight.detach().t(), requires_grad=False)
                linear.bias = torch.nn.Parameter(child.bias.detach(), requires_grad=False)
                setattr(module, name, linear)


def _no_init_weights() -> Any:
    """transformers' context that skips random initialisation (parameters are then left
    untouched, so never resident), or a no-op where this transformers has none."""
    import contextlib

    try:
        from transformers.initialization import no_init_weights
    except ImportError:
        try:
            from transformers.modeling_utils import no_init_weights
        except ImportError:
            return contextlib.nullcontext()
    return no_init_weights()


def hf_wrapper(model: Any, config: Any) -> Any:
    """Plain tensors in and out around transformers' DynamicCache (for torch.onnx.export)."""
    import torch
    from transformers import DynamicCache

    class Wrapper(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, input_ids: Any, attention_mask: Any, position_ids: Any, past: Any) -> Any:
            cache = DynamicCache(config=config)
            for i, (k, v) in enumerate(past):
                cache.update(k, v, i)
            out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                             past_key_values=cache, use_cache=True)
            return out.logits, [(layer.keys, layer.values) for layer in out.past_key_values.layers]

    return Wrapper()


def plain_engine(path: Path, cfg: Any, threads: int,
                 tokens: list[int] | None = None) -> Callable[[list[int], int], tuple[float, list[float]]]:
    """The plainest loop: session.run with numpy feeds; present becomes the next past. Each run
    writes its greedy tokens into `tokens` when given."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    n = cfg.num_layers
    dtype = np.float32

    def run(prompt: list[int], steps: int) -> tuple[float, list[float]]:
        start = time.perf_counter()
        ids = np.array([prompt], np.int64)
        past = [np.zeros((1, cfg.num_kv_heads, 0, cfg.head_dim), dtype) for _ in range(2 * n)]
        length, stamps, out = 0, [], []
        for _ in range(steps):
            T = ids.shape[1]
            feeds = {"input_ids": ids, "attention_mask": np.ones((1, length + T), np.int64),
                     "position_ids": np.arange(length, length + T)[None]}
            feeds.update({f"past.{i}.{kv}": past[2 * i + j] for i in range(n) for j, kv in enumerate("kv")})
            logits, *past = session.run(None, feeds)
            length += T
            ids = logits[:, -1].argmax(-1)[:, None].astype(np.int64)
            stamps.append(time.perf_counter())
            out.append(int(ids[0, 0]))
        if tokens is not None:
            tokens[:] = out
        return start, stamps

    return run


def _genai_copy(folder: Path, copy: Path, threads: int) -> None:
    """A copy of the bundle for onnxruntime-genai, its config given our thread count."""
    shutil.copytree(folder, copy, dirs_exist_ok=True)
    config = json.loads((copy / "genai_config.json").read_text())
    config["model"]["decoder"]["session_options"]["intra_op_num_threads"] = threads
    (copy / "genai_config.json").write_text(json.dumps(config))


def genai_engine(copy: Path) -> Callable[[list[int], int], tuple[float, list[float]]]:
    """onnxruntime-genai's own loop on the bundle copy made by `_genai_copy`."""
    import onnxruntime_genai as og

    model = og.Model(str(copy))

    def run(prompt: list[int], n: int) -> tuple[float, list[float]]:
        start = time.perf_counter()
        params = og.GeneratorParams(model)
        params.set_search_options(max_length=len(prompt) + n, min_length=len(prompt) + n, do_sample=False)
        generator = og.Generator(model, params)
        generator.append_tokens(np.array([prompt], dtype=np.int32))
        stamps = []
        while not generator.is_done():
            generator.generate_next_token()
            stamps.append(time.perf_counter())
        return start, stamps

    return run


if __name__ == "__main__":
    _serve(json.loads(sys.argv[1]))
