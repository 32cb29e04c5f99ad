"""Export a GroupMamba model to ONNX and check it in onnxruntime against PyTorch.

    python tools/deploy/export_onnx.py CONFIG [--checkpoint CKPT] --shape H W --out FILE
        [--dynamic] [--cfg-options KEY=VALUE ...]

Classification configs export the classifier (images -> logits), segmentation configs the
segmentor's tensor forward (images -> decode-head logits), detection configs the backbone and
neck (images -> FPN maps; the heads are mmdeploy's). Inputs are preprocessed images (normalised,
padded), batch 1. Without --checkpoint the config's freshly initialised weights are exported.
--dynamic keeps the height and width symbolic: one file for every input size (checked at the
given size and at a second, odd one); UperNet's pyramid pooling follows the size through running
sums (``IntegralAdaptiveAvgPool2d``).

After writing the file the tool runs it in onnxruntime (CPU) on a random input, prints the largest relative error against the PyTorch model (max |onnx - torch| / max
|torch|, per output) and both run times, and fails if the error is above 1e-4.
"""
import argparse
import os
import time

from mmengine.config import DictAction

from mmgroupmamba.deploy import (MAX_RELATIVE_ERROR, TASKS, build_export_model, check_parity,
                                 export_onnx)


def main():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('config', help='classification, segmentation or detection config')
    parser.add_argument('--checkpoint', help='weights of the whole model (default: the '
                        'config\'s fresh initialisation)')
    parser.add_argument('--shape', type=int, nargs=2, metavar=('H', 'W'), required=True,
                        help='input height and width (of the preprocessed, padded images)')
    parser.add_argument('--out', required=True, help='the ONNX file to write')
    parser.add_argument('--dynamic', action='store_true',
                        help='dynamic height and width (one file for every input size)')
    parser.add_argument('--cfg-options', nargs='+', action=DictAction, metavar='KEY=VALUE',
                        help='override config entries')
    args = parser.parse_args()
    try:
        exported = build_export_model(args.config, args.checkpoint, args.cfg_options)
    except (FileNotFoundError, ValueError) as error:
        parser.error(str(error))
    print(f'exporting the {TASKS[exported.task]} of {args.config}, input (1, 3, '
          f'{"H, W" if args.dynamic else ", ".join(map(str, args.shape))})')
    start = time.perf_counter()
    try:
        export_onnx(exported, args.shape, args.out, dynamic=args.dynamic)
    except ValueError as error:
        parser.error(str(error))
    print(f'wrote {args.out} in {time.perf_counter() - start:.0f} s')
    shapes = [tuple(args.shape)]
    if args.dynamic:  # the same file at a second, odd size
        shapes.append((args.shape[0] + 16 + 1, args.shape[1] + 48 + 1))
    for shape in shapes:
        parity = check_parity(exported, args.out, shape)
        for name, error in zip(exported.names, parity.errors):
            print(f'  {name}: relative error {error:.2e}')
        print(f'largest relative error {parity.max_error:.2e} on input {parity.shape}; '
              f'PyTorch eager {parity.torch_ms:.1f} ms, onnxruntime {parity.onnx_ms:.1f} ms (CPU)')
        if not parity.max_error <= MAX_RELATIVE_ERROR:
            os.remove(args.out)  # a file that fails its check is not left to be deployed
            raise SystemExit(f'error: the ONNX model differs from PyTorch by '
                             f'{parity.max_error:.2e} (relative) on input {parity.shape}, more '
                             f'than {MAX_RELATIVE_ERROR:.0e}; {args.out} was removed')


if __name__ == '__main__':
    main()
