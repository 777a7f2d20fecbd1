"""`pangu convert SRC DST`: read a checkpoint in any layout pangu-fn knows and write it as our
folder (default), a MindSpore `.ckpt` (release, model zoo or mindformers names), a Hugging Face
folder, a PanGu-α gpt_pangu folder or a PanGu-α Megatron `.pt`.

Streams one tensor at a time (except HF-folder and .pt sources/outputs, which need the whole
state dict), writes atomically, copies the tokenizer files beside the weights, and with
`--verify` runs a few prompts through source and result and prints the largest logit
difference.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

SIZE_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
              "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def register(sub: argparse._SubParsersAction) -> None:
    from pangu_fn.io.alpha import MS_NAMINGS
    from pangu_fn.io.checkpoint import LAYOUTS
    from pangu_fn.io.writers import WRITERS

    p = sub.add_parser("convert", help="convert a checkpoint (MindSpore, HF, gpt_pangu, .pt, ours) to another layout",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                       epilog="source layouts:\n" + "\n".join(f"  {lay.name:10s} {lay.what}" for lay in LAYOUTS))
    p.add_argument("src", help="checkpoint file or folder")
    p.add_argument("dst", help="output folder (or a .ckpt file for MindSpore, a .pt file for --to megatron)")
    p.add_argument("--from", dest="fmt", choices=[lay.name for lay in LAYOUTS], default=None,
                   help="source layout (default: detected)")
    p.add_argument("--to", choices=WRITERS, default=None,
                   help="output layout (default: mindspore for a .ckpt DST, else pangu-fn)")
    p.add_argument("--config", default=None,
                   help="preset name, config.json or mindformers run yaml giving what MindSpore/.pt files do not "
                        "store (head count, activation, ...)")
    p.add_argument("--layout", choices=list(MS_NAMINGS), default=None,
                   help="MindSpore output: tensor names (default: the naming the source was read from, else release)")
    p.add_argument("--dtype", default=None, help="cast floating tensors: fp32 | bf16 | fp16 (default: as stored)")
    p.add_argument("--shard-size", default="2GB", help="largest safetensors shard, e.g. 500MB, 2GB, 1GiB (default 2GB)")
    p.add_argument("--verify", action="store_true", help="compare logits of source and result on a few prompts")
    p.add_argument("--no-tokenizer", action="store_true", help="do not copy tokenizer files")
    p.add_argument("--no-crc", action="store_true", help="MindSpore output: omit the CRC trailer")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing DST (only a model folder, bundle or checkpoint file; never the source)")
    p.set_defaults(func=run)


def parse_size(text: str) -> int:
    """'500MB' -> 500_000_000, '1GiB' -> 2**30, '12345' -> 12345."""
    from pangu_fn.errors import ConfigError

    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", text)
    if not m or m.group(2).upper() not in SIZE_UNITS or float(m.group(1)) <= 0:
        raise ConfigError(f"--shard-size {text!r}: expected a positive size such as 500MB, 2GB or 1GiB")
    return int(float(m.group(1)) * SIZE_UNITS[m.group(2).upper()])


def run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from pangu_fn.io import alpha, writers
    from pangu_fn.io.checkpoint import open_source
    from pangu_fn.io.destination import check_destination
    from pangu_fn.params import parse_dtype

    src, dst = Path(args.src), Path(args.dst)
    dtype = parse_dtype(args.dtype) if args.dtype else None
    shard_size = parse_size(args.shard_size)
    check_destination(dst, overwrite=args.overwrite, sources=[src])
    source = open_source(src, args.fmt, args.config)
    cfg = source.cfg
    fmt = writers.output_format(dst, args.to, cfg)
    writers.check_writable(source, fmt, args.layout)
    tokenizer = {} if args.no_tokenizer else _tokenizer_files(source.folder)
    if source.layout == "gguf" and not args.no_tokenizer:
        from pangu_fn.io.gguf import tokenizer_files as gguf_tokenizer

        tokenizer = gguf_tokenizer(src)  # the vocabulary stored in the file, as tokenizer.model / .json
    total = _output_bytes(source, fmt, dtype)
    with tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc="convert", file=sys.stderr,
              disable=None) as bar:
        on_tensor = lambda name, n: bar.update(n)
        if fmt == "mindspore":
            writers.write_mindspore(source, dst, dtype, crc=not args.no_crc, on_tensor=on_tensor,
                                    overwrite=args.overwrite, naming=args.layout)
            _copy_beside(tokenizer, dst.parent)
        elif fmt == "megatron":
            writers.write_megatron(source, dst, dtype, on_tensor, overwrite=args.overwrite)
            _copy_beside(tokenizer, dst.parent)
        else:
            write = {"pangu-fn": writers.write_ours, "hf": writers.write_hf, "gpt_pangu": writers.write_gpt_pangu}[fmt]
            write(source, dst, dtype, shard_size, tokenizer, on_tensor, overwrite=args.overwrite)
    print(f"{src}: {source.layout}, {cfg.family} family, {cfg.num_layers} layers"
          f"{' + query layer' if cfg.query_layer else ''}, hidden {cfg.hidden_size}, vocab {cfg.vocab_size}, "
          f"{len(source.tensors)} tensors ({source.nbytes / 2**20:.1f} MiB)", file=sys.stderr)
    if source.skipped:
        shown = ", ".join(source.skipped[:8]) + (f", ... ({len(source.skipped)} in all)" if len(source.skipped) > 8 else "")
        print(f"  skipped: {shown}", file=sys.stderr)
    notes, written = source.notes, fmt
    if fmt == "mindspore":
        written = f"mindspore, {alpha.mindspore_naming(cfg, args.layout).name} names"
        notes = notes + alpha.mindspore_notes(cfg, args.layout)
    for note in notes:
        print(f"  note: {note}", file=sys.stderr)
    print(f"wrote {dst} ({written}{', tokenizer: ' + ', '.join(tokenizer) if tokenizer else ''})", file=sys.stderr)
    if args.verify:
        diff = verify(source, dst, fmt)
        print(f"verify: largest |logit difference| between {src} and {dst}: {diff:.3g}")
    return 0


def _tokenizer_files(folder: Path | None) -> dict[str, bytes]:
    from pangu_fn.tokenizer import tokenizer_files

    return {f.name: f.read_bytes() for f in tokenizer_files(folder)} if folder is not None else {}


def _copy_beside(files: dict[str, bytes], folder: Path) -> None:
    """Tokenizer files next to a `.ckpt` output, without replacing ones already there."""
    from pangu_fn.io.atomic import atomic_file

    for name, data in files.items():
        if not (folder / name).exists():
            with atomic_file(folder / name) as tmp:
                tmp.write_bytes(data)


def _output_bytes(source, fmt: str, dtype) -> int:
    """Bytes the writer will report (for the progress bar)."""
    total = 0
    for name, ref in source.tensors.items():
        n = ref.nbytes
        if dtype is not None and ref.dtype.is_floating_point:
            n = n // ref.dtype.itemsize * dtype.itemsize
        if fmt == "gpt_pangu" and name == "tok_embed.weight" and source.cfg.tie_embeddings:
            n *= 2  # the head is written as a copy
        total += n
    return total


def verify(source, dst: Path, fmt: str, prompts: int = 3, length: int = 16, seed: int = 0) -> float:
    """Largest |logit difference| of source and result (both computed in fp32) over `prompts`
    random prompts of `length` tokens."""
    import torch

    import pangu_fn as pf
    from pangu_fn.io.checkpoint import materialise

    a, cfg_a = materialise(source, dtype="fp32")
    b, cfg_b = pf.load(dst, dtype="fp32", config=cfg_a if fmt in ("mindspore", "megatron") else None)
    if cfg_b.replace(max_seq_len=cfg_a.max_seq_len) != cfg_a.replace(max_seq_len=cfg_a.max_seq_len):
        print(f"verify: configs differ:\n  source {cfg_a}\n  result {cfg_b}", file=sys.stderr)
    gen = torch.Generator().manual_seed(seed)
    length = min(length, cfg_a.max_seq_len, cfg_b.max_seq_len)
    ids = torch.randint(0, min(cfg_a.vocab_size, cfg_b.vocab_size), (prompts, length), generator=gen)
    with torch.no_grad():
        la, _ = pf.forward(a, cfg_a, ids)
        lb, _ = pf.forward(b, cfg_b, ids)
    return (la - lb).abs().max().item()
