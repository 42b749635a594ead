"""Chat templates for the OpenAI-compatible server: the model's jinja2 `chat_template`, or a
plain "role: content" layout when it has none."""
from __future__ import annotations

import json
import os
from typing import List, Optional

from .server_protocol import bad


PLAIN_TEMPLATE_DOC = 'each message as "role: content\\n", then "assistant:"'


class ChatTemplate:
    """The model's `chat_template` (tokenizer_config.json) rendered with jinja2 in a sandbox, or
    the plain template: one "role: content" line per message, then "assistant:"."""

    def __init__(self, source: Optional[str] = None, bos_token: str = "", eos_token: str = ""):
        self.source = source
        self.bos_token = bos_token
        self.eos_token = eos_token
        self._template = None
        if source is not None:
            from jinja2 import TemplateError
            from jinja2.sandbox import ImmutableSandboxedEnvironment

            def raise_exception(message):
                raise TemplateError(message)

            env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                                extensions=["jinja2.ext.loopcontrols"])
            env.globals["raise_exception"] = raise_exception
            env.filters.setdefault("tojson", lambda v, indent=None: json.dumps(v, ensure_ascii=False, indent=indent))
            self._template = env.from_string(source)

    @property
    def is_plain(self) -> bool:
        return self._template is None

    def render(self, messages: List[dict], add_generation_prompt: bool = True) -> str:
        if self._template is None:
            text = "".join(f"{m['role']}: {m['content']}\n" for m in messages)
            return text + "assistant:" if add_generation_prompt else text
        from jinja2 import TemplateError
        try:
            return self._template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                         bos_token=self.bos_token, eos_token=self.eos_token)
        except TemplateError as e:
            raise bad(f"the chat template rejected the messages: {e}", "messages", "invalid_value") from None
        except Exception as e:  # a template bug must not become a 500 loop
            raise bad(f"the chat template failed: {type(e).__name__}: {e}", "messages", "invalid_value") from None

    @classmethod
    def for_model_path(cls, path: Optional[str]) -> "ChatTemplate":
        if not path:
            return cls()
        cfg_path = os.path.join(path, "tokenizer_config.json")
        if not os.path.exists(cfg_path):
            return cls()
        with open(cfg_path, encoding="utf-8") as f:
            cfg = json.load(f)

        def token(name):
            t = cfg.get(name)
            if isinstance(t, dict):
                t = t.get("content")
            return t if isinstance(t, str) else ""

        tpl = cfg.get("chat_template")
        if isinstance(tpl, list):  # [{"name": ..., "template": ...}]
            named = {t.get("name"): t.get("template") for t in tpl if isinstance(t, dict)}
            tpl = named.get("default") or next(iter(named.values()), None)
        if tpl is not None and not isinstance(tpl, str):
            tpl = None
        return cls(tpl, token("bos_token"), token("eos_token"))
