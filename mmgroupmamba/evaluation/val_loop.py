"""Validation of both the trained weights and their exponential moving average."""
from mmengine.hooks import EMAHook
from mmengine.runner import ValLoop

from ..registry import LOOPS


@LOOPS.register_module()
class RawAndEMAValLoop(ValLoop):
    """A ``ValLoop`` that, when the runner has an ``EMAHook``, evaluates the model twice: its
    own weights first (metrics prefixed ``raw/``), then the EMA weights that ``EMAHook`` swaps
    in for validation (metrics under their usual names, as the checkpoint's ``state_dict``
    holds the EMA weights). Without an ``EMAHook`` it is a plain ``ValLoop``.

    The official recipe reports both, as the EMA of a 0.9999 decay lags far behind early on.
    """

    def run(self) -> dict:
        if not any(isinstance(hook, EMAHook) for hook in self.runner.hooks):
            return super().run()
        self.runner.call_hook('before_val')
        raw = {f'raw/{k}': v for k, v in self._evaluate().items()}
        self.runner.call_hook('before_val_epoch')  # EMAHook swaps the EMA weights in
        metrics = {**self._evaluate(), **raw}
        self.runner.call_hook('after_val_epoch', metrics=metrics)  # and back out
        self.runner.call_hook('after_val')
        return metrics

    def _evaluate(self) -> dict:
        self.runner.model.eval()
        for idx, data_batch in enumerate(self.dataloader):
            self.run_iter(idx, data_batch)
        return self.evaluator.evaluate(len(self.dataloader.dataset))
