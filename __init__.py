"""spikeformers: spiking transformers on SpikingJelly 2.0, registered in timm.

Importing the package registers every architecture with timm, so
``timm.create_model("sdt_cifar_2_512")`` works after ``import spikeformers``.
"""

from spikeformers import models  # noqa: F401  (registers the timm entrypoints)
from spikeformers.models import hub  # noqa: F401  (spikeformers.hub: pretrained weights)
