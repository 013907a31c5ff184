import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_processes_opening_a_fresh_store_at_once_all_succeed(tmp_path):
    # A scheduled retrain and a pipeline run can start together on a new SQLite store: each would
    # create MLflow's tables (alembic migrations) and the experiment, and the loser of that race died
    # with "Online migration expected to match one row". Four real processes, released together.
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}", "BUCKETCHAT_HOME": str(tmp_path / "home")}
    go = tmp_path / "go"
    code = (
        "import sys, time, mlflow, sqlalchemy; from pathlib import Path\n"  # import first: start together
        f"while not Path({str(go)!r}).exists(): time.sleep(0.01)\n"
        "from tasks.registry import configure, register\n"
        "exp = configure()\n"
        "run = mlflow.start_run(); mlflow.end_run()\n"
        "print(exp, register(run.info.run_id, {}))\n"
    )
    procs = [
        subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for _ in range(4)
    ]
    go.touch()
    outs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n".join(err[-2000:] for _, err in outs)
    experiments = {out.split()[0] for out, _ in outs}
    versions = sorted(int(out.split()[1]) for out, _ in outs)
    assert len(experiments) == 1 and versions == [1, 2, 3, 4]  # one experiment; every run registered
