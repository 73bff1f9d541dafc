"""The README's layout section matches the tree: every package under cxr/ is named there, and only the modules it
allows stand at the top."""
from __future__ import annotations

import re

from tests.conftest import ROOT


def test_readme_layout_names_every_stage_package_and_the_top_modules():
    readme = (ROOT / "README.md").read_text()
    layout = readme[readme.index("## Layout"):readme.index("Sample data:")]
    listed = set(re.findall(r"^      ([a-z_]+)/ ", layout, flags=re.M))
    packages = {p.name for p in (ROOT / "cxr").iterdir() if p.is_dir() and (p / "__init__.py").is_file()}
    assert listed == packages
    top = {p.name for p in (ROOT / "cxr").glob("*.py")}
    assert top == {"__init__.py", "cli.py", "config.py"}
    for package in packages:   # each says in its docstring what it owns
        assert (ROOT / "cxr" / package / "__init__.py").read_text().lstrip().startswith('"""'), package
