from pathlib import Path

from common.iteration import TrainIteration, measure_train_iteration, profile_train_iteration
from common.speed import profile_summary

CONFIGS = Path(__file__).resolve().parents[2] / 'configs'
CONFIG = str(CONFIGS / 'upernet' / 'gm_t_toy_ade20k.py')


def test_measure_train_iteration_on_the_cpu():
    result = measure_train_iteration(CONFIG, (64, 64), batch_size=2, warmup=1, steps=2,
                                     device='cpu')
    assert result['seconds'] > 0 and result['peak_gib'] is None
    assert 20 < result['params_m'] < 60
    assert result['sizes'] == []


def test_eager_runs_a_compiled_config_without_torch_compile():
    """The shipped Mask R-CNN config compiles its backbone; ``eager`` takes that away (and only
    that: the published peers have no such option)."""
    config = str(CONFIGS / 'mask_rcnn' / 'gm_t_1x_coco.py')
    shipped = TrainIteration(config, (64, 64), 1, device='cpu')
    assert shipped.model.backbone.compile_settings is not None
    eager = TrainIteration(config, (64, 64), 1, device='cpu', eager=True)
    assert eager.model.backbone.compile_settings is None


def test_measure_train_iteration_follows_changing_sizes():
    seen = []
    result = measure_train_iteration(str(CONFIGS / 'mask_rcnn' / 'gm_t_toy_coco.py'), (64, 64),
                                     batch_size=2, warmup=1, steps=1, device='cpu',
                                     sizes=[(64, 96), (96, 64)], on_size=seen.append)
    assert [row['size'] for row in result['sizes']] == [(64, 96), (96, 64)]
    assert seen == result['sizes']
    for row in seen:  # eager on the CPU: nothing compiles
        assert row['seconds'] > 0 and row['graphs'] == row['kernels'] == 0
        assert row['peak_gib'] is None


def test_profile_train_iteration_records_the_eager_ops_and_the_optimizer():
    prof = profile_train_iteration(CONFIG, (64, 64), batch_size=2, warmup=1, steps=1,
                                   device='cpu')
    names = {event.key for event in prof.key_averages()}
    # Eager training calls the ops' autograd Functions, not their custom operators.
    assert {'_EagerScan', '_EagerScanBackward', '_EagerDepthwiseConv'} <= names
    assert not any(name.startswith('mmgroupmamba::') for name in names)
    assert 'Optimizer.step#AdamW.step' in names
    assert profile_summary(prof, 1) == 'no CUDA kernels in the trace'
