"""Models-from-code entry for `vision-bridge` versions: images -> pooled visual features."""
import mlflow

from pipeline.evaluate.serving import VisionBridgePyfunc

mlflow.models.set_model(VisionBridgePyfunc())
