"""Operability: the model card of an exported merge (with the cached CE), an export that reads only the
chosen experts and checks memory first, -v/-q over the logging module, the worker's timestamped log,
progress bars on a terminal only, and `mergelab family init`."""

from __future__ import annotations

import json
import os
import pty
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from mergelab.io.family import load_family
from mergelab.store import ResultStore
from tests.helpers import build_tiny_family, save_checkpoint, synthetic_results, tiny_config, wait_until
from tests.test_sweep import cli

pytestmark = pytest.mark.slow


@pytest.fixture
def quiet_home(tmp_path, monkeypatch):
    """No default results cache (the user's own must never be read by a test)."""
    monkeypatch.setenv("MERGELAB_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("MERGELAB_DB", raising=False)
    monkeypatch.setenv("MERGELAB_JOBS", str(tmp_path / "jobs.sqlite"))


def _card(out: Path):
    from huggingface_hub import ModelCard

    return ModelCard.load(out / "README.md")


# --- item 9: exported models carry their story ----------------------------------------------------

def test_model_card_carries_method_experts_and_the_cached_ce(tiny_family, tmp_path, capsys, quiet_home):
    db = tmp_path / "r.duckdb"
    assert cli(capsys, "sweep", "--family", tiny_family, "--methods", "ties", "--hp", "ties.density=0.5", "--db", db,
               "--device", "cpu")[0] == 0
    out = tmp_path / "merged"
    code, stdout, err = cli(capsys, "export-model", "--family", tiny_family, "--size", "s", "--method", "ties",
                            "--hp", "ties.density=0.5", "--experts", "gamma,alpha", "--out", out, "--db", db)
    assert code == 0, err
    card = _card(out)
    info = card.data.to_dict()["mergelab"]
    assert info["method"] == "ties" and info["experts"] == ["gamma", "alpha"]
    assert json.loads(info["hparams"]) == {"density": 0.5, "lambda": 1.0}
    assert info["base"] == "s/base" and info["family"] == "tiny" and info["version"]
    assert info["n_params"] == load_family(tiny_family).sizes[0].n_params
    cached = ResultStore(db).results(method="ties", experts_key="alpha+gamma").set_index("domain")["loss"]
    assert len(cached) == 3
    for domain, loss in cached.items():
        assert info["measured_ce"][domain] == pytest.approx(loss, rel=1e-12, abs=0)
    assert info["measured_ce"]["macro"] == pytest.approx(cached.mean(), rel=1e-12)
    assert "tags" in card.data.to_dict() and "ties" in card.data.tags and card.data.library_name == "transformers"
    assert "merge_method: ties" in card.text and "density: 0.5" in card.text  # the mergekit config
    assert f"{cached.mean():.4f}" in card.text and f"macro {cached.mean():.4f}" in stdout
    assert str(tmp_path) not in (out / "README.md").read_text()  # no local paths in a card meant to be shared


def test_model_card_says_not_measured_without_current_rows(tiny_family, tmp_path, capsys, quiet_home):
    db = tmp_path / "r.duckdb"
    assert cli(capsys, "sweep", "--family", tiny_family, "--methods", "average", "--k", "2", "--db", db,
               "--device", "cpu")[0] == 0
    for name, args in (("no-cache", []), ("other-method", ["--method", "task_arithmetic", "--db", db]),
                       ("other-experts", ["--experts", "alpha,beta,gamma", "--db", db])):
        out = tmp_path / name
        base = ["export-model", "--family", tiny_family, "--size", "s", "--experts", "alpha,beta", "--out", out]
        code, _, err = cli(capsys, *base, *args)
        assert code == 0, err
        assert _card(out).data.to_dict()["mergelab"]["measured_ce"] == "not measured", name
        assert "Not measured." in _card(out).text and "CE not measured" in err
    assert _card(tmp_path / "other-method").data.to_dict()["mergelab"]["method"] == "task_arithmetic"
    # an expert replaced since the sweep: its cached rows describe another merge
    out = tmp_path / "measured"
    assert cli(capsys, "export-model", "--family", tiny_family, "--size", "s", "--experts", "alpha,beta", "--out", out,
               "--db", db)[0] == 0
    assert isinstance(_card(out).data.to_dict()["mergelab"]["measured_ce"], dict)
    size = load_family(tiny_family).sizes[0]
    state = load_file(size.base / "model.safetensors")
    state["lm_head.weight"] = state["model.embed_tokens.weight"]  # tied: not stored
    save_checkpoint(size.experts["beta"], tiny_config(), seed=99, noise=0.05, base_state=state)
    out = tmp_path / "replaced"
    code, _, err = cli(capsys, "export-model", "--family", tiny_family, "--size", "s", "--experts", "alpha,beta",
                       "--out", out, "--db", db)
    assert code == 0 and _card(out).data.to_dict()["mergelab"]["measured_ce"] == "not measured"
    assert "computed from other checkpoints" in err


def test_export_reads_only_the_chosen_experts(tiny_family, tmp_path, capsys, quiet_home):
    from mergelab.engine.session import ExpertPool

    size = load_family(tiny_family).sizes[0]
    db = tmp_path / "r.duckdb"
    assert cli(capsys, "sweep", "--family", tiny_family, "--methods", "average", "--k", "2", "--db", db,
               "--device", "cpu")[0] == 0
    # an unchosen expert whose file cannot be read at all (nor its header, nor a fingerprint of it)
    (size.experts["gamma"] / "model.safetensors").write_bytes(b"\x00garbage, not safetensors" * 10)
    out = tmp_path / "merged"
    code, _, err = cli(capsys, "export-model", "--family", tiny_family, "--size", "s", "--experts", "alpha,beta",
                       "--out", out, "--db", db)
    assert code == 0, err
    measured = _card(out).data.to_dict()["mergelab"]["measured_ce"]  # the cache lookup left gamma alone too
    assert measured["macro"] == pytest.approx(ResultStore(db).macro(experts_key="alpha+beta")["loss"].item(), rel=1e-12)
    merged = load_file(out / "model.safetensors")
    experts = [load_file(size.experts[e] / "model.safetensors") for e in ("alpha", "beta")]
    for name, tensor in merged.items():
        assert torch.allclose(tensor, (experts[0][name] + experts[1][name]) / 2, atol=1e-6), name
    pool = ExpertPool.load(size, experts=["beta", "alpha"])
    assert pool.expert_names == ("beta", "alpha") and sum(len(b) for b in pool.experts.buffers.values()) == 2  # memory for k, not M
    code, _, err = cli(capsys, "export-model", "--family", tiny_family, "--size", "s", "--experts", "alpha,gamma",
                       "--out", tmp_path / "with-gamma")
    assert code == 2 and str(size.experts["gamma"]) in err  # choosing it does read it


def test_export_refuses_when_memory_is_short(tiny_family, tmp_path, capsys, quiet_home, monkeypatch):
    monkeypatch.setenv("MERGELAB_MEMORY_LIMIT_GB", "0.00001")  # 10.5 KiB
    out, yaml = tmp_path / "merged", tmp_path / "m.yml"
    code, _, err = cli(capsys, "export-model", "--family", tiny_family, "--size", "s", "--experts", "alpha,beta",
                       "--out", out, "--mergekit-yaml", yaml)
    assert code == 2 and err.count("\n") == 1
    assert re.search(r"not exporting: the merge of 2 experts of size s on cpu: needs ~\d+ KiB, available 10\.5 KiB", err), err
    assert "MERGELAB_MEMORY_LIMIT_GB" in err
    assert not out.exists() and not yaml.exists() and not list(tmp_path.glob(".*partial*"))
    monkeypatch.setenv("MERGELAB_MEMORY_LIMIT_GB", "1")
    assert cli(capsys, "export-model", "--family", tiny_family, "--size", "s", "--experts", "alpha,beta",
               "--out", out)[0] == 0


# --- item 10: operability ---------------------------------------------------------------------------

def test_quiet_silences_info_lines_and_verbose_shows_debug(tiny_family, tmp_path, capsys, quiet_home):
    export = ["export-model", "--family", tiny_family, "--size", "s", "--experts", "alpha,beta"]
    code, out, err = cli(capsys, *export, "--out", tmp_path / "default")
    assert code == 0 and "reading the base and 2 of the 3 experts of size s" in err and "debug:" not in err
    assert out.startswith("wrote the average merge")  # the result stays on stdout
    code, out, err = cli(capsys, "-q", *export, "--out", tmp_path / "quiet")
    assert code == 0 and err == "" and out.startswith("wrote the average merge")
    code, out, err = cli(capsys, "--verbose", *export, "--out", tmp_path / "verbose")
    assert code == 0 and "debug: memory plan: size s on cpu: needs ~" in err and "reading the base" in err
    code, _, err = cli(capsys, "-v", "-q", "methods")
    assert code == 2 and err == "error: -v/--verbose and -q/--quiet: pick one\n"
    # warnings survive -q
    (tiny_family.parent / "eval" / "gamma.jsonl").rename(tmp_path / "gamma.jsonl")
    (tiny_family).unlink()
    code, _, err = cli(capsys, "-q", "family", "init", tiny_family.parent)
    assert code == 0 and err.startswith("warning: no eval set for domain 'gamma'")


WORKER_LINE = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} (DEBUG|INFO|WARNING|ERROR|CRITICAL) mergelab(\.\w+)*: \S")


