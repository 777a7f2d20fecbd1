"""The files `pangu bench --peers` loads, each built in a child process of its own.

At pangu-1b (5 GB of fp32 weights) building them inside the bench process ran out of 24 GiB:
ONNX Runtime's `quantize_dynamic` rewrote the fp32 graph beside the fp32 tree and the export's
leftovers. Now the bench process saves the fp32 tree once (`peers_bench.prepare`, to
DIR/pangu-fp32, which the pangu-fn fp32 engine loads too) and drops it; each step below runs in
a fresh interpreter (`python -m pangu_tools.peers_build STEP`: spawned, so it does not inherit
the parent's memory) that reads what it needs from disk, writes its file and exits. The peak of
the run is then about the largest single step, not their sum.

| step | reads | writes |
|---|---|---|
| `pangu` | the fp32 folder | pangu-SCHEME for each quantized scheme (`quant_bench.recipe`) |
| `gguf` | the fp32 folder | model-TYPE.gguf for each type (`gguf_bench.our_tree` + `export_gguf`) |
| `onnx` | the fp32 folder | onnx-fp32/model.onnx (+ .data past 2 GB): transformers' graph, ORT fusions |
| `onnx-quant` | onnx-fp32/model.onnx | onnx-SCHEME/model.onnx + .data (`ort_bench.quantize_plain`; no torch) |

The `pangu` and `gguf` steps load the fp32 tree once and write one file at a time (a quantized
copy is dropped before the next); each ONNX quantization is a step of its own, as ONNX Runtime's
quantizers hold several copies of the graph.

A step's reply carries what it measured (`weights_mb` for pangu trees) and its process's peak
RSS (`build_peak_rss_mb`).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

# The bench options a step reads (quant_bench.recipe, ort_bench.quantize_plain).
OPTIONS = ("group_size", "asym", "quant_head", "accuracy_level")


def options(args: Any) -> dict[str, Any]:
    """The OPTIONS of `args` (an argparse Namespace) as JSON-able values."""
    return {name: getattr(args, name) for name in OPTIONS}


def build_in_child(step: dict[str, Any]) -> dict[str, Any]:
    """Run one build `step` ({"step": a name of STEPS, its paths and options}) in a fresh child
    process and return its reply. Its progress lines go to this process's stderr. Raises the
    child's PanguError class when it raised one, RuntimeError when it failed otherwise (a
    traceback above, or a signal such as the OOM killer's). The child's temporary files
    (ONNX Runtime's quantizers write gigabytes there at pangu-1b) go to a folder of this call,
    removed when the child ends, however it ends: a killed quantizer once left 4.9 GB behind."""
    from pangu_fn import errors

    with tempfile.TemporaryDirectory(prefix="pangu-peers-build-") as scratch:
        proc = subprocess.run([sys.executable, "-m", "pangu_tools.peers_build", json.dumps(step)],
                              stdout=subprocess.PIPE, text=True, check=False, env={**os.environ, "TMPDIR": scratch})
    lines = proc.stdout.strip().splitlines()
    reply = json.loads(lines[-1]) if lines and lines[-1].startswith("{") else {}
    if proc.returncode == 0 and "error" not in reply:
        return reply
    error = getattr(errors, reply.get("error", ""), None)
    if isinstance(error, type) and issubclass(error, errors.PanguError):
        raise error(reply["message"])
    how = (f"was killed by signal {-proc.returncode}" + (" (out of memory?)" if proc.returncode == -9 else "")
           if proc.returncode < 0 else f"failed with exit code {proc.returncode} (traceback above)")
    raise RuntimeError(f"bench: building {step.get('out', step['step'])} in a child process {how}")


def pangu_step(step: dict[str, Any]) -> dict[str, Any]:
    """The fp32 folder quantized with `quant_bench.recipe(scheme)` for each of `schemes`, saved
    to `out`/pangu-SCHEME one after another; {"weights_mb": {scheme: MiB}}."""
    import pangu_fn as pf
    from pangu_fn.quant import quantize

    from .quant_bench import recipe

    fp32, cfg = pf.load(step["source"])
    sizes = {}
    for scheme in step["schemes"]:
        tree = quantize(fp32, recipe(scheme, SimpleNamespace(**step["options"])), progress=True)
        pf.save(Path(step["out"]) / f"pangu-{scheme}", tree, cfg, overwrite=True)
        sizes[scheme] = round(pf.nbytes(tree) / 2**20, 1)
        del tree
    return {"weights_mb": sizes}


def gguf_step(step: dict[str, Any]) -> dict[str, Any]:
    """The fp32 folder written as a GGUF of each llama.cpp type of `types` (see gguf_bench) to
    `out`/model-TYPE.gguf, one after another."""
    from pangu_export.gguf import export_gguf

    import pangu_fn as pf

    from .gguf_bench import our_tree

    fp32, cfg = pf.load(step["source"])
    for type in step["types"]:
        export_gguf(our_tree(fp32, type)[0], cfg, Path(step["out"]) / f"model-{type}.gguf", type, overwrite=True)
    return {}


def onnx_step(step: dict[str, Any]) -> dict[str, Any]:
    """transformers' model on the fp32 folder (`ort_bench.hf_model`: it shares the loaded tree's
    memory) exported to the folder `out` (model.onnx, by `ort_bench.export_hf_onnx`, written
    beside it and renamed into place)."""
    import pangu_fn as pf

    from .ort_bench import export_hf_onnx, hf_model

    fp32, cfg = pf.load(step["source"])
    model, hf_cfg = hf_model(fp32, cfg)
    with _fresh_folder(Path(step["out"])) as tmp:
        export_hf_onnx(model, hf_cfg, cfg, tmp)
    return {}


def onnx_quant_step(step: dict[str, Any]) -> dict[str, Any]:
    """The fp32 graph `source` quantized by ONNX Runtime's tools (`quantize_plain`) to the folder
    `out` (model.onnx + model.onnx.data, written beside it and renamed into place)."""
    from .ort_bench import quantize_plain

    with _fresh_folder(Path(step["out"])) as tmp:
        quantize_plain(Path(step["source"]), tmp / "model.onnx", step["scheme"], SimpleNamespace(**step["options"]))
    return {}


@contextlib.contextmanager
def _fresh_folder(out: Path) -> Iterator[Path]:
    """An empty folder beside `out` that replaces `out` when the block succeeds and is removed
    when it fails (pangu_fn.io.atomic's atomic_dir without importing torch, which these ONNX
    steps do not need)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        yield tmp
        os.chmod(tmp, 0o755)  # mkdtemp makes 0700
        shutil.rmtree(out, ignore_errors=True)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


STEPS: dict[str, Callable[[dict[str, Any]], dict[str, Any]]] = {
    "pangu": pangu_step, "gguf": gguf_step, "onnx": onnx_step, "onnx-quant": onnx_quant_step}


def _main(step: dict[str, Any]) -> int:
    """The child's side of `build_in_child`: run the step with stdout sent to stderr (libraries
    print), then print the reply as the last line of stdout."""
    from .ort_bench import peak_rss_kib

    try:
        with contextlib.redirect_stdout(sys.stderr):
            reply = STEPS[step["step"]](step)
    except Exception as e:
        if type(e).__module__ != "pangu_fn.errors":  # PanguError, without importing torch here
            raise
        print(json.dumps({"error": type(e).__name__, "message": str(e)}), flush=True)
        return 1
    print(json.dumps({**reply, "build_peak_rss_mb": round(peak_rss_kib() / 1024, 1)}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(_main(json.loads(sys.argv[1])))
