"""Pipeline step 2: load the dataset of step 1 (by URL), split it, store the splits."""

import pickle

from controller import StorageManager, Task

args = {"dataset_url": "", "random_state": 42, "test_size": 0.2}
task = Task.init(project_name="examples", task_name="pipeline step 2 process dataset")
task.connect(args)
task.execute_remotely()

from sklearn.model_selection import train_test_split  # noqa: E402

local_copy = StorageManager.get_local_copy(remote_url=args["dataset_url"])
with open(local_copy, "rb") as f:
    dataset = pickle.load(f)
X_train, X_test, y_train, y_test = train_test_split(
    dataset["data"], dataset["target"], test_size=args["test_size"], random_state=args["random_state"]
)
for name, value in (("X_train", X_train), ("X_test", X_test), ("y_train", y_train), ("y_test", y_test)):
    task.upload_artifact(name, value)
print(f"split {len(dataset['data'])} samples: {len(X_train)} train, {len(X_test)} test "
      f"(test_size={args['test_size']})")
