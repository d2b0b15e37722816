"""Figure downloads for the pages: a chart as PNG (300 dpi), PDF (fonts embedded) or SVG, one or two
paper columns wide (mergelab.figures). The file is rendered only when its button is clicked."""

from __future__ import annotations

import re

import streamlit as st

from mergelab.errors import MergelabError

MIME = {"png": "image/png", "pdf": "application/pdf", "svg": "image/svg+xml"}


def _renderer_problem() -> str | None:
    from mergelab.figures import check_renderer

    try:
        check_renderer()
    except MergelabError as exc:
        return str(exc)
    return None


def figure_download(fig, stem: str, key: str) -> None:
    """A 'Download for a paper' popover under a chart: width (one or two columns) and a PNG, PDF and SVG
    button; when kaleido or Chromium is missing it says what to install instead."""
    from mergelab import figures

    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", stem).strip("_") or "figure"
    with st.popover("Download for a paper", help="PNG at 300 dpi, PDF with embedded fonts, or SVG; one column "
                                                 "is 3.5 in wide, two columns 7 in"):
        problem = _renderer_problem()
        if problem:
            st.caption(problem)
            return
        columns = st.radio("width", [1, 2], horizontal=True, key=f"{key}-columns",
                           format_func=lambda c: f"{c} column{'s' if c > 1 else ''} ({figures.WIDTH_IN[c]:g} in)")
        for col, fmt in zip(st.columns(len(figures.FORMATS)), figures.FORMATS):
            col.download_button(fmt.upper(), data=lambda fmt=fmt: figures.to_bytes(fig, fmt, columns=columns),
                                file_name=f"{stem}_{columns}col.{fmt}", mime=MIME[fmt], key=f"{key}-{fmt}",
                                on_click="ignore")
