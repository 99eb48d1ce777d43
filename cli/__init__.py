"""The loft-probe command line (shipped as loft_probe.cli)."""
