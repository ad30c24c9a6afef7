"""The options every subcommand that runs a model shares, and how they become `moestream.load`."""

from __future__ import annotations

import argparse

CACHE_POLICIES = ("lru", "lfu", "hot", "prior", "lrfu")


def positive_int(text: str) -> int:
    """argparse type: an integer of at least 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def add_runtime_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("bundle", help="bundle folder, Hub repo id of a bundle (ORG/NAME), or a source checkpoint folder")
    p.add_argument("--revision", default=None, help="Hub revision (branch, tag or commit) of ORG/NAME")
    p.add_argument("--memory-budget", default=None,
                   help="e.g. 8GB: resident weights + expert cache + KV cache + buffers (default: no limit)")
    p.add_argument("--experts-per-token", type=positive_int, default=None,
                   help="lower the routed top-k of every MoE layer (default: the model's own)")
    p.add_argument("--cache-policy", default="lru", choices=CACHE_POLICIES,
                   help="expert cache policy; hot, prior and lrfu need a routing profile (a bundle prepared with "
                        "--profile has one)")
    p.add_argument("--prefetch", action="store_true", help="read the next MoE layer's experts early, predicted by its router")
    p.add_argument("--max-kv-size", type=positive_int, default=None,
                   help="tokens of KV cache the budget reserves (default: 4096)")
    p.add_argument("--dtype", default=None, choices=("float32", "bfloat16", "float16"),
                   help="compute dtype (default: float32 on CPU, the source dtype on GPU)")
    p.add_argument("--io-mode", choices=("direct", "buffered"), default="direct",
                   help="direct: bypass the OS page cache (honest budget); buffered: trust the OS")
    p.add_argument("--io-threads", type=positive_int, default=None,
                   help="expert reader threads (default: 8, or 2 per core if fewer)")
    p.add_argument("--verify", action="store_true", help="check every checksum before loading")


def load_model(args):
    """moestream.load with the runtime options every running subcommand shares."""
    from moestream import IOOptions, load

    return load(args.bundle, memory_budget=args.memory_budget, experts_per_token=args.experts_per_token,
                cache_policy=args.cache_policy, prefetch=args.prefetch, max_kv_size=args.max_kv_size,
                dtype=args.dtype, revision=args.revision, verify=args.verify,
                io=IOOptions(mode=args.io_mode, threads=args.io_threads))


def write_json(path, data) -> None:
    """A result file, written atomically."""
    from moestream.common.files import write_json_atomic

    write_json_atomic(path, data, sort_keys=False, default=str)


def add_prompt_options(p: argparse.ArgumentParser) -> None:
    """The prompt options `generate` and `chat` share with mlx-lm's (`--system-prompt`,
    `--prefill-step-size`), plus `--tools` and `--chat-template-config`."""
    p.add_argument("--system-prompt", default=None, help="system prompt for the chat template")
    p.add_argument("--tools", default=None, metavar="FILE",
                   help="JSON file with a list of OpenAI-style tool schemas, given to the chat template (tools=) "
                        "so the model can call them")
    p.add_argument("--chat-template-config", default=None, metavar="JSON",
                   help="keyword arguments for the chat template as a JSON object, e.g. '{\"enable_thinking\": false}'")
    p.add_argument("--prefill-step-size", type=positive_int, default=None,
                   help="prompt tokens processed at a time; smaller lowers the peak memory of a long prompt "
                        "(default: from the memory plan)")


def prompt_settings(args) -> dict:
    """The tools and chat template arguments of `add_prompt_options`, read and checked (OptionsError)."""
    from moestream.runtime.frontends.prompt import load_tools, template_args

    return {"system_prompt": args.system_prompt, "tools": load_tools(args.tools) if args.tools else None,
            "chat_template_args": template_args(args.chat_template_config)}
