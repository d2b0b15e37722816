"""`mergelab import`: results measured elsewhere, in each layout, into the cache — marked imported, checked
before anything is written, and round-tripping what `mergelab export --what results` writes."""

import json
import time

import pandas as pd
import pytest

from mergelab import importing
from mergelab.errors import MergelabError
from mergelab.store import ResultStore
from tests.helpers import synthetic_results
from tests.test_sweep import cli

LONG = """family,size,method,experts,domain,ce
demo,0.5B,average,a,x,2.70
demo,0.5B,average,a,y,2.80
demo,0.5B,average,"a,b",x,2.50
demo,0.5B,average,"a,b",y,2.60
demo,0.5B,average,"[""a"", ""b"", ""c""]",x,2.40
demo,0.5B,average,"[""a"", ""b"", ""c""]",y,2.50
demo,0.5B,average,b+c,x,2.55
demo,0.5B,average,b+c,y,2.65
"""


def imported(db):
    return ResultStore(db).results().sort_values(["experts_key", "domain"], ignore_index=True)


def test_long_layout_with_every_expert_list_spelling(tmp_path, capsys):
    src = tmp_path / "runs.csv"
    src.write_text(LONG)
    db = tmp_path / "r.duckdb"
    code, out, err = cli(capsys, "import", src, "--db", db)
    assert code == 0 and out.strip() == "imported 8 rows", err
    rows = imported(db)
    assert list(rows["experts_key"].unique()) == ["a", "a+b", "a+b+c", "b+c"]
    assert list(rows.drop_duplicates("experts_key")["k"]) == [1, 2, 3, 2]
    assert rows.loc[(rows["experts_key"] == "a+b+c") & (rows["domain"] == "y"), "loss"].item() == 2.5
    assert set(rows["n_params"]) == {500_000_000}  # read from the size's name
    assert set(rows["metric"]) == {"ce"} and set(rows["device"]) == {"imported"}
    digest = __import__("hashlib").sha256(src.read_bytes()).hexdigest()[:12]
    assert set(rows["eval_hash"]) == {f"import:runs.csv:{digest}"}
    code, out, _ = cli(capsys, "import", src, "--db", db)  # again: nothing new
    assert code == 0 and out.strip() == "imported 0 rows (8 already cached)"


@pytest.mark.parametrize("fmt", ["parquet", "jsonl", "tsv"])
def test_the_same_rows_from_parquet_json_lines_and_tsv(tmp_path, capsys, fmt):
    frame = pd.read_csv(pd.io.common.StringIO(LONG), dtype=str)
    src = tmp_path / f"runs.{fmt}"
    if fmt == "parquet":
        frame.assign(ce=frame["ce"].astype(float)).to_parquet(src)
    elif fmt == "jsonl":
        src.write_text("".join(json.dumps(r) + "\n" for r in frame.to_dict("records")))
    else:
        frame.to_csv(src, sep="\t", index=False)
    db = tmp_path / "r.duckdb"
    assert cli(capsys, "import", src, "--db", db)[0] == 0
    assert len(imported(db)) == 8 and imported(db)["loss"].sum() == pytest.approx(20.7)


def test_wide_layout_one_column_per_domain_with_a_mapping(tmp_path, capsys):
    src = tmp_path / "wide.csv"
    src.write_text("subset,algebra,code\na,2.7,3.1\na+b,2.5,2.9\na+b+c,2.4,2.8\n")
    db = tmp_path / "r.duckdb"
    code, out, err = cli(capsys, "import", src, "--db", db, "--family", "mine", "--map", "experts=subset",
                         "--set", "size=1.5B,method=ties")
    assert code == 0 and "wide: one column per domain" in err
    rows = imported(db)
    assert len(rows) == 6 and set(rows["domain"]) == {"algebra", "code"} and set(rows["method"]) == {"ties"}
    assert rows.loc[(rows["experts_key"] == "a+b") & (rows["domain"] == "code"), "loss"].item() == 2.9
    assert set(rows["n_params"]) == {1_500_000_000}


