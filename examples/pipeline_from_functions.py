"""A pipeline of function steps: each function becomes a step task run by an agent.

Run it with an agent on "default": `python examples/pipeline_from_functions.py`. The
pipeline logic runs in this process (`start_locally`); `--local` runs the steps as
local subprocesses too (no agent needed). `score` imports nothing: its packages come
from its inputs (the pickled model needs scikit-learn). The script exits 1 if the
pipeline failed.
"""

import sys

from controller.automation import PipelineController


def load_dataset(test_size: float = 0.2, random_state: int = 42):
    from sklearn.datasets import load_iris
    from sklearn.model_selection import train_test_split

    iris = load_iris()
    return train_test_split(iris.data, iris.target, test_size=test_size, random_state=random_state)


def train(X_train, y_train, max_iter: int = 200):
    from sklearn.linear_model import LogisticRegression

    return LogisticRegression(max_iter=max_iter).fit(X_train, y_train)


def score(model, X_test, y_test):
    accuracy = float(model.score(X_test, y_test))
    print(f"test accuracy: {accuracy:.3f}")
    return accuracy


if __name__ == "__main__":
    pipe = PipelineController(name="functions demo", project="examples", version="1.0.0")
    pipe.set_default_execution_queue("default")
    pipe.add_parameter("test_size", 0.25)
    pipe.add_function_step("load", load_dataset, function_kwargs={"test_size": "${pipeline.test_size}"},
                           function_return=["X_train", "X_test", "y_train", "y_test"], cache_executed_step=True)
    pipe.add_function_step("train", train, function_kwargs={"X_train": "${load.X_train}", "y_train": "${load.y_train}"},
                           function_return=["model"])
    pipe.add_function_step("score", score, function_kwargs={"model": "${train.model}", "X_test": "${load.X_test}",
                                                            "y_test": "${load.y_test}"}, function_return=["accuracy"])
    pipe.start_locally(run_pipeline_steps_locally="--local" in sys.argv)
    for name, node in pipe.get_pipeline_dag().items():
        print(f"{name:<8} {node.status:<10} task {node.executed}")
    print("successful:", pipe.is_successful())
    sys.exit(0 if pipe.is_successful() else 1)
