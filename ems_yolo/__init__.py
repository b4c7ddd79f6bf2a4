"""ems-yolo: directly-trained spiking neural networks for object detection (EMS-YOLO) on the Ultralytics engine."""

from ems_yolo.utils.offline import configure_environment, quiet_integrations

configure_environment()  # before anything imports ultralytics (it probes the network at import)
quiet_integrations()

from ems_yolo.engine.model import EMSYOLO  # noqa: E402
from ems_yolo.nn import LIF, EMSDetectionModel  # noqa: E402

__version__ = "0.1.0"
__all__ = ["EMSYOLO", "LIF", "EMSDetectionModel", "__version__"]
