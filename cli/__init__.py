"""The loft-probe command line (shipped as loft_probe.cli): `app` is the typer application."""

from .main import app, parse_options

__all__ = ["app", "parse_options"]