def test_worker_log_lines_have_timestamps_and_levels(tiny_family, tmp_path):
    from mergelab.sweep.jobs import JobQueue
    from mergelab.sweep.plan import SweepJob
    from mergelab.sweep.worker import ensure_worker, worker_running

    queue = JobQueue(tmp_path / "q" / "jobs.sqlite")
    job_id = queue.submit(SweepJob(str(tiny_family), {"average": {}}, ks=(2,), db=str(tmp_path / "r.duckdb"),
                                   device="cpu"))
    assert ensure_worker(queue, idle_exit=0.5)  # the dashboard's way: stdout and stderr into worker.log
    assert wait_until(lambda: queue.get(job_id).status == "done", timeout=240), queue.get(job_id)
    assert wait_until(lambda: not worker_running(queue), timeout=60)
    lines = (queue.path.parent / "worker.log").read_text().splitlines()
    assert lines and all(WORKER_LINE.match(line) for line in lines), lines
    text = "\n".join(lines)
    assert re.search(r" INFO mergelab\.sweep\.worker: worker pid \d+ serving ", text)
    assert f"INFO mergelab.sweep.worker: job {job_id} started: family {tiny_family}" in text
    assert f"INFO mergelab.sweep.worker: job {job_id} done: 7 merges evaluated, 0 already cached, 21 rows written" in text
    assert "INFO mergelab.sweep.worker: queue empty for 0.5 s: exiting" in text
    second = subprocess.run([sys.executable, "-m", "mergelab", "worker", "--queue", queue.path, "--once"],
                            capture_output=True, text=True, timeout=120)  # the queue is free: runs, finds nothing
    assert second.returncode == 0 and all(WORKER_LINE.match(line) for line in second.stderr.splitlines())


