"""Export of pangu_fn models to ONNX and torch.export bundles (import name pangu_export).

    from pangu_export import export_bundle
    export_bundle(params, cfg, "out/bundle", target="ort")      # then pangu_runtime.Session
    export_bundle(params, cfg, "out/ascend", target="ascend")   # + the atc command, checked
    export_bundle(params, cfg, "out/pt2", target="torch")       # then load_program

Every target traces `pangu_fn.forward` itself; see docs/export.md.
"""

from .ascend import Problem, atc_command, check_ascend
from .bundle import TARGETS, export_bundle
from .onnx_export import export_onnx
from .torch_export import Program, export_pt2, load_program

__all__ = ["TARGETS", "Problem", "Program", "atc_command", "check_ascend", "export_bundle", "export_onnx",
           "export_pt2", "load_program"]
