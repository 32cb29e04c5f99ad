"""End to end: tools/train.py, tools/test.py and tools/dist_test.sh on a toy regression task
(``toy_task.py``, scope ``mmgroupmamba``), all on CPU."""
import os
import re
import runpy
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import WritesMarker
from mmgroupmamba.engine import load_checkpoint_file

ROOT = Path(__file__).resolve().parents[2]
TOOLS = ROOT / 'tools'

CONFIG = """
default_scope = 'mmgroupmamba'
custom_imports = dict(imports=['toy_task'], allow_failed_imports=False)
model = dict(type='ToyRegressor')
train_dataloader = dict(dataset=dict(type='ToyPoints'), batch_size=2, num_workers=0,
                        sampler=dict(type='InfiniteSampler', shuffle=True))
train_cfg = dict(by_epoch=False, max_iters=4)
optim_wrapper = dict(optimizer=dict(type='SGD', lr=0.1))
test_dataloader = dict(dataset=dict(type='ToyPoints', length=10), batch_size=2, num_workers=0,
                       sampler=dict(type='DefaultSampler', shuffle=False))
test_cfg = dict()
test_evaluator = dict(type='ToyMSE')
default_hooks = dict(checkpoint=dict(type='CheckpointHook', interval=2, by_epoch=False),
                     logger=dict(type='LoggerHook', interval=1))
log_processor = dict(by_epoch=False)
randomness = dict(seed=0)
"""


def _env():
    env = dict(os.environ, PYTHON=sys.executable, OMP_NUM_THREADS='1')
    paths = [str(ROOT), str(Path(__file__).parent), env.get('PYTHONPATH', '')]
    env['PYTHONPATH'] = os.pathsep.join(p for p in paths if p)
    return env


def _run(args, cwd):
    result = subprocess.run(args, cwd=cwd, env=_env(), capture_output=True, text=True,
                            timeout=300)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    return output


def _logged_mse(output):
    values = re.findall(r'Iter\(test\).*?mse: ([0-9.]+)', output)
    assert len(values) == 1, output
    return float(values[0])


def _free_port():
    with socket.socket() as sock:
        sock.bind(('127.0.0.1', 0))
        return sock.getsockname()[1]


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
    """Config file and work dir of a 4-iteration training run (checkpoints at 2 and 4)."""
    root = tmp_path_factory.mktemp('tools')
    config = root / 'toy.py'
    config.write_text(CONFIG)
    work_dir = root / 'work'
    _run([sys.executable, str(TOOLS / 'train.py'), str(config), '--work-dir', str(work_dir)],
         cwd=root)
    assert (work_dir / 'iter_4.pth').is_file()
    return config, work_dir


def test_checkpoint_loads_safely(trained):
    _, work_dir = trained
    checkpoint = load_checkpoint_file(str(work_dir / 'iter_4.pth'))
    assert checkpoint['meta']['iter'] == 4
    assert set(checkpoint['state_dict']) == {'linear.weight', 'linear.bias'}


def test_resume_continues_iterations(trained, tmp_path):
    config, work_dir = trained
    resumed = tmp_path / 'work'
    shutil.copytree(work_dir, resumed)
    output = _run([sys.executable, str(TOOLS / 'train.py'), str(config), '--work-dir',
                   str(resumed), '--resume', '--cfg-options', 'train_cfg.max_iters=6'],
                  cwd=tmp_path)
    assert 'resumed' in output.lower()
    trained_iters = [int(i) for i in re.findall(r'Iter\(train\) \[\s*(\d+)/6\]', output)]
    assert trained_iters == [5, 6]
    assert load_checkpoint_file(str(resumed / 'iter_6.pth'))['meta']['iter'] == 6


@pytest.fixture(scope='module')
def single_process_output(trained):
    config, work_dir = trained
    return _run([sys.executable, str(TOOLS / 'test.py'), str(config),
                 str(work_dir / 'iter_4.pth'), '--work-dir', str(work_dir / 'single')],
                cwd=work_dir)


def test_test_reports_metric_of_checkpoint(trained, single_process_output):
    _, work_dir = trained
    state = load_checkpoint_file(str(work_dir / 'iter_4.pth'))['state_dict']
    x = torch.stack([torch.arange(10) / 10, torch.ones(10)], dim=1)
    preds = x @ state['linear.weight'][0] + state['linear.bias']
    expected = ((preds - (2 * x[:, 0] - 1)) ** 2).mean().item()
    assert _logged_mse(single_process_output) == pytest.approx(expected, abs=1e-4)


def test_dist_test_on_cpu_matches_single_process(trained, single_process_output):
    config, work_dir = trained
    result = subprocess.run(['bash', str(TOOLS / 'dist_test.sh'), str(config),
                             str(work_dir / 'iter_4.pth'), '2', '--work-dir',
                             str(work_dir / 'dist')], cwd=work_dir,
                            env=dict(_env(), PORT=str(_free_port())), capture_output=True,
                            text=True, timeout=300)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert _logged_mse(output) == _logged_mse(single_process_output)
    # Each of the two ranks tested half of the 10 samples: 3 batches of at most 2.
    assert re.search(r'Iter\(test\) \[3/3\]', output)


