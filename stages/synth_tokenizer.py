"""A small byte-level BPE tokenizer with a Qwen-style chat template, for synthetic checkpoints.

Every synthetic family gets the same tokenizer: what the pipeline and runtime need from it is
that `transformers.AutoTokenizer` (and so `mlx_lm.load`) reads it from the folder, that any text
round-trips (byte-level BPE has no unknown tokens), and that the chat template renders tools and
tool calls the way Qwen does (`<tool_call>{"name": ..., "arguments": ...}</tool_call>`), which
mlx-lm recognises as its `json_tools` parser. The BPE merges are trained on a fixed text, which is
deterministic, so the files are byte-identical on every run.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

VOCAB_SIZE = 320  # bytes (256) + a few merges + the added tokens below

# Control tokens (special: stripped by decode(skip_special_tokens=True)) and the tool/think
# markers, which Qwen adds as ordinary added tokens so they survive decoding.
SPECIAL_TOKENS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    # Qwen3.5's vision markers, so the ids its config.json names exist in the vocabulary.
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
)
MARKER_TOKENS = (
    "<tool_call>",
    "</tool_call>",
    "<tool_response>",
    "</tool_response>",
    "<think>",
    "</think>",
)

# Text the merges are learned from: a little English, JSON and chat markup, so that common
# pieces of prompts and tool calls become single tokens.
_CORPUS = (
    "The quick brown fox jumps over the lazy dog. " * 4,
    "You are a helpful assistant. What is the weather like in Paris today? ",
    "It is sunny and warm in the city, with a light wind from the west. ",
    '{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}\n',
    '{"type": "function", "function": {"name": "search", "parameters": {"type": "object"}}}\n',
    "def main():\n    return print('hello world')\n",
    "Mixture of experts models route each token to a few of their experts. ",
)

# Qwen2.5/Qwen3-style template (system + tools header, assistant tool calls as JSON inside
# <tool_call> tags, tool results inside <tool_response> in a user turn). mlx-lm picks its
# json_tools parser when the template contains "<tool_call>" and "tool_call.name".
CHAT_TEMPLATE = """\
{%- if tools %}
    {{- '<|im_start|>system\\n' }}
    {%- if messages[0].role == 'system' %}
        {{- messages[0].content + '\\n\\n' }}
    {%- endif %}
    {{- '# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\n' }}
    {{- 'You are provided with function signatures within <tools></tools> XML tags:\\n<tools>' }}
    {%- for tool in tools %}
        {{- '\\n' }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- '\\n</tools>\\n\\nFor each function call, return a json object with function name and '
        'arguments within <tool_call></tool_call> XML tags:\\n<tool_call>\\n'
        '{\"name\": <function-name>, \"arguments\": <args-json-object>}\\n</tool_call><|im_end|>\\n' }}
{%- elif messages[0].role == 'system' %}
    {{- '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' }}
{%- endif %}
{%- for message in messages %}
    {%- if message.role == 'system' %}
        {%- if not loop.first %}
            {{- '<|im_start|>system\\n' + message.content + '<|im_end|>\\n' }}
        {%- endif %}
    {%- elif message.role == 'user' or (message.role == 'assistant' and not message.tool_calls) %}
        {{- '<|im_start|>' + message.role + '\\n' + (message.content or '') + '<|im_end|>\\n' }}
    {%- elif message.role == 'assistant' %}
        {{- '<|im_start|>assistant' }}
        {%- if message.content %}
            {{- '\\n' + message.content }}
        {%- endif %}
        {%- for tool_call in message.tool_calls %}
            {%- if tool_call.function is defined %}
                {%- set tool_call = tool_call.function %}
            {%- endif %}
            {{- '\\n<tool_call>\\n{\"name\": \"' }}
            {{- tool_call.name }}
            {{- '\", \"arguments\": ' }}
            {%- if tool_call.arguments is string %}
                {{- tool_call.arguments }}
            {%- else %}
                {{- tool_call.arguments | tojson }}
            {%- endif %}
            {{- '}\\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\\n' }}
    {%- elif message.role == 'tool' %}
        {%- if loop.first or messages[loop.index0 - 1].role != 'tool' %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\\n<tool_response>\\n' + message.content + '\\n</tool_response>' }}
        {%- if loop.last or messages[loop.index0 + 1].role != 'tool' %}
            {{- '<|im_end|>\\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
{%- endif %}
"""


@dataclass(frozen=True)
class TokenizerInfo:
    """The ids a model config and generation config refer to."""

    vocab_size: int
    bos_token_id: int
    eos_token_id: int  # <|im_end|>: ends a chat turn
    pad_token_id: int  # <|endoftext|>
    vision_start_token_id: int
    vision_end_token_id: int
    image_token_id: int
    video_token_id: int

    @classmethod
    def from_tokenizer(cls, tok: Tokenizer) -> TokenizerInfo:
        return cls(
            vocab_size=tok.get_vocab_size(),
            bos_token_id=tok.token_to_id("<|endoftext|>"),
            eos_token_id=tok.token_to_id("<|im_end|>"),
            pad_token_id=tok.token_to_id("<|endoftext|>"),
            vision_start_token_id=tok.token_to_id("<|vision_start|>"),
            vision_end_token_id=tok.token_to_id("<|vision_end|>"),
            image_token_id=tok.token_to_id("<|image_pad|>"),
            video_token_id=tok.token_to_id("<|video_pad|>"),
        )


def build_tokenizer() -> Tokenizer:
    """Byte-level BPE (GPT-2/Qwen style) with merges learned from the fixed corpus."""
    added = len(SPECIAL_TOKENS) + len(MARKER_TOKENS)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE - added,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        min_frequency=1,
        show_progress=False,
    )
    tok.train_from_iterator(list(_CORPUS), trainer=trainer)
    tok.add_special_tokens(list(SPECIAL_TOKENS))
    tok.add_tokens(list(MARKER_TOKENS))
    return tok


def write_tokenizer(folder: Path) -> TokenizerInfo:
    """Write tokenizer.json and tokenizer_config.json into `folder`; return the ids to use."""
    tok = build_tokenizer()
    (folder / "tokenizer.json").write_text(tok.to_str(pretty=True), encoding="utf-8")
    info = TokenizerInfo.from_tokenizer(tok)
    config = tokenizer_config(tok)
    (folder / "tokenizer_config.json").write_text(
        json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8"
    )
    return info


def tokenizer_config(tok: Tokenizer, special_tokens=SPECIAL_TOKENS, marker_tokens=MARKER_TOKENS,
                     model_max_length: int = 131072) -> dict:
    """Like Qwen's tokenizer_config.json, but with the generic fast-tokenizer class: the
    tokenizer is fully described by tokenizer.json (there is no vocab.json/merges.txt)."""
    decoder = {}
    for content in special_tokens + marker_tokens:
        decoder[str(tok.token_to_id(content))] = {
            "content": content,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": content in special_tokens,
        }
    return {
        "add_bos_token": False,
        "add_prefix_space": False,
        "added_tokens_decoder": decoder,
        "additional_special_tokens": ["<|im_start|>", "<|im_end|>"],
        "bos_token": None,
        "chat_template": CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": False,
        "eos_token": "<|im_end|>",
        "errors": "replace",
        "model_max_length": model_max_length,
        "pad_token": "<|endoftext|>",
        "split_special_tokens": False,
        "tokenizer_class": "PreTrainedTokenizerFast",
        "unk_token": None,
    }
