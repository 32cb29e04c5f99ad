"""Test (and evaluate) a checkpoint with an mmdet, mmseg or mmgroupmamba (classification) config.

    python tools/test.py CONFIG CHECKPOINT [--work-dir DIR] [--out FILE] [--show]
        [--show-dir DIR] [--tta] [--cfg-options KEY=VALUE ...] [--launcher ...]

--out: detection/classification dump predictions to a .pkl file; segmentation writes one PNG
label map per image into the directory given. Distributed: tools/dist_test.sh CONFIG CKPT GPUS.
"""
import argparse

from mmgroupmamba.engine.runner import (add_shared_arguments, build_runner,
                                        check_checkpoint_fits, configure_test,
                                        end_cpu_distributed_process, load_config,
                                        parse_shared_arguments, refusals_leave_nothing)


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('config', help='test config file')
    parser.add_argument('checkpoint', help='checkpoint: a file, or a URL / open-mmlab:// ... '
                        'name that mmengine loads')
    parser.add_argument('--work-dir', help='where the metrics and logs go '
                        '(default: the config\'s work_dir, else work_dirs/<config name>)')
    parser.add_argument('--out', help='dump predictions: a .pkl file (detection, '
                        'classification) or a directory of PNG label maps (segmentation)')
    parser.add_argument('--show', action='store_true', help='display painted predictions')
    parser.add_argument('--show-dir', help='save painted predictions (mmdet: under '
                        '<work_dir>/<timestamp>/DIR; mmseg: DIR/vis_data/vis_image)')
    parser.add_argument('--wait-time', type=float, default=2.0,
                        help='seconds each image is shown with --show')
    parser.add_argument('--tta', action='store_true',
                        help='test-time augmentation with the config\'s tta_model/tta_pipeline')
    add_shared_arguments(parser, 'test_dataloader.batch_size=1')
    return parser, parse_shared_arguments(parser)


def main():
    parser, args = parse_args()
    try:
        cfg = load_config(args.config, args.cfg_options, args.launcher, args.work_dir)
        configure_test(cfg, args.checkpoint, out=args.out, show=args.show,
                       show_dir=args.show_dir, wait_time=args.wait_time, tta=args.tta)
    except (FileNotFoundError, ValueError) as error:
        parser.error(str(error))
    with refusals_leave_nothing(cfg):
        runner = build_runner(cfg)
        check_checkpoint_fits(runner.model, args.checkpoint)
    try:
        runner.test()
    except FloatingPointError as error:  # non-finite outputs: no metric to report
        raise SystemExit(f'error: {error}')
    end_cpu_distributed_process()


if __name__ == '__main__':
    main()
