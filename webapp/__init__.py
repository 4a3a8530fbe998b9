"""The Streamlit app's logic: computations as memoized background jobs (service.py) and
the widgets the pages share (widgets.py). Pages live in ../views, the router in ../app.py."""
