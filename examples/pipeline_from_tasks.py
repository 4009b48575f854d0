"""The reference example: a three-step pipeline made of existing (template) tasks.

Register the step templates first (run each step script once: outside an agent it
records itself and stops at `execute_remotely()`), then run this script. `pipe.start()`
sends the pipeline to the "services" queue, where an agent runs this same script as
the pipeline controller while the steps go to the "default" queue.
"""

from controller.automation import PipelineController

pipe = PipelineController(name="pipeline demo", project="examples", version="1.0.0",
                          add_pipeline_tags=False)
pipe.set_default_execution_queue("default")
pipe.add_parameter("test_size", 0.25, description="fraction of the data kept for testing")
pipe.add_step(name="stage_data", base_task_project="examples",
              base_task_name="pipeline step 1 dataset artifact")
pipe.add_step(name="stage_process", parents=["stage_data"], base_task_project="examples",
              base_task_name="pipeline step 2 process dataset",
              parameter_override={"General/dataset_url": "${stage_data.artifacts.dataset.url}",
                                  "General/test_size": "${pipeline.test_size}"})
pipe.add_step(name="stage_train", parents=["stage_process"], base_task_project="examples",
              base_task_name="pipeline step 3 train model",
              parameter_override={"General/dataset_task_id": "${stage_process.id}"},
              monitor_metrics=[("model", "accuracy")], monitor_artifacts=["accuracy"])

pipe.start(queue="services")  # outside an agent, this process ends here
print("pipeline done, successful:", pipe.is_successful())
