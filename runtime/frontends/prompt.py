"""Prompts as mlx-lm's commands build them, for `moestream generate` and `moestream chat`.

- `read_prompt`: `--prompt -` reads the prompt from stdin; on the command line `\\n` and `\\t`
  become a newline and a tab (as `mlx_lm.generate` does).
- `load_tools`: `--tools FILE`, a JSON list of OpenAI-style tool schemas (`{"type": "function",
  "function": {"name", "description", "parameters"}}`; a bare function schema is wrapped, an
  object with a "tools" list, as in a request body, is taken too).
- `build_prompt`: the system prompt, the user message and the tools through the model's chat
  template (`apply_chat_template(messages, tools=..., add_generation_prompt=True)`, as mlx-lm's
  server and transformers do), or the raw prompt when there is no template or it is ignored.
- `parse_tool_call` / `find_tool_calls`: the model's tool-call markup (the tokenizer's
  `tool_call_start` ... `tool_call_end`) through mlx-lm's own tool parser, with what a client
  needs checked (a non-empty name, arguments that are a JSON object); what does not parse is
  kept as text, never dropped. `moestream serve` uses `parse_tool_call` too.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

from ...common.errors import OptionsError

STDIN = "-"
MAX_TOOLS_BYTES = 16 << 20  # a tools file larger than this is a mistake, not a schema


def read_prompt(text: str, stdin=None) -> str:
    """The prompt of `--prompt TEXT`: `-` reads stdin to its end; otherwise the escapes `\\n` and
    `\\t` become a newline and a tab, as `mlx_lm.generate` does."""
    if text == STDIN:
        stream = sys.stdin if stdin is None else stdin
        if stream is None:
            raise OptionsError("--prompt -: there is no stdin to read the prompt from")
        prompt = stream.read()
        if not prompt.strip():
            raise OptionsError("--prompt -: stdin was empty: pipe the prompt in, e.g. echo Hello | moestream generate ...")
        return prompt
    return text.replace("\\n", "\n").replace("\\t", "\t")


def load_tools(path: str | Path) -> list[dict]:
    """The tool schemas of a `--tools` JSON file, in OpenAI's shape, checked."""
    path = Path(path)
    where = f"--tools {path}"
    try:
        size = path.stat().st_size
        if size > MAX_TOOLS_BYTES:
            raise OptionsError(f"{where}: {size} bytes, more than a tools file should hold ({MAX_TOOLS_BYTES})")
        data = json.loads(path.read_text(encoding="utf-8"))
    except OptionsError:
        raise
    except (OSError, UnicodeDecodeError) as e:
        raise OptionsError(f"{where}: cannot read it: {getattr(e, 'strerror', None) or e}") from None
    except json.JSONDecodeError as e:
        raise OptionsError(f"{where}: not valid JSON: {e}") from None
    return check_tools(data, where)


def check_tools(data, where: str = "tools") -> list[dict]:
    """A list of OpenAI tool schemas (bare function schemas wrapped), or an OptionsError naming
    the first entry that is not one."""
    if isinstance(data, dict) and isinstance(data.get("tools"), list):
        data = data["tools"]
    if not isinstance(data, list) or not data:
        raise OptionsError(f"{where}: expected a non-empty JSON list of tool schemas, like "
                           '[{"type": "function", "function": {"name": "get_weather", "parameters": {...}}}]')
    tools = []
    for i, tool in enumerate(data):
        if isinstance(tool, dict) and "function" not in tool and isinstance(tool.get("name"), str):
            tool = {"type": "function", "function": tool}  # a bare function schema
        function = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str) or not function["name"]:
            raise OptionsError(f"{where}: entry {i} is not a tool schema: expected "
                               '{"type": "function", "function": {"name": ..., "parameters": {...}}}')
        if tool.get("type", "function") != "function":
            raise OptionsError(f"{where}: entry {i} has type {tool.get('type')!r}; only \"function\" tools exist")
        if "parameters" in function and not isinstance(function["parameters"], dict):
            raise OptionsError(f"{where}: entry {i} ({function['name']}): 'parameters' must be a JSON schema object")
        tools.append({"type": "function", **tool})
    return tools


