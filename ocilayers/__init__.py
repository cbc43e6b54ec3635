"""ocilayers: Docker's overlay2 image store, without the daemon."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("ocilayers")
except PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0.0.0"
