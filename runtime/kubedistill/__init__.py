"""kubedistill: knowledge distillation for LLMs and VLMs as Kubeflow Pipelines + MLflow."""

__version__ = "0.1.0"
