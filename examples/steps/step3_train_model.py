"""Pipeline step 3: train a model on the splits of step 2 and report its accuracy."""

import pickle
import tempfile
from pathlib import Path

from controller import OutputModel, Task

args = {"dataset_task_id": "", "max_iter": 200}
task = Task.init(project_name="examples", task_name="pipeline step 3 train model")
task.connect(args)
task.execute_remotely()

from sklearn.linear_model import LogisticRegression  # noqa: E402

dataset_task = Task.get_task(task_id=args["dataset_task_id"])
X_train = dataset_task.artifacts["X_train"].get()
X_test = dataset_task.artifacts["X_test"].get()
y_train = dataset_task.artifacts["y_train"].get()
y_test = dataset_task.artifacts["y_test"].get()

model = LogisticRegression(max_iter=args["max_iter"]).fit(X_train, y_train)
accuracy = float(model.score(X_test, y_test))
task.get_logger().report_scalar("model", "accuracy", accuracy, iteration=0)
weights = Path(tempfile.mkdtemp()) / "model.pkl"
weights.write_bytes(pickle.dumps(model))
OutputModel(task=task, name="iris logistic regression", framework="scikit-learn").update_weights(
    weights_filename=str(weights)
)
task.upload_artifact("accuracy", {"accuracy": accuracy})
print(f"test accuracy: {accuracy:.3f}")
