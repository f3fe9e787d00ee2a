"""The Prefect flows. Importing them has the embedded Prefect server, where a flow run starts one, start in a
session of its own (edgar_tune/reaper.py)."""

from edgar_tune.reaper import own_session_for_embedded_server

own_session_for_embedded_server()
