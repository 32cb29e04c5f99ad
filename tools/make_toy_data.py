"""Write one of the project's small synthetic datasets to disk.

    python tools/make_toy_data.py coco data/toy_coco
    python tools/make_toy_data.py ade20k data/toy_ade20k
    python tools/make_toy_data.py imagenet data/toy_imagenet
"""
import argparse
import importlib

MAKERS = {
    'coco': 'mmgroupmamba.datasets.toy_coco:make_toy_coco',
    'ade20k': 'mmgroupmamba.datasets.toy_ade20k:make_toy_ade20k',
    'imagenet': 'mmgroupmamba.datasets.toy_imagenet:make_toy_imagenet',
}


def main():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('kind', choices=sorted(MAKERS))
    parser.add_argument('out_dir', help='folder to write the dataset into')
    parser.add_argument('--seed', type=int, default=0)
    args = parser.parse_args()
    module, name = MAKERS[args.kind].split(':')
    summary = getattr(importlib.import_module(module), name)(args.out_dir, seed=args.seed)
    print(summary)


if __name__ == '__main__':
    main()
