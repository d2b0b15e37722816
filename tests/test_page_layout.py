"""The Sweep and Import pages as a new user meets them (the walkthrough of 2026-11-30): settings in at most two
columns, readable adaptive quantities, fields greyed out where they do not apply, durations in seconds, family
names on job cards, families found under the allowed folders, one upload limit, user-facing preview columns."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from mergelab.sweep.jobs import JobQueue
from mergelab.sweep.plan import SweepJob, family_name
from mergelab.ui.dashboard import duration_text
from tests.helpers import build_tiny_family, serve_cache, synthetic_results
from tests.test_app import ROOT, run

SWEEP = ROOT / "pages" / "2_Sweep.py"


def shown(at) -> str:
    return " ".join(str(e.value) for kind in ("info", "caption", "markdown", "error", "warning", "success")
                    for e in getattr(at, kind))


@pytest.fixture
def walk(tmp_path, monkeypatch):
    """The walkthrough's setup: a family at ROOT/fam (a folder named unlike the family) under MERGELAB_ROOTS,
    an empty cache and a private home with no family in it."""
    family = build_tiny_family(tmp_path / "walk" / "fam", domains=("alpha", "beta", "gamma"))
    serve_cache(synthetic_results({"average": lambda k: 2.0}, ["a"]).iloc[:0], tmp_path, monkeypatch)
    monkeypatch.setenv("MERGELAB_ROOTS", str(tmp_path / "walk"))
    return family


def test_settings_use_at_most_two_columns():
    """Streamlit cannot see the viewport: four columns broke words per letter at 800 px."""
    tree = ast.parse(SWEEP.read_text())
    widths = [node.args[0] for node in ast.walk(tree) if isinstance(node, ast.Call)
              and getattr(node.func, "attr", "") == "columns" and node.args]
    assert widths, "the page lays out columns"
    for width in widths:
        count = len(width.elts) if isinstance(width, ast.List) else getattr(width, "value", None)
        if count is None:  # per_row: the name's value
            count = next(n.value.value for n in ast.walk(tree) if isinstance(n, ast.Assign)
                         and getattr(n.targets[0], "id", "") == width.id)
        assert count <= 2, ast.unparse(width)


def test_picker_finds_the_family_under_the_roots_and_cards_name_it(walk):
    at = run("pages/2_Sweep.py")
    assert at.selectbox(key="sweep-family").value == str(walk)  # found two folders below MERGELAB_ROOTS
    assert "**tiny** · 3 domains" in shown(at)
    JobQueue().submit(SweepJob(str(walk), {"average": {}}, ("s",), device="cpu"))
    at = run("pages/2_Sweep.py")
    cards = [m.value for m in at.markdown if m.value.startswith("**Job 1**")]
    assert cards and "· tiny · sizes s · average" in cards[0] and " fam " not in cards[0], cards


def test_no_family_says_where_it_looks_and_how_to_add_one(tmp_path, monkeypatch):
    serve_cache(synthetic_results({"average": lambda k: 2.0}, ["a"]).iloc[:0], tmp_path, monkeypatch)
    monkeypatch.setenv("MERGELAB_ROOTS", str(tmp_path / "elsewhere"))
    at = run("pages/2_Sweep.py")
    (message,) = [i.value for i in at.info if "No family yet" in i.value]
    assert str(tmp_path / "home") in message and str(tmp_path / "elsewhere") in message  # the allowed folders
    assert "MERGELAB_ROOTS" in message and "mergelab demo build" in message


def test_family_name_reads_the_manifest_and_falls_back_to_the_folder(tmp_path):
    (tmp_path / "fam").mkdir()
    (tmp_path / "fam" / "family.toml").write_text('name = "demo-micro"\n')
    assert family_name(str(tmp_path / "fam" / "family.toml")) == "demo-micro"
    assert family_name(str(tmp_path / "gone" / "family.toml")) == "gone"
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "family.toml").write_text("name = [unclosed\n")
    assert family_name(str(tmp_path / "bad" / "family.toml")) == "bad"


def test_adaptive_quantities_read_as_words_and_fields_grey_out(walk):
    at = run("pages/2_Sweep.py")
    quantity = at.selectbox(key="sweep-adaptive-quantity")
    assert quantity.options[:2] == ["L∞ (floor)", "k90 (experts to 90% of the gain)"], quantity.options
    assert quantity.disabled and at.text_input(key="sweep-adaptive-precision").disabled
    assert at.number_input(key="sweep-adaptive-budget").disabled
    assert at.number_input(key="sweep-n").disabled  # all subsets: N does not apply
    at.radio(key="sweep-subsets").set_value("N random per k").run()
    assert not at.number_input(key="sweep-n").disabled
    at.toggle(key="sweep-adaptive").set_value(True).run()
    assert not at.selectbox(key="sweep-adaptive-quantity").disabled and at.number_input(key="sweep-n").disabled
    assert at.radio(key="sweep-subsets").disabled
    at.selectbox(key="sweep-adaptive-quantity").set_value("k90")  # the value passed on is the target's name
    at.text_input(key="sweep-adaptive-precision").input("0.5")
    next(b for b in at.button if b.label == "Estimate").click().run()
    assert not at.error, [e.value for e in at.error]
    assert any("k90" in i.value for i in at.info), [i.value for i in at.info]


def test_a_tiny_sweeps_estimate_is_in_seconds(walk):
    at = run("pages/2_Sweep.py")
    next(b for b in at.button if b.label == "Estimate").click().run()
    (info,) = [i.value for i in at.info if "to run" in i.value]
    assert "about " in info and " s at 100 ms per merge" in info and "0.0 min" not in info, info


@pytest.mark.parametrize("seconds, text", [(None, "—"), (0, "0 s"), (0.4, "under 1 s"), (4.2, "4 s"),
                                           (89, "89 s"), (90, "1.5 min"), (750, "12.5 min"), (11_520, "3.2 h")])
def test_duration_text(seconds, text):
    assert duration_text(seconds) == text


# -- Import page ----------------------------------------------------------------------------------------


def test_upload_limit_has_one_source(monkeypatch):
    """The label said 50 MB while Streamlit's uploader said 200MB: both now follow MERGELAB_UPLOAD_MB."""
    import tomllib

    from mergelab.errors import MergelabError
    from mergelab.paths import UPLOAD_MB, streamlit_options, upload_limit_mb

    config = tomllib.loads((ROOT / ".streamlit" / "config.toml").read_text())
    assert config["server"]["maxUploadSize"] == UPLOAD_MB == upload_limit_mb() == 50  # a bare `streamlit run`
    assert "--server.maxUploadSize=50" in streamlit_options()
    monkeypatch.setenv("MERGELAB_UPLOAD_MB", "7")
    assert "--server.maxUploadSize=7" in streamlit_options() and upload_limit_mb() == 7
    for bad in ("lots", "0", "-3", "inf"):
        monkeypatch.setenv("MERGELAB_UPLOAD_MB", bad)
        with pytest.raises(MergelabError, match=f"MERGELAB_UPLOAD_MB='{bad}': not a positive number of MB"):
            upload_limit_mb()


