"""Exports a paper can use: the compact LaTeX table (compiled with pdflatex and parsed for its structure),
the full tables kept for CSV/JSON/Parquet, figures written through kaleido and Chromium (PNG pixel size,
PDF with embedded fonts, SVG), and the example notebook run end to end."""

from __future__ import annotations

import itertools
import json
import os
import re
import shutil
import struct
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from mergelab.export import read_provenance
from mergelab.paper import escape, number, si_params
from mergelab.store import ResultStore
from tests.test_sweep import cli

ROOT = Path(__file__).resolve().parent.parent
EXPERTS = ["e1", "e2", "e3", "e4", "e5", "e6"]
SIZES = {"a_1": 1_000_000, "b_4": 4_000_000, "c_16": 16_000_000}
FAMILY = "syn_%&#"           # every character LaTeX treats specially that a family name may hold
DOMAINS = {"x_y": 0.0, "q#z": 0.1}


@pytest.fixture(scope="module")
def db(tmp_path_factory):
    """Three sizes, two domains, all 63 subsets of 6 experts; loss from L* + B N^-0.3 + 0.2/(k+0.4) plus noise,
    under names with _ % & #."""
    rng = np.random.default_rng(0)
    rows = []
    for size, n in SIZES.items():
        for k in range(0, 7):
            for subset in itertools.combinations(EXPERTS, k):
                for domain, shift in DOMAINS.items():
                    loss = 0.3 + shift + 0.01 * (n / 1e9) ** -0.3 + (0.2 / (k + 0.4) if k else 0.5) + rng.normal(0, 0.002)
                    rows.append({"family": FAMILY, "size": size, "n_params": n, "method": "task_arithmetic" if k else "base",
                                 "hparams": "{}", "experts_key": "+".join(subset), "domain": domain, "loss": loss,
                                 "n_tokens": 100, "eval_hash": f"h{domain}", "metric_version": 1, "device": "cpu"})
    path = tmp_path_factory.mktemp("paper") / "syn.duckdb"
    ResultStore(path).upsert(pd.DataFrame(rows))
    return path


# -- LaTeX structure --------------------------------------------------------------------------------------

def split_cells(row: str) -> list[str]:
    return [c.strip() for c in re.split(r"(?<!\\)&", row)]


def balanced(text: str) -> bool:
    depth = 0
    for ch in re.sub(r"\\[{}$]", "", text):
        depth += {"{": 1, "}": -1}.get(ch, 0)
        if depth < 0:
            return False
    return depth == 0


def check_latex(text: str) -> tuple[list[str], list[list[str]], str]:
    """Assert the structure a paper needs and return (header cells, body rows as cells, caption)."""
    assert text.isascii(), sorted({c for c in text if not c.isascii()})
    assert "\\u03b2" not in text and "\\u221e" not in text
    assert text.startswith("% provenance: ") and "booktabs" in text.splitlines()[1]
    body = text.split("\\begin{table}", 1)[1]
    assert '"' not in body and "[[" not in body and "{'" not in body, "JSON or Python reprs in a cell"
    for rule in ("\\toprule", "\\midrule", "\\bottomrule"):
        assert rule in body
    assert balanced(body)
    align = re.search(r"\\begin\{tabular\}\{([lrc]+)\}", body).group(1)
    header_part, rest = body.split("\\toprule", 1)[1].split("\\midrule", 1)
    header = split_cells(header_part.strip().removesuffix("\\\\"))
    assert len(header) == len(align), (header, align)
    rows = []
    for line in rest.split("\\bottomrule")[0].splitlines():
        line = line.strip()
        if not line or line == "\\midrule":
            continue
        assert line.endswith("\\\\"), line
        cells = split_cells(line.removesuffix("\\\\"))
        assert len(cells) == len(align), (line, align)
        for cell in cells:
            assert re.sub(r"\\\$", "", cell).count("$") % 2 == 0, cell
            for math in re.findall(r"\$([^$]*)\$", cell):
                for token in re.findall(r"\d+\.\d+", math):  # 3-4 significant digits, never 16
                    assert len(token.replace(".", "").lstrip("0")) <= 4, (token, cell)
        rows.append(cells)
    caption = re.search(r"\\caption\{(.*)\}\n\\label", body, re.S).group(1)
    assert balanced(caption)
    return header, rows, caption


