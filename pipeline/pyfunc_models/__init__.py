"""MLflow models-from-code entry files (each calls `mlflow.models.set_model`)."""
