"""Models-from-code entry for `report-vlm` versions: images -> reports."""
import mlflow

from pipeline.evaluate.serving import ReportVLMPyfunc

mlflow.models.set_model(ReportVLMPyfunc())
