from .depthwise_conv import depthwise_conv2d
from .selective_scan import SCAN_DIRECTIONS, selective_scan

__all__ = ['SCAN_DIRECTIONS', 'depthwise_conv2d', 'selective_scan']
