"""Registers the deployments (the conversion, the ablation) with a Prefect server and runs the flow runs
started from it.

    make ui      # terminal 1: Prefect server on http://127.0.0.1:4200 (and the MLflow UI)
    make serve   # terminal 2: PREFECT_API_URL=http://127.0.0.1:4200/api python -m flows.serve

Then, in the Prefect UI, Deployments -> convert/convert -> Run -> Custom run: edit `overrides` (a list of
Hydra overrides such as `experiment=tiny` or `teacher.path=s3://models/llama`) and `until`. This process
runs each flow run in a subprocess of its own, from the working directory it was started in (so
`./artifacts`, `./mlflow.db` and `.cache/` are the project's), one at a time by default.
"""

from __future__ import annotations

import argparse
import sys

from prefect import serve
from prefect.deployments.runner import EntrypointType, RunnerDeployment

from flows.ablation import ablation
from flows.console import quiet_console
from flows.convert import convert

DEPLOYMENTS = {
    # name: (flow, default parameters, description)
    "convert": (convert, {"overrides": [], "until": "evaluate"},
                "The whole chain on the given overrides (empty: the bundled demo)."),
    "tiny": (convert, {"overrides": ["experiment=tiny"], "until": "evaluate"},
             "The tiny preset: the whole chain in about a minute on a CPU, to check a setup."),
    "ablation": (ablation, {"overrides": []},
                 "The recipe's choices against their alternatives (data, loss, layer order), several seeds, "
                 "on the given overrides; the report goes to ablation.results_dir and the MLflow parent run."),
}


def deployments() -> list[RunnerDeployment]:
    """The deployments; entrypoints by module path (`flows.convert.convert`, `flows.ablation.ablation`)."""
    return [
        flow.to_deployment(name=name, parameters=parameters, description=description,
                           tags=["hybrid-distill"], entrypoint_type=EntrypointType.MODULE_PATH)
        for name, (flow, parameters, description) in DEPLOYMENTS.items()
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m flows.serve", description=__doc__.splitlines()[0])
    parser.add_argument("--limit", type=int, default=1, help="flow runs at a time (default 1: one model per machine)")
    args = parser.parse_args(argv)
    quiet_console()
    from prefect.settings import get_current_settings

    if not get_current_settings().api.url:
        print("error: no Prefect server configured: start one (`make ui`) and set "
              "PREFECT_API_URL=http://127.0.0.1:4200/api", file=sys.stderr)
        return 2
    serve(*deployments(), limit=args.limit)
    return 0


if __name__ == "__main__":
    sys.exit(main())
