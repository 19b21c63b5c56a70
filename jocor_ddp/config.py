"""Run configuration: nested dataclasses, YAML defaults, dotted ``key=value`` overrides.

Each component owns a small dataclass that validates itself in ``__post_init__``;
``load_config`` merges a YAML file with command-line overrides, rejects unknown keys
and wrong types by name, and returns a frozen-in-spirit ``Config``. The resolved
config is written into the run folder and every checkpoint, so a run can always be
reproduced from its own files.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import yaml

from .registry import get_method, method_names
from .runfolder import NOISY_VAL


class ConfigError(ValueError):
    """A configuration value is unknown, of the wrong type or impossible."""


DATASETS = ("fashion-mnist", "mnist", "cifar10", "cifar100", "clothing1m", "imagefolder")
MODELS = ("mlp", "cnn", "resnet18", "resnet34", "resnet50")
NOISE_TYPES = ("symmetric", "pairflip", "asymmetric", "instance", "none", "file")
FORGET_RATE_WORDS = ("auto",)  # method.forget_rate besides a number
TRANSITION_FILES = (".json", ".csv", ".npy")  # method.transition: a matrix file of these kinds
TRANSITION_WORDS = ("auto",)  # method.transition besides a file or true
TRANSITION_FORMS = ("a .json, .csv or .npy file of a C x C row-stochastic matrix, true (the matrix of the "
                    "noise this config drew) or auto (estimated after method.warmup_epochs)")
SELECTIONS = ("global", "local")
SOURCES = ("memory", "shards")
CACHES = ("auto", "device", "stream")
BAD_SAMPLE = ("error", "skip")
VERIFY = ("sha256", "size")
DEVICES = ("auto", "cpu", "cuda")
BACKENDS = ("auto", "gloo", "nccl")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
NONFINITE = ("error", "skip")
PROGRESS = ("auto", "always", "never")


def _choice(key: str, value: Any, allowed: tuple) -> None:
    if value not in allowed:
        raise ConfigError(f"{key}: {value!r} is not one of {', '.join(map(repr, allowed))}")


def _range(key: str, value: float, lo: float, hi: float, *, hi_open: bool = True) -> None:
    ok = lo <= value < hi if hi_open else lo <= value <= hi
    if not ok:
        bracket = ")" if hi_open else "]"
        raise ConfigError(f"{key}: {value!r} is outside [{lo}, {hi}{bracket}")


def _above(key: str, value: float, lo: float) -> None:
    if not value > lo:
        raise ConfigError(f"{key}: must be > {lo}, got {value!r}")


def _at_least(key: str, value: float, lo: float) -> None:
    if value < lo:
        raise ConfigError(f"{key}: must be >= {lo}, got {value!r}")


def _positive(key: str, value: int) -> None:
    if value <= 0:
        raise ConfigError(f"{key}: must be a positive number, got {value!r}")


def _seed_fits(key: str, value: int) -> None:
    # torch.manual_seed overflows from 2**64 on, and train.seed + 1 seeds the re-initialised pair.
    if value >= 2**63:
        raise ConfigError(f"{key}: must be below 2**63, got {value!r}")


# "train" is trained on; the held-out share of its labels (data.noisy_val_fraction) is scored
# as NOISY_VAL. Neither can be an evaluation split of the shards.
NOT_EVAL_SPLITS = ("train", NOISY_VAL)


def true_transition_unknown(noise_type: str, labels_noisy: bool) -> Optional[str]:
    """Why ``method.transition: true`` has no matrix to give (None: it has one): the noise is
    known as a class-level matrix only where the config drew it from one."""
    if labels_noisy:
        why = "the training labels came noisy (the shards' labels), with no known noise"
    elif noise_type == "file":
        why = "noise.type: file gives per-sample labels, not the matrix that drew them"
    elif noise_type == "instance":
        why = "noise.type: instance draws each sample from its own flip distribution, not from one class-level matrix"
    else:
        return None
    return f"{why}; give the matrix as a file ({', '.join(TRANSITION_FILES)})"


def _eval_splits(key: str, splits: list[str], source: str) -> None:
    if not splits:
        raise ConfigError(f"{key}: must name at least one split (test, val, ...)")
    for name in splits:
        if not name or "/" in name:
            raise ConfigError(f"{key}: {name!r} is not a split name (test, val, ...)")
        if name in NOT_EVAL_SPLITS:
            why = ("is trained on" if name == "train" else
                   "names the held-out share of the training labels (data.noisy_val_fraction)")
            raise ConfigError(f"{key}: {name!r} {why}, not an evaluation split")
        if splits.count(name) > 1:
            raise ConfigError(f"{key}: {name!r} is named twice")
    # A list without test trains (an ImageFolder set of train and val); report, which judges
    # test accuracy, then says the run scored no test split.
    listed = f"[{', '.join(splits)}]"
    if source == "memory" and splits != ["test"]:
        raise ConfigError(f"{key}: the memory source has only test; use data.source: shards for {listed}")


@dataclass
class RunConfig:
    # The run folder: config.yaml, noise.json, metrics.jsonl and checkpoints/.
    dir: str = "runs/default"

    def __post_init__(self):
        if not self.dir:
            raise ConfigError("run.dir: must name a folder")


@dataclass
class DataConfig:
    # The dataset (the shard manifest must name the same one).
    name: str = "fashion-mnist"
    # Folder holding the raw files in their original format (IDX, CIFAR pickles, ...).
    root: str = "/usr/share/datasets/fashion-mnist"
    # memory: the raw files into one device tensor; shards: WebDataset shards written by prepare.
    source: str = "memory"
    # data.source: shards reads SHARD_DIR/manifest.json and the tars it lists
    # (written by ``python -m jocor_ddp.prepare``).
    shards: Optional[str] = None
    # Use only the first N training samples (small demos and tests); null = all.
    train_subset: Optional[int] = None
    # Use only the first N samples of each evaluation split (data.eval_splits); null = all.
    test_subset: Optional[int] = None
    # Random crop (pad 4) and horizontal flip on the device; the reference uses none.
    # (Clothing1M and ImageFolder always take random crops: resize_size, then crop_size.)
    augment: bool = False
    # Shards only. device: decode every shard once into a uint8 tensor on the training
    # device; stream: decode in the workers every epoch; auto: device when the decoded
    # splits fit in cache_budget_gb (per rank), else stream.
    cache: str = "auto"
    # Per-rank budget for cache: auto, in decoded bytes (the resized sets count resize_size
    # squared per image).
    cache_budget_gb: float = 8.0
    # Decoding worker processes per rank (persistent; 0: decode in the training process).
    num_workers: int = 2
    # error: a bad sample (undecodable image, label outside [0, C)) stops the run;
    # skip: it is left out, counted, and the count goes to metrics.jsonl.
    on_bad_sample: str = "error"
    # Stream JPEG shards decoded on the GPU (one batched torchvision.io.decode_jpeg per batch,
    # off the training stream); the workers then only read and check the bytes.
    gpu_decode: bool = False
    # The splits scored after every epoch, in this order, each logged under its own name
    # (SPLIT_acc1, SPLIT_acc2, SPLIT_samples). report judges test accuracy, so name test
    # where the data has one; Clothing1M's shards also have val, clean labels: [val, test].
    # The memory source has only test.
    eval_splits: list[str] = field(default_factory=lambda: ["test"])
    # sha256: hash every shard on every rank before training; size: check sizes only.
    verify: str = "sha256"
    # Datasets of variable image size (Clothing1M, ImageFolder): shorter side resized
    # to resize_size, then a crop_size square (random for training, central for evaluation).
    resize_size: int = 256
    # The side of that square: what the model sees.
    crop_size: int = 224
    # A share of the training split held out, with its noisy labels, and scored each epoch
    # (noisy_val_acc1, noisy_val_acc2): a validation signal without clean labels. The same
    # samples for any seed of training and any world size; 0: none (the paper's protocol).
    noisy_val_fraction: float = 0.0

    def __post_init__(self):
        _choice("data.name", self.name, DATASETS)
        _choice("data.source", self.source, SOURCES)
        if self.source == "shards" and not self.shards:
            raise ConfigError("data.shards: must name the shard folder when data.source is 'shards'")
        for key in ("train_subset", "test_subset"):
            value = getattr(self, key)
            if value is not None:
                _positive(f"data.{key}", value)
        _choice("data.cache", self.cache, CACHES)
        _above("data.cache_budget_gb", self.cache_budget_gb, 0)
        _at_least("data.num_workers", self.num_workers, 0)
        _choice("data.on_bad_sample", self.on_bad_sample, BAD_SAMPLE)
        _eval_splits("data.eval_splits", self.eval_splits, self.source)
        _choice("data.verify", self.verify, VERIFY)
        _positive("data.resize_size", self.resize_size)
        _positive("data.crop_size", self.crop_size)
        _range("data.noisy_val_fraction", self.noisy_val_fraction, 0.0, 0.5, hi_open=False)
        if self.crop_size > self.resize_size:
            raise ConfigError(f"data.crop_size: {self.crop_size} is larger than data.resize_size "
                              f"{self.resize_size}")

    def validation_splits(self) -> list[str]:
        """The validation splits a run with this config scores, the preferred first: the clean
        val split, then the noisy held-out one (docs/tools.md, Choosing by validation)."""
        return [s for s, scored in (("val", "val" in self.eval_splits), (NOISY_VAL, self.noisy_val_fraction > 0))
                if scored]


@dataclass
class NoiseConfig:
    # How the training labels are corrupted (drawn once, on the whole split): see
    # docs/training.md, Noise; instance: instance-dependent (part-dependent) noise, drawn
    # from the images (MNIST, Fashion-MNIST, CIFAR); none: the labels as given; file:
    # per-sample labels from noise.file.
    type: str = "symmetric"
    # The share of labels corrupted (for asymmetric: the flip rate of the affected classes;
    # for instance: the mean of the per-sample flip rates, before their truncation to [0, 1]).
    rate: float = 0.5
    # Fixed, whatever the training seed: the reference always corrupts with seed 0.
    seed: int = 0
    # For type 'file': per-sample labels (.npy, .txt/.csv one label per line, .json list,
    # or a torch file of tensors with file_key naming the entry, e.g. CIFAR-10N's 'worse_label').
    file: Optional[str] = None
    # The entry of a torch label file to read (e.g. CIFAR-10N's 'worse_label').
    file_key: Optional[str] = None

    def __post_init__(self):
        _choice("noise.type", self.type, NOISE_TYPES)
        _range("noise.rate", self.rate, 0.0, 1.0)
        _at_least("noise.seed", self.seed, 0)  # numpy's generators take no negative seed
        _seed_fits("noise.seed", self.seed)
        if self.type == "none" and self.rate != 0.0:
            raise ConfigError("noise.rate: must be 0 when noise.type is 'none'")
        if self.type == "file" and not self.file:
            raise ConfigError("noise.file: must name a label file when noise.type is 'file'")


@dataclass
class ModelConfig:
    # The network of each of the pair: mlp (784-256-C), cnn (the reference's 6-conv CIFAR net),
    # resnet18/34/50.
    arch: str = "mlp"
    # 3x3 stride-1 first convolution and no max-pool: the usual ResNet stem for 32x32 inputs.
    cifar_stem: bool = False
    # Initial weights: a local state_dict file, or a torchvision weight name of the ResNet
    # (IMAGENET1K_V1, IMAGENET1K_V2, DEFAULT) read from torchvision's cache
    # ($TORCH_HOME/hub/checkpoints); nothing is downloaded at run time.
    weights: Optional[str] = None
    # SyncBatchNorm across ranks (CUDA, several ranks): BatchNorm over the global batch.
    sync_bn: bool = False

    def __post_init__(self):
        _choice("model.arch", self.arch, MODELS)


@dataclass
class MethodConfig:
    # The method: JoCoR or one of the baselines the paper compares with (docs/methods.md).
    name: str = "jocor"
    # The reference's code default; the authors advise 0.5-0.9 per dataset (configs/ say which).
    co_lambda: float = 0.1
    # tau: null = the noise rate (half of it for asymmetric noise), as in the reference;
    # auto = estimated from the data while the pair trains (docs/methods.md), the default
    # where the noise rate is unknown (noise.type: file, labels that came noisy). Decided
    # once per run: schedule.decide_forget_rate.
    forget_rate: Optional[Union[float, str]] = None
    # auto: the tau used until the first estimate, and where the estimator cannot decide.
    forget_rate_fallback: float = 0.2
    # Tk: epochs over which the forget rate ramps linearly from 0 to tau**c.
    num_gradual: int = 10
    # c: the ramp reaches tau**c.
    exponent: float = 1.0
    # Co-teaching+ only: plain Co-teaching before this epoch (the authors use 0 for MNIST,
    # 20 for CIFAR-10, 5 for CIFAR-100).
    init_epoch: int = 20
    # F-correction only: the transition matrix T (T[i, j] = P(noisy j | clean i)) its loss
    # corrects with: the path of a .json (a list of C lists), .csv (C lines of C numbers) or
    # .npy file, each row summing to 1; or true: the matrix of the noise this config drew
    # (symmetric, pairflip, asymmetric; the identity for noise.type none); or auto: the
    # identity (plain cross-entropy) for method.warmup_epochs, then estimated once from the
    # pair's scoring pass of the training split (the anchor set), the default for
    # fcorrection. docs/methods.md.
    transition: Optional[Union[bool, str]] = None
    # method.transition auto: the epochs of plain cross-entropy before T is estimated. 10:
    # the MLP pair on Fashion-MNIST is then near its plain cross-entropy peak (symmetric 50%:
    # 85.4% test accuracy at epoch 10, best 85.8% in 30), and a longer warm-up lets it memorise
    # more flipped labels, which pull the anchors' labels towards a T nearer I; T-Revision
    # warms up 20 epochs of its schedule. Must be below train.epochs.
    warmup_epochs: int = 10
    # method.transition auto: after the estimate, restart both networks from fresh weights
    # (seeded by train.seed + 1, the same on every rank) and a zeroed Adam, as the original
    # F-correction trains a new network with the corrected loss; false: go on from the
    # warm-up's weights. true: 2.4 and 2.9 points better last-5 test accuracy on
    # Fashion-MNIST at symmetric 50% and pairflip 45% (docs/methods.md).
    reinit_after_warmup: bool = True
    # method.transition auto: rounds of refinement after the first estimate. Each trains
    # method.refine_epochs epochs of F-correction with the current estimate (no selection: every
    # sample, the hard classes too), then estimates T again, the same anchor-set rule, from
    # that pair, and the run trains on with it (no re-initialisation). Why: the first estimate
    # reads a pair trained on the noisy labels, which is confidently wrong on whole groups of a
    # class (Fashion-MNIST's shirts as T-shirts at pairflip 45%), and those anchors carry their
    # own class's labels into another row; a pair trained with the corrected loss is right on
    # far more of its confident samples. 2 rounds of 5: from the warm-up's estimate, pairflip
    # 45%'s error 0.382 -> 0.086 -> 0.034 in a 200-epoch run (docs/methods.md); one round is not
    # always enough from that start. 0: the first estimate only.
    refine_rounds: int = 2
    # method.transition auto: the epochs of F-correction in each refinement round. 5: the
    # anchor set read from a corrected pair stops improving by then (Fashion-MNIST, MLP pair,
    # one-off runs: 0.03 to 0.06 from its fourth epoch on, in all four settings measured);
    # method.warmup_epochs + rounds x epochs must be below train.epochs.
    refine_epochs: int = 5

    def __post_init__(self):
        _choice("method.name", self.name, method_names())
        self._check_transition()
        _range("method.co_lambda", self.co_lambda, 0.0, 1.0, hi_open=False)
        if isinstance(self.forget_rate, str):
            _choice("method.forget_rate", self.forget_rate, FORGET_RATE_WORDS)
            if not get_method(self.name).selects:
                raise ConfigError(f"method.forget_rate: auto: method.name={self.name} selects no small-loss "
                                  f"share, so it takes no forget rate; use jocor, coteaching or coteaching_plus")
        elif self.forget_rate is not None:
            _range("method.forget_rate", self.forget_rate, 0.0, 1.0)
        _range("method.forget_rate_fallback", self.forget_rate_fallback, 0.0, 1.0)
        _at_least("method.num_gradual", self.num_gradual, 0)
        _above("method.exponent", self.exponent, 0)
        _at_least("method.init_epoch", self.init_epoch, 0)
        _at_least("method.warmup_epochs", self.warmup_epochs, 1)
        _at_least("method.refine_rounds", self.refine_rounds, 0)
        _at_least("method.refine_epochs", self.refine_epochs, 1)

    def transition_estimate_epochs(self) -> list[int]:
        """method.transition auto: the (0-based) epochs at whose end T is estimated, the first
        estimate then each refinement."""
        return [self.warmup_epochs - 1 + k * self.refine_epochs for k in range(self.refine_rounds + 1)]

    def _check_transition(self) -> None:
        """The form only: the file is read by the trainer, once it knows the classes (a
        checkpoint's config is validated too, and must not need the file)."""
        if self.transition == "true":  # quoted in YAML, or a string from a sweep file
            self.transition = True
        if self.transition is None and "transition" in get_method(self.name).uses:
            # What Patrini et al. do where T is not known, and what a sweep's method axis needs:
            # one name that trains. Written out, so config.yaml says where T came from.
            self.transition = "auto"
        t = self.transition
        if t in TRANSITION_WORDS:
            if "transition" not in get_method(self.name).uses:
                raise ConfigError(f"method.transition: {t}: method.name={self.name} corrects with no transition "
                                  f"matrix, so there is none to estimate; use fcorrection")
        elif t is not None and t is not True and (t is False or not t.lower().endswith(TRANSITION_FILES)):
            raise ConfigError(f"method.transition: {t!r} is not one of the allowed forms: {TRANSITION_FORMS}")


@dataclass
class TrainConfig:
    # Epochs to train.
    epochs: int = 200
    # The GLOBAL batch: each of W ranks takes batch_size / W samples of every step.
    batch_size: int = 128
    # An epoch of this many global batches (null: one pass over the training split, the last
    # partial batch dropped), drawn afresh each epoch, each sample at most once; the lr and
    # forget-rate schedules still count epochs. The reference's MNIST loop stops at 401.
    steps_per_epoch: Optional[int] = None
    # A class-balanced epoch: at most this many samples of each class by the given labels,
    # drawn afresh each epoch (null: every sample), as DivideMix's Clothing1M epochs.
    max_per_class: Optional[int] = None
    # Adam's learning rate (both networks, one optimizer, as the reference).
    lr: float = 0.001
    # From this epoch the lr falls linearly towards 0 and Adam's beta1 drops to 0.1.
    epoch_decay_start: int = 80
    # Seeds the initial networks and the data order (not the noise: noise.seed).
    seed: int = 1
    # auto: CUDA when present (the local rank's GPU), else the CPU.
    device: str = "auto"
    # auto: bf16 autocast on CUDA devices that support it, fp32 elsewhere; fp16 adds a GradScaler.
    precision: str = "auto"
    # Channels-last memory format for the convolutional networks.
    channels_last: bool = False
    # torch.compile the pair (the CIFAR configs set it with channels_last).
    compile: bool = False
    # error: a NaN or infinite loss or gradient stops the run, naming the step; skip: that
    # step updates nothing and is counted.
    on_nonfinite: str = "error"
    # Steps between host syncs: the non-finite verdict and the stop-signal agreement are read
    # every N steps (each sync drains the GPU's queue). A non-finite value is still reported
    # with the step it appeared on; 'skip' needs the verdict at once (N = 1).
    # null (auto): 1 on CPU and with on_nonfinite=skip, 50 on CUDA.
    sync_every: Optional[int] = None
    # The whole step as one CUDA graph replay. auto: captured on CUDA wherever possible (one
    # process; not with on_nonfinite=skip), else eager with a one-line notice, and eager if
    # the capture fails; true: an error where it is impossible; false: always eager.
    cuda_graph: Union[bool, str] = "auto"
    # auto: continue from the newest checkpoint in RUN/checkpoints that loads; never: start
    # fresh; any other value: the path of a checkpoint to continue from.
    resume: str = "auto"

    def __post_init__(self):
        _positive("train.epochs", self.epochs)
        _positive("train.batch_size", self.batch_size)
        for key in ("steps_per_epoch", "max_per_class"):
            if getattr(self, key) is not None:
                _positive(f"train.{key}", getattr(self, key))
        _above("train.lr", self.lr, 0)
        _at_least("train.epoch_decay_start", self.epoch_decay_start, 0)
        _at_least("train.seed", self.seed, 0)
        _seed_fits("train.seed", self.seed)
        _choice("train.device", self.device, DEVICES)
        _choice("train.precision", self.precision, PRECISIONS)
        _choice("train.on_nonfinite", self.on_nonfinite, NONFINITE)
        if self.sync_every is not None:
            _positive("train.sync_every", self.sync_every)
        if self.sync_every is not None and self.sync_every > 1 and self.on_nonfinite == "skip":
            raise ConfigError("train.sync_every: must be 1 with train.on_nonfinite=skip (a step can only "
                              "be skipped when its verdict is read at once)")
        if not self.resume:
            raise ConfigError("train.resume: must be 'auto', 'never' or the path of a checkpoint")
        if self.cuda_graph not in (True, False, "auto"):
            raise ConfigError(f"train.cuda_graph: {self.cuda_graph!r} is not one of 'auto', true, false")


@dataclass
class CheckpointConfig:
    # Also at every epoch end; 0 = at epoch ends only.
    every_steps: int = 0
    # How many of the newest checkpoints to keep.
    keep: int = 3

    def __post_init__(self):
        _at_least("checkpoint.every_steps", self.every_steps, 0)
        _positive("checkpoint.keep", self.keep)


@dataclass
class DistConfig:
    # The process-group backend: auto = nccl on CUDA, gloo on the CPU.
    backend: str = "auto"
    # A collective that cannot complete (a peer died) fails after this many seconds.
    timeout_s: float = 300.0

    def __post_init__(self):
        _choice("dist.backend", self.backend, BACKENDS)
        _above("dist.timeout_s", self.timeout_s, 0)


@dataclass
class LogConfig:
    # The progress bar: auto = on a terminal.
    progress: str = "auto"
    # Also write each epoch's metrics as TensorBoard scalars to RUN/tensorboard (needs the
    # optional extra: pip install -e .[tensorboard]).
    tensorboard: bool = False

    def __post_init__(self):
        _choice("log.progress", self.progress, PROGRESS)


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    data: DataConfig = field(default_factory=DataConfig)
    noise: NoiseConfig = field(default_factory=NoiseConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    dist: DistConfig = field(default_factory=DistConfig)
    log: LogConfig = field(default_factory=LogConfig)
    # 'global': one small-loss threshold over the all-gathered batch (what one big batch
    # would select); 'local': each rank selects inside its own shard of the batch.
    selection: str = "global"

    def __post_init__(self):
        _choice("selection", self.selection, SELECTIONS)
        if self.method.transition is True and "transition" in get_method(self.method.name).uses:
            why = true_transition_unknown(self.noise.type, labels_noisy=False)
            if why:
                raise ConfigError(f"method.transition: true: {why}")
        if self.method.transition == "auto" and self.method.warmup_epochs >= self.train.epochs:
            raise ConfigError(f"method.warmup_epochs: {self.method.warmup_epochs} with train.epochs="
                              f"{self.train.epochs}: method.transition auto estimates T after the warm-up, so "
                              f"it must end before the last epoch (at most {self.train.epochs - 1})")
        last = self.method.transition_estimate_epochs()[-1] + 1
        if self.method.transition == "auto" and self.method.refine_rounds and last >= self.train.epochs:
            m = self.method
            raise ConfigError(f"method.refine_rounds: {m.refine_rounds} of method.refine_epochs={m.refine_epochs} "
                              f"after method.warmup_epochs={m.warmup_epochs} end at epoch {last}, with train.epochs="
                              f"{self.train.epochs}: the last refinement must end before the last epoch; fewer "
                              f"rounds or epochs (method.refine_rounds=0: the first estimate only)")

    def check_world_size(self, world_size: int) -> None:
        if self.train.batch_size % world_size:
            raise ConfigError(
                f"train.batch_size: the global batch {self.train.batch_size} is not divisible by "
                f"the world size {world_size}; choose a multiple of {world_size}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# --- building dataclasses from plain dicts, with errors that name the key ---------------

def _convert(key: str, value: Any, hint: Any) -> Any:
    origin = typing.get_origin(hint)
    if origin is typing.Union:
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if value is None and len(args) < len(typing.get_args(hint)):
            return None
        for arg in args[:-1]:  # Union[bool, str]: a YAML true / false stays a bool
            try:
                return _convert(key, value, arg)
            except ConfigError:
                pass
        return _convert(key, value, args[-1])
    if value is None:
        raise ConfigError(f"{key}: must not be null")
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, e.g. [a, b], got {value!r}")
        return [_convert(f"{key}[{i}]", v, typing.get_args(hint)[0]) for i, v in enumerate(value)]
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise ConfigError(f"{key}: expected a number, got {value!r}")
    if hint is str:
        if isinstance(value, str) and "\0" in value:  # no path or name holds one; os calls refuse it
            raise ConfigError(f"{key}: holds a NUL character: {value!r}")
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    raise TypeError(f"unsupported config type {hint!r} for {key}")


def _build(cls: type, data: dict, prefix: str = "") -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    for key in data:
        if key not in names:
            raise ConfigError(f"{prefix}{key}: unknown key; allowed here: {', '.join(names)}")
    kwargs = {}
    for name in names:
        if name not in data:
            continue
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            kwargs[name] = _build(hint, data[name], f"{prefix}{name}.")
        else:
            kwargs[name] = _convert(f"{prefix}{name}", data[name], hint)
    return cls(**kwargs)


def parse_override(text: str) -> tuple[list[str], Any]:
    """``a.b=value`` -> (['a', 'b'], value); the value is read as YAML (1, 0.5, true, null)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r}: expected key=value")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"override {text!r}: empty key")
    try:
        value = parse_yaml(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.split("."), value


class _UniqueKeyLoader(yaml.SafeLoader):
    """yaml.SafeLoader, except that a key given twice in one mapping is an error: PyYAML
    keeps the last silently, so the value a user reads first would not be the one used."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            try:
                if key in seen:
                    raise yaml.constructor.ConstructorError(None, None, f"key {key!r} is given twice",
                                                            key_node.start_mark)
                seen.add(key)
            except TypeError:
                break  # an unhashable key: the base class refuses it, naming the line
        return super().construct_mapping(node, deep)


def parse_yaml(text: str) -> Any:
    """YAML text as Python values, with duplicate keys and what yaml raises besides its own
    errors on hostile text (nesting deeper than the recursion limit, an integer of more digits
    than Python converts) raised as yaml.YAMLError."""
    try:
        return yaml.load(text, Loader=_UniqueKeyLoader)
    except RecursionError:
        raise yaml.YAMLError("nested too deeply") from None
    except ValueError as exc:  # int() of a literal past sys.get_int_max_str_digits()
        raise yaml.YAMLError(str(exc).split(":")[0]) from None


def _set(tree: dict, path: list[str], value: Any) -> None:
    node = tree
    for part in path[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"{'.'.join(path)}: {part} is not a section")
        node = child
    node[path[-1]] = value


def read_yaml_mapping(path: str | Path, what: str = "config file", *, empty_ok: bool = True) -> dict:
    """A YAML file whose top level is a mapping; errors name ``what`` and the path."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{what} {path}: not found")
    try:
        text = p.read_text()
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{what} {path}: not UTF-8 text (byte {exc.object[exc.start]:#04x} at offset "
                          f"{exc.start})") from None
    except OSError as exc:
        raise ConfigError(f"{what} {path}: cannot be read: {exc.strerror or exc}") from None
    try:
        loaded = parse_yaml(text)
    except yaml.YAMLError as exc:
        mark, problem = getattr(exc, "problem_mark", None), getattr(exc, "problem", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
        raise ConfigError(f"{what} {path}: not valid YAML: {where}{problem or str(exc).splitlines()[0]}") from None
    if (loaded is None and not empty_ok) or (loaded is not None and not isinstance(loaded, dict)):
        raise ConfigError(f"{what} {path}: expected a mapping at the top level")
    return loaded or {}


# --- configs written with the names of earlier versions ----------------------------------

RENAMED = {"eval_split": "eval_splits", "val_fraction": "noisy_val_fraction"}  # data.*: old -> new


def upgrade_config(tree: dict) -> dict:
    """A config dict in today's names, from one that may use earlier ones: a checkpoint's or a
    run folder's config.yaml written before the renames, or a YAML file or override written
    for them. ``data.eval_split: X`` (then the only split scored) becomes ``data.eval_splits:
    [X]`` (what an earlier run scored, it scores when continued); ``data.val_fraction`` becomes
    ``data.noisy_val_fraction``, the same samples. An old name beside its new one is an error.
    The one place old names are read: load_config and config_from_dict call it; ``tree`` is
    not changed. (A run folder's metrics.jsonl rows are renamed by runfolder.read_metrics.)"""
    data = tree.get("data") if isinstance(tree, dict) else None
    if not isinstance(data, dict) or not RENAMED.keys() & data.keys():
        return tree
    data = dict(data)
    for old, new in RENAMED.items():
        if old in data and new in data:
            raise ConfigError(f"data.{old}: the earlier name of data.{new}; give only data.{new}")
    if "eval_split" in data:
        split = data.pop("eval_split")
        data["eval_splits"] = [split]
    if "val_fraction" in data:
        data["noisy_val_fraction"] = data.pop("val_fraction")
    return {**tree, "data": data}


def written_before_refinement(tree: dict) -> dict:
    """A config written whole (a checkpoint's) before method.refine_rounds existed: that run never
    refined its transition estimate, so it reads as ``refine_rounds: 0``, not today's default
    (which a short F-correction run's config would fail: the rounds must end before the last
    epoch). Every whole config since F-correction has ``method.warmup_epochs``; ``tree`` is
    not changed."""
    method = tree.get("method") if isinstance(tree, dict) else None
    if isinstance(method, dict) and "warmup_epochs" in method and "refine_rounds" not in method:
        return {**tree, "method": {**method, "refine_rounds": 0}}
    return tree


def load_config(path: Optional[str] = None, overrides: Optional[list[str]] = None) -> Config:
    tree: dict = read_yaml_mapping(path) if path is not None else {}
    for text in overrides or []:
        keys, value = parse_override(text)
        _set(tree, keys, value)
    return _build(Config, upgrade_config(tree))


def config_from_dict(data: dict) -> Config:
    return _build(Config, upgrade_config(data))


def dump_config(cfg: Config) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)
