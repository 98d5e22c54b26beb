"""Orchestration: the recipe's stages as Prefect tasks over the checkpoint store, tracked in MLflow.

    python -m flows.convert [--until STAGE] key=value ...   # one conversion run (Hydra overrides)
    python -m flows.serve                                    # register the deployments with a Prefect server

`flows.config` composes the Hydra config, `flows.executor` runs each `pipeline.chain.StageCall` as a
task (skipping what the store already holds), `flows.publish` turns stage outputs into MLflow runs and
Prefect artifacts. The sequencing lives in `pipeline.chain`, the work in `pipeline.stages`: nothing here
computes anything.
"""
