"""The recipes of docs/architecture.md, done. A method is one module and one registry entry: a toy method, written here in a temporary
module and registered through the entry-point group ``jocor_ddp.methods`` (as an installed
plugin would be), trains through the ordinary command on 2 ranks, and everything that
knows about methods (config validation, the forget-rate decision, the step's error text,
the report's names) knows about it from that entry alone. A new way of feeding the step is a
loader that meets the protocol of data/types.py: one written here trains exactly as the memory
source does."""


import pytest
import torch

from helpers import child_env, metric_rows, run_python, run_torchrun, train_args
from jocor_ddp import registry
from jocor_ddp.data import BadSamples, Batch, DataBundle
from jocor_ddp.data.epochs import epoch_permutation
from jocor_ddp.data.sources import load_arrays
from jocor_ddp.dist import DistContext
from jocor_ddp.trainer import Trainer
from jocor_ddp.config import ConfigError, load_config
from jocor_ddp.schedule import decide_forget_rate

TOY = '''
"""A toy method: both networks learn from the small-loss share of their summed cross-entropy."""
from jocor_ddp.methods import MethodStep
from jocor_ddp.methods.coteaching import cross_entropies
from jocor_ddp.registry import Method


def step(logits1, logits2, labels, values, sel, cfg):
    ce = cross_entropies(logits1, logits2, labels).sum(0)
    ce_all = sel.gather(ce.detach())
    kept = sel.keep_smallest(ce_all, values.remember)
    return MethodStep(loss=sel.mean(ce, kept), checked=ce_all[None], kept_local=kept.local[None],
                      kept_global=kept.glob[None], objective=sel.objective(ce_all, kept))


METHOD = Method("toy", "Toy method", "toy_method:step", selects=True, loss_name="toy loss")
'''


@pytest.fixture(scope="module")
def plugin(tmp_path_factory):
    """A folder that, on PYTHONPATH, is an installed distribution with one method."""
    root = tmp_path_factory.mktemp("plugin")
    (root / "toy_method.py").write_text(TOY)
    info = root / "toy_method-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: toy-method\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[jocor_ddp.methods]\ntoy = toy_method:METHOD\n")
    return root


def plugin_env(plugin, **extra):
    env = child_env(**extra)
    env["PYTHONPATH"] = f"{plugin}:{env['PYTHONPATH']}"
    return env


@pytest.fixture(scope="module")
def mnist(mnist_data):
    return mnist_data(256, 64)


def _args(mnist, run_dir, *extra):
    return train_args(mnist, run_dir, "model.arch=mlp", "method.name=toy", "noise.rate=0.4", "method.num_gradual=1",
                      "train.batch_size=32", "train.epochs=2", *extra)


@pytest.mark.slow
def test_a_registered_toy_method_trains_through_the_ordinary_command(plugin, mnist, tmp_path):
    run_torchrun(2, _args(mnist, tmp_path / "run"), env=plugin_env(plugin), timeout=240)
    rows = metric_rows(tmp_path / "run")
    assert [r["epoch"] for r in rows] == [1, 2]
    # It selects, so tau is decided for it: the noise rate, reached after the one-epoch ramp,
    # and it keeps exactly that share: floor(0.6 * 32) samples of each of 8 steps.
    assert [r["forget_rate"] for r in rows] == [0.0, 0.4]
    assert rows[1]["kept"] == 8 * 19


def test_in_process_the_plugin_is_one_more_entry(plugin, monkeypatch):
    monkeypatch.syspath_prepend(str(plugin))
    registry.methods.cache_clear()
    try:
        assert registry.method_names()[-1] == "toy"
        assert registry.display_name("toy") == "Toy method"  # the report's and plots' name
        cfg = load_config(None, ["method.name=toy", "noise.rate=0.3"])
        assert decide_forget_rate(cfg.method, cfg.noise, False).tau == 0.3
    finally:
        registry.methods.cache_clear()


@pytest.mark.slow
def test_its_entry_names_its_loss_in_the_error_text(plugin, mnist, tmp_path):
    proc = run_torchrun(2, _args(mnist, tmp_path / "run"), env=plugin_env(plugin, JOCOR_FAULT="nan:1:3"),
                        check=False, timeout=240)
    assert proc.returncode != 0
    assert "non-finite toy loss at rank 1" in proc.stderr, proc.stderr[-3000:]


