"""What the dashboard draws: plotly figures (`figures`), per-curve computations the pages share
(`curves`), and the Streamlit helpers (`dashboard`, the only module here that imports streamlit)."""
