"""FedLEASE: federated LoRA expert allocation and selection, as a library.

Importable without Prefect, MLflow or DVC running; the flows and the CLI call it.
"""

__version__ = "0.1.0"
