"""`diep-hub --help`: every command shows examples that parse as written, the prune flags come from the option
models, and importing diep_hub or building the parser loads no heavy module."""

from __future__ import annotations

import subprocess
import sys

import pytest

from diep_hub.cli import build_parser, main
from tests.helpers.console import ROOT, help_examples

pytestmark = pytest.mark.usefixtures("private_cache")


@pytest.mark.parametrize("command", ["run", "prune", "eval", "card", "push", "inspect", "reproduce", "env"])
def test_every_command_has_examples_in_its_help(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "examples:" in out and f"diep-hub {command}" in out


def test_top_level_help_lists_commands(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--help"])
    out = capsys.readouterr().out
    for command in ("run", "prune", "eval", "card", "push", "inspect", "reproduce", "env"):
        assert command in out
    assert "diep-hub run recipes/tiny.yaml" in out


def test_prune_flags_come_from_the_option_models(capsys):
    """Every prune flag's default is its recipe field's (the search's left unset, so the recipe's own applies), and
    ``--method``'s help lists the criteria registry."""
    from diep_hub.cli.parser import PRUNE_FLAGS, UNSET_BY_DEFAULT, recipe_field
    from diep_hub.criteria import available_criteria

    args = build_parser().parse_args(["prune", "m", "--output", "o"])
    for flag, path in PRUNE_FLAGS.items():
        model, name = recipe_field(path)
        value = getattr(args, flag.removeprefix("--").replace("-", "_"))
        assert value == (None if flag in UNSET_BY_DEFAULT else model.model_fields[name].default), flag
    defaults = (args.sparsity, args.method, args.batch_size, args.seed, args.num_samples)
    assert defaults == (0.5, "validated_choice", 16, 0, 128)
    assert (args.dataset, args.dataset_config, args.data_file, args.search_mode) == ("allenai/c4", "en", None, None)
    with pytest.raises(SystemExit):
        main(["prune", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "one of: " + ", ".join(available_criteria()) + " (default: validated_choice)" in help_text
    assert "--search-mode SEARCH_MODE" in help_text and "one of: auto, gated, dense (default: auto)" in help_text


IMPORTED_HEAVY = (
    "import sys; {code}; "
    "print(sorted(m for m in ('torch','transformers','lm_eval','matplotlib','datasets') if m in sys.modules))"
)


@pytest.mark.parametrize("code", ["import diep_hub", "import diep_hub.cli; diep_hub.cli.build_parser()"],
                         ids=["import", "build-parser"])
def test_import_and_help_load_no_heavy_module(code):
    """``import diep_hub`` and building the CLI parser (``diep-hub --help``) import none of torch, transformers,
    lm-eval, matplotlib or datasets: the public names are lazy and the commands import what they use."""
    proc = subprocess.run([sys.executable, "-c", IMPORTED_HEAVY.format(code=code)], capture_output=True, text=True,
                          timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip() == "[]"


def test_import_registers_the_auto_classes_once_transformers_is_loaded():
    """README: ``import diep_hub; AutoModelForCausalLM.from_pretrained(path)`` needs no remote code. With
    transformers already imported, ``import diep_hub`` registers the diep_* classes; a lazy public name that
    loads the modeling code (``prune_experts``) registers them too."""
    script = (
        "import sys\n"
        "first = sys.argv[1] == 'transformers-first'\n"
        "if first:\n    import transformers\n"
        "import diep_hub\n"
        "from transformers.models.auto.configuration_auto import CONFIG_MAPPING\n"
        "before = 'diep_mixtral' in CONFIG_MAPPING\n"
        "diep_hub.prune_experts\n"
        "print(before, 'diep_mixtral' in CONFIG_MAPPING)\n"
    )
    results = {}
    for order in ("transformers-first", "diep-hub-first"):
        proc = subprocess.run([sys.executable, "-c", script, order], capture_output=True, text=True, timeout=300,
                              cwd=ROOT)
        assert proc.returncode == 0, proc.stderr[-3000:]
        results[order] = proc.stdout.split()
    assert results == {"transformers-first": ["True", "True"], "diep-hub-first": ["False", "True"]}




def test_every_help_example_parses_with_the_flags_it_shows():
    """Each `diep-hub ...` example of every epilog (main and subcommands) is accepted by the parser as written: an
    example naming a flag that does not exist (`eval ... --json` once) fails here."""
    from diep_hub.cli.parser import build_parser

    parser = build_parser()
    examples = help_examples()
    assert len(examples) >= 15
    for argv in examples:
        if argv in (["--version"], ["--help"]):
            continue
        namespace = parser.parse_args(argv)  # exits (SystemExit) on an unknown flag or a bad value
        assert callable(namespace.func), argv
    commands = {argv[0] for argv in examples if not argv[0].startswith("-")}
    assert {"run", "prune", "eval", "card", "push", "inspect", "reproduce", "env"} <= commands