def paper_csv(path, values):
    """One merged model's results as the paper's code writes them: problem, CE Loss, class, then its means."""
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = ["problem,CE Loss,class"] + [f"{d},{v},{d}" for d, v in values.items()]
    mean = sum(values.values()) / len(values)
    path.write_text("\n".join(lines + [f"Avg.,{mean},average", f"Overall,{mean},overall"]) + "\n")
    return path


def test_the_papers_per_model_csvs_with_a_path_pattern(tmp_path, capsys):
    files = [paper_csv(tmp_path / "out" / f"qwen-0.5B_{m}" / "all" / "results.csv", {"algebra": 2.0 + i, "code": 3.0 + i})
             for i, m in enumerate(["algebra", "algebra+code", "algebra+code+geometry"])]
    db = tmp_path / "r.duckdb"
    code, out, err = cli(capsys, "import", *files, "--db", db, "--family", "qwen", "--set", "method=task_arithmetic",
                         "--pattern", r"qwen-(?P<size>[^_]+)_(?P<experts>[^/]+)/all/results\.csv$")
    assert code == 0, err
    assert "summary row(s) left out (Avg., Overall)" in err
    rows = imported(db)
    assert len(rows) == 6 and set(rows["domain"]) == {"algebra", "code"} and set(rows["size"]) == {"0.5B"}
    assert rows.loc[(rows["k"] == 3) & (rows["domain"] == "code"), "loss"].item() == 5.0
    assert set(rows["eval_hash"].str.rpartition(":")[0]) == {"import:results.csv+2 more"}  # one import, one eval set


def test_a_per_model_file_without_pattern_or_sidecar_is_refused(tmp_path, capsys):
    src = paper_csv(tmp_path / "results.csv", {"algebra": 2.0})
    code, _, err = cli(capsys, "import", src, "--db", tmp_path / "r.duckdb", "--family", "f")
    assert code == 2 and "results.csv: one file per merged model needs its experts" in err and "--pattern" in err


def test_lm_eval_results_with_a_sidecar_are_accuracy_rows(tmp_path, capsys):
    db = tmp_path / "r.duckdb"
    files = []
    for i, experts in enumerate([["a"], ["a", "b"], ["a", "b", "c"]]):
        folder = tmp_path / f"m{i}"
        folder.mkdir()
        (folder / "merge.json").write_text(json.dumps({"experts": experts, "method": "ties", "size": "7B"}))
        results = {"results": {"arc_easy": {"alias": "arc_easy", "acc,none": 0.5 + 0.1 * i, "acc_stderr,none": 0.01,
                                            "acc_norm,none": 0.4},
                               "hellaswag": {"acc,none": 0.3 + 0.05 * i, "acc_stderr,none": 0.02}},
                   "config": {"model": "hf"}}
        files.append(folder / "results_2026-11-30.json")
        files[-1].write_text(json.dumps(results))
    code, out, err = cli(capsys, "import", *files, "--db", db, "--family", "lm")
    assert code == 0 and "lm-eval results (acc)" in err, err
    rows = imported(db)
    assert set(rows["metric"]) == {"acc"} and rows["higher_better"].all() and set(rows["unit"]) == {"fraction"}
    assert rows.loc[(rows["k"] == 3) & (rows["domain"] == "arc_easy"), "loss"].item() == pytest.approx(0.7)
    code, _, err = cli(capsys, "fit", "--db", db, "--family", "lm", "--domain", "arc_easy", "--format", "csv")
    assert code == 0, err


