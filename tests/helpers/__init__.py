"""Helpers shared by the test modules, imported as ``from tests.helpers.<module> import ...`` (no ``sys.path`` edits).

- ``tiny_models``: seeded random-weight tiny models of every supported family, one table row a family;
- ``word_tokenizer``: offline word-level tokenizers and documents over them (tiny, pruner and calibration variants);
- ``numerics``: the tolerance two computations of the same maths are compared within, and greedy-token checks;
- ``fault_catalogue``: the table-driven fault harness (``Fault`` / ``CliFault`` rows, ``check_fault``, ``run_cli``);
- ``hub_server``: an in-process fake Hugging Face Hub; its ``hub_server`` fixture is registered by tests/conftest.py.

Models and servers are built inside tests and fixtures, never when a module is imported.
"""
