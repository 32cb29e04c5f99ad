"""The multi-GPU check in one go, on the toy datasets, through tools/dist_train.sh and dist_test.sh:

1. Mask R-CNN GM-T (configs/mask_rcnn/gm_t_toy_coco.py, toy images resized to 1333x800, batch 2
   per GPU) trains on 2 GPUs (loss trend, checkpoint), resumes with --resume (the iteration
   counter goes on), and trains on 1 GPU for the scaling figure.
2. UperNet GM-T (configs/upernet/gm_t_toy_ade20k.py) trains on 2 GPUs with SyncBN in the heads
   (the toy config's BN swapped back), for a checkpoint.
3. Both checkpoints are tested with dist_test.sh on 2 GPUs and on 1: the metrics must agree.
4. ImageNet GM-T (configs/imagenet/gm_t_in1k.py: AMP, batch 128 per GPU, 224x224 crops, EMA,
   a randomly initialised RegNetY-16G teacher) trains on 2 GPUs and on 1, on the toy ImageNet
   with every image linked many times so that an epoch holds enough full batches.

Images/s per GPU come from the ``time`` of mmengine's json logs (median over the windows after
the warm-up); efficiency = images/s per GPU on 2 GPUs over that on 1. --gpus N uses N GPUs
wherever this says 2.

    python benchmarks/multi_gpu_check.py --out DIR [--root work_dirs/multi_gpu_check]
        [--budget 360] [--gpus 2] [--smoke]

--smoke (or MULTI_GPU_CHECK_SMOKE=1): the same steps with tiny settings, for a dry run on a CPU
(2 gloo processes). Every step has its own time limit inside --budget seconds; DIR receives
summary.txt, summary.json and logs.tar.gz (each step's output and the runs' json and text logs)
after every step, so a run cut short still leaves what it did.
"""
import argparse
import dataclasses
import datetime
import json
import os
import os.path as osp
import shlex
import signal
import subprocess
import sys
import tarfile
import time

from mmengine.config import Config

from common.scaling import (compare_metrics, final_metrics, json_logs, metrics_agree,
                            read_json_log, repeat_image_folder, scaling_efficiency,
                            summarize_train)

REPO = osp.dirname(osp.dirname(osp.abspath(__file__)))
DET_CONFIG = 'configs/mask_rcnn/gm_t_toy_coco.py'
SEG_CONFIG = 'configs/upernet/gm_t_toy_ade20k.py'
CLS_CONFIG = 'configs/imagenet/gm_t_in1k.py'
# NVLink multicast stays off: a program using it can put the host's GPUs out of service.
NCCL_ENV = dict(NCCL_NVLS_ENABLE='0', TORCH_SYMM_MEM_DISABLE_MULTICAST='1',
                NVSHMEM_DISABLE_NVLS='1')


@dataclasses.dataclass
class Settings:
    det_scale: tuple          # Mask R-CNN input (w, h), resized without keeping the ratio
    det_epochs: int           # first 2-GPU run; the resumed run adds one epoch
    det_batch: int            # per GPU
    det_workers: int
    det_train_images: int     # 0: the whole train split
    det_one_gpu_images: int   # dataset subset for the 1-GPU run (det_one_gpu_images / batch iters)
    det_log: int              # logging interval = window of the logged means
    det_warmup: int           # iterations left out of the timing
    det_test_images: int      # 0: the whole val split
    seg_iters: int
    seg_sync_bn: bool
    cls_repeat: int           # links per toy ImageNet image
    cls_batch: int            # per GPU
    cls_workers: int
    cls_images: int           # 0: all of them
    cls_input: int
    cls_epochs_two: int
    cls_epochs_one: int
    cls_log: int
    cls_warmup: int
    cls_amp: bool
    gpus: int


GPU = Settings(
    det_scale=(1333, 800), det_epochs=2, det_batch=2, det_workers=4, det_train_images=0,
    det_one_gpu_images=160, det_log=10, det_warmup=20, det_test_images=0,
    seg_iters=20, seg_sync_bn=True,
    cls_repeat=80, cls_batch=128, cls_workers=8, cls_images=0, cls_input=224, cls_epochs_two=2,
    cls_epochs_one=1, cls_log=5, cls_warmup=10, cls_amp=True, gpus=2)
