"""Old import path of the ``spikeformers-hub`` command line, which now lives in the training app
(``spikeformers.train.hub_cli``). Kept only so existing imports keep working; new code imports
``spikeformers.train.hub_cli``. This is the one module of the model library allowed to import the
app (tests/test_layering.py names it); delete it when nothing imports it any more."""

from spikeformers.train.hub_cli import convert, main

__all__ = ["main", "convert"]
