"""Print the requirements of one optional extra in pyproject.toml, one a line (pip -r, without the project).

    python scripts/extra_requirements.py airflow | pip install -r /dev/stdin   # make test-airflow
"""
import sys
import tomllib
from pathlib import Path

PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"

if __name__ == "__main__":
    with PYPROJECT.open("rb") as fh:
        extras = tomllib.load(fh)["project"]["optional-dependencies"]
    print("\n".join(extras[sys.argv[1]]))
