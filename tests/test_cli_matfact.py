"""The paper's matrix factorisation through the CLI: LoFT and full fine-tuning solve it on every seed tried.

The runs go without the shadow optimizer (``--no-shadow``): probing does not change training (tests/test_probe.py),
so the losses are those of a shadowed run to the bit, and LoFT's shadow at 1024×512 doubles its run's time."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from loft_probe import cli, load_run


@pytest.mark.slow
@pytest.mark.parametrize("method", ["loft", "full"])
@pytest.mark.parametrize("seed", [0, 1])
def test_matfact_reaches_machine_precision(tmp_path, method, seed):
    out = tmp_path / f"{method}-{seed}"
    result = CliRunner().invoke(cli.app, ["run", "matfact", "--method", method, "--seed", str(seed), "--every", "100",
                                          "--no-shadow", "--out", str(out)])
    assert result.exit_code == 0, result.output
    final = load_run(out).metrics.query("metric == 'eval_loss'").sort_values("step").value.iloc[-1]
    assert final < 1e-9
