"""`import mergelab` and the backend modules work without the UI stack or duckdb, and without torch
until a tensor is touched."""

import subprocess
import sys

BLOCKER = """
import sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in {blocked!r}:
            raise ImportError('blocked for this test: ' + name)
sys.meta_path.insert(0, Block())
"""


def run_blocked(blocked, code):
    return subprocess.run([sys.executable, "-c", BLOCKER.format(blocked=set(blocked)) + code],
                          capture_output=True, text=True, timeout=120)


def test_backend_imports_without_streamlit_plotly_duckdb():
    code = ("import mergelab, mergelab.io.family, mergelab.io.checkpoints, mergelab.engine.methods, mergelab.engine.session, "
            "mergelab.engine.evaluate, mergelab.sweep.runner, mergelab.store, mergelab.ui.figures, mergelab.cli, mergelab.demo.build, "
            "mergelab.figures, mergelab.paper, mergelab.export; "
            "print('ok')")
    proc = run_blocked({"streamlit", "plotly", "duckdb"}, code)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr


def test_package_import_does_not_pull_torch():
    code = "import sys, mergelab, mergelab.engine.methods, mergelab.io.family, mergelab.sweep.runner; print('torch' in sys.modules)"
    proc = run_blocked(set(), code)
    assert proc.returncode == 0 and proc.stdout.strip() == "False", proc.stderr


def test_merging_works_where_duckdb_is_missing():
    code = ("import torch; from mergelab.engine.methods import get_method, MergeContext; "
            "m = get_method('ties'); out = m.merge(torch.zeros(3), torch.ones(2, 3), MergeContext('t', ('a', 'b')), m.resolve({})); "
            "print(out.tolist())")
    proc = run_blocked({"streamlit", "plotly", "duckdb"}, code)
    assert proc.returncode == 0 and proc.stdout.strip() == "[1.0, 1.0, 1.0]", proc.stderr