def template_args(text: str | None) -> dict:
    """`--chat-template-config '{"enable_thinking": false}'`: keyword arguments for the chat template."""
    if text is None or text == "":
        return {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise OptionsError(f"chat template arguments are not valid JSON: {e}") from None
    if not isinstance(value, dict):
        raise OptionsError(f"chat template arguments must be a JSON object, like '{{\"enable_thinking\": false}}', "
                           f"not {text!r}")
    return value


def has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def messages_for(prompt: str, system_prompt: str | None = None) -> list[dict]:
    messages = [{"role": "system", "content": system_prompt}] if system_prompt is not None else []
    return messages + [{"role": "user", "content": prompt}]


def check_template_use(tokenizer, use_chat_template: bool, system_prompt=None, tools=None) -> None:
    """Refuse what needs the chat template when it is not there or is ignored (mlx-lm drops the
    system prompt silently there; a tool schema dropped silently is worse)."""
    if use_chat_template and has_chat_template(tokenizer):
        return
    needed = [name for name, value in (("--system-prompt", system_prompt), ("--tools", tools)) if value]
    if needed:
        why = "--ignore-chat-template is given" if not use_chat_template else "this model has no chat template"
        raise OptionsError(f"{' and '.join(needed)} go through the chat template, but {why}")


def build_prompt(tokenizer, prompt: str, *, system_prompt: str | None = None, tools: list | None = None,
                 use_chat_template: bool = True, chat_template_args: dict | None = None) -> list[int] | str:
    """The prompt as mlx-lm builds it: token ids of the chat template applied to the system prompt
    and the user message (with `tools=` when there are tools), or the prompt text as it is when
    the model has no template or `use_chat_template` is False."""
    check_template_use(tokenizer, use_chat_template, system_prompt, tools)
    if not (use_chat_template and has_chat_template(tokenizer)):
        return prompt
    return apply_template(tokenizer, messages_for(prompt, system_prompt), tools, chat_template_args)


def apply_template(tokenizer, messages: list[dict], tools: list | None = None, chat_template_args: dict | None = None,
                   **kwargs) -> list[int]:
    """Token ids of the chat template applied to `messages` (generation prompt added)."""
    options = {"add_generation_prompt": True, **(chat_template_args or {}), **kwargs}
    if tools:
        options["tools"] = tools
    try:
        return list(tokenizer.apply_chat_template(messages, **options))
    except Exception as e:  # noqa: BLE001 - jinja raises anything a template author wrote
        raise OptionsError(f"the chat template cannot render this prompt: {type(e).__name__}: {e}") from None


# --- tool calls in the model's output -----------------------------------------------------------


def parse_tool_call(tool_parser, text: str, tools=None) -> list[dict] | None:
    """The calls in one tool-call body (the text between the markers), as mlx-lm's parser gives
    them (`{"name": str, "arguments": dict}`, plus "id" for some parsers), or None when it does not
    parse or is not what a client can call: no parser, a parser error of any kind, a name that is
    not a non-empty string, arguments that are not a JSON object."""
    if tool_parser is None:
        return None
    try:
        parsed = tool_parser(text, tools)
    except Exception:  # noqa: BLE001 - parsers raise ValueError, KeyError, IndexError, AttributeError ...
        return None
    calls = parsed if isinstance(parsed, list) else [parsed]
    if not calls:
        return None
    for call in calls:
        if not (isinstance(call, dict) and isinstance(call.get("name"), str) and call["name"].strip()
                and isinstance(call.get("arguments"), dict)):
            return None
        try:
            json.dumps(call["arguments"])
        except (TypeError, ValueError):
            return None
    return calls


@dataclass
class ToolCalls:
    """What a reply's tool-call markup holds: the calls that parsed, the markup of those that did
    not (as the model wrote it), and the text around them."""

    calls: list[dict] = field(default_factory=list)
    unparsed: list[str] = field(default_factory=list)
    text: str = ""


def find_tool_calls(tokenizer, text: str, tools=None) -> ToolCalls:
    """Split a reply into tool calls (through the tokenizer's tool parser) and text. A call that
    does not parse (or is cut off by max_tokens) stays in `text` and is listed in `unparsed`."""
    start = getattr(tokenizer, "tool_call_start", None)
    end = getattr(tokenizer, "tool_call_end", None)
    parser = getattr(tokenizer, "tool_parser", None)
    result = ToolCalls()
    if not start or start not in text:
        result.text = text
        return result
    rest, kept = text, []
    while start in rest:
        before, _, after = rest.partition(start)
        kept.append(before)
        if end and end in after:
            body, _, rest = after.partition(end)
            markup = start + body + end
        else:
            body, rest, markup = after, "", start + after
        calls = parse_tool_call(parser, body, tools)
        if calls is None:
            result.unparsed.append(markup)
            kept.append(markup)
        else:
            result.calls.extend(calls)
    kept.append(rest)
    result.text = "".join(kept)
    return result


def describe_tool_calls(found: ToolCalls) -> list[str]:
    """One line per call (name and arguments) and per call that did not parse."""
    lines = [f"tool call: {c['name']}({json.dumps(c['arguments'], ensure_ascii=False)})" for c in found.calls]
    lines += [f"tool call that does not parse (kept as text): {' '.join(u.split())[:200]}" for u in found.unparsed]
    return lines
