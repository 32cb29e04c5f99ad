# GroupMamba-T on ImageNet-1k with the official recipe: 300 epochs at batch 1024 (8 GPUs x 128),
# AdamW, cosine schedule after 20 warm-up epochs, AMP, EMA of the weights, RandAugment, Mixup and
# CutMix, and hard distillation from RegNetY-16G (83.3 top-1 in the paper).
#
#   python tools/train.py configs/imagenet/gm_t_in1k.py            (1 process)
#   bash tools/dist_train.sh configs/imagenet/gm_t_in1k.py 8        (the recipe's 8 GPUs)
#   python tools/test.py configs/imagenet/gm_t_in1k.py CHECKPOINT   (top-1 / top-5)

# ---- Settings to edit (gm_s_in1k.py and gm_b_in1k.py inherit them) ------------------------------
# ImageNet in the folder layout: data_root/train/<class>/<image>, data_root/val/<class>/<image>.
data_root = 'data/imagenet/'
# The teacher's weights, needed to train with distillation (not to test): DeiT's RegNetY-16G,
# https://dl.fbaipublicfiles.com/deit/regnety_160-a5fe301d.pth
teacher_checkpoint = None
# False trains without a teacher: no distillation head, loss = CE(head, mixed targets) only.
distillation = True
# -------------------------------------------------------------------------------------------------

default_scope = 'mmgroupmamba'
custom_imports = dict(imports=['mmgroupmamba'], allow_failed_imports=False)

# Atomic checkpoints, auto-resume from the newest checkpoint that loads, and exact resume (random
# states in every checkpoint), for tools/train.py and mmdet's/mmseg's own tools alike.
runner_type = 'DurableRunner'

num_classes = 1000
model = dict(
    type='ImageClassifier',
    # The official train.py builds every variant with drop_path_rate=0.05 (its drop_rate=0.1 is
    # swallowed by the model's **kwargs and has no effect).
    classifier=dict(type='GroupMambaClassifier', arch='tiny', num_classes=num_classes,
                    distillation=distillation, drop_path_rate=0.05),
    teacher=(dict(type='TimmClassifier', model_name='regnety_160', num_classes=num_classes)
             if distillation else None),
    teacher_checkpoint=teacher_checkpoint,
    distillation_alpha=0.5,
    data_preprocessor=dict(
        type='ClsDataPreprocessor', num_classes=num_classes, label_smoothing=0.1,
        mixup=dict(mixup_alpha=0.8, cutmix_alpha=1.0, prob=1.0, switch_prob=0.5, mode='batch')))

# ---- Data: timm's transforms, as the official code builds them ---------------------------------
# (With RandAugment on, timm leaves colour jitter out, as it did for the official runs.)
train_pipeline = [
    dict(type='LoadPILImage'),
    dict(type='TimmTransform', is_training=True, input_size=224, interpolation='bicubic',
         color_jitter=0.4, auto_augment='rand-m9-mstd0.5-inc1',
         re_prob=0.25, re_mode='pixel', re_count=1),
    dict(type='PackClsInputs'),
]
# Resize the short side to 224 / 0.875 = 256, centre crop 224.
test_pipeline = [
    dict(type='LoadPILImage'),
    dict(type='TimmTransform', is_training=False, input_size=224, crop_pct=0.875,
         interpolation='bicubic'),
    dict(type='PackClsInputs'),
]
train_dataloader = dict(
    batch_size=128,  # per GPU
    num_workers=8,
    persistent_workers=True,
    pin_memory=True,
    drop_last=True,  # Mixup pairs each batch with its reverse: batches must be full (even)
    sampler=dict(type='DefaultSampler', shuffle=True),
    collate_fn=dict(type='default_collate'),
    dataset=dict(type='ImageNetFolder', data_root=data_root, data_prefix=dict(img_path='train'),
                 pipeline=train_pipeline))
