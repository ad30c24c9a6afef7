"""The `moestream` command as a user meets it: help for every subcommand (a description, examples,
every option explained), --version, bad values refused by argparse, and the lazy imports that keep
the runtime's commands free of the preparation pipeline."""

from __future__ import annotations

import subprocess
import sys

import pytest

from moestream.cli import COMMANDS, command_parser, main


def test_version_and_the_command_list(capsys):
    import moestream

    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0 and capsys.readouterr().out.strip() == f"moestream {moestream.__version__}"
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    assert all(f"  {name} " in out for name in COMMANDS)


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_every_subcommand_has_a_description_examples_and_help_for_each_option(name, capsys):
    parser, module = command_parser(name)
    assert module.__doc__ and len(module.__doc__.split()) >= 8
    assert module.EXAMPLES.startswith("examples:\n") and f"moestream {name}" in module.EXAMPLES
    for action in parser._actions:
        assert action.help, f"moestream {name}: {action.dest} has no help"
    with pytest.raises(SystemExit):
        main([name, "--help"])
    text = capsys.readouterr().out
    assert "examples:" in text


def test_defaults_are_shown_and_zero_threads_refused(capsys):
    with pytest.raises(SystemExit):
        main(["generate", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "(default: 256)" in text and "(default: 0.0)" in text and "(default: lru)" in text
    with pytest.raises(SystemExit) as exit_:
        main(["generate", "b", "--prompt", "x", "--io-threads", "0"])
    assert exit_.value.code == 2 and "must be at least 1" in capsys.readouterr().err


def test_unknown_command_is_an_argparse_error(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["genrate"])
    assert exit_.value.code == 2 and "invalid choice" in capsys.readouterr().err


@pytest.mark.parametrize("argv", [["generate", "--help"], ["generate", "/nonexistent", "--prompt", "x"],
                                  ["inspect", "/nonexistent"], ["serve", "--help"]])
def test_runtime_commands_never_import_prefect(argv):
    code = ("import sys\nfrom moestream.cli import main\ntry:\n    main(%r)\nexcept SystemExit:\n    pass\n"
            "print('PREFECT' if any(m.split('.')[0] in ('prefect', 'dask') for m in sys.modules) else 'CLEAN')" % argv)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120).stdout
    assert out.strip().splitlines()[-1] == "CLEAN"


def test_inspect_speaks_human_sizes_and_the_budgets_a_bundle_runs_in(bundle_dir, capsys):
    import json

    import moestream

    bundle = bundle_dir("qwen3_moe")
    assert main(["inspect", str(bundle)]) == 0
    text = capsys.readouterr().out
    assert "{" not in text and " KB" in text and "at least" in text and "caches 25%" in text
    assert main(["inspect", str(bundle), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    memory = info["memory"]
    assert memory["minimum_bytes"] == moestream.plan_memory(bundle).minimum_bytes
    assert memory["for_cache_share"]["25%"] == moestream.plan_memory(bundle, expert_cache_share=0.25).budget_bytes
    assert memory["minimum_bytes"] <= memory["for_cache_share"]["10%"] < memory["for_cache_share"]["50%"]
