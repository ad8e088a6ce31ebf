"""The step programs, one per MLproject entry point."""
import os

# The pipeline talks to the tracking server only; MLflow's usage telemetry stays off.
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("DO_NOT_TRACK", "true")
