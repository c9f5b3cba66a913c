"""A short pass of every fuzz target (tools/fuzz) inside `make test`, and every corpus input
(seeds and kept findings, tests/fuzz/corpus/TARGET/) replayed in-process as a regression test."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.fuzz.targets import TARGETS

REPO = Path(__file__).resolve().parent.parent.parent
CORPUS = REPO / "tests" / "fuzz" / "corpus"


@pytest.mark.parametrize("target", sorted(TARGETS))
def test_corpus_replays(target: str) -> None:
    files = sorted(p for p in (CORPUS / target).iterdir() if p.is_file())
    assert files, f"no corpus for {target}"
    for p in files:
        TARGETS[target](p.read_bytes())


@pytest.mark.parametrize("target", sorted(TARGETS))
def test_short_fuzz_pass(target: str) -> None:
    """A few thousand inputs (atheris when installed, else the mutation loop), a few seconds at most."""
    env = dict(os.environ, PYTHONPATH=str(REPO))
    p = subprocess.run([sys.executable, str(REPO / "tools" / "fuzz"), target, "--runs", "3000", "--seconds", "2",
                        "--seed", "1"], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert f"summary target={target}" in p.stdout
