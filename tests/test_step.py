"""The graph-ready training step (jocor_ddp/step.py), on CPU.

1. It trains exactly what the old eager step trained (tests/reference_step.py), bit for
   bit, over epochs whose forget rate, lr and beta1 change, for every method.
2. A guard records the ops the step dispatches (what a CUDA graph would capture) and fails
   on a host read, a data-dependent shape, or any difference between two consecutive steps
   or across an epoch boundary: a Python number that changes from step to step would be
   frozen into a captured graph. The same guard fails the old step.
"""

from __future__ import annotations

import contextlib

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from helpers import method_args, train_args
from reference_step import ReferenceStep
from jocor_ddp.config import ConfigError, load_config
from jocor_ddp.dist import DistContext
from jocor_ddp.models import build_pair
from jocor_ddp.step import CUDA_SYNC_EVERY, resolve_sync_every
from jocor_ddp.trainer import Trainer
from jocor_ddp.registry import method_names

METHODS = method_names()
EPOCHS = 3


@pytest.fixture(scope="module")
def mnist(mnist_data):
    return mnist_data(192, 32)


def _trainer(mnist, tmp_path, *extra) -> Trainer:
    # Forget rate 0 -> 0.5 over two epochs; lr decay and beta1 0.9 -> 0.1 from epoch 2:
    # every per-epoch value changes at some boundary.
    cfg = load_config(None, train_args(mnist, tmp_path / "run", "model.arch=mlp", "train.batch_size=32",
                                       f"train.epochs={EPOCHS}", "method.num_gradual=2", "method.forget_rate=0.5",
                                       "method.init_epoch=1", "train.epoch_decay_start=1", "train.lr=0.01",
                                       *extra, entry=()))
    return Trainer(cfg, DistContext())


# --- 1. the same training as the old step ---------------------------------------------

@pytest.mark.parametrize("method", METHODS)
def test_step_equals_the_old_eager_step_bit_for_bit(mnist, tmp_path, method):
    trainer = _trainer(mnist, tmp_path, *method_args(method))
    cfg = trainer.cfg
    reference = ReferenceStep(build_pair(cfg.model, 1, 10, 28, seed=cfg.train.seed), cfg,
                              trainer.step.values.log_transition)
    steps = 0
    for epoch in range(EPOCHS):
        trainer.begin_epoch(epoch)
        reference.begin_epoch(epoch, trainer.lrs[epoch], trainer.beta1s[epoch], float(trainer.forget_rates[epoch]))
        for ref_batch in trainer.data.train.epoch(epoch):
            trainer.step.run(None)
            batch, out = trainer.step.last
            assert torch.equal(batch.idx, ref_batch.idx)
            kept = reference.run(ref_batch)
            assert torch.equal(out.kept_global, kept), f"{method}: step {steps} kept other samples"
            assert out.loss.grad_fn is None  # no autograd graph outlives its step
            steps += 1
    assert steps == EPOCHS * 6
    for (name, p), q in zip(trainer.pair.named_parameters(), reference.pair.parameters()):
        assert torch.equal(p, q), f"{method}: {name} differs by {(p - q).abs().max().item():.3g}"


# --- 2. the capture guard ----------------------------------------------------------------

# Ops that read a device value on the host, or whose output shape depends on the data.
HOST_OR_DYNAMIC = ("_local_scalar_dense", "item", "nonzero", "masked_select", "unique", "_unique",
                   "_unique2", "unique_dim", "unique_consecutive", "is_nonzero", "equal", "lift_fresh",
                   "masked_scatter", "repeat_interleave", "_assert_async")


def _signature(value):
    if isinstance(value, torch.Tensor):
        return ("tensor", tuple(value.shape), str(value.dtype), value.device.type)
    if isinstance(value, (list, tuple)):
        return tuple(_signature(v) for v in value)
    if isinstance(value, dict):
        return tuple(sorted((k, _signature(v)) for k, v in value.items()))
    return repr(value)


class OpTrace(TorchDispatchMode):
    """Every dispatched op with its arguments' signatures (shapes, dtypes, numbers), and the
    ops a capture cannot hold. ``.tolist()`` and ``.numpy()`` read CPU tensors without
    dispatching anything, so they are watched by hand."""

    def __init__(self):
        super().__init__()
        self.ops: list[tuple] = []
        self.violations: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func.namespace == "profiler":  # the optimizer's record_function marks: host only
            return func(*args, **kwargs)
        name = func.overloadpacket.__name__
        if name in HOST_OR_DYNAMIC:
            self.violations.append(str(func))
        if name in ("index", "index_put", "index_put_") and any(
                isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8) for i in args[1] if i is not None):
            self.violations.append(f"{func} with a boolean mask")
        self.ops.append((str(func), _signature(args), _signature(kwargs)))
        return func(*args, **kwargs)

    @contextlib.contextmanager
    def watching(self):
        originals = {name: getattr(torch.Tensor, name) for name in ("tolist", "numpy", "__array__")}

        def host_read(name):
            def read(t, *a, **k):
                self.violations.append(f"Tensor.{name}()")
                return originals[name](t, *a, **k)
            return read
        try:
            for name in originals:
                setattr(torch.Tensor, name, host_read(name))
            with self:
                yield self
        finally:
            for name, fn in originals.items():
                setattr(torch.Tensor, name, fn)


def trace_step(run_one) -> OpTrace:
    with OpTrace().watching() as trace:
        run_one()
    return trace


def first_difference(a: OpTrace, b: OpTrace) -> str:
    for i, (x, y) in enumerate(zip(a.ops, b.ops)):
        if x != y:
            return f"op {i}: {x[0]} {x[1:]}  vs  {y[0]} {y[1:]}"
    return f"{len(a.ops)} ops vs {len(b.ops)} ops" if len(a.ops) != len(b.ops) else ""


