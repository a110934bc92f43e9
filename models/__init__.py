"""Model families. Importing this package registers every architecture with timm.

Every module in this folder is imported here, so a new family file registers its models with no
edit anywhere else (docs/architecture.md).
"""

import importlib
import pkgutil

from spikeformers.models.neurons import LIF, set_backend

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")

from spikeformers.models.sdt import SpikeDrivenTransformer  # noqa: E402
from spikeformers.models.spikformer import Spikformer  # noqa: E402

__all__ = ["LIF", "set_backend", "Spikformer", "SpikeDrivenTransformer"]
