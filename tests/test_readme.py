"""The README's library example runs as written, on a toy model with q_proj/v_proj layers."""

from __future__ import annotations

import re
from pathlib import Path

import torch

README = Path(__file__).resolve().parents[1] / "README.md"


class ToyAttention(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.q_proj, self.v_proj, self.out = (torch.nn.Linear(16, 16) for _ in range(3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.tanh(self.q_proj(x)) * self.v_proj(x))


def test_library_example_runs(tmp_path, monkeypatch):
    snippet = re.search(r"```python\n(import loft_probe\n.*?)```", README.read_text(), re.S).group(1)
    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    data = [torch.randn(8, 16) for _ in range(20)]
    namespace = {"model": ToyAttention(), "loader": data, "compute_loss": lambda model, x: model(x).pow(2).mean()}
    exec(compile(snippet, str(README), "exec"), namespace)
    run = namespace["run"]
    assert run.method == "loft" and run.last_step == 20
    assert {"loss", "shadow_update_cosine", "residual_tangent"} <= set(run.metrics.metric)


def test_the_box_table_names_every_module():
    """README's "What is in the box" names every public module and package of loft_probe, and nothing else."""
    text = README.read_text()
    table = text[text.index("## What is in the box"):]
    table = table[:table.index("\n\n", table.index("|"))]
    named = set(re.findall(r"`loft_probe\.(\w+)`", table))
    package = README.parent / "loft_probe"
    present = {p.stem for p in package.glob("*.py") if not p.stem.startswith("_")}
    present |= {p.name for p in package.iterdir() if (p / "__init__.py").is_file()}
    assert named == present
