"""Pruning as tree transforms: `prune(params, recipe, calib, cfg=...) -> (params, report)`.

Methods: exact-count magnitude and Wanda (per layer, per row or global), N:M semi-structured,
structured removal of KV groups and FFN neurons (tensors become smaller), and iterative pruning
on the cubic schedule with recovery training. See docs/pruning.md.
"""

from .calibrate import calibration_windows, input_norms, loss_gradients
from .recipe import PruneRecipe, count_for, parse_nm, parse_structured
from .report import PruneReport
from .schedule import cubic_sparsity
from .select import smallest_k_masks
from .structured import unit_scores
from .transform import prune
from .unstructured import compute_masks, wanda_scores

__all__ = ["PruneRecipe", "PruneReport", "calibration_windows", "compute_masks", "count_for", "cubic_sparsity",
           "input_norms", "loss_gradients", "parse_nm", "parse_structured", "prune", "smallest_k_masks",
           "unit_scores", "wanda_scores"]
