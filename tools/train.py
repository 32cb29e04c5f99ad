"""Train a model from an mmdet, mmseg or mmgroupmamba (classification) config.

    python tools/train.py CONFIG [--work-dir DIR] [--resume [CKPT]] [--amp] [--auto-scale-lr]
        [--cfg-options KEY=VALUE ...] [--launcher {none,pytorch,slurm,mpi}]

Distributed: tools/dist_train.sh CONFIG GPUS [options].
"""
import argparse

from mmgroupmamba.engine.runner import (add_shared_arguments, build_runner, configure_train,
                                        end_cpu_distributed_process, load_config,
                                        parse_shared_arguments, refusals_leave_nothing)


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('config', help='train config file')
    parser.add_argument('--work-dir', help='where logs and checkpoints go '
                        '(default: the config\'s work_dir, else work_dirs/<config name>)')
    parser.add_argument('--resume', nargs='?', const='auto', metavar='CKPT',
                        help='resume from CKPT; without CKPT, from the newest checkpoint in '
                        'the work dir that loads')
    parser.add_argument('--amp', action='store_true',
                        help='automatic mixed precision (AmpOptimWrapper, dynamic loss scale)')
    parser.add_argument('--auto-scale-lr', action='store_true',
                        help='scale the learning rate to the actual total batch size')
    add_shared_arguments(parser, 'train_cfg.max_iters=100 or key="[a,b]" for lists')
    return parser, parse_shared_arguments(parser)


def main():
    parser, args = parse_args()
    try:
        cfg = load_config(args.config, args.cfg_options, args.launcher, args.work_dir)
        configure_train(cfg, resume=args.resume, amp=args.amp, auto_scale_lr=args.auto_scale_lr)
    except (FileNotFoundError, ValueError) as error:
        parser.error(str(error))
    # Refusals come while the weights load, before the first iteration: nothing worth keeping.
    with refusals_leave_nothing(cfg):
        runner = build_runner(cfg)
        try:
            runner.train()
        except FloatingPointError as error:  # a non-finite loss (NonFiniteLossHook)
            raise SystemExit(f'error: {error}')
    end_cpu_distributed_process()


if __name__ == '__main__':
    main()
