"""Calibration files for the fault catalogues (test_faults_calibration_files.py, test_faults_preflight.py): documents
over the calibration vocabulary as JSON lines, whole or with one line broken."""

from __future__ import annotations

import json

from tests.helpers.word_tokenizer import make_documents

DOCS = make_documents(30, 10)


def documents_jsonl(docs: list[str] = DOCS, field: str = "text") -> bytes:
    """``docs`` as a JSON-lines file, one ``{field: document}`` object a line."""
    return "".join(json.dumps({field: d}) + "\n" for d in docs).encode("utf-8")


def jsonl_with_bad_line(number: int) -> bytes:
    """The JSON lines of DOCS with line ``number`` (from 1) replaced by invalid JSON."""
    lines = documents_jsonl().decode().splitlines()
    lines[number - 1] = '{"text": "w1 w2", }'
    return ("\n".join(lines) + "\n").encode()
