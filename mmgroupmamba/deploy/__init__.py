"""Deployment: ONNX export of the models our configs build (see :mod:`.onnx_export`)."""
from .onnx_export import (MAX_RELATIVE_ERROR, TASKS, ExportedModel, IntegralAdaptiveAvgPool2d,
                          Parity, build_export_model, check_parity, export_onnx,
                          non_standard_nodes, size_bound_modules)

__all__ = ['MAX_RELATIVE_ERROR', 'TASKS', 'ExportedModel', 'IntegralAdaptiveAvgPool2d', 'Parity',
           'build_export_model', 'check_parity', 'export_onnx', 'non_standard_nodes',
           'size_bound_modules']
