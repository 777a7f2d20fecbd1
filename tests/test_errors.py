"""Bad input gets a typed error that says what was expected, what was found and where; the
CLI prints it on one line and exits 2."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from pangu_tools.cli import main

import pangu_fn as pf
from pangu_fn.errors import ConfigError, InputError, PanguError, ShapeError


@pytest.fixture(scope="module")
def tiny():
    cfg = pf.ModelConfig.preset("tiny-gpt")
    return pf.init_params(cfg), cfg


def test_token_id_outside_vocabulary(tiny):
    params, cfg = tiny
    with pytest.raises(InputError, match=r"token id 256 outside the vocabulary \[0, 256\)"):
        pf.forward(params, cfg, torch.tensor([[1, 256]]))
    with pytest.raises(InputError, match="prompt 1 has token id -3"):
        pf.generate(params, cfg, [[1], [2, -3]], 4)


def test_prompt_plus_new_tokens_beyond_context(tiny):
    params, cfg = tiny
    with pytest.raises(InputError, match=r"100 tokens \+ max_new_tokens 29 = 129, beyond the context length 128"):
        pf.generate(params, cfg, [[1] * 100], 29)
    with pytest.raises(InputError, match="exceed the context length 128"):
        pf.forward(params, cfg, torch.ones(1, 129, dtype=torch.int64))


def test_cache_overflow(tiny):
    params, cfg = tiny
    cache = pf.init_cache(params, cfg, 1, 8)
    _, cache = pf.forward(params, cfg, torch.ones(1, 6, dtype=torch.int64), cache)
    with pytest.raises(InputError, match="needs 9 positions; the cache holds 8"):
        pf.forward(params, cfg, torch.ones(1, 3, dtype=torch.int64), cache)


@pytest.mark.parametrize("prompts,match", [([[]], "prompt 0 is empty"), ([], "non-empty list of prompts"),
                                           ([1, 2, 3], "each a list of token ids")])
def test_empty_or_malformed_prompts(tiny, prompts, match):
    params, cfg = tiny
    with pytest.raises(InputError, match=match):
        pf.generate(params, cfg, prompts, 4)


def test_shapes_that_disagree_with_the_config_name_the_tensor(tiny):
    params, cfg = tiny
    bad = pf.tree.unflatten({**pf.tree.flatten(params), "blocks.1.mlp.up.weight": torch.zeros(256, 60)})
    with pytest.raises(ShapeError, match=r"blocks.1.mlp.up.weight has shape \[256, 60\], expected \[256, 64\]"):
        pf.validate(bad, cfg)
    wide = pf.tree.unflatten({**pf.tree.flatten(params), "tok_embed.weight": torch.zeros(300, 64)})
    with pytest.raises(ShapeError, match=r"tok_embed.weight has shape \[300, 64\], expected \[256, 64\]"):
        pf.validate(wide, cfg)
    missing = pf.tree.unflatten({k: v for k, v in pf.tree.flatten(params).items() if k != "final_norm.bias"})
    with pytest.raises(ShapeError, match="missing tensors.*final_norm.bias"):
        pf.validate(missing, cfg)


def test_unknown_preset_and_bad_sampling():
    with pytest.raises(ConfigError, match="unknown preset 'pangu-3b'; expected one of"):
        pf.ModelConfig.preset("pangu-3b")
    with pytest.raises(InputError, match="expected temperature >= 0, found -0.5"):
        pf.SamplingParams(temperature=-0.5)
    with pytest.raises(InputError, match="top_p <= 1, found 1.5"):
        pf.SamplingParams(top_p=1.5)
    with pytest.raises(ConfigError, match="unknown keys"):
        pf.ModelConfig.from_dict({**pf.ModelConfig.preset("tiny-gpt").to_dict(), "hidden": 3})


def test_errors_are_one_family():
    for cls in (ConfigError, InputError, ShapeError, pf.FormatError):
        assert issubclass(cls, PanguError) and issubclass(cls, ValueError)


@pytest.mark.parametrize("argv,fragment", [
    (["generate", "--model", "tiny-gpt", "--prompt-ids", "1 2 999"], "token id 999 outside the vocabulary"),
    (["generate", "--model", "no-such-model", "--prompt-ids", "1"], "neither an existing folder nor a preset"),
    (["generate", "--model", "tiny-gpt", "--prompt-ids", "1", "--temperature", "-1"], "temperature >= 0"),
    (["generate", "--model", "tiny-gpt", "--prompt-ids", "1 x"], "expected integers"),
    (["generate", "--model", "tiny-gpt", "--prompt", "hello"], "--prompt needs a tokenizer"),
    (["generate", "--model", "tiny-gpt", "--prompt-ids", "1", "--max-new-tokens", "500"], "beyond the context"),
    (["info", "pangu-3b"], "neither an existing folder nor a preset"),
])
def test_cli_prints_one_line_and_exits_2(argv, fragment, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and fragment in err and err.startswith(f"pangu {argv[0]}: error:")


def test_cli_error_in_a_real_process():
    proc = subprocess.run([sys.executable, "-m", "pangu_tools.cli", "generate", "--model", "tiny-gpt",
                           "--prompt-ids", "", "--max-new-tokens", "3"], capture_output=True, text=True, check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [("pangu generate: error: generate: prompt 0 is empty; "
                                                "expected at least one token")]
