"""Test helpers, importable as the package ``helpers``: pytest puts ``tests/`` on ``sys.path``
(``pythonpath = ["tests"]`` in pyproject.toml), so a test module writes ``from helpers.slides import ...``.

* ``slides``: tiny Aperio / generic tiled TIFF slides with H&E-like tissue.
* ``wsi_runs``: the 5-slide WSI cohort and ways to run ``mmcli extract`` on it (in process, in a child process).
* ``planted_data``: small feature stores with a planted signal, written with the store API.
* ``fake_runs``: run folders written by hand, as ``mmcli fit`` writes them.
* ``geojson_check``: the JSON-schema and shapely checks of a QuPath GeoJSON export.

The session-wide cohort and its clean reference extraction are fixtures in ``tests/conftest.py``.
"""