def _tool_exit(tool, *args):
    argv = sys.argv
    sys.argv = [str(TOOLS / tool), *args]
    try:
        with pytest.raises(SystemExit) as exit_info:
            runpy.run_path(str(TOOLS / tool), run_name='__main__')
    finally:
        sys.argv = argv
    return exit_info.value.code


def test_missing_checkpoint_fails_before_runner(trained, tmp_path, capsys):
    config, _ = trained
    code = _tool_exit('test.py', str(config), str(tmp_path / 'nope.pth'), '--work-dir',
                      str(tmp_path / 'work'))
    assert code != 0
    assert 'nope.pth does not exist' in capsys.readouterr().err
    assert not (tmp_path / 'work').exists()


def test_missing_config_and_resume_checkpoint(trained, tmp_path, capsys):
    config, _ = trained
    assert _tool_exit('train.py', str(tmp_path / 'none.py')) != 0
    assert 'none.py does not exist' in capsys.readouterr().err
    assert _tool_exit('train.py', str(config), '--resume', str(tmp_path / 'gone.pth'),
                      '--work-dir', str(tmp_path / 'work')) != 0
    assert 'gone.pth does not exist' in capsys.readouterr().err
    assert not (tmp_path / 'work').exists()


def test_amp_refused_at_argument_parsing_without_gpu(trained, tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip('this machine has a GPU')
    config, _ = trained
    assert _tool_exit('train.py', str(config), '--amp', '--work-dir', str(tmp_path / 'w')) == 2
    assert '--amp (mixed precision) needs a GPU' in capsys.readouterr().err
    assert not (tmp_path / 'w').exists()


def _own_experiment(tmp_path):
    # Runs in one process share mmengine's visualizer and message hub when their experiment
    # names (config name + timestamp to the second) agree: keep each test's run apart.
    return '--cfg-options', f'experiment_name={tmp_path.name}'


def test_test_refuses_malicious_url_and_leaves_no_work_dir(trained, http_folder, tmp_path):
    config, _ = trained
    marker = tmp_path / 'marker'
    torch.save({'state_dict': {}, 'meta': WritesMarker(marker)}, http_folder.root / 'evil.pth')
    code = _tool_exit('test.py', str(config), f'{http_folder.url}/evil.pth', '--work-dir',
                      str(tmp_path / 'work'), *_own_experiment(tmp_path))
    assert 'posix.system' in str(code)
    assert not marker.exists()
    assert not (tmp_path / 'work').exists()
    assert http_folder.cached() == []


@pytest.mark.parametrize('damage, message', [
    ('wrong', r'other shapes than its own'),
    ('nan', r'NaN|non-finite'),
])
def test_test_checks_url_weights_fit(trained, http_folder, tmp_path, damage, message):
    """A URL is checked like a file: weights of another model, or NaN weights, stop the test
    before anything is evaluated."""
    config, work_dir = trained
    root, url = http_folder.root, http_folder.url
    checkpoint = load_checkpoint_file(str(work_dir / 'iter_4.pth'))
    state = checkpoint['state_dict']
    if damage == 'wrong':
        state['linear.weight'] = torch.zeros(3, 2)
    else:
        state['linear.bias'] = torch.tensor([float('nan')])
    torch.save(checkpoint, root / 'damaged.pth')
    code = _tool_exit('test.py', str(config), f'{url}/damaged.pth', '--work-dir',
                      str(tmp_path / 'work'), *_own_experiment(tmp_path))
    assert re.search(message, str(code))
    assert not (tmp_path / 'work').exists()


def test_train_refuses_untrusted_resume_and_keeps_work_dir_as_it_was(trained, tmp_path):
    config, work_dir = trained
    run_dir = tmp_path / 'work'
    shutil.copytree(work_dir, run_dir)
    before = sorted(os.listdir(run_dir))
    torch.save({'meta': WritesMarker(tmp_path / 'marker')}, tmp_path / 'evil.pth')
    code = _tool_exit('train.py', str(config), '--resume', str(tmp_path / 'evil.pth'),
                      '--work-dir', str(run_dir), *_own_experiment(tmp_path))
    assert 'Refusing to load checkpoint' in str(code)
    assert sorted(os.listdir(run_dir)) == before
    assert not (tmp_path / 'marker').exists()


def test_refused_config_leaves_no_work_dir(trained, tmp_path):
    config, _ = trained
    argv = sys.argv
    sys.argv = [str(TOOLS / 'train.py'), str(config), '--work-dir', str(tmp_path / 'work'),
                '--cfg-options', 'model.type=NoSuchModel', f'experiment_name={tmp_path.name}']
    try:
        with pytest.raises(KeyError, match='NoSuchModel'):
            runpy.run_path(str(TOOLS / 'train.py'), run_name='__main__')
    finally:
        sys.argv = argv
    assert not (tmp_path / 'work').exists()

