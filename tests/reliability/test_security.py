"""Security: pickles are never unpickled and remote code never runs, even when a checkpoint asks; filters
from the UI, URL and CLI cannot inject SQL; exports carry no absolute local paths."""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import pytest

from mergelab.export import read_provenance
from mergelab.store import ResultStore
from tests.helpers import build_tiny_family
from tests.test_app import PAGES, run
from tests.test_sweep import cli

pytestmark = pytest.mark.slow


class Payload:
    """Unpickling this runs os.system: the test fails if the marker file ever appears."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.fixture
def family(tmp_path) -> Path:
    return build_tiny_family(tmp_path / "fam")


def test_pickles_are_never_loaded(family, tmp_path, capsys, tally):
    expert = family.parent / "s" / "experts" / "beta"
    marker = tmp_path / "PWNED"
    for layout in ("pytorch_model.bin", "model.safetensors"):  # a .bin beside nothing, a pickle named .safetensors
        for old in expert.glob("*.safetensors"):
            old.unlink()
        (expert / layout).write_bytes(pickle.dumps(Payload(marker)))
        db = tmp_path / "r.duckdb"
        for args in (["sweep", "--family", family, "--methods", "average", "--db", db, "--device", "cpu"],
                     ["export-model", "--family", family, "--size", "s", "--experts", "alpha,beta", "--out", tmp_path / "m"]):
            code, _, err = cli(capsys, *args)
            assert code != 0 and str(expert) in err, err
        assert not marker.exists(), "a pickle was unpickled"
        (expert / layout).unlink()
        tally["security: malicious pickles refused"] += 1


def test_remote_code_in_a_tokenizer_never_runs(family, tmp_path, capsys, tally):
    marker = tmp_path / "PWNED"
    base = family.parent / "s" / "base"
    config = json.loads((base / "tokenizer_config.json").read_text())
    config["auto_map"] = {"AutoTokenizer": ["evil_tokenizer.EvilTokenizer", None]}
    (base / "tokenizer_config.json").write_text(json.dumps(config))
    (base / "evil_tokenizer.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n")
    code, _, err = cli(capsys, "sweep", "--family", family, "--methods", "average", "--db", tmp_path / "r.duckdb",
                       "--device", "cpu")
    assert not marker.exists(), "the tokenizer's custom code ran"
    assert "Traceback" not in err
    tally["security: remote code refused"] += 1


def test_no_code_path_turns_trust_remote_code_on():
    sources = Path(__file__).resolve().parents[2].joinpath("mergelab").rglob("*.py")
    assert not [p for p in sources if "trust_remote_code=True" in p.read_text()]


INJECTIONS = ["x' OR '1'='1", "tiny'; DROP TABLE results; --", "\" OR 1=1 --", "tiny%' --", "') UNION SELECT * FROM meta --"]


@pytest.fixture
def swept(family, tmp_path, capsys) -> Path:
    db = tmp_path / "r.duckdb"
    assert cli(capsys, "sweep", "--family", family, "--methods", "average", "--db", db, "--device", "cpu")[0] == 0
    return db


def test_sql_injection_through_the_cli_and_the_store(swept, capsys, tally):
    store = ResultStore(swept)
    rows, merges = store.count(), len(store.macro(family="tiny"))
    for text in INJECTIONS:
        for column in ("family", "method", "size", "domain"):
            assert store.results(**{column: text}).empty  # matched as a value, never as SQL
        assert len(store.macro(family=[text, "tiny"])) == merges
        code, out, err = cli(capsys, "results", "--db", swept, "--family", text, "--format", "csv")
        assert "Traceback" not in err and "average" not in out  # no rows leak out
        assert store.count() == rows
        tally["security: SQL injection attempts"] += 4 * 2 + 1
    name = swept.parent / "it's; DROP TABLE results; --.parquet"
    ResultStore(swept).export_parquet(name)
    assert ResultStore(swept.parent / "copy.duckdb").import_parquet(name) == rows


def test_sql_injection_through_the_dashboard_url(swept, monkeypatch, tmp_path, tally):
    monkeypatch.setenv("MERGELAB_DB", str(swept))
    monkeypatch.setenv("MERGELAB_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("MERGELAB_JOBS", str(tmp_path / "jobs.sqlite"))
    rows = ResultStore(swept).count()
    for page in PAGES:
        for text in INJECTIONS[:2]:
            run(page, family=text, methods=text, domain=text, size=text)  # run() asserts no exception
            tally["security: SQL injection attempts"] += 1
    assert ResultStore(swept).count() == rows


def test_exports_carry_no_absolute_local_paths(swept, family, tmp_path, capsys, tally):
    secret = str(tmp_path)
    outputs = []
    for what in ("fits", "joint", "results", "synergy", "plan"):
        for fmt in ("csv", "json", "latex", "parquet"):
            if what == "joint":
                continue  # one size: no joint law to export
            out = tmp_path / "exports" / f"{what}.{fmt}"
            out.parent.mkdir(exist_ok=True)
            code, _, err = cli(capsys, "export", "--what", what, "--format", fmt, "--out", out, "--db", swept)
            assert code == 0, err
            outputs.append(out)
    for fmt in ("json", "csv", "table"):
        code, out, _ = cli(capsys, "fit", "--db", swept, "--format", fmt)
        assert code == 0 and secret not in out
    model = tmp_path / "merged"
    assert cli(capsys, "export-model", "--family", family, "--size", "s", "--experts", "alpha,beta", "--out", model)[0] == 0
    outputs += [p for p in model.iterdir() if p.is_file()]
    for path in outputs:
        assert secret.encode() not in path.read_bytes(), path
    assert read_provenance(tmp_path / "exports" / "fits.csv")["families"] == ["tiny"]
    tally["security: export files checked for local paths"] += len(outputs)
