"""Downstream accuracy beside CE (`mergelab[lmeval]`): a sweep runs a tiny local lm-eval multiple-choice task
on the resident merged model, writing one accuracy row per task next to the CE rows."""

import pytest

from mergelab.demo.tasks import write_demo_tasks
from mergelab.errors import MergelabError
from mergelab.store import ResultStore
from mergelab.sweep.downstream import Downstream, Runner
from tests.test_sweep import cli


def test_demo_tasks_are_local_multiple_choice(tmp_path):
    import json

    names = write_demo_tasks(tmp_path, ["algebra", "code"], n_items=10)
    assert names == ["mergelab_mc_algebra", "mergelab_mc_code"]
    items = [json.loads(line) for line in (tmp_path / "mergelab_mc_code.jsonl").read_text().splitlines()]
    assert len(items) == 10 and all(len(i["choices"]) == 4 and len(set(i["choices"])) == 4 for i in items)
    assert all(0 <= i["answer"] < 4 for i in items)
    assert str(tmp_path / "mergelab_mc_code.jsonl") in (tmp_path / "mergelab_mc_code.yaml").read_text()
    spec = Downstream(tmp_path)
    assert spec.tasks == names and len(set(spec.hashes().values())) == 2
    with pytest.raises(MergelabError, match="not a demo domain"):
        write_demo_tasks(tmp_path, ["alpha"])
    with pytest.raises(MergelabError, match="no task YAML"):
        Downstream(tmp_path / "nothing" if (tmp_path / "nothing").mkdir() is None else tmp_path)


def test_a_sweep_writes_one_accuracy_row_per_task_beside_ce(tiny_family, tmp_path, capsys):
    import lm_eval  # noqa: F401  (requirements-dev.txt installs it: a missing one fails here, never skips)
    tasks = write_demo_tasks(tmp_path / "tasks", ["algebra", "code"], n_items=12)
    db = tmp_path / "r.duckdb"
    code, out, err = cli(capsys, "sweep", "--family", tiny_family, "--db", db, "--methods", "average", "--k", "1,2",
                         "--device", "cpu", "--downstream", tmp_path / "tasks", "--downstream-per-k", "1")
    assert code == 0, err
    rows = ResultStore(db).results()  # current rows: the accuracy rows are not stale beside the CE ones
    ce, acc = rows[rows["metric"] == "ce"], rows[rows["metric"] == "acc"]
    assert len(ce) == (1 + 3 + 3 + 3) * 3  # base, 3 experts, 3 singles and 3 pairs averaged, on 3 domains
    assert set(acc["domain"]) == set(tasks) and acc["higher_better"].all() and set(acc["unit"]) == {"fraction"}
    # --downstream-per-k 1: the first merge of each k (0, 1, 2), both tasks
    assert sorted(acc.groupby("k")["experts_key"].nunique().items()) == [(0, 1), (1, 1), (2, 1)]
    assert acc["loss"].between(0, 1).all() and set(acc["n_tokens"]) == {12}
    # the base's accuracy is what lm-eval gives the base checkpoint loaded on its own
    import torch
    from transformers import AutoModelForCausalLM

    base_path = tiny_family.parent / "s" / "base"
    model = AutoModelForCausalLM.from_pretrained(str(base_path), dtype=torch.float32)
    direct = Runner(Downstream(tmp_path / "tasks"), base_path).scores(model)
    cached = acc[acc["method"] == "base"].set_index("domain")["loss"]
    assert {t: cached[t] for t in tasks} == pytest.approx({t: v for t, (v, _) in direct.items()}, abs=1e-9)
    # fitted and exported like any metric; a rerun finds everything cached
    code, out, err = cli(capsys, "fit", "--db", db, "--domain", tasks[0], "--format", "csv")
    assert code == 0 and "acc" in out, err
    code, out, _ = cli(capsys, "sweep", "--family", tiny_family, "--db", db, "--methods", "average", "--k", "1,2",
                       "--device", "cpu", "--downstream", tmp_path / "tasks", "--downstream-per-k", "1")
    assert code == 0 and "0 rows written" in out
