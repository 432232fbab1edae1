"""The README's usage example runs as written."""

from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_usage_example_runs() -> None:
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert blocks, "README.md has no python example"
    namespace: dict = {}
    exec(compile(blocks[0], str(README), "exec"), namespace)
    assert namespace["output"].shape == (8, 35, 128)


def test_readme_documents_every_benchmark_column(tmp_path) -> None:
    import pandas as pd

    from mogrifier_fast import bench

    bench.main(["--steps", "2", "--batch", "1", "--hidden-size", "2", "--rounds", "1", "--mode", "inference",
                "--repeats", "1", "--candidates", "reference", "--out", str(tmp_path), "--name", "doc"])  # fmt: skip
    columns = pd.read_csv(tmp_path / "doc.csv").columns
    text = README.read_text()
    undocumented = [c for c in columns if f"`{c}`" not in text]
    assert not undocumented, f"README.md does not describe the CSV columns {undocumented}"