def compile_latex(tables: list[str], where: Path) -> Path:
    """Compile `tables` in one article with pdflatex; returns the PDF. .ci/run installs TeX (Debian's
    texlive-latex-base and texlive-latex-recommended, which holds booktabs)."""
    pdflatex = shutil.which("pdflatex")
    assert pdflatex, "pdflatex not found: apt-get install texlive-latex-base texlive-latex-recommended (.ci/run does)"
    for i, table in enumerate(tables):
        (where / f"t{i}.tex").write_text(table)
    inputs = "\n".join(f"\\input{{t{i}.tex}}\\clearpage" for i in range(len(tables)))
    (where / "doc.tex").write_text("\\documentclass{article}\n\\usepackage{booktabs}\n\\begin{document}\n"
                                   f"{inputs}\n\\end{{document}}\n")
    proc = subprocess.run([pdflatex, "-interaction=nonstopmode", "-halt-on-error", "-no-shell-escape", "doc.tex"],
                          cwd=where, capture_output=True, text=True, timeout=300)
    log = (where / "doc.log").read_text(errors="replace") if (where / "doc.log").exists() else proc.stdout
    assert proc.returncode == 0, log[-3000:]
    assert "Missing character" not in log and "Undefined control sequence" not in log
    return where / "doc.pdf"


def test_escape_numbers_and_sizes():
    assert escape("syn_%&#$") == r"syn\_\%\&\#\$"
    assert escape("a{b}~^\\") == r"a\{b\}\textasciitilde{}\textasciicircum{}\textbackslash{}"
    assert escape("L∞ β −1 · é") == r"L$\infty$ $\beta$ $-$1 $\cdot$ \'{e}"
    assert escape("日").isascii() and escape("tab\there\x07") == "tab here"
    assert number(-0.00001234) == r"$-1.234\times 10^{-5}$" and number(float("nan")) == "--" and number(12.0) == "$12$"
    assert number(0.123456789) == "$0.1235$"
    assert [si_params(n) for n in (7376, 625_000, 999_600, 1.5e9, 999, None)] == ["7.38K", "625K", "1M", "1.5B", "999", ""]


def test_latex_cells_with_extremes_and_awkward_names_compile(tmp_path):
    from mergelab.paper import PAPER_COLUMNS, latex

    nan = float("nan")
    fitted = dict(family="f_1%", domain="macro", method="m&x", setting="m&x lambda=0.5 ~^\\ <a|b>", hparams="{}",
                  size="s#1", n_params=7376, L_inf=-1.234e-5, L_inf_lo=-2e-5, L_inf_hi=3e-5, A=1400.5, A_lo=900.0,
                  A_hi=1600.0, b=100.0, b_lo=nan, b_hi=nan, at_bound="A,b", r2=0.99998, heldout_rmse=nan,
                  heldout_points=0, n_subsets=12, k_max=3, n_bootstrap=200, note="")
    unfitted = {**{c: nan for c in PAPER_COLUMNS}, "family": "f_1%", "domain": "macro", "method": "ties",
                "setting": "tiés ∞ β — 日本", "size": "xl", "n_params": 1.5e9, "at_bound": "", "note": "too few k"}
    paper = pd.DataFrame([fitted, unfitted], columns=PAPER_COLUMNS)
    tex = latex("paper", paper, {"options": {"what": "paper"}})
    header, rows, caption = check_latex(tex)
    assert rows[0][:2] == ["m\\&x lambda=0.5 \\textasciitilde{}\\textasciicircum{}\\textbackslash{} \\textless{}a\\textbar{}b\\textgreater{}",
                           "7.38K"]
    assert rows[0][2] == "$-1.234\\times 10^{-5}\\;[-2\\times 10^{-5},\\,3\\times 10^{-5}]$"
    assert rows[0][3] == "${1400}^{\\dagger}\\;[900,\\,1600]$" and rows[0][4] == "${100}^{\\dagger}$"
    assert rows[0][5] == "$1.000$" and rows[0][6] == "--"
    assert rows[1][:3] == ["ti\\'{e}s $\\infty$ $\\beta$ --- \\texttt{U+65E5}\\texttt{U+672C}", "1.5B", "--"]
    assert "At its bound" in caption and "f\\_1\\%" in caption
    asked = paper.assign(n_bootstrap=0, L_inf_lo=nan, L_inf_hi=nan, A_lo=nan, A_hi=nan,
                         note=["no interval: a single subset at every k", "too few k"])
    assert "No intervals: a single subset at every k." in check_latex(latex("paper", asked, {"options": {"bootstrap": 200}}))[2]
    assert "No intervals (bootstrap off)." in check_latex(latex("paper", asked, {"options": {"bootstrap": 0}}))[2]
    generic = latex("other", pd.DataFrame({"name_x": ["a%", "b"], "values": [[0.123456, 2], {"k": 1.5}],
                                            "n": [1, 2]}), {})
    _, generic_rows, _ = check_latex(generic)
    assert generic_rows[0] == ["a\\%", "0.1235, 2", "$1$"] and generic_rows[1][1] == "k=1.5"
    compile_latex([tex, generic], tmp_path)


