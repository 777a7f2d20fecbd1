"""Chat templates: messages -> prompt text, through jinja2 as transformers renders them.

The template is the model folder's `tokenizer_config.json` `chat_template` when it has one;
otherwise openPangu's (for a tokenizer with its `[unused9]` / `[unused10]` markers), otherwise
`PLAIN_TEMPLATE`: one `role: content` line per message, then `assistant:`.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ..errors import FormatError, InputError

PLAIN_TEMPLATE = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                  "{% if add_generation_prompt %}assistant:{% endif %}")

OPENPANGU_TEMPLATE = (
    "{% set roles = {'system': '系统', 'user': '用户', 'assistant': '助手', 'tool': '工具', 'function': '方法'} %}"
    "{% for m in messages %}"
    "{% if m['role'] not in roles %}{{ raise_exception('unknown role ' ~ m['role']) }}{% endif %}"
    "{% if loop.first and m['role'] != 'system' %}[unused9]系统：[unused10]{% endif %}"
    "[unused9]{{ roles[m['role']] }}：{{ m['content'] }}[unused10]"
    "{% endfor %}"
    "{% if add_generation_prompt %}[unused9]助手：{% endif %}")


def chat_template_for(folder: str | Path | None, tokenizer: Any) -> str:
    """The template text for a model folder (None: a preset) and its tokenizer."""
    if folder is not None:
        f = Path(folder) / "tokenizer_config.json"
        if f.is_file():
            try:
                template = json.loads(f.read_text()).get("chat_template")
            except json.JSONDecodeError as e:
                raise FormatError(f"{f}: not valid JSON: {e}") from None
            if isinstance(template, str):
                return template
    specials = getattr(tokenizer, "special_tokens", {}) or {}
    if "[unused9]" in specials and "[unused10]" in specials:
        return OPENPANGU_TEMPLATE
    return PLAIN_TEMPLATE


class ChatTemplate:
    """A compiled template; `render(messages)` gives the prompt text. Raises InputError for
    messages the template rejects (or that are not role / string-content objects)."""

    def __init__(self, source: str, bos_token: str = "", eos_token: str = "") -> None:
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = _raise
        self.source, self.template = source, env.from_string(source)
        self.bos_token, self.eos_token = bos_token, eos_token

    def render(self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = True) -> str:
        for i, m in enumerate(messages):
            if not isinstance(m, Mapping) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
                raise InputError(f"messages[{i}]: expected an object with a string 'role' and string 'content', "
                                 f"found {str(m)[:80]}")
        try:
            return self.template.render(messages=[dict(m) for m in messages], add_generation_prompt=add_generation_prompt,
                                        bos_token=self.bos_token, eos_token=self.eos_token)
        except InputError:
            raise
        except Exception as e:  # noqa: BLE001 (a template's own errors)
            raise InputError(f"messages: the chat template failed: {e}") from None


def _raise(message: str) -> None:
    raise InputError(f"messages: {message}")
