"""Build hook (the metadata is in pyproject.toml): a wheel carries the dashboard (app.py, pages/), the
shipped data (data/: the paper's tables, the demo results) and the Streamlit config beside the package,
as mergelab/_shipped/, where mergelab.paths.shipped_root() finds them once installed. The top level of
the repository keeps them (the product card fixes it); an editable install reads them in place."""

import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent
SHIPPED = ("app.py", "pages", "data", ".streamlit/config.toml")
TARGET = ("mergelab", "_shipped")


class BuildPyWithShipped(build_py):
    def run(self):
        super().run()
        if getattr(self, "editable_mode", False):
            return
        target = Path(self.build_lib, *TARGET)
        shutil.rmtree(target, ignore_errors=True)  # nothing stale from an earlier build
        for rel in SHIPPED:
            source, dest = ROOT / rel, target / rel
            if source.is_dir():
                shutil.copytree(source, dest, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
            else:
                dest.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(source, dest)


setup(cmdclass={"build_py": BuildPyWithShipped})
