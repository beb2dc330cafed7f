"""Helpers shared by the test modules, imported as ``from tests.helpers.<module> import ...`` (no ``sys.path`` edits).

- ``tiny_models``: seeded random-weight tiny models of every supported family, one table row a family;
- ``word_tokenizer``: offline word-level tokenizers and documents over them (tiny, pruner and calibration variants);
- ``numerics``: the tolerance two computations of the same maths are compared within, and greedy-token checks;
- ``fault_catalogue``: the table-driven fault harness (``Fault`` / ``CliFault`` rows, ``check_fault``, ``run_cli``);
- ``hub_server``: an in-process fake Hugging Face Hub (its protocol in ``hub_protocol``, its repositories in
  ``hub_repos``); its ``hub_server`` fixture is registered by tests/conftest.py;
- ``scoring``: a criterion's scoring context over a whole model, as the pruner builds it;
- ``fresh_process``: saved checkpoints reloaded in a fresh process that cannot import diep_hub;
- ``console``: the ``diep-hub`` console script in a fresh process, and the examples of its help;
- ``cli_faults``: the CLI fault catalogue's run folder, setups and row check (fixtures registered by conftest.py);
- ``saving``, ``push_checkpoint``, ``card_inputs``, ``skipping_models``, ``calibration_files``: the shared inputs of
  the saving, push, model-card, expert-skipping and calibration-file test modules.

Models and servers are built inside tests and fixtures, never when a module is imported.
"""
