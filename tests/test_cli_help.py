"""`krona --help` and every subcommand's: text for every option, a default where there is one, examples; the
parser built from one module per group; the old spellings of renamed options still accepted."""

import argparse
import subprocess
import sys
from pathlib import Path

import pytest

from services.cli.commands import add_leaf, command_doc
from services.cli.main import build_parser

ROOT = Path(__file__).resolve().parents[1]


def _commands(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()):
    """(path, parser) of every command that runs something (the leaves of the tree)."""
    subparsers = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not subparsers:
        yield path, parser
        return
    for action in subparsers:
        seen = set()
        for name, child in action.choices.items():
            if id(child) in seen:  # an alias
                continue
            seen.add(id(child))
            yield from _commands(child, (*path, name))


COMMANDS = list(_commands(build_parser()))
CLIENT_GROUPS = ("trainings", "adapters", "generations", "batches", "api-keys", "usage", "webhook-secret",
                 "capabilities", "tenants")  # fmt: skip


def test_every_api_operation_has_a_command():
    paths = {" ".join(path) for path, _ in COMMANDS}
    expected = {
        "trainings create", "trainings get", "trainings list", "trainings wait", "trainings cancel",
        "trainings delete", "trainings events",
        "adapters list", "adapters get", "adapters download", "adapters upload", "adapters delete",
        "adapters evaluate",
        "generations create", "generations get", "generations list", "generations wait", "generations cancel",
        "generations delete", "generations download",
        "batches create", "batches get", "batches list", "batches wait", "batches cancel", "batches download",
        "api-keys create", "api-keys list", "api-keys revoke", "usage", "webhook-secret rotate", "capabilities",
        "tenants create", "tenants list", "tenants get", "tenants update", "tenants delete",
        # the commands other tests, the images and the deployment run
        "up", "demo", "gateway", "worker", "migrate", "train", "generate", "eval", "export", "import", "inspect",
        "count", "models path", "admin create-tenant", "admin rotate-webhook-secret", "admin create-admin-key",
        "admin create-key", "admin list-keys", "admin revoke-key", "admin list-tenants", "admin set-limits",
        "admin delete-tenant", "admin usage", "admin sweep",
    }  # fmt: skip
    assert expected <= paths, sorted(expected - paths)


@pytest.mark.parametrize(("path", "parser"), COMMANDS, ids=[" ".join(p) for p, _ in COMMANDS])
def test_every_option_has_help_and_the_command_has_examples(path, parser):
    undocumented = [
        "/".join(action.option_strings) or action.dest
        for action in parser._actions
        if action.help != argparse.SUPPRESS and not isinstance(action, argparse._HelpAction) and not action.help
    ]
    assert not undocumented, f"krona {' '.join(path)}: options without help: {undocumented}"
    text = parser.format_help()
    assert (parser.description and "examples:\n  krona " in text) or path[0] == "models", text
    # A default the help does not state is added by the formatter: "(default: …)".
    for action in parser._actions:
        shown = action.default not in (None, False, True, argparse.SUPPRESS, [], "") and action.option_strings
        if shown and action.help != argparse.SUPPRESS:
            assert "default" in parser._get_formatter()._expand_help(action), action.option_strings


@pytest.mark.parametrize("group", CLIENT_GROUPS)
def test_client_commands_take_url_key_and_output(group):
    for path, parser in COMMANDS:
        if path[0] != group:
            continue
        options = {s for a in parser._actions for s in a.option_strings}
        assert {"--url", "--api-key", "--data-dir"} <= options, path


def test_help_is_quick_and_loads_neither_torch_nor_the_sdk():
    code = (
        "import sys; from services.cli.main import build_parser; build_parser(); "
        "print('torch' in sys.modules, 'krona_sdk' in sys.modules, 'httpx' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.split() == ["False", "False", "False"]
    result = subprocess.run(
        [sys.executable, "-m", "services.cli.main", "trainings", "create", "--help"],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert result.returncode == 0 and "--learning-rate" in result.stdout and "--lr" not in result.stdout


def test_renamed_options_keep_their_old_spelling_unlisted():
    parser = build_parser()
    args = parser.parse_args(
        ["train", "--base", "tiny-sd", "--images", "x", "--prompt", "p", "--out", "o", "--lr", "5e-4",
         "--grad-accum", "2", "--flip", "--targets", "to_q,to_v", "--rank", "8"]
    )  # fmt: skip
    assert (args.learning_rate, args.gradient_accumulation, args.random_flip) == (5e-4, 2, True)
    assert args.target_modules == ["to_q", "to_v"] and args.lora_rank == 8
    args = parser.parse_args(["generate", "--base", "b", "--prompt", "p", "--out", "o", "--scale", "0.5"])
    assert args.adapter_scale == 0.5
    args = parser.parse_args(["count", "--targets", "to_q"])
    assert args.target_modules == "to_q"
    new = parser.parse_args(
        ["trainings", "create", "--images", "x", "--prompt", "p", "--learning-rate", "5e-4",
         "--gradient-accumulation", "2", "--random-flip", "--target-modules", "to_q"]
    )  # fmt: skip
    old = parser.parse_args(
        ["trainings", "create", "--images", "x", "--prompt", "p", "--lr", "5e-4", "--grad-accum", "2", "--flip",
         "--targets", "to_q"]
    )  # fmt: skip
    from services.cli.params import training_params

    assert (
        training_params(new)
        == training_params(old)
        == {
            "learning_rate": 5e-4,
            "gradient_accumulation": 2,
            "random_flip": True,
            "target_modules": ["to_q"],
        }
    )


def test_training_option_names_are_the_apis_params():
    from services.cli.params import TRAINING_PARAMS
    from services.gateway.services.trainings import CLIENT_PARAMS
    from shared.training_spec import TrainingSpec

    names = {name for name, *_ in TRAINING_PARAMS}
    assert names <= set(TrainingSpec.model_fields) and names | {"evaluate"} <= CLIENT_PARAMS


def test_a_command_takes_its_help_description_and_examples_from_its_handlers_docstring():
    def handler(args):
        r"""do the thing to one thing
        over two lines

        What it does, at length.

        A second paragraph.

        Examples:
            krona thing do x
            krona thing do y \
                --long option
        """

    help, description, examples = command_doc(handler)
    assert help == "do the thing to one thing over two lines"
    assert description == "What it does, at length.\n\nA second paragraph."
    assert examples == ["krona thing do x", "krona thing do y \\", "    --long option"]

    def terse(args):
        """just a help line"""

    assert command_doc(terse) == ("just a help line", None, [])
    parser = add_leaf(argparse.ArgumentParser().add_subparsers(), "do", handler)
    assert parser.description == description and "examples:\n  krona thing do x\n" in parser.epilog
    assert add_leaf(argparse.ArgumentParser().add_subparsers(), "t", terse).description == "Just a help line."
    with pytest.raises(TypeError, match="needs a docstring"):
        add_leaf(argparse.ArgumentParser().add_subparsers(), "x", lambda args: 0)
    # Given help wins over the docstring (handlers every collection shares have none of their own).
    given = add_leaf(argparse.ArgumentParser().add_subparsers(), "y", handler, help="other", examples=["krona y"])
    assert given.description == "Other." and given.epilog == "examples:\n  krona y"
