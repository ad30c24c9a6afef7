"""Prefect flows. Defaults set here (before Prefect is imported) keep `moestream prepare`
setup-free and quiet; any PREFECT_* variable the user sets wins."""

import os

# No usage telemetry from a tool run on users' machines; it also races the embedded server's
# SQLite database at start-up ("database is locked").
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
# The embedded server can take longer than Prefect's 20 s default to start on a busy 2-core box.
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "90")
