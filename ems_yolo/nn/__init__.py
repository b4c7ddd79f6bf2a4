"""Spiking layers, blocks, head, loss and the model parser of EMS-YOLO."""

from ems_yolo.nn.blocks import EMSBlock1, EMSBlock2, MSBlock, SiLUConv, WideBlock
from ems_yolo.nn.head import EMSDetect
from ems_yolo.nn.layers import LCB, EncodingConv, TDBatchNorm2d
from ems_yolo.nn.model import EMSDetectionModel
from ems_yolo.nn.ilif import ILIF
from ems_yolo.nn.neuron import LIF, NeuronConfig, SiLUNeuron
from ems_yolo.nn.parser import parse_model
from ems_yolo.nn.surrogate import ATan, Rectangle, Sigmoid

__all__ = [
    "LIF", "ILIF", "SiLUNeuron", "NeuronConfig", "Rectangle", "Sigmoid", "ATan", "TDBatchNorm2d", "EncodingConv", "LCB",
    "EMSBlock1", "EMSBlock2", "MSBlock", "WideBlock", "SiLUConv", "EMSDetect", "EMSDetectionModel", "parse_model",
]
