"""Model families. Importing this package registers every architecture with timm."""

from spikeformers.models import atsnn, qcfs, qkformer, sdt_v2, spikingformer  # noqa: F401  (register the models)
from spikeformers.models.neurons import LIF, set_backend
from spikeformers.models.sdt import SpikeDrivenTransformer
from spikeformers.models.spikformer import Spikformer

__all__ = ["LIF", "set_backend", "Spikformer", "SpikeDrivenTransformer"]