def test_import_page_says_the_real_limit(tmp_path, monkeypatch):
    serve_cache(synthetic_results({"average": lambda k: 2.0}, ["a"]).iloc[:0], tmp_path, monkeypatch)
    at = run("pages/6_Import.py")
    labels = [w.label for w in at.get("file_uploader")]
    assert labels == ["Results files (up to 50 MB each)"], labels
    assert at.get("file_uploader")[0].proto.max_upload_size_mb == 50  # what the uploader itself says and enforces
    monkeypatch.setenv("MERGELAB_UPLOAD_MB", "7")
    at = run("pages/6_Import.py")
    assert at.get("file_uploader")[0].label == "Results files (up to 7 MB each)"
    assert at.get("file_uploader")[0].proto.max_upload_size_mb == 7
    monkeypatch.setenv("MERGELAB_UPLOAD_MB", "nope")
    at = run("pages/6_Import.py")
    assert "MERGELAB_UPLOAD_MB='nope'" in at.error[0].value


def test_preview_shows_user_facing_columns_only(tmp_path):
    from mergelab import importing

    mixed = tmp_path / "mixed.csv"
    mixed.write_text("family,size,method,hparams,experts,domain,metric,value\n"
                     'f,7B,ties,"{""density"": 0.5}",a+b,x,accuracy,0.5\n'
                     "g,7B,average,{},a,x,ce,2.5\n")
    table = importing.plan([mixed]).preview()
    assert list(table.columns) == ["family", "size", "method", "settings", "experts", "k", "domain", "metric", "value"]
    assert table["metric"].tolist() == ["accuracy (fraction)", "cross-entropy (nats/token)"]
    assert table["settings"].tolist()[1] == "" and table["experts"].tolist() == ["a + b", "a"]
    assert importing.plan([ROOT / "docs" / "examples" / "accuracy.csv"], family="q").preview(3).columns.tolist() \
        == ["size", "method", "experts", "k", "domain", "accuracy (fraction)"]


@pytest.mark.parametrize("header", ["model_size", "size_name", "Model_Size"])
def test_size_aliases_need_no_map(tmp_path, header):
    """docs/examples/accuracy.csv names its size column model_size: recognised without --map size=model_size."""
    from mergelab import importing

    path = tmp_path / "acc.csv"
    path.write_text(f"{header},subset,task,accuracy\n0.5B,algebra,gsm8k,0.4\n0.5B,algebra+code,gsm8k,0.5\n")
    rows = importing.plan([path], family="q").rows
    assert set(rows["size"]) == {"0.5B"} and set(rows["n_params"]) == {500_000_000}
    assert rows["experts_key"].tolist() == ["algebra", "algebra+code"]  # 'subset' still the experts


def test_the_no_count_note_is_a_sentence(tmp_path):
    """Was: "no n_params column and size(s) default name no count"."""
    from mergelab import importing

    path = tmp_path / "acc.csv"
    path.write_text("subset,task,accuracy\nalgebra,gsm8k,0.4\n")
    notes = importing.plan([path], family="q").notes
    (note,) = [n for n in notes if "n_params" in n]
    assert note == ("acc.csv: no n_params column, and the size name 'default' does not give a parameter count the way "
                    "'0.5B' or '125M' does, so n_params is 0. Curves and fits per size still work; the law across "
                    "sizes needs counts: add an n_params column or --set n_params=N (e.g. 500000000).")
    assert "acc.csv: no size column: size 'default'" in notes
    fixed = importing.plan([path], family="q", constants={"n_params": "500000000"})
    assert not [n for n in fixed.notes if "n_params" in n] and set(fixed.rows["n_params"]) == {500_000_000}
