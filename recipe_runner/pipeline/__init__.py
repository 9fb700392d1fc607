"""The pipeline: recipe -> plan (stages and their params) -> keys (resolve) -> run (build, scheduler
and executors) -> publish, with the plan report, progress and `recipe diff`."""