def test_latex_is_a_compact_paper_table_that_compiles(db, tmp_path, capsys):
    # The example: `fit --format latex` was a 28-column tabular with JSON cells, 16-digit interval
    # strings, raw ∞ β − and a literal \u03b2.
    code, tex, err = cli(capsys, "fit", "--db", db, "--format", "latex")
    assert code == 0, err
    header, rows, caption = check_latex(tex)
    assert header == ["Method", "Size $N$", "$L_\\infty$", "$A$", "$b$", "$R^2$", "Held-out error ($10^{-3}$)"]
    assert [r[1] for r in rows] == ["1M", "4M", "16M"] and {r[0] for r in rows} == {"task\\_arithmetic"}
    for cells in rows:  # intervals on by default: value [lo, hi]
        assert re.fullmatch(r"\$0\.\d+\\;\[0\.\d+,\\,0\.\d+\]\$", cells[2]), cells[2]
        assert float(re.search(r"\$([\d.]+)\$", cells[6]).group(1)) < 3  # held-out RMS < 3e-3 nats for noise 2e-3
    assert "syn\\_\\%\\&\\#" in caption and "cross-domain mean (macro)" in caption
    assert "nats/token" in caption and "parameter count" in caption and "200 draws" in caption
    prov = json.loads(tex.splitlines()[0].split("provenance: ", 1)[1])
    assert prov["options"]["bootstrap"] == 200 and prov["options"]["what"] == "paper" and "units" in prov

    outputs = {}
    for what in ("fits", "paper", "joint", "plan", "synergy", "results"):
        out = tmp_path / f"{what}.tex"
        extra = ["--size", "a_1"] if what in ("synergy", "results") else []
        code, _, err = cli(capsys, "export", "--what", what, "--format", "latex", "--out", out, "--db", db, *extra)
        assert code == 0, err
        outputs[what] = out.read_text()
        check_latex(outputs[what])
        assert read_provenance(out)["families"] == [FAMILY]
    assert outputs["fits"].split("\n", 1)[1] == outputs["paper"].split("\n", 1)[1]  # LaTeX fits: the paper table
    joint_header, _, joint_caption = check_latex(outputs["joint"])
    assert "$\\beta$" in joint_header and "not identified" in joint_caption  # 3 sizes fix L*, B, beta exactly
    _, synergy_rows, _ = check_latex(outputs["synergy"])
    assert {r[1] for r in synergy_rows} == {"x\\_y", "q\\#z"}
    _, domain_rows, domain_caption = check_latex(cli(capsys, "fit", "--db", db, "--format", "latex", "--domain", "q#z",
                                                     "--bootstrap", "0")[1])
    assert "domain q\\#z" in domain_caption and "No intervals" in domain_caption and "\\;[" not in str(domain_rows)
    code, joint_tex, err = cli(capsys, "fit", "--db", db, "--joint", "--format", "latex", "--domain", "x_y")
    assert code == 0 and "domain x\\_y" in check_latex(joint_tex)[2], err
    pdf = compile_latex([tex, joint_tex, *outputs.values()], tmp_path)
    assert pdf.read_bytes().startswith(b"%PDF")


