"""Screenshots of the Prefect and MLflow pages of a finished conversion run, with headless Chromium
(Debian's `chromium`), for docs/. Both UIs are JavaScript apps: each page gets a virtual-time budget
to render before the shot.

    source .cache/stack/env                      # a stack (make stack) that ran a deployment (make serve)
    python infra/screenshots.py --run-name team-demo --out docs/screenshots

Takes: the flow run's page, the deployment's Run form (custom run, with `overrides`), MLflow's compare
view of the run's evaluated checkpoints and its chart view of the training curves. Prints every URL.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import urllib.parse
from pathlib import Path

CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--hide-scrollbars"]


def shoot(url: str, path: Path, *, width: int = 1600, height: int = 1000, budget_ms: int = 25000) -> None:
    """One screenshot in a fresh, empty profile (no state carried between pages)."""
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        raise SystemExit("chromium is not installed: apt-get install -y chromium")
    with tempfile.TemporaryDirectory(prefix="chromium-profile-") as profile:
        subprocess.run([chromium, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", f"--window-size={width},{height}",
                        f"--virtual-time-budget={budget_ms}", f"--screenshot={path}", url],
                       check=True, capture_output=True, timeout=180)
    print(f"{path}  <-  {url}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python infra/screenshots.py", description=__doc__.splitlines()[0])
    parser.add_argument("--run-name", required=True, help="the conversion run (its MLflow experiment's parent run)")
    parser.add_argument("--experiment", help="MLflow experiment (default: the run name's, else hybrid-distill)")
    parser.add_argument("--deployment", default="convert/tiny")
    parser.add_argument("--out", type=Path, default=Path("docs/screenshots"))
    args = parser.parse_args(argv)
    from mlflow import MlflowClient
    from prefect.client.orchestration import get_client

    prefect_api = os.environ["PREFECT_API_URL"].rstrip("/")
    prefect_ui = prefect_api.removesuffix("/api")
    mlflow_uri = os.environ["MLFLOW_TRACKING_URI"].rstrip("/")
    args.out.mkdir(parents=True, exist_ok=True)

    mlflow = MlflowClient(mlflow_uri)
    experiment = None
    for name in (args.experiment, args.run_name, "hybrid-distill"):
        experiment = mlflow.get_experiment_by_name(name) if name else None
        if experiment is not None:
            break
    if experiment is None:
        raise SystemExit(f"no MLflow experiment for run {args.run_name!r} at {mlflow_uri}")
    runs = mlflow.search_runs([experiment.experiment_id], max_results=500)
    parent = next(run for run in runs if run.data.tags.get("conversion_run") == args.run_name)
    evaluated = [run for run in runs if run.data.tags.get("mlflow.parentRunId") == parent.info.run_id
                 and run.data.tags.get("stage") == "evaluate" and run.data.tags.get("checkpoint") != "evaluate"]
    flow_run_id = parent.data.tags["prefect.flow_run_id"]

    with get_client(sync_client=True) as prefect:
        deployment = prefect.read_deployment_by_name(args.deployment)

    experiment_ids = json.dumps([experiment.experiment_id])
    run_ids = json.dumps([run.info.run_id for run in sorted(evaluated, key=lambda r: r.info.start_time)])
    compare = f"{mlflow_uri}/#/compare-runs?" + urllib.parse.urlencode({"runs": run_ids, "experiments": experiment_ids})
    # Every run with a training curve (conversions, MMR trials, SFT, a demo teacher), listed flat: sorted by
    # a key other than the date, MLflow's table stops nesting children under their (curve-less) parent.
    charts = (f"{mlflow_uri}/#/experiments/{experiment.experiment_id}/runs?" + urllib.parse.urlencode({
        "compareRunsMode": "CHART", "searchFilter": "metrics.`train/loss` >= 0",
        "orderByKey": "tags.`mlflow.runName`", "orderByAsc": "true"}))
    shoot(f"{prefect_ui}/runs/flow-run/{flow_run_id}", args.out / "prefect-flow-run.png", height=1100)
    shoot(f"{prefect_ui}/deployments/deployment/{deployment.id}/run", args.out / "prefect-run-form.png", height=1200)
    shoot(compare, args.out / "mlflow-compare.png", height=1400)
    shoot(charts, args.out / "mlflow-charts.png", height=1300, budget_ms=60000)  # a chart loads each history
    return 0


if __name__ == "__main__":
    sys.exit(main())
