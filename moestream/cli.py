"""The `moestream` command. Each subcommand is a module of moestream/commands, imported only when
it runs, so `moestream generate` starts fast and never imports the preparation pipeline (Prefect)."""

from __future__ import annotations

import argparse
import importlib
import os
import sys

# name -> one line for `moestream --help` (kept here so that listing them imports nothing)
COMMANDS = {
    "demo": "prepare the trained fixture MoE, then answer a tool call inside a small memory budget",
    "prepare": "turn a Hub repo id or checkpoint folder into a verified bundle",
    "generate": "generate text, streaming experts from disk inside a memory budget",
    "chat": "chat in the terminal (the model's chat template, multi-turn)",
    "serve": "OpenAI-compatible HTTP server (mlx-lm's) with streaming and tool calling",
    "inspect": "describe a bundle: family, experts, bits, sizes, bytes per token",
    "verify": "check a bundle's structure, every checksum, its model and tokenizer (exit code says)",
    "publish": "verify a bundle, write its model card, upload it to the Hub in one commit",
    "bench": "disclosed decode benchmark: disk ceiling, cold/warm tok/s, roofline, comparisons",
    "profile": "record which experts fire (and together) on calibration text; Parquet + PNG",
    "replay": "replay a routing trace through the real cache and reader, no compute",
    "eval": "quality against the source: KL, top-1, perplexity, tool-call validity",
    "sweep": "prepare and evaluate every expert-bits x experts-per-token combination",
    "synth": "write a random-weight MoE checkpoint in the Hub layout (tests, benchmarks)",
}
MAX_ERROR_CHARS = 2000


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Descriptions and examples as written; every option's default shown where it has one."""

    def _get_help_string(self, action):
        text = action.help or ""
        default = action.default
        if ("%(default)" in text or "default:" in text or default is None or default is False
                or default == argparse.SUPPRESS or not action.option_strings):
            return text
        return f"{text} (default: {str(default).replace('%', '%%')})"


def top_parser() -> argparse.ArgumentParser:
    from moestream import __version__

    width = max(map(len, COMMANDS))
    listing = "\n".join(f"  {name:<{width}}  {text}" for name, text in COMMANDS.items())
    p = argparse.ArgumentParser(
        prog="moestream", formatter_class=HelpFormatter,
        description="Run Mixture-of-Experts models larger than memory: prepare a bundle once, then stream the "
                    "routed experts from disk at inference.",
        epilog=f"commands:\n{listing}\n\n`moestream COMMAND --help` describes each, with examples.")
    p.add_argument("--version", action="version", version=f"moestream {__version__}")
    p.add_argument("command", metavar="COMMAND", choices=list(COMMANDS), help="one of the commands below")
    return p


def command_parser(name: str):
    """The parser of one subcommand and its module (imported now)."""
    module = importlib.import_module(f"moestream.commands.{name}")
    p = argparse.ArgumentParser(prog=f"moestream {name}", description=module.__doc__, epilog=module.EXAMPLES,
                                formatter_class=HelpFormatter)
    module.add_arguments(p)
    return p, module


def main(argv=None) -> int:
    try:
        try:
            return _main(argv)
        finally:
            sys.stdout.flush()  # a reader that went away shows here, rather than as a traceback at exit
    except BrokenPipeError:
        # `moestream ... | head`: the reader has what it wanted. As the Python docs advise, stdout goes
        # to devnull (the interpreter's last flush would fail again) and the exit code is a shell's
        # for a command ended by SIGPIPE.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141


def _main(argv=None) -> int:
    from moestream.common.errors import MoestreamError

    argv = list(sys.argv[1:] if argv is None else argv)
    split = next((i for i, a in enumerate(argv) if not a.startswith("-")), len(argv))
    top_parser().parse_args(argv[: split + 1])  # --help, --version, or an unknown command: exits here
    name = argv[split]
    parser, module = command_parser(name)
    args = parser.parse_args(argv[split + 1:])
    args.command = name
    try:
        code = module.run(args)
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        raise  # not an error of the command: see main
    except (MoestreamError, OSError) as e:  # expected failures: one clear line, no traceback
        if os.environ.get("MOESTREAM_DEBUG"):
            raise
        print(f"moestream {name}: error: {_one_line(e)}", file=sys.stderr)
        return 2
    return code or 0


def _one_line(e: BaseException) -> str:
    """The error in one line; an OSError from outside moestream with its file and cause."""
    if isinstance(e, OSError) and e.strerror and not str(e).startswith(("cannot", "[")) and e.filename:
        return f"{e.filename}: {e.strerror}"
    line = " ".join(str(e).split()) or type(e).__name__
    # a message quoting an untrusted file's value can be megabytes: one line means a readable one
    return line if len(line) <= MAX_ERROR_CHARS else f"{line[:MAX_ERROR_CHARS]}... ({len(line) - MAX_ERROR_CHARS} more characters)"


if __name__ == "__main__":
    sys.exit(main())
