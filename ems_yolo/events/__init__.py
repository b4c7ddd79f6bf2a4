"""Event-camera data: Prophesee `.dat` events and Gen1 `_bbox.npy` boxes."""

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

__all__ = [
    "BBOX_DTYPE",
    "BBOX_DTYPE_V1",
    "EVENT_DTYPE",
    "DatHeader",
    "DatReader",
    "EventFileError",
    "read_bbox",
    "read_dat",
    "read_dat_header",
    "write_bbox",
    "write_dat",
]