def _on_a_terminal(args, timeout: float = 240) -> str:
    """Run `mergelab ARGS` with stderr on a pseudo-terminal (stdout a pipe); return what the terminal got."""
    import fcntl
    import struct
    import termios

    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))  # rows, columns: a real terminal's
    proc = subprocess.Popen([sys.executable, "-m", "mergelab", *map(str, args)], stdout=subprocess.PIPE,
                            stderr=slave, stdin=subprocess.DEVNULL)
    os.close(slave)
    chunks = []
    while True:
        try:
            data = os.read(master, 65536)
        except OSError:  # EIO: the child closed the terminal
            break
        if not data:
            break
        chunks.append(data)
    proc.wait(timeout=timeout)
    os.close(master)
    assert proc.returncode == 0, b"".join(chunks).decode(errors="replace")
    return b"".join(chunks).decode(errors="replace")


def test_progress_bars_on_a_terminal_only(tiny_family, tmp_path, quiet_home):
    db = tmp_path / "r.duckdb"
    ResultStore(db).upsert(synthetic_results({"average": lambda k: 2 + 1 / k}, ["a", "b", "c", "d", "e"]))
    fit = ["fit", "--db", db, "--bootstrap", "50", "--format", "csv"]
    assert "bootstrap fits (50 draws)" in _on_a_terminal(fit)
    assert "bootstrap fits" not in _on_a_terminal(["-q", *fit])
    piped = subprocess.run([sys.executable, "-m", "mergelab", *map(str, fit)], capture_output=True, text=True,
                           timeout=240)
    assert piped.returncode == 0 and "bootstrap" not in piped.stderr and "\r" not in piped.stderr
    export = ["export-model", "--family", tiny_family, "--size", "s", "--experts", "alpha,beta"]
    shown = _on_a_terminal([*export, "--out", tmp_path / "m1"])
    assert "read experts" in shown and "write" in shown and "Writing model shards" not in shown
    piped = subprocess.run([sys.executable, "-m", "mergelab", *map(str, export), "--out", str(tmp_path / "m2")],
                           capture_output=True, text=True, timeout=240)
    assert piped.returncode == 0 and "\r" not in piped.stderr and "read experts" not in piped.stderr
    assert "reading the base and 2 of the 3 experts" in piped.stderr