def captured_region(trainer: Trainer):
    """What a CUDA graph of this step holds: the body, after the feed's copy-in."""
    def run_one():
        trainer.step.feed.load(None)
        trainer.step._body()
        trainer.step.global_step += 1
    return run_one


@pytest.mark.parametrize("method,extra", [(m, []) for m in METHODS] + [
    ("jocor", ["data.augment=true"]), ("jocor", ["train.precision=bf16"]),
    ("jocor", ["train.precision=fp16"]), ("coteaching", ["selection=local"])])
def test_step_can_be_captured_and_replays_no_stale_value(mnist, tmp_path, method, extra):
    trainer = _trainer(mnist, tmp_path, *method_args(method), *extra)
    step = captured_region(trainer)
    n = trainer.data.train.steps_per_epoch
    # Epoch 2 -> 3 changes the forget rate (ramp), the lr (decay) and the epoch number.
    trainer.begin_epoch(1)
    for _ in range(n - 2):
        step()
    within = trace_step(step), trace_step(step)  # two consecutive steps: the epoch's last two
    trainer.begin_epoch(2)
    across = within[1], trace_step(step)         # the last of epoch 2 and the first of epoch 3
    for trace in (*within, across[1]):
        assert not trace.violations, f"not capturable: {sorted(set(trace.violations))}"
    assert len(within[0].ops) > 50
    assert not first_difference(*within), f"consecutive steps differ: {first_difference(*within)}"
    assert not first_difference(*across), f"the epoch boundary changes the step: {first_difference(*across)}"


def test_beta1_change_differs_only_in_adam_and_recaptures(mnist, tmp_path):
    """The fused Adam kernel takes beta1 as a number: across epoch_decay_start (beta1 0.9 ->
    0.1) its call is the one difference, and the step drops its graph to capture again."""
    trainer = _trainer(mnist, tmp_path)
    step = captured_region(trainer)
    trainer.begin_epoch(0)
    for _ in range(trainer.data.train.steps_per_epoch - 1):
        step()
    before = trace_step(step)
    trainer.begin_epoch(1)
    after = trace_step(step)
    differing = [x[0] for x, y in zip(before.ops, after.ops) if x != y]
    assert differing == ["aten._fused_adam_.tensor_lr"] and len(before.ops) == len(after.ops)
    trainer.step.graph, trainer.step.graph_beta1 = object(), 0.1  # as if captured in epoch 2
    trainer.begin_epoch(2)   # beta1 stays 0.1: the graph stays
    assert trainer.step.graph is not None
    trainer.begin_epoch(0)   # beta1 0.9: captured again at the next step
    assert trainer.step.graph is None


def test_the_guard_fails_the_old_step(mnist, tmp_path):
    """The guard can fail: the old step reads its verdict and k on the host and freezes the
    global step into the non-finite record."""
    trainer = _trainer(mnist, tmp_path, "method.name=coteaching_plus")
    cfg = trainer.cfg
    reference = ReferenceStep(build_pair(cfg.model, 1, 10, 28, seed=cfg.train.seed), cfg)
    reference.begin_epoch(1, 0.01, 0.1, 0.25)
    batches = list(trainer.data.train.epoch(1))
    first, second = (trace_step(lambda b=b: reference.run(b)) for b in batches[:2])
    assert "Tensor.tolist()" in first.violations                        # the verdict
    assert "aten._local_scalar_dense.default" in first.violations       # int(eligible.sum())
    assert first_difference(first, second)                               # torch.full((), global_step)


# --- the switch and its defaults ------------------------------------------------------------

def test_cuda_graph_true_without_cuda_is_a_config_error(mnist, tmp_path):
    with pytest.raises(ConfigError, match="train.cuda_graph: true, but the step cannot be captured: "
                                          "the training device is not CUDA"):
        _trainer(mnist, tmp_path, "train.cuda_graph=true", "train.device=cpu")


def test_eager_on_cpu_and_sync_every_auto(mnist, tmp_path):
    trainer = _trainer(mnist, tmp_path)
    assert not trainer.step.capture and trainer.step.describe() == "eager"
    assert trainer.sync_every == 1
    cfg = load_config(None, [])
    assert resolve_sync_every(cfg.train, torch.device("cuda", 0)) == CUDA_SYNC_EVERY
    assert resolve_sync_every(load_config(None, ["train.on_nonfinite=skip"]).train, torch.device("cuda", 0)) == 1
    assert resolve_sync_every(load_config(None, ["train.sync_every=7"]).train, torch.device("cuda", 0)) == 7


def test_a_checkpoint_of_another_adam_resumes_with_this_steps_optimizer(mnist, tmp_path):
    """An older checkpoint (plain Adam: float lr, step counts on the CPU, not fused) loads
    into the fused, tensor-lr Adam the step needs, and training goes on."""
    trainer = _trainer(mnist, tmp_path)
    old = torch.optim.Adam(trainer.pair.parameters(), lr=0.01)
    for p in trainer.pair.parameters():
        p.grad = torch.ones_like(p)
    old.step()
    trainer.step.load_state_dict({"optimizer": old.state_dict(), "scaler": trainer.step.scaler.state_dict(),
                                  "skipped_steps": 0, "counters": None})
    trainer.begin_epoch(0)
    trainer.step.run(None)
    group = trainer.step.optimizer.param_groups[0]
    assert group["fused"] and group["lr"] is trainer.step.lr
    assert all(s["step"].item() == 2 for s in trainer.step.optimizer.state.values())