SMOKE = Settings(
    det_scale=None, det_epochs=1, det_batch=2, det_workers=0, det_train_images=8,
    det_one_gpu_images=4, det_log=1, det_warmup=0, det_test_images=4,
    seg_iters=4, seg_sync_bn=False,
    cls_repeat=1, cls_batch=4, cls_workers=0, cls_images=16, cls_input=64, cls_epochs_two=1,
    cls_epochs_one=1, cls_log=1, cls_warmup=0, cls_amp=False, gpus=2)


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--out', required=True, help='folder for the summary and logs')
    parser.add_argument('--root', default='work_dirs/multi_gpu_check',
                        help='data and work dirs of all runs')
    parser.add_argument('--budget', type=float, default=360,
                        help='seconds for everything; steps are cut to fit')
    parser.add_argument('--gpus', type=int, default=2,
                        help='GPUs (smoke: CPU processes) of the multi-GPU runs, at least 2')
    parser.add_argument('--smoke', action='store_true',
                        default=os.environ.get('MULTI_GPU_CHECK_SMOKE') == '1')
    args = parser.parse_args()
    if args.gpus < 2:
        parser.error('--gpus must be at least 2: the check compares them with 1')
    return args


class Check:
    """Runs the steps one after another under one deadline and keeps the summary current."""

    def __init__(self, args):
        self.s = dataclasses.replace(SMOKE if args.smoke else GPU, gpus=args.gpus)
        self.smoke = args.smoke
        self.root = osp.abspath(args.root)
        self.out = osp.abspath(args.out)
        self.deadline = time.monotonic() + args.budget
        self.steps = []   # dicts: name, command, rc, seconds
        self.port = 29500
        os.makedirs(osp.join(self.root, 'logs'), exist_ok=True)
        os.makedirs(self.out, exist_ok=True)
        self.env = dict(os.environ, **NCCL_ENV, PYTHON=sys.executable, PYTHONUNBUFFERED='1')
        self.env['PYTHONPATH'] = os.pathsep.join(
            p for p in (REPO, os.environ.get('PYTHONPATH')) if p)

    # ---- running ------------------------------------------------------------------------------
    def run(self, steps, limit):
        """Run ``steps`` (name, argv, visible GPUs or None) side by side, each under ``limit``
        seconds (cut to the deadline); returns True if all exited with 0."""
        limit = min(limit, self.deadline - time.monotonic() - 15)
        if limit < 20:
            for name, argv, _ in steps:
                self._record(name, argv, 'skipped: out of time', 0.0)
            return False
        procs = []
        for name, argv, gpus in steps:
            env = dict(self.env, PORT=str(self.port))
            self.port += 1
            if gpus is not None and not self.smoke:
                env['CUDA_VISIBLE_DEVICES'] = gpus
            log = open(osp.join(self.root, 'logs', f'{name}.log'), 'w')
            print(f'[{name}] {shlex.join(argv)}', flush=True)
            # A new session, so that a timeout can end torchrun and all its workers together.
            proc = subprocess.Popen(argv, cwd=REPO, env=env, stdout=log,
                                    stderr=subprocess.STDOUT, start_new_session=True)
            procs.append((name, argv, proc, log, time.monotonic()))
        ok = True
        for name, argv, proc, log, start in procs:
            try:
                rc = proc.wait(timeout=max(1.0, start + limit - time.monotonic()))
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                rc = f'timed out after {limit:.0f} s'
            log.close()
            self._record(name, argv, rc, time.monotonic() - start)
            ok = ok and rc == 0
        self.report()
        return ok

    def _record(self, name, argv, rc, seconds):
        self.steps.append(dict(name=name, command=shlex.join(argv), rc=rc,
                               seconds=round(seconds, 1)))
        print(f'[{name}] rc={rc} in {seconds:.0f} s', flush=True)

    def work_dir(self, name):
        return osp.join(self.root, name)

    # ---- commands -----------------------------------------------------------------------------
    def train(self, config, gpus, name, options, *extra):
        return ['bash', 'tools/dist_train.sh', config, str(gpus), '--work-dir',
                self.work_dir(name), *extra, '--cfg-options', *options]

    def test(self, config, checkpoint, gpus, name, options):
        return ['bash', 'tools/dist_test.sh', config, checkpoint, str(gpus), '--work-dir',
                self.work_dir(name), '--cfg-options', *options]

    def det_options(self, data_root):
        s = self.s
        cfg = Config.fromfile(osp.join(REPO, DET_CONFIG), import_custom_modules=False)
        options = [f'default_hooks.logger.interval={s.det_log}',
                   f'log_processor.window_size={s.det_log}',
                   f'train_dataloader.batch_size={s.det_batch}']
        for loader in ('train_dataloader', 'val_dataloader', 'test_dataloader'):
            options += [f'{loader}.dataset.data_root={data_root}/',
                        f'{loader}.num_workers={s.det_workers}',
                        f'{loader}.persistent_workers={s.det_workers > 0}']
            if s.det_scale is not None:
                options += _pipeline_options(cfg, loader, ('Resize',),
                                             scale=s.det_scale, keep_ratio=False)
        for evaluator in ('val_evaluator', 'test_evaluator'):
            options.append(f'{evaluator}.ann_file={data_root}/annotations/val.json')
        if s.det_train_images:
            options.append(f'train_dataloader.dataset.indices={s.det_train_images}')
        if s.det_test_images:
            options.append(f'test_dataloader.dataset.indices={s.det_test_images}')
        return options

    def seg_options(self, data_root):
        s = self.s
        options = [f'train_cfg.max_iters={s.seg_iters}', f'train_cfg.val_interval={s.seg_iters}',
                   f'default_hooks.checkpoint.interval={s.seg_iters}',
                   f'param_scheduler.1.end={s.seg_iters}',
                   'default_hooks.logger.interval=1', 'log_processor.window_size=1']
        options += [f'{loader}.dataset.data_root={data_root}'
                    for loader in ('train_dataloader', 'val_dataloader', 'test_dataloader')]
        if s.seg_sync_bn:
            options += ['model.decode_head.norm_cfg.type=SyncBN',
                        'model.auxiliary_head.norm_cfg.type=SyncBN']
        return options

    def cls_options(self, data_root, teacher):
        s = self.s
        cfg = Config.fromfile(osp.join(REPO, CLS_CONFIG), import_custom_modules=False)
        options = [f'model.teacher_checkpoint={teacher}',
                   f'train_dataloader.batch_size={s.cls_batch}',
                   f'train_dataloader.num_workers={s.cls_workers}',
                   f'train_dataloader.persistent_workers={s.cls_workers > 0}',
                   'train_cfg.val_begin=1000',
                   f'default_hooks.logger.interval={s.cls_log}',
                   f'log_processor.window_size={s.cls_log}',
                   'default_hooks.checkpoint.interval=1000',
                   'default_hooks.checkpoint.save_last=False']
        options += [f'{loader}.dataset.data_root={data_root}'
                    for loader in ('train_dataloader', 'val_dataloader', 'test_dataloader')]
        options += _pipeline_options(cfg, 'train_dataloader', ('TimmTransform',),
                                     input_size=s.cls_input)
        if s.cls_images:
            options.append(f'train_dataloader.dataset.indices={s.cls_images}')
        if not s.cls_amp:
            options.append('optim_wrapper.type=OptimWrapper')  # AMP needs a GPU
        return options

    # ---- the check ----------------------------------------------------------------------------
    def prepare_data(self):
        data = osp.join(self.root, 'data')
        python = sys.executable
        self.run([(f'make_{kind}', [python, 'tools/make_toy_data.py', kind,
                                    osp.join(data, f'toy_{kind}')], None)
                  for kind in ('coco', 'ade20k', 'imagenet')], limit=120)
        links = repeat_image_folder(osp.join(data, 'toy_imagenet'),
                                    osp.join(data, 'toy_imagenet_repeated'), self.s.cls_repeat)
        print(f'{links} links in {data}/toy_imagenet_repeated', flush=True)
        teacher = osp.join(data, 'teacher_random.pth')
        _write_random_teacher(teacher)
        return data, teacher

    def main(self):
        s = self.s
        data, teacher = self.prepare_data()
        det = self.det_options(osp.join(data, 'toy_coco'))
        seg = self.seg_options(osp.join(data, 'toy_ade20k'))
        cls = self.cls_options(osp.join(data, 'toy_imagenet_repeated'), teacher)
        no_val = 'train_cfg.val_begin=1000'
        # Steps whose times are reported run alone; the others share the GPUs.
        self.run([('det_train_multi', self.train(DET_CONFIG, s.gpus, 'det_multi',
                                                det + [f'train_cfg.max_epochs={s.det_epochs}',
                                                       no_val]), None)], limit=120)
        self.run([('det_resume_multi', self.train(DET_CONFIG, s.gpus, 'det_multi',
                                                 det + [f'train_cfg.max_epochs={s.det_epochs + 1}',
                                                        no_val], '--resume'), None),
                  ('seg_train_multi', self.train(SEG_CONFIG, s.gpus, 'seg_multi', seg), None)],
                 limit=90)
        one_gpu = [f'train_dataloader.dataset.indices={s.det_one_gpu_images}',
                   'train_cfg.max_epochs=1', no_val]
        self.run([('det_train_1gpu', self.train(DET_CONFIG, 1, 'det_1gpu', det + one_gpu), '0')],
                 limit=80)

        det_ckpt = osp.join(self.work_dir('det_multi'), f'epoch_{s.det_epochs + 1}.pth')
        seg_ckpt = osp.join(self.work_dir('seg_multi'), f'iter_{s.seg_iters}.pth')
        self.run([('det_test_multi', self.test(DET_CONFIG, det_ckpt, s.gpus, 'det_test_multi',
                                               det), None),
                  ('seg_test_multi', self.test(SEG_CONFIG, seg_ckpt, s.gpus, 'seg_test_multi',
                                               seg), None),
                  ('det_test_1gpu', self.test(DET_CONFIG, det_ckpt, 1, 'det_test_1gpu', det), '0'),
                  ('seg_test_1gpu', self.test(SEG_CONFIG, seg_ckpt, 1, 'seg_test_1gpu', seg), '1')],
                 limit=90)

        self.run([('cls_train_multi', self.train(
            CLS_CONFIG, s.gpus, 'cls_multi', cls + [f'train_cfg.max_epochs={s.cls_epochs_two}']),
            None)], limit=110)
        self.run([('cls_train_1gpu', self.train(
            CLS_CONFIG, 1, 'cls_1gpu', cls + [f'train_cfg.max_epochs={s.cls_epochs_one}']), '0')],
            limit=110)

    # ---- summary ------------------------------------------------------------------------------
    def report(self):
        summary = dict(date=datetime.date.today().isoformat(), device=_device(), smoke=self.smoke,
                       settings=dataclasses.asdict(self.s), steps=self.steps)
        lines = [f'date {summary["date"]}; {summary["device"]}; smoke={self.smoke}']
        lines += [f'  {st["name"]}: rc={st["rc"]} {st["seconds"]} s' for st in self.steps]
        s = self.s
        trains = {}
        for key, name, index, batch, warmup in (
                ('det_multi', 'det_multi', 0, s.det_batch, s.det_warmup),
                ('det_resume', 'det_multi', 1, s.det_batch, 0),
                ('det_1gpu', 'det_1gpu', 0, s.det_batch, s.det_warmup),
                ('seg_multi', 'seg_multi', 0, 2, 0),
                ('cls_multi', 'cls_multi', 0, s.cls_batch, s.cls_warmup),
                ('cls_1gpu', 'cls_1gpu', 0, s.cls_batch, s.cls_warmup)):
            logs = json_logs(self.work_dir(name))
            try:
                trains[key] = summarize_train(read_json_log(logs[index]), batch, warmup)
            except (IndexError, ValueError):
                continue
            t = trains[key]
            lines.append(f'{key}: steps {t.first_step}-{t.last_step}, loss {t.first_loss:.4f} -> '
                         f'{t.last_loss:.4f}, {t.seconds_per_iter:.4f} s/iter (data '
                         f'{t.data_seconds_per_iter:.4f}) over {t.num_windows} windows, '
                         f'{t.images_per_s_per_gpu:.1f} images/s/GPU')
        summary['train'] = {k: dataclasses.asdict(v) for k, v in trains.items()}
        if 'det_multi' in trains and 'det_resume' in trains:
            summary['resume_continues'] = (trains['det_resume'].first_step
                                           > trains['det_multi'].last_step)
            lines.append(f'resume continues the iteration counter: {summary["resume_continues"]}')
        det_dir = self.work_dir('det_multi')
        summary['checkpoints'] = sorted(f for f in os.listdir(det_dir) if f.endswith('.pth')) \
            if osp.isdir(det_dir) else []
        lines.append(f'det_multi checkpoints: {summary["checkpoints"]}')
        summary['efficiency'] = {}
        for task in ('det', 'cls'):
            if f'{task}_1gpu' in trains and f'{task}_multi' in trains:
                eff = scaling_efficiency(trains[f'{task}_1gpu'].images_per_s_per_gpu,
                                         trains[f'{task}_multi'].images_per_s_per_gpu)
                summary['efficiency'][task] = eff
                lines.append(f'{task} scaling efficiency {s.gpus} GPUs vs 1: {100 * eff:.1f}%')
        summary['tests'] = {}
        for task in ('det', 'seg'):
            metrics = {}
            for run in ('1gpu', 'multi'):
                logs = json_logs(self.work_dir(f'{task}_test_{run}'))
                try:
                    metrics[run] = final_metrics(read_json_log(logs[-1]))
                except (IndexError, ValueError):
                    pass
            if len(metrics) == 2:
                diff = compare_metrics(metrics['1gpu'], metrics['multi'])
                summary['tests'][task] = dict(one_gpu=metrics['1gpu'], multi_gpu=metrics['multi'],
                                              agree=metrics_agree(diff))
                lines.append(f'{task} test metrics, 1 GPU: {metrics["1gpu"]}')
                lines.append(f'{task} test metrics, {s.gpus} GPUs: {metrics["multi"]}')
                lines.append(f'{task} 1 vs {s.gpus} GPUs agree: {metrics_agree(diff)}')
        sync_bn = _dumped_config_mentions(self.work_dir('seg_multi'), "type='SyncBN'")
        summary['seg_sync_bn'] = sync_bn
        lines.append(f'seg_multi config uses SyncBN: {sync_bn}')
        text = '\n'.join(lines)
        with open(osp.join(self.out, 'summary.txt'), 'w') as f:
            f.write(text + '\n')
        with open(osp.join(self.out, 'summary.json'), 'w') as f:
            json.dump(summary, f, indent=1)
        self._pack_logs()
        return text

    def _pack_logs(self):
        with tarfile.open(osp.join(self.out, 'logs.tar.gz'), 'w:gz') as tar:
            for folder, _, files in os.walk(self.root):
                if osp.join(self.root, 'data') in folder:
                    continue
                for name in files:
                    if name.endswith(('.log', '.json', '.py')):
                        path = osp.join(folder, name)
                        tar.add(path, arcname=osp.relpath(path, self.root))