def test_an_export_of_results_imports_unchanged(tmp_path, capsys):
    rows = synthetic_results({"average": lambda k: 2 + 1 / (k + 0.5)}, list("abcd"), domains=("x", "y"))
    acc = synthetic_results({"average": lambda k: 0.8 - 0.2 / (k + 0.5)}, list("abcd"), domains=("x",)).assign(
        metric="accuracy", higher_better=True, unit="fraction")
    source = tmp_path / "measured.duckdb"
    ResultStore(source).upsert(pd.concat([rows, acc], ignore_index=True))
    before = ResultStore(source).results()
    for fmt in ("csv", "parquet", "json"):
        out = tmp_path / f"results.{fmt}"
        code, _, err = cli(capsys, "export", "--what", "results", "--format", fmt, "--db", source, "--out", out)
        assert code == 0, err
        db = tmp_path / f"back-{fmt}.duckdb"
        code, _, err = cli(capsys, "import", out, "--db", db)
        assert code == 0, err
        after = ResultStore(db).results()
        same = ["family", "size", "n_params", "method", "hparams", "experts_key", "k", "domain", "loss", "n_tokens",
                "metric_version", "metric", "higher_better", "unit"]
        key = ["metric", "method", "experts_key", "domain"]
        left = before[same].sort_values(key, ignore_index=True)
        right = after[same].sort_values(key, ignore_index=True)
        pd.testing.assert_frame_equal(left, right, check_dtype=False)
        assert (after["eval_hash"].str.startswith(f"import:results.{fmt}:")).all()  # marked imported


BAD = [
    ("family,size,method,experts,domain,ce\nf,s,average,a,x,2.7\nf,s,average,a+b,x,oops\n",
     [], "bad.csv line 3, column 'ce': 'oops' is not a finite number"),
    ("family,size,method,experts,domain,ce\nf,s,average,a,x,2.7\nf,s,average,a+,x,2.5\n",
     [], "bad.csv line 3, column 'experts': 'a+': an empty expert name"),
    ("family,size,method,experts,domain,ce\nf,s,average,a,x,2.7\nf,s,average,a,x,2.5\n",
     [], "bad.csv line 3 repeats the merge, domain and metric of line 2: keep one"),
    ("size,method,experts,domain,ce\ns,average,a,x,2.7\n", [], "bad.csv: no family column: name the family with --family"),
    ("family,experts,domain,ce\nf,a,x,2.7\n", ["--map", "experts=subset"], "--map experts=subset: no column 'subset'"),
    ("family,experts,domain,ce\nf,a,x,2.7\n", ["--map", "expert=experts"], "--map 'expert': not a field"),
    ("family,experts,domain,bleu\nf,a,x,2.7\n", ["--map", "value=bleu", "--metric", "bleu"],
     "metric 'bleu' is not known"),
    ("family,experts,domain,ce\nf,a,mac+ro,2.7\n", [], "bad.csv line 2, column 'domain': 'mac+ro' contains '+'"),
    ("family,experts,k,domain,ce\nf,a+b,3,x,2.7\n", [], "bad.csv line 2, column 'k': k = '3' but the experts 'a+b' are 2"),
    ("family,experts,domain,ce\nf,a,x,2.7\n", ["--pattern", "(unclosed"], "--pattern '(unclosed': not a regular expression"),
    # a row longer than its header (pandas would read its first field as an index), after a provenance comment
    ("# exported\nfamily,experts,domain,ce\nf,a,x,2.7\nf,b,x,2.6,more\n", [], "bad.csv line 4: 5 fields, the header has 4"),
    # an unclosed quote swallows the rest of the file: named at the line where the row starts, not pandas' row count
    ("family,experts,domain,ce\nf,a,x,2.7\nf,\"b,x,2.6\nf,c,x,2.5\n", [], "bad.csv line 3: not a readable CSV row"),
]


