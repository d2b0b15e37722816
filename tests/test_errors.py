"""Errors keep their cause: one line by default, the original exception under MERGELAB_TRACEBACK=1."""

import pytest

from mergelab.errors import ManifestError, MergelabError
from mergelab.io.family import load_family
from mergelab.engine.methods import get_method
from mergelab.sweep.plan import parse_ks
from tests.test_sweep import cli


def test_one_line_by_default_and_the_cause_with_traceback(tmp_path, capsys, monkeypatch):
    missing = tmp_path / "nowhere" / "family.toml"
    code, _, err = cli(capsys, "sweep", "--family", missing, "--db", tmp_path / "r.duckdb")
    assert code == 2 and err.strip() == f"error: {missing}: family manifest not found"
    monkeypatch.setenv("MERGELAB_TRACEBACK", "1")
    with pytest.raises(ManifestError) as info:
        cli(capsys, "sweep", "--family", missing, "--db", tmp_path / "r.duckdb")
    assert isinstance(info.value.__cause__, FileNotFoundError)


def test_translated_errors_chain_their_cause(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("name = ")
    for call, cause in ((lambda: parse_ks("1-x", 9), ValueError), (lambda: get_method("nope"), KeyError),
                        (lambda: load_family(bad), ValueError)):
        with pytest.raises(MergelabError) as info:
            call()
        assert isinstance(info.value.__cause__, cause), info.value
