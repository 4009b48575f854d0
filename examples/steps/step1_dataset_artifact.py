"""Pipeline step 1: fetch the dataset and store it as the artifact "dataset".

The dataset is the iris data that scikit-learn ships (no download needed).
"""

import pickle
import tempfile
from pathlib import Path

from controller import Task

task = Task.init(project_name="examples", task_name="pipeline step 1 dataset artifact")
# Outside an agent this registers the step as a template and stops here.
task.execute_remotely()

from sklearn.datasets import load_iris  # noqa: E402

iris = load_iris()
dataset = {"data": iris.data, "target": iris.target, "feature_names": list(iris.feature_names)}
path = Path(tempfile.mkdtemp()) / "iris_dataset.pkl"
path.write_bytes(pickle.dumps(dataset))
task.upload_artifact("dataset", artifact_object=str(path))
print(f"stored {len(iris.data)} samples as artifact 'dataset'")
