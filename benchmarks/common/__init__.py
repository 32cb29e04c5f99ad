"""What the benchmark scripts share: timing on asynchronous devices, the synthetic training
iteration of a detection or segmentation config, kernel timing and the scan benchmarks' inputs,
saved-activation accounting, json-log reading for the multi-GPU check, and the compile check.

The scripts in ``benchmarks/`` import it as ``common``: Python puts a script's own folder first
on ``sys.path``.
"""
