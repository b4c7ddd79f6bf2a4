"""Event-camera data: Prophesee `.dat` and `.raw` (EVT 2.0/2.1/3.0) events, `_bbox.npy` boxes, event
representations, the Gen1 and 1 Mpx protocols and their metrics."""

from ems_yolo.events.evaluation import evaluate_detections
from ems_yolo.events.formats import EventSource, convert_events, open_events, read_events, write_events
from ems_yolo.events.io import (
    BBOX_DTYPE,
    BBOX_DTYPE_V1,
    EVENT_DTYPE,
    DatHeader,
    DatReader,
    EventFileError,
    read_bbox,
    read_dat,
    read_dat_header,
    write_bbox,
    write_dat,
)
from ems_yolo.events.raw import TRIGGER_DTYPE, RawHeader, RawReader, read_raw, read_raw_header, write_raw_evt2
from ems_yolo.events.representations import (
    EventRepresentation,
    count_histogram,
    ems_frames,
    voxel_grid,
)
from ems_yolo.events.protocols import GEN1, GEN4, DatasetProtocol, clean_labels, get_protocol
from ems_yolo.events.simulator import EventSimulator, SimulatorConfig, video_to_events
from ems_yolo.events.synthetic import make_synthetic_gen1, make_synthetic_gen4

__all__ = [
    "BBOX_DTYPE",
    "BBOX_DTYPE_V1",
    "EVENT_DTYPE",
    "GEN1",
    "GEN4",
    "TRIGGER_DTYPE",
    "DatHeader",
    "DatReader",
    "DatasetProtocol",
    "EventFileError",
    "EventRepresentation",
    "EventSimulator",
    "EventSource",
    "RawHeader",
    "RawReader",
    "SimulatorConfig",
    "clean_labels",
    "convert_events",
    "count_histogram",
    "ems_frames",
    "evaluate_detections",
    "get_protocol",
    "make_synthetic_gen1",
    "make_synthetic_gen4",
    "open_events",
    "read_bbox",
    "read_dat",
    "read_dat_header",
    "read_events",
    "read_raw",
    "read_raw_header",
    "video_to_events",
    "voxel_grid",
    "write_bbox",
    "write_dat",
    "write_events",
    "write_raw_evt2",
]
