"""`pangu export SRC OUT --target ort|ascend|torch`: write a bundle; `--target gguf --type q8_0`: write
one GGUF file for llama.cpp / Ollama; and
`pangu export --check ascend MODEL.onnx`: verify an ONNX file against ATC's constraints."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .common import resolve_model


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="export a model to an ONNX / Ascend / torch.export bundle",
                       description="Export SRC (a model folder or preset) to the bundle folder OUT, or "
                                   "with --check ascend, verify the ONNX file SRC against ATC's rules.")
    p.add_argument("src", help="model folder or preset name; with --check: the ONNX file")
    p.add_argument("out", nargs="?", help="bundle folder (or .gguf file with --target gguf) to write (atomically)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing OUT (only a bundle or model folder; never SRC or a folder holding it)")
    p.add_argument("--target", choices=["ort", "ascend", "torch", "gguf"], default="ort",
                   help="ort | ascend | torch (bundle folders) or gguf (one .gguf file for llama.cpp / Ollama)")
    p.add_argument("--type", default="f16", choices=["f32", "f16", "bf16", "q8_0", "q4_0"],
                   help="gguf: the type of every matrix (default f16); quantized trees are dequantized to it")
    p.add_argument("--check", choices=["ascend"], help="only check the ONNX file SRC; write nothing")
    p.add_argument("--dtype", default=None,
                   help="fp32 | fp16 | bf16 (default: as stored, but bf16 becomes fp32 for --target ort / ascend, "
                        "since ONNX Runtime's CPU provider has no bf16 kernels; fp32 for presets)")
    p.add_argument("--opset", type=int, default=18, help="ONNX opset (default 18; ascend needs <= 18)")
    p.add_argument("--weights-seed", type=int, default=0, help="seed for a preset's random weights")
    p.add_argument("--tokenizer", default=None, help="tokenizer file or folder (default: the one beside SRC)")
    p.add_argument("--no-fusions", action="store_true", help="ort: skip onnxscript's ONNX Runtime fusions")
    p.add_argument("--accuracy-level", type=int, default=0, choices=[0, 1, 2, 3, 4],
                   help="ort int4: MatMulNBits accuracy_level (4 = int8 activations, faster on CPU)")
    p.add_argument("--no-genai", action="store_true", help="ort: do not write onnxruntime-genai's files")
    p.add_argument("--batch", type=int, default=1, help="ascend: the fixed batch size")
    p.add_argument("--kv-len", type=int, default=None, help="ascend: the fixed KV length (default min(1024, context))")
    p.add_argument("--prefill-lengths", default=None,
                   help="ascend: ATC profiles, e.g. 1,16,64,256 (must include 1 for decode)")
    p.add_argument("--soc-version", default="Ascend310B1", help="ascend: the --soc_version in the atc command")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from pangu_fn.errors import ConfigError

    if args.check:
        return check(args.src)
    if args.out is None:
        raise ConfigError("export: expected an output folder OUT (or --check ascend MODEL.onnx)")
    from pangu_export import export_bundle

    from pangu_fn.io.destination import check_destination
    from pangu_fn.tokenizer import find_tokenizer

    sources = [args.src] if Path(args.src).exists() else []
    check_destination(args.out, overwrite=args.overwrite, sources=sources)
    params, cfg, _ = resolve_model(args.src, "cpu", args.dtype, args.weights_seed)
    if args.target == "gguf":
        return _gguf(args, params, cfg, sources)
    if args.dtype is None and args.target != "torch":
        import torch

        from pangu_fn.cache import compute_dtype

        if compute_dtype(params) == torch.bfloat16:
            print("note: the model is stored in bf16; exporting fp32 (ONNX Runtime's CPU provider has no bf16 "
                  "kernels). Pass --dtype bf16 to keep it.", file=sys.stderr)
            from pangu_fn.params import astype

            params = astype(params, "fp32")
    tokenizer = args.tokenizer
    if tokenizer is None and Path(args.src).is_dir() and find_tokenizer(args.src) is not None:
        tokenizer = args.src
    lengths = None
    if args.prefill_lengths:
        try:
            lengths = [int(n) for n in args.prefill_lengths.replace(";", ",").split(",") if n.strip()]
        except ValueError:
            raise ConfigError(f"--prefill-lengths: expected integers like 1,16,64, found {args.prefill_lengths!r}") from None
    manifest = export_bundle(params, cfg, args.out, args.target, opset=args.opset, tokenizer=tokenizer,
                             batch_size=args.batch, kv_len=args.kv_len, prefill_lengths=lengths,
                             soc_version=args.soc_version, ort_fusions=not args.no_fusions,
                             accuracy_level=args.accuracy_level, genai=not args.no_genai,
                             overwrite=args.overwrite, sources=sources)
    size = sum(f["bytes"] for f in manifest["files"].values())
    print(f"wrote {args.out}: target {manifest['target']}, {len(manifest['files'])} files, "
          f"{size / 2**20:.1f} MiB", file=sys.stderr)
    for note in (manifest.get("genai") or {}).get("notes", []):
        print(f"note: {note}", file=sys.stderr)
    if manifest.get("ascend"):
        print(manifest["ascend"]["atc"])
    return 0


def _gguf(args: argparse.Namespace, params, cfg, sources: list[str]) -> int:
    from pangu_export.gguf import export_gguf

    from pangu_fn.tokenizer import find_tokenizer

    tokenizer = args.tokenizer
    if tokenizer is None and Path(args.src).is_dir() and find_tokenizer(args.src) is not None:
        tokenizer = args.src
    summary = export_gguf(params, cfg, args.out, args.type, tokenizer=tokenizer, overwrite=args.overwrite,
                          sources=sources)
    for note in summary.notes:
        print(f"note: {note}", file=sys.stderr)
    types = ", ".join(f"{n} {k}" for k, n in sorted(summary.types.items()))
    print(f"wrote {args.out}: gguf {summary.arch} {summary.type}, {summary.tensors} tensors ({types}), "
          f"{summary.nbytes / 2**20:.1f} MiB", file=sys.stderr)
    return 0


def check(path: str) -> int:
    """Print every ATC rule the ONNX file breaks; exit 0 when it fits, 1 when it does not."""
    from pangu_export.ascend import check_ascend

    from pangu_fn.errors import FormatError

    if not Path(path).is_file():
        raise FormatError(f"--check ascend: expected an ONNX file, found no file at {path}")
    try:
        problems = check_ascend(path)
    except Exception as e:  # noqa: BLE001  (onnx raises DecodeError and others for a non-ONNX file)
        raise FormatError(f"--check ascend: {path} is not a readable ONNX model: {e}") from None
    for problem in problems:
        print(f"{path}: {problem}")
    print(f"{path}: {'fails' if problems else 'passes'} the Ascend (ATC) checks"
          f"{f' ({len(problems)} problems)' if problems else ''}", file=sys.stderr)
    return 1 if problems else 0