@pytest.mark.parametrize("text,options,message", BAD)
def test_errors_name_file_line_and_column_and_write_nothing(tmp_path, capsys, text, options, message):
    db = tmp_path / "r.duckdb"
    ResultStore(db).upsert(synthetic_results({"average": lambda k: 2 + 1 / k}, list("ab"), domains=("x",)))
    before = ResultStore(db).count()
    src = tmp_path / "bad.csv"
    src.write_text(text)
    code, out, err = cli(capsys, "import", src, "--db", db, *options)
    assert code == 2 and message in err, err
    assert err.count("\n") == 1 and ResultStore(db).count() == before  # one line; nothing written


def test_a_bad_row_in_the_second_file_writes_nothing_of_the_first(tmp_path, capsys):
    good, bad = tmp_path / "good.csv", tmp_path / "bad.csv"
    good.write_text(LONG)
    bad.write_text("family,size,method,experts,domain,ce\ndemo,0.5B,average,d,x,nan\n")
    db = tmp_path / "r.duckdb"
    code, _, err = cli(capsys, "import", good, bad, "--db", db)
    assert code == 2 and "bad.csv line 2, column 'ce': 'nan' is not a finite number" in err
    assert ResultStore(db).count() == 0


def test_imported_rows_never_mix_with_measured_ones_under_the_same_key(tmp_path, capsys):
    db = tmp_path / "r.duckdb"
    measured = synthetic_results({"average": lambda k: 2 + 1 / k}, list("abc"), family="demo", size="0.5B",
                                 n_params=500_000_000, domains=("x", "y"))
    ResultStore(db).upsert(measured)
    src = tmp_path / "runs.csv"
    src.write_text(LONG)
    assert cli(capsys, "import", src, "--db", db)[0] == 0
    rows = ResultStore(db).results(include_stale=True, family="demo")
    current = rows[rows["stale"] == ""]
    assert (current["device"] != "imported").all() and len(current) == len(measured)  # the measured rows win
    shadowed = rows[rows["device"] == "imported"]
    assert len(shadowed) == 8 and shadowed["stale"].str.contains("another import or measured eval set").all()
    # accuracy imported beside the measured CE is current: another metric, its own curve
    acc = tmp_path / "acc.csv"
    acc.write_text(LONG.replace(",ce\n", ",accuracy\n"))
    assert cli(capsys, "import", acc, "--db", db)[0] == 0
    now = ResultStore(db).results(family="demo")
    assert sorted(now["metric"].unique()) == ["accuracy", "ce"] and (now["metric"] == "accuracy").sum() == 8


def test_importing_100k_rows_takes_seconds(tmp_path, capsys):
    """Closing-note number: 100,000 rows (10,000 merges × 10 domains) from CSV into a fresh cache."""
    import itertools

    experts = [f"e{i}" for i in range(16)]
    subsets = list(itertools.islice((c for k in range(1, 7) for c in itertools.combinations(experts, k)), 10_000))
    domains = [f"d{i}" for i in range(10)]
    frame = pd.DataFrame([(
        "+".join(s), d, 2 + 1 / len(s) + 0.001 * j) for s in subsets for j, d in enumerate(domains)],
        columns=["experts", "domain", "ce"]).assign(family="big", size="7B", method="average")
    src = tmp_path / "big.csv"
    frame.to_csv(src, index=False)
    db = tmp_path / "r.duckdb"
    start = time.perf_counter()
    code, out, err = cli(capsys, "import", src, "--db", db)
    took = time.perf_counter() - start
    assert code == 0 and out.strip() == "imported 100000 rows", err
    assert ResultStore(db).count() == 100_000
    print(f"\nimporting 100k rows from CSV: {took:.1f} s")
    assert took < 120  # measured about 10 s on 2 shared cores