def _pipeline_options(cfg, loader, types, **values):
    """``--cfg-options`` that set ``values`` on every transform of one of ``types`` in
    ``cfg[loader].dataset.pipeline`` (addressed by index, as mmengine merges lists)."""
    options = []
    for index, transform in enumerate(cfg[loader].dataset.pipeline):
        if transform['type'] in types:
            for key, value in values.items():
                value = str(value).replace(' ', '')
                options.append(f'{loader}.dataset.pipeline.{index}.{key}={value}')
    if not options:
        raise ValueError(f'no {types} in {loader}.dataset.pipeline')
    return options


def _write_random_teacher(path):
    """The config's teacher with random weights: the machine cannot download them, and the
    weights do not change the speed."""
    import timm
    import torch
    teacher = Config.fromfile(osp.join(REPO, CLS_CONFIG), import_custom_modules=False).model.teacher
    model = timm.create_model(teacher.model_name, pretrained=False,
                              num_classes=teacher.num_classes)
    torch.save(model.state_dict(), path)


def _dumped_config_mentions(work_dir, text):
    # mmengine dumps the merged config into the work dir as <config name>.py.
    if not osp.isdir(work_dir):
        return None
    for name in os.listdir(work_dir):
        if name.endswith('.py'):
            with open(osp.join(work_dir, name)) as f:
                return text in f.read()
    return None


def _device():
    try:
        out = subprocess.run(['nvidia-smi', '--query-gpu=name,driver_version',
                              '--format=csv,noheader'], capture_output=True, text=True,
                             timeout=20).stdout.strip().splitlines()
        return f'{len(out)} x {out[0]}' if out else 'CPU'
    except (OSError, subprocess.TimeoutExpired):
        return 'CPU'


def main():
    args = parse_args()
    check = Check(args)
    start = time.monotonic()
    try:
        check.main()
    finally:
        print(f'\n--- summary ({time.monotonic() - start:.0f} s) ---')
        print(check.report())


if __name__ == '__main__':
    main()
