"""The registered model, logged as source (MLflow models-from-code): loading a version runs this file, with the
version's own copy of `tasks/` and `edgar_tune/` importable, instead of unpickling an object.

    mlflow.pyfunc.load_model("models:/edgar-tune-10k@champion").predict(pd.DataFrame({"prompt": ["..."]}))
"""

from mlflow.models import set_model

from tasks.registry import EdgarTuneLM

set_model(EdgarTuneLM())
