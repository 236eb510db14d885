"""The package version: one line that the build (``[tool.hatch.version]``) and every file
hoverdask writes read."""

__version__ = "0.1.0"