val_dataloader = dict(
    batch_size=128,
    num_workers=8,
    persistent_workers=True,
    pin_memory=True,
    sampler=dict(type='DefaultSampler', shuffle=False),
    collate_fn=dict(type='default_collate'),
    dataset=dict(type='ImageNetFolder', data_root=data_root, data_prefix=dict(img_path='val'),
                 pipeline=test_pipeline))
test_dataloader = val_dataloader
val_evaluator = dict(type='Accuracy', topk=(1, 5))
test_evaluator = val_evaluator

# ---- Schedule ----------------------------------------------------------------------------------
# lr 1e-3 = 5e-4 x 1024 / 512; with --auto-scale-lr it follows the actual total batch size.
# No weight decay where the official optimizer has none: 1-D parameters and biases, i.e. all
# norms (incl. the stacked SS2D output norms), biases, D and skip_scale. A_log and the dt bias
# are 2-D in the official model ((d, 1) and (1, d)), so it decays them, and so do we.
# AMP: fp16 autocast, dynamic loss scale (on a CPU: --cfg-options optim_wrapper.type=OptimWrapper).
# Parameters that share settings step as one group (MergedGroupsOptimWrapperConstructor): the same
# update as mmengine's default constructor, without its host time of one group per parameter.
optim_wrapper = dict(
    type='AmpOptimWrapper',
    constructor='MergedGroupsOptimWrapperConstructor',
    optimizer=dict(type='AdamW', lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.05),
    clip_grad=dict(max_norm=5.0),
    paramwise_cfg=dict(
        norm_decay_mult=0.,
        bias_decay_mult=0.,
        custom_keys={
            'ssm.D': dict(decay_mult=0.),
            'ssm.out_norm_': dict(decay_mult=0.),
            'skip_scale': dict(decay_mult=0.),
        }))
# Per iteration: linear warm-up from 1e-6 over 20 epochs, then cosine down to 1e-5.
param_scheduler = [
    dict(type='LinearLR', start_factor=1e-3, by_epoch=True, begin=0, end=20,
         convert_to_iter_based=True),
    dict(type='CosineAnnealingLR', T_max=280, eta_min_ratio=1e-2, by_epoch=True, begin=20,
         end=300, convert_to_iter_based=True),
]
auto_scale_lr = dict(base_batch_size=1024, enable=False)
train_cfg = dict(type='EpochBasedTrainLoop', max_epochs=300, val_interval=1)
# Evaluates the trained weights (raw/accuracy/...) and their EMA (accuracy/...).
val_cfg = dict(type='RawAndEMAValLoop')
test_cfg = dict(type='TestLoop')

# ---- Runtime -----------------------------------------------------------------------------------
default_hooks = dict(
    timer=dict(type='IterTimerHook'),
    logger=dict(type='LoggerHook', interval=100),
    param_scheduler=dict(type='ParamSchedulerHook'),
    checkpoint=dict(type='CheckpointHook', interval=1, max_keep_ckpts=3,
                    save_best='accuracy/top1', rule='greater'),
    sampler_seed=dict(type='DistSamplerSeedHook'),
)
# EMA with decay 0.9999 (timm's ModelEma of the official code: parameters and buffers). The
# checkpoints' state_dict holds the EMA weights; the raw ones are under ema_state_dict.
# NonFiniteLossHook stops at the first non-finite loss, naming the iteration.
custom_hooks = [
    dict(type='EMAHook', ema_type='ExponentialMovingAverage', momentum=1e-4, update_buffers=True),
    dict(type='NonFiniteLossHook', patience=0),
]
env_cfg = dict(
    cudnn_benchmark=True,
    mp_cfg=dict(mp_start_method='fork', opencv_num_threads=0),
    dist_cfg=dict(backend='nccl'))
randomness = dict(seed=0, diff_rank_seed=True)
log_processor = dict(by_epoch=True)
visualizer = dict(type='Visualizer', vis_backends=[dict(type='LocalVisBackend')])
log_level = 'INFO'
load_from = None
resume = False
