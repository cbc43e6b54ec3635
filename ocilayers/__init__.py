"""ocilayers: Docker's overlay2 image store, without the daemon."""

# Static (not importlib.metadata, whose import alone costs ~35 ms of every CLI start);
# pyproject.toml reads it from here.
__version__ = "0.1.0"
