"""Write one of the project's small synthetic datasets to disk.

    python tools/make_toy_data.py coco data/toy_coco
    python tools/make_toy_data.py ade20k data/toy_ade20k
    python tools/make_toy_data.py imagenet data/toy_imagenet
    # COCO-like sizes and instance counts (e.g. for a rehearsal of the full Mask R-CNN config):
    python tools/make_toy_data.py coco data/coco_like --image-size 640 --num-train 600 \
        --num-val 50 --max-objects 12 --aspect-ratios 0.75 0.667 1.333 1.5 1
"""
import argparse
import importlib

MAKERS = {
    'coco': 'mmgroupmamba.datasets.toy_coco:make_toy_coco',
    'ade20k': 'mmgroupmamba.datasets.toy_ade20k:make_toy_ade20k',
    'imagenet': 'mmgroupmamba.datasets.toy_imagenet:make_toy_imagenet',
}

COCO_OPTIONS = ('image_size', 'num_train', 'num_val', 'max_objects', 'aspect_ratios')


def main():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('kind', choices=sorted(MAKERS))
    parser.add_argument('out_dir', help='folder to write the dataset into')
    parser.add_argument('--seed', type=int, default=0)
    coco = parser.add_argument_group('coco only (defaults: 96 px squares, 300 / 50 images, up to '
                                     '3 shapes each)')
    coco.add_argument('--image-size', type=int, help='the longer side of the images, in pixels')
    coco.add_argument('--num-train', type=int)
    coco.add_argument('--num-val', type=int)
    coco.add_argument('--max-objects', type=int, help='most shapes per image')
    coco.add_argument('--aspect-ratios', type=float, nargs='+',
                      help='height / width of the images, one drawn per image')
    args = parser.parse_args()
    options = {key: value for key in COCO_OPTIONS
               if (value := getattr(args, key)) is not None}
    if options and args.kind != 'coco':
        given = ', '.join('--' + key.replace('_', '-') for key in options)
        parser.error(f'the {args.kind} dataset takes none of the coco options ({given})')
    module, name = MAKERS[args.kind].split(':')
    summary = getattr(importlib.import_module(module), name)(args.out_dir, seed=args.seed,
                                                             **options)
    print(summary)


if __name__ == '__main__':
    main()
