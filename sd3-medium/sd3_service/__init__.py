"""The work behind the SD3 Medium service: settings, contract, model loading, engine and stores."""

__version__ = "0.1.0"  # the project's version (pyproject.toml); the artifact carries it without pyproject
