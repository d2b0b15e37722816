"""mergelab dashboard: the entry point (`streamlit run app.py`). It names the pages, so that the sidebar's
first entry reads "Overview" (a pages/ folder alone would name it after this file), and runs the chosen one."""

import streamlit as st

PAGES = {"pages/0_Overview.py": "Overview", "pages/1_Curves.py": "Curves", "pages/2_Sweep.py": "Sweep",
         "pages/3_Fit_and_Plan.py": "Fit & Plan", "pages/4_Synergy.py": "Synergy", "pages/5_Export.py": "Export",
         "pages/6_Import.py": "Import"}

# url paths stay those of the file names (/Curves, /Fit_and_Plan, …): links made before keep working
st.navigation([st.Page(path, title=title, default=path == "pages/0_Overview.py") for path, title in PAGES.items()]).run()
