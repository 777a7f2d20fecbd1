"""Fixtures; the helper functions live in helpers.py (`from helpers import ...`)."""

from __future__ import annotations

import os

import pytest
import torch
from helpers import FAMILIES, random_model

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(params=FAMILIES)
def family_model(request):
    """(params, cfg) of a random tiny model of each family, biases and norms redrawn."""
    return random_model(request.param)
