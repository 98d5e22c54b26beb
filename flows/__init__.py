"""Orchestration: the recipe's stages as Prefect tasks over the checkpoint store, tracked in MLflow.

    python -m flows.convert [--until STAGE] key=value ...   # one conversion run (Hydra overrides)
    python -m flows.convert --plan key=value ...             # check the run, print its plan, run nothing
    python -m flows.serve                                    # register the deployments with a Prefect server

`flows.config` composes the Hydra config, `flows.common` holds what both flows' command lines share,
`flows.executor` wraps the pipeline's one executor (`pipeline.executor`: keys, skipping, resuming,
committing) in a Prefect task and an MLflow run per stage, `flows.sources` resolves an s3:// teacher,
`flows.publish` turns stage outputs into MLflow runs and Prefect artifacts. The sequencing lives in
`pipeline.chain`, the work in `pipeline.stages`: nothing here computes anything.
"""
