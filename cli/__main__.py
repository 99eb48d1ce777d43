"""``python -m loft_probe.cli``: the loft-probe command without the console script."""

from loft_probe.cli.main import app

app(prog_name="loft-probe")