def test_the_readme_examples(tmp_path, capsys):
    """README, "Bring your own results": the paper's per-model CSVs, then accuracy beside them, fitted."""
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent / "docs" / "examples"
    db = tmp_path / "r.duckdb"
    files = sorted((root / "paper_results").glob("*/all/results.csv"))
    assert len(files) == 15
    code, out, err = cli(capsys, "import", *files, "--db", db, "--family", "qwen2.5", "--pattern",
                         r"Qwen2.5-(?P<size>[^_]+)__(?P<method>.+?)__(?P<experts>[^/]+)/all/results\.csv$")
    assert code == 0 and out.strip() == "imported 60 rows" and "15 files: per model: one row per domain" in err
    assert "2 summary row(s) left out (Avg., Overall) (× 15)" in err
    # the README's own accuracy line: model_size is recognised as the size without --map
    import shlex

    readme = (root.parent.parent / "README.md").read_text()
    (line,) = [x for x in readme.splitlines() if x.startswith("mergelab import docs/examples/accuracy.csv")]
    args = shlex.split(line)[2:]
    assert "--map" not in args
    code, out, err = cli(capsys, "import", root.parent.parent / args[0], "--db", db, *args[1:])
    assert code == 0 and out.strip() == "imported 30 rows", err
    accuracy = ResultStore(db).results().query("metric == 'accuracy'")
    assert set(accuracy["size"]) == {"0.5B"} and set(accuracy["n_params"]) == {500_000_000}
    code, out, err = cli(capsys, "fit", "--db", db, "--family", "qwen2.5", "--domain", "macro", "--format", "csv")
    assert code == 0, err
    fits = pd.read_csv(pd.io.common.StringIO(out), comment="#").set_index("metric")
    assert fits.loc["ce", "L_inf"] == pytest.approx(0.560, abs=0.001) and fits.loc["ce", "b"] == pytest.approx(1.87, abs=0.01)
    assert fits.loc["accuracy", "formula"] == "C − A/(k+b)" and 0.45 < fits.loc["accuracy", "L_inf"] < 0.55
    out_file = tmp_path / "fits.csv"
    assert cli(capsys, "export", "--what", "fits", "--db", db, "--family", "qwen2.5", "--format", "csv",
               "--out", out_file)[0] == 0
    assert out_file.read_text().startswith("# provenance: ")


def test_the_results_command_csv_imports_too(tmp_path, capsys):
    """`mergelab results --format csv` prints the expert list as a Python list literal: read as a literal."""
    source = tmp_path / "measured.duckdb"
    ResultStore(source).upsert(synthetic_results({"average": lambda k: 2 + 1 / k}, list("abc"), domains=("x",)))
    out = tmp_path / "rows.csv"
    assert cli(capsys, "results", "--db", source, "--format", "csv", "--out", out)[0] == 0
    assert "\"['a', 'b']\"" in out.read_text()
    code, printed, err = cli(capsys, "import", out, "--db", tmp_path / "back.duckdb")
    assert code == 0 and printed.strip() == f"imported {ResultStore(source).count()} rows", err


def test_a_toml_mapping_and_a_declared_metric(tmp_path, capsys):
    src = tmp_path / "bleu.csv"
    src.write_text("run,subset,task,score\nr1,a,wmt,20.5\nr1,a+b,wmt,22.0\nr1,a+b+c,wmt,23.1\n")
    mapping = tmp_path / "map.toml"
    mapping.write_text('[map]\nexperts = "subset"\ndomain = "task"\nvalue = "score"\n')
    db = tmp_path / "r.duckdb"
    code, out, err = cli(capsys, "import", src, "--db", db, "--family", "mt", "--map", mapping,
                         "--metric", "bleu:higher:points")
    assert code == 0 and out.strip() == "imported 3 rows", err
    rows = imported(db)
    assert set(rows["metric"]) == {"bleu"} and rows["higher_better"].all() and set(rows["unit"]) == {"points"}
    assert list(rows["loss"]) == [20.5, 22.0, 23.1]
    code, out, _ = cli(capsys, "import", src, "--db", db, "--family", "mt", "--map", mapping, "--metric", "bleu:higher",
                       "--dry-run")
    assert code == 0 and "would import 3 rows (dry run: nothing written)" in out