def test_the_dashboard_never_draws_progress_bars():
    """Bars draw only after the CLI's `configure`; nothing the dashboard runs calls it."""
    root = Path(__file__).resolve().parent.parent
    sources = [root / "app.py", *(root / "pages").glob("*.py"), *(root / "mergelab" / "ui").glob("*.py")]
    assert sources and not [p for p in sources if "configure(" in p.read_text() or "mergelab.logs" in p.read_text()]
    code = ("import sys; from mergelab.bars import asked_bar as progress_bar; from mergelab.logs import progress_enabled; "
            "assert not progress_enabled(); print(progress_bar(total=3).disable)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "True", out.stderr


def test_family_init_writes_a_manifest_load_family_accepts_and_a_sweep_runs(tmp_path, capsys, quiet_home):
    from mergelab.io.checkpoints import Checkpoint

    root = tmp_path / "fam"
    original = load_family(build_tiny_family(root))
    (root / "family.toml").unlink()
    shutil.copytree(root / "s", root / "t")  # a second size
    shutil.rmtree(root / "t" / "experts" / "gamma")  # with fewer experts
    (root / ".s.partial-1234").mkdir()  # a killed build's leftovers are not a size
    capsys.readouterr()  # what building the checkpoints printed
    code, out, err = cli(capsys, "family", "init", root)
    assert code == 0 and err == "", err
    n = Checkpoint(root / "s" / "base").n_params
    assert out == (f"wrote {root / 'family.toml'}: family 'fam', sizes s ({n:,} parameters, 3 experts), "
                   f"t ({n:,} parameters, 2 experts), domains alpha, beta, gamma\n")
    family = load_family(root)
    assert family.name == "fam" and family.size_names == ("s", "t") and family.domains == original.domains
    assert family.size("s").declared_n_params == n == original.sizes[0].n_params == family.size("s").n_params
    assert family.size("t").expert_names == ("alpha", "beta")
    assert family.eval_sets == original.eval_sets and family.size("s").experts == original.sizes[0].experts
    db = tmp_path / "r.duckdb"
    code, out, err = cli(capsys, "sweep", "--family", root, "--methods", "average", "--k", "2", "--db", db,
                         "--device", "cpu")
    assert code == 0, err
    assert len(ResultStore(db).macro(family="fam", method="average")) == 3 + 1  # C(3,2) in s, C(2,2) in t
    code, _, err = cli(capsys, "family", "init", root)
    assert code == 2 and "family.toml: already exists; pass --force" in err

    # an eval set missing: a placeholder, flagged in the manifest and on stderr; load_family names it
    (root / "eval" / "beta.jsonl").unlink()
    code, _, err = cli(capsys, "family", "init", root, "--force", "--name", "mine")
    assert code == 0 and "warning: no eval set for domain 'beta': family.toml names eval/beta.jsonl (marked MISSING)" in err
    text = (root / "family.toml").read_text()
    assert re.search(r'^beta = "eval/beta\.jsonl"  # MISSING: write this eval set', text, re.M)
    assert 'alpha = "eval/alpha.jsonl"\n' in text and 'name = "mine"' in text
    with pytest.raises(Exception, match=r"eval\.beta points at .*beta\.jsonl, which does not exist"):
        load_family(root)


def test_family_init_refuses_what_it_cannot_describe(tmp_path, capsys, quiet_home):
    root = tmp_path / "fam"
    build_tiny_family(root)
    (root / "family.toml").unlink()
    capsys.readouterr()
    cases = []
    bad_expert = root / "s" / "experts" / "a+b"
    bad_expert.mkdir()
    cases.append((root, "expert (domain) name 'a+b' contains '+'"))
    for folder, fragment in cases:
        code, _, err = cli(capsys, "family", "init", folder)
        assert code == 2 and fragment in err and err.count("\n") == 1, err
    bad_expert.rmdir()
    (root / "s" / "experts" / "delta").mkdir()  # not a checkpoint
    code, _, err = cli(capsys, "family", "init", root)
    assert code == 2 and str(root / "s" / "experts" / "delta") in err, err
    shutil.rmtree(root / "s" / "experts" / "delta")
    (root / "s" / "experts" / "beta" / "model.safetensors").write_bytes(b"\x08" + b"\x00" * 7 + b"{bad")
    code, _, err = cli(capsys, "family", "init", root)
    assert code == 2 and "beta" in err and "model.safetensors" in err, err
    assert not (root / "family.toml").exists()  # nothing written on a refusal
