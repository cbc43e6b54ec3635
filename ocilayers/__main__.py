"""`python -m ocilayers`."""

from ocilayers.cli import run

run()
