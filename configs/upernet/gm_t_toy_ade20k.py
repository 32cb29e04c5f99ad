# gm_t_160k_ade20k.py shrunk to run on a CPU in seconds, for tests and demos: the toy ADE20K
# (`python tools/make_toy_data.py ade20k data/toy_ade20k`), 64x64 crops of pictures resized to
# about 1/8 of ADE20K's scale, BN instead of SyncBN in the heads, no pretrained backbone,
# 4 iterations (warm-up 2, then poly decay), one evaluation at the end.
_base_ = ['./gm_t_160k_ade20k.py']

data_root = 'data/toy_ade20k'
crop_size = (64, 64)
scale = (256, 64)
norm_cfg = dict(type='BN', requires_grad=True)

model = dict(
    data_preprocessor=dict(size=crop_size),
    backbone=dict(torch_compile=False, init_cfg=None),  # a short run: not worth compiling
    decode_head=dict(norm_cfg=norm_cfg),
    auxiliary_head=dict(norm_cfg=norm_cfg))

train_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='LoadAnnotations', reduce_zero_label=True),
    dict(type='RandomResize', scale=scale, ratio_range=(0.5, 2.0), keep_ratio=True),
    dict(type='RandomCrop', crop_size=crop_size, cat_max_ratio=0.75),
    dict(type='RandomFlip', prob=0.5),
    dict(type='PhotoMetricDistortion'),
    dict(type='PackSegInputs'),
]
test_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='Resize', scale=scale, keep_ratio=True),
    dict(type='LoadAnnotations', reduce_zero_label=True),
    dict(type='PackSegInputs'),
]
train_dataloader = dict(
    batch_size=2,
    num_workers=0,
    persistent_workers=False,
    dataset=dict(data_root=data_root, pipeline=train_pipeline))
val_dataloader = dict(
    num_workers=0,
    persistent_workers=False,
    dataset=dict(data_root=data_root, pipeline=test_pipeline))
test_dataloader = val_dataloader

train_cfg = dict(type='IterBasedTrainLoop', max_iters=4, val_interval=4)
param_scheduler = [
    dict(type='LinearLR', start_factor=1e-6, by_epoch=False, begin=0, end=2),
    dict(type='PolyLR', eta_min=0., power=1., begin=2, end=4, by_epoch=False),
]
default_hooks = dict(
    logger=dict(interval=1),
    checkpoint=dict(interval=4),
    # mmseg draws every interval-th picture (default 50) for --show-dir; the toy set has 3.
    visualization=dict(interval=1))