def test_paper_table_values_and_full_tables_kept(db, tmp_path, capsys):
    out = tmp_path / "paper.csv"
    assert cli(capsys, "export", "--what", "paper", "--out", out, "--db", db)[0] == 0
    paper = pd.read_csv(out, skiprows=1)  # not comment="#": the family name holds one
    assert len(paper) == 3 and set(paper["domain"]) == {"macro"} and (paper["n_bootstrap"] == 200).all()
    k = np.arange(1, 7)
    for _, r in paper.iterrows():
        assert r["L_inf_lo"] <= r["L_inf"] <= r["L_inf_hi"] and r["A_lo"] <= r["A"] <= r["A_hi"]
        truth = 0.35 + 0.01 * (r["n_params"] / 1e9) ** -0.3 + 0.2 / (k + 0.4)
        assert np.abs(r["L_inf"] + r["A"] / (k + r["b"]) - truth).max() < 0.003
        assert r["heldout_points"] == 3 and r["heldout_rmse"] < 0.003  # k = 3, 5, 6 forecast from 1, 2, 4
    assert read_provenance(out)["units"]["n_params"] == "parameters (count)"
    # CSV, JSON and Parquet keep every column of the fits
    full = tmp_path / "fits.csv"
    assert cli(capsys, "export", "--what", "fits", "--out", full, "--db", db, "--bootstrap", "20")[0] == 0
    fits = pd.read_csv(full, skiprows=1)
    assert {"se_L_inf", "aicc", "ci_L_inf", "formula", "n_bootstrap"} <= set(fits.columns) and len(fits) == 9
    assert json.loads(fits.loc[0, "ci_L_inf"])[0] < fits.loc[0, "L_inf"]


# -- figures ----------------------------------------------------------------------------------------------

def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", data[16:24])


@pytest.mark.slow
def test_figures_for_one_and_two_columns(db, tmp_path, capsys):
    base = ["export", "--what", "figure", "--db", db, "--family", FAMILY]
    png1, png2, pdf, svg = (tmp_path / n for n in ("c1.png", "c2.png", "sizes.pdf", "variance.svg"))
    code, out, err = cli(capsys, *base, "--format", "png", "--out", png1)
    assert code == 0 and "1 column" in out, err
    width, height = png_size(png1)
    assert width == 1050 and 0.5 < height / width < 1.2  # 3.5 in at 300 dpi
    assert cli(capsys, *base, "--format", "png", "--columns", "2", "--dpi", "150", "--out", png2)[0] == 0
    assert png_size(png2)[0] == 1050  # 7 in at 150 dpi
    assert cli(capsys, *base, "--figure", "sizes", "--format", "pdf", "--out", pdf)[0] == 0
    data = pdf.read_bytes()
    assert data.startswith(b"%PDF") and b"/FontFile" in data  # fonts embedded
    media = re.search(rb"/MediaBox\s*\[\s*0 0 ([\d.]+) ([\d.]+)", data)
    assert abs(float(media.group(1)) - 3.5 * 72) < 1
    assert cli(capsys, *base, "--figure", "variance", "--out", svg)[0] == 0  # format from the suffix
    root = ET.parse(svg).getroot()
    assert root.tag.endswith("svg") and root.get("width") == "336"
    synergy = tmp_path / "synergy.svg"
    code, _, err = cli(capsys, *base, "--figure", "synergy", "--size", "a_1", "--bootstrap", "0", "--out", synergy)
    assert code == 0, err
    assert "q#z" in synergy.read_text() and ET.parse(synergy).getroot().tag.endswith("svg")


def test_figure_without_a_browser_is_refused_before_any_work(db, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("BROWSER_PATH", str(tmp_path / "no-chrome"))
    out = tmp_path / "f.pdf"
    code, _, err = cli(capsys, "export", "--what", "figure", "--out", out, "--db", db)
    assert code == 2 and "needs Chrome or Chromium" in err and "BROWSER_PATH" in err and "apt-get install chromium" in err
    assert not out.exists()


@pytest.mark.slow
def test_notebook_draws_the_figures_without_streamlit(db, tmp_path):
    notebook = json.loads((ROOT / "docs" / "figures.ipynb").read_text())
    assert notebook["nbformat"] == 4
    code = "\n\n".join("".join(cell["source"]) for cell in notebook["cells"] if cell["cell_type"] == "code")
    assert "streamlit" not in code
    blocker = ("import sys\nclass Block:\n    def find_spec(self, name, path=None, target=None):\n"
               "        if name.split('.')[0] == 'streamlit':\n            raise ImportError('no streamlit here')\n"
               "sys.meta_path.insert(0, Block())\n")
    env = {**os.environ, "MERGELAB_DB": str(db), "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-c", blocker + code], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    written = sorted(p.name for p in tmp_path.iterdir() if p.suffix in (".png", ".pdf", ".svg"))
    assert written == ["curves_1col.pdf", "curves_1col.png", "sizes_2col.svg"], written
    assert png_size(tmp_path / "curves_1col.png")[0] == 1050
    assert b"/FontFile" in (tmp_path / "curves_1col.pdf").read_bytes()
    assert ET.parse(tmp_path / "sizes_2col.svg").getroot().get("width") == "672"
