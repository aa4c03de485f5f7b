"""The registered model as an MLflow pyfunc ("models from code": this file, no pickled object).

MLflow loads it for `mlflow.pyfunc.load_model("models:/fedlease@current")` and
`mlflow models serve -m models:/fedlease@current --env-manager local`. Input: a table with columns
`client` and `text` (and `text_pair` for a pair task) for classification, `client` and `prompt` for
generation; output: one label or generated text per row, from that client's model (its expert,
router and head), rebuilt by `fedlease.predict` from the final-model folder logged beside it. Logging
and registering it is `fedlease.tracking`'s job; this file is what MLflow itself imports to serve it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import mlflow
from mlflow.pyfunc import PythonModel


class FedLeaseModel(PythonModel):
    def load_context(self, context: Any) -> None:
        self.model_dir = Path(context.artifacts["model_dir"])

    def predict(self, context: Any, model_input: Any, params: dict[str, Any] | None = None) -> list[str]:
        from fedlease.predict import predict_rows

        rows = model_input.to_dict(orient="records") if hasattr(model_input, "to_dict") else list(model_input)
        return predict_rows(self.model_dir, rows)


mlflow.models.set_model(FedLeaseModel())
