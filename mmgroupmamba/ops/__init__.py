from .selective_scan import SCAN_DIRECTIONS, selective_scan

__all__ = ['SCAN_DIRECTIONS', 'selective_scan']
