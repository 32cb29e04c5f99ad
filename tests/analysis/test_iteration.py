from mmgroupmamba.analysis.iteration import measure_train_iteration, profile_train_iteration
from mmgroupmamba.analysis.speed import profile_summary

CONFIG = 'configs/upernet/gm_t_toy_ade20k.py'


def test_measure_train_iteration_on_the_cpu():
    result = measure_train_iteration(CONFIG, (64, 64), batch_size=2, warmup=1, steps=2,
                                     device='cpu')
    assert result['seconds'] > 0 and result['peak_gib'] is None
    assert 20 < result['params_m'] < 60


def test_profile_train_iteration_records_the_eager_ops_and_the_optimizer():
    prof = profile_train_iteration(CONFIG, (64, 64), batch_size=2, warmup=1, steps=1,
                                   device='cpu')
    names = {event.key for event in prof.key_averages()}
    # Eager training calls the ops' autograd Functions, not their custom operators.
    assert {'_EagerScan', '_EagerScanBackward', '_EagerDepthwiseConv'} <= names
    assert not any(name.startswith('mmgroupmamba::') for name in names)
    assert 'Optimizer.step#AdamW.step' in names
    assert profile_summary(prof, 1) == 'no CUDA kernels in the trace'