def test_without_the_plugin_the_name_is_a_config_error(mnist, tmp_path):
    with pytest.raises(ConfigError, match=r"method\.name: 'toy' is not one of 'jocor', .*'standard'"):
        load_config(None, ["method.name=toy"])


def test_the_registry_holds_the_built_in_methods():
    assert registry.method_names()[:5] == ("jocor", "coteaching", "coteaching_plus", "decoupling", "standard")
    assert [m.name for m in registry.BUILTIN if not m.selects] == ["decoupling", "standard", "fcorrection"]
    for m in registry.BUILTIN:  # every entry's step exists and takes the trainer's arguments
        assert callable(m.load_step())
    assert registry.display_name("coteaching_plus") == "Co-teaching+"
    assert registry.display_name("unknown") == "unknown"


def test_a_bad_entry_point_is_refused_by_name(tmp_path, mnist):
    root = tmp_path / "bad"
    (root / "bad_method-0.1.dist-info").mkdir(parents=True)
    (root / "bad_method.py").write_text("METHOD = 42\n")
    (root / "bad_method-0.1.dist-info" / "METADATA").write_text("Metadata-Version: 2.1\nName: bad-method\nVersion: 0.1\n")
    (root / "bad_method-0.1.dist-info" / "entry_points.txt").write_text("[jocor_ddp.methods]\nbad = bad_method:METHOD\n")
    proc = run_python(["-m", "jocor_ddp.train", "--print-config"], env=plugin_env(root), check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.startswith("error: entry point bad = bad_method:METHOD (group jocor_ddp.methods): "
                                  "expected a jocor_ddp.registry.Method"), proc.stderr
    (root / "bad_method.py").write_text("import not_a_module\n")  # one that does not even import
    proc = run_python(["-m", "jocor_ddp.train", "--print-config"], env=plugin_env(root), check=False)
    assert proc.returncode == 2 and "cannot be loaded: ModuleNotFoundError" in proc.stderr, proc.stderr


# --- docs/architecture.md's other recipe: a new way of feeding the step ------------------------

class ArrayLoader:
    """A resident training loader written from the protocol in data/types.py alone: float
    images on the device, the epoch's global permutation, rank r the r-th slice of a batch."""
    resident = True
    world_size_invariant = True

    def __init__(self, images, labels, *, global_batch: int, seed: int):
        self.x = torch.from_numpy(images).float().div_(255.0).unsqueeze(1)  # what ToTensor gives
        self.y = torch.from_numpy(labels.astype("int64"))
        self.index_range = len(labels)
        self.steps_per_epoch = len(labels) // global_batch
        self.global_batch, self.seed = global_batch, seed
        self.bad = BadSamples()

    def epoch_plan(self, epoch, start_step=0):
        self.bad.start_epoch(start_step)
        return {"order": torch.from_numpy(epoch_permutation(self.index_range, self.seed, epoch))}

    def gather(self, plan, step):
        rows = plan["order"][step * self.global_batch + torch.arange(self.global_batch)]
        return Batch(x=self.x[rows], y=self.y[rows], clean=self.y[rows], idx=rows)

    def epoch(self, epoch, start_step=0):
        plan = self.epoch_plan(epoch, start_step)
        for step in range(start_step, self.steps_per_epoch):
            yield self.gather(plan, torch.tensor(step))

    def close(self):
        pass


def test_a_new_resident_loader_trains_like_the_memory_source(mnist, tmp_path):
    overrides = ["model.arch=mlp", "noise.type=none", "noise.rate=0", "train.batch_size=32", "train.epochs=2",
                 "method.forget_rate=0.2"]
    built_in = Trainer(load_config(None, train_args(mnist, tmp_path / "a", *overrides, entry=())), DistContext())
    built_in.fit()
    arrays = load_arrays("mnist", str(mnist))
    cfg = load_config(None, train_args(mnist, tmp_path / "b", *overrides, entry=()))
    bundle = DataBundle(name="mnist", classes=arrays.classes, in_channels=1, image_size=28,
                        train=ArrayLoader(arrays.train.images[..., 0], arrays.train.labels, global_batch=32, seed=1),
                        evals=built_in.data.evals)
    Trainer(cfg, DistContext(), data=bundle).fit()
    assert metric_rows(tmp_path / "a") == metric_rows(tmp_path / "b")
