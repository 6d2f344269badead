"""Defaults shared by every experiment config (CIFAR L2W settings), and
the model fields of each backbone for each kind of dataset."""

import ml_collections
from absl import flags
from ml_collections import config_dict
from ml_collections import config_flags

# The model fields of each backbone for each kind of dataset ('cifar',
# 'imagenet', 'digits'; see `dataset_kind`): the settings of the papers and
# originals, and the small models of the embedded digits. A dataset config
# sets its backbone's; `--config.model.name=<other>` on the command line
# switches to the other backbone's (`config_from_flag`).
MODEL_PRESETS = {
    # L2W-DEN's CIFAR MSDNet (MSDNet-PyTorch's CIFAR command line).
    ('msdnet', 'cifar'): dict(
        n_blocks=5, step_mode='lin_grow', step=1, base=1, n_channels=16,
        growth_rate=6, gr_factor=(1, 2, 4), bn_factor=(1, 2, 4), prune='max',
        bottleneck=True, reduction=0.5, init='torch_default'),
    # L2W-DEN's ImageNet MSDNet, step 4 (configs/imagenet.py).
    ('msdnet', 'imagenet'): dict(
        n_blocks=5, step_mode='even', step=4, base=4, n_channels=32,
        growth_rate=16, gr_factor=(1, 2, 4, 4), bn_factor=(1, 2, 4, 4),
        prune='max', bottleneck=True, reduction=0.5, init='torch_default'),
    # The demo's 4-exit MSDNet on 32 px digits (configs/digits.py).
    ('msdnet', 'digits'): dict(
        n_blocks=4, step_mode='even', step=1, base=1, n_channels=4,
        growth_rate=2, gr_factor=(1, 2, 4), bn_factor=(1, 2, 4), prune='max',
        bottleneck=True, reduction=0.5, init='torch_default'),
    # RANet-pytorch's train_cifar.sh with its args.py defaults (8 exits).
    ('ranet', 'cifar'): dict(
        n_blocks=2, n_channels=16, growth_rate=6, gr_factor=(4, 2, 1, 1),
        bn_factor=(4, 2, 1, 1), block_step=2, scale_list=(1, 2, 3, 3),
        compress_factor=0.25, step=4, step_mode='even', bn_after=True,
        reduction=0.5, init='msdnet'),
    # RANet-pytorch's train_imagenet.sh (8 exits, 168 to 1681 MFLOPs).
    ('ranet', 'imagenet'): dict(
        n_blocks=2, n_channels=16, growth_rate=16, gr_factor=(4, 2, 1, 1),
        bn_factor=(4, 2, 1, 1), block_step=2, scale_list=(1, 2, 3, 4),
        compress_factor=0.25, step=8, step_mode='even', bn_after=True,
        reduction=0.5, init='msdnet'),
    # A 4-exit RANet on 32 px digits: 8, 16 and 32 px flows of 2, 3 and 4
    # blocks (configs/ranet_digits.py).
    ('ranet', 'digits'): dict(
        n_blocks=2, n_channels=4, growth_rate=4, gr_factor=(4, 2, 1),
        bn_factor=(4, 2, 1), block_step=1, scale_list=(1, 2, 3),
        compress_factor=0.25, step=2, step_mode='even', bn_after=True,
        reduction=0.5, init='msdnet'),
}


def dataset_kind(config: ml_collections.ConfigDict) -> str:
  """'digits' (the embedded sklearn_digits and graded_digits), 'imagenet'
  (the ImageNet stem) or 'cifar' (everything else on 32 px CIFAR-style
  images)."""
  if config.dataset.name in ('sklearn_digits', 'graded_digits'):
    return 'digits'
  return 'imagenet' if config.model.stem == 'imagenet' else 'cifar'


def use_model(config: ml_collections.ConfigDict,
              name: str) -> ml_collections.ConfigDict:
  """Sets `config.model.name` and the model fields of `name`'s preset for
  the config's kind of dataset (MODEL_PRESETS); returns `config`."""
  key = (name, dataset_kind(config))
  if key not in MODEL_PRESETS:
    raise ValueError(f'model.name: no {name!r} preset for {key[1]} datasets;'
                     f' presets: {sorted(MODEL_PRESETS)}')
  config.model.name = name
  for field, value in MODEL_PRESETS[key].items():
    config.model[field] = value
  return config


def switch_backbone(config: ml_collections.ConfigDict, file_model_name: str,
                    overrides: dict) -> bool:
  """A command line that sets `model.name` to another backbone than the
  config file's gets that backbone's preset (`use_model`), then its own
  `model.*` overrides again (a flat {'model.step': 2, ...} dict). Returns
  whether the backbone was switched.

  Without this, `--config=configs/digits.py --config.model.name=ranet`
  would build a RANet from the digits MSDNet's fields, which do not make a
  RANet (its fusion blocks need step >= 2, its factors run the other way).
  """
  name = config.model.name
  if 'model.name' not in overrides or name == file_model_name:
    return False
  if ':' in name and (name, dataset_kind(config)) not in MODEL_PRESETS:
    # A backbone from outside the package (`module:name`) without a preset
    # here: it reads the `model.*` fields it has and defaults the rest.
    return False
  use_model(config, name)
  for path, value in overrides.items():
    if path.startswith('model.') and path != 'model.name':
      config.model[path.split('.', 1)[1]] = value
  return True


def config_from_flag(holder) -> ml_collections.ConfigDict:
  """The config of a parsed `config_flags.DEFINE_config_file` flag (the
  FlagHolder it returned) with `switch_backbone` applied; prints one line
  when the backbone was switched."""
  flag = flags.FLAGS[holder.name]
  config = flag.value
  overrides = config_flags.get_override_values(flag)
  if 'model.name' not in overrides:
    return config
  file_config = flag.parser.parse(flag.config_filename)
  if switch_backbone(config, file_config.model.name, overrides):
    given = sorted(p for p in overrides if p.startswith('model.') and
                   p != 'model.name')
    print(f'model.name={config.model.name}: the {dataset_kind(config)} '
          f'{config.model.name} preset of configs/common.py replaces the '
          f'config file\'s {file_config.model.name} fields'
          + (f' (kept from the command line: {", ".join(given)})'
             if given else ''), flush=True)
  return config


def base_config() -> ml_collections.ConfigDict:
  """The CIFAR L2W-DEN configuration; experiment files override fields."""
  config = ml_collections.ConfigDict()
  config.method = 'l2w'
  config.seed = 0

  config.dataset = ml_collections.ConfigDict()
  config.dataset.name = 'cifar100'
  config.dataset.num_classes = 100
  config.dataset.image_size = 32
  config.dataset.data_dir = config_dict.placeholder(str)  # tfds default
  config.dataset.manual_dir = config_dict.placeholder(str)  # ImageNet tars
  # Training images held out under eval.protocol='holdout' (unset: the
  # dataset's, MSDNet's --use-valid: 5,000 on CIFAR, 50,000 on ImageNet,
  # 1,000 on CIFAR-100-LT; a fixed random draw). Must stay unset with
  # eval.protocol='train', which trains on every image.
  config.dataset.holdout = config_dict.placeholder(int)
  config.dataset.augment = 'crop_flip'  # crop_flip | crop | imagenet | none
  # A record that cannot be read (a corrupt image, a truncated file) stops
  # the run naming it; True trains without such records, counted in the log
  # and in results.json (l2w_jax/data/records.py).
  config.dataset.skip_corrupt = False

  config.model = ml_collections.ConfigDict()
  config.model.name = 'msdnet'
  config.model.update(MODEL_PRESETS['msdnet', 'cifar'])
  config.model.stem = 'cifar'
  # Channels of the exits' two hidden convs; 0: the original's (128 on the
  # CIFAR stem, the exit's input width on the ImageNet stem).
  config.model.classifier_width = 0
  # The convolutions' derivative rules (l2w_jax/models/conv.py), and with
  # them BatchNorm's one-pass derivative (models/batch_norm.py): 'auto'
  # takes the explicit ones on CPU (faster there) and JAX's on GPU / TPU;
  # 'lax' everywhere allows jax.jvp through the model.
  config.model.conv_gradients = 'auto'
  # RANet only (model.name='ranet'; configs/ranet_*.py): flows of
  # n_blocks + block_step * i blocks per scale, the stem's resolution steps,
  # the share of the fused low-resolution features, BN after the convs.
  config.model.block_step = 2
  config.model.scale_list = (1, 2, 3)
  config.model.compress_factor = 0.25
  config.model.bn_after = True
  # model.init (in the presets) 'torch_default': what MSDNet's original
  # effectively initialises (its _init_weights never reaches a conv);
  # 'msdnet': what it intended, and what RANet's original does.

  config.meta = ml_collections.ConfigDict()
  config.meta.epsilon = 0.8
  config.meta.constraint = 'col'
  config.meta.input = 'loss'
  config.meta.output = 'tanh'
  config.meta.hidden_size = 500
  config.meta.num_layers = 1
  config.meta.interval = 1
  config.meta.lr = 1e-4
  config.meta.weight_decay = 1e-4
  config.meta.target_p_index = 15
  # The exits' shares of the meta samples, (K,); empty: from target_p_index
  # (q_k = p^k normalised, p = index / 20). Set them to reproduce a run
  # whose float32 shares differ in the last bit (the original computes them
  # with a float32 exp whose rounding depends on the CPU).
  config.meta.target_probs = ()
  # The virtual step (`l2w_jax.meta.api`): unrolled inner steps; first_order
  # treats each inner gradient as a constant of the backbone parameters;
  # virtual_params 'all' or 'heads' (only the exits' classifiers move).
  config.meta.inner_steps = 1
  config.meta.first_order = False
  config.meta.virtual_params = 'all'
  # The meta step's pieces by name (`l2w_jax.meta.pieces`; `module:name` for
  # one registered outside the package): L2W-DEN's weight net, its
  # confidence-allocated meta objective, the real optimizer as the virtual
  # step.
  config.meta.weight_net = 'mlp'
  config.meta.objective = 'allocation'
  config.meta.inner_update = 'optimizer'
  # The paper's ablations (docs/methods.md, 'Ablations'): 'none', or
  # 'allocation' (0/1 training-data allocation instead of weights),
  # 'fixed_weights' (per-exit constants, meta.fixed_weights; () for K times
  # the target shares), 'frozen' (the random weight net, never updated),
  # 'vanilla_objective' (every exit's CE on every meta sample).
  config.meta.ablation = 'none'
  config.meta.fixed_weights = ()
  # Rematerialise the backbone's layers (flax remat = jax.checkpoint): the
  # same values, 40 % less peak memory for the CIFAR-100 meta step at 8-14 %
  # more time (README, benchmarks/meta_memory.py).
  config.meta.remat = False

  config.train = ml_collections.ConfigDict()
  config.train.batch_size = 1024
  config.train.epochs = 300
  config.train.num_steps = -1  # > 0 overrides epochs
  # 'keep': an epoch ends with the partial batch that is left, as the
  # originals' DataLoaders (no drop_last): CIFAR at 1024 runs 49 iterations
  # per epoch, ImageNet at 4096 313. Padded to a multiple of the devices by
  # repeating images, as DistributedSampler pads to one of the GPUs
  # (`data.last_batch_size`); it compiles the step once more, for the last
  # batch's shape. 'drop': full batches only (48 / 312), one program.
  config.train.last_batch = 'keep'
  config.train.lr = 0.8
  # 'cosine' (per iteration, L2W-DEN) or 'multistep' (per epoch: x lr_gamma
  # at each of lr_milestones, fractions of the run; MSDNet, IMTA, BoostNet).
  config.train.schedule = 'cosine'
  config.train.lr_milestones = (0.5, 0.75)
  config.train.lr_gamma = 0.1
  # Methods trained in two phases (regime_disjoint, regime_mixed, imta):
  # the fraction of the iterations in the first phase.
  config.train.phase_split = 0.5
  # Start at a later phase (e.g. 1: IMTA's stage 2, the disjoint regime's
  # heads) from the parameters and statistics of the latest checkpoint of
  # another run of the same method and model (train.init_from, a workdir),
  # with a fresh optimizer; the run is then that phase alone.
  config.train.start_phase = 0
  config.train.init_from = config_dict.placeholder(str)
  config.train.momentum = 0.9
  config.train.weight_decay = 1e-4
  config.train.label_smoothing = 0.0
  config.train.log_every_steps = 50
  config.train.checkpoint_every_steps = 1000
  config.train.keep_checkpoints = 3
  config.train.eval_every_epochs = 10  # 0: only the final evaluation
  # Data parallelism: train.batch_size is the global batch, split evenly over
  # all devices of all processes (each device halves its own share, as DDP
  # does); per_device_batch_size > 0 sets it as per-device x devices instead.
  config.train.per_device_batch_size = 0
  config.train.sync_bn = False  # True: BatchNorm statistics over all devices
  # Running statistics kept: 'device0' (DDP's buffer broadcast) or 'mean'.
  config.train.bn_stats = 'device0'
  config.train.compute_dtype = 'float32'  # or 'bfloat16' (activations only)

  # Multi-process runs. On a multi-host TPU slice nothing needs setting; on
  # CPU/GPU clusters give the coordinator and each process's id.
  config.distributed = ml_collections.ConfigDict()
  config.distributed.coordinator_address = config_dict.placeholder(str)
  config.distributed.num_processes = 1
  config.distributed.process_id = 0
  config.distributed.num_devices = 0  # 0: every device; n: the first n
  # A process silent for this long is lost and the others stop, with one
  # line (JAX's default is 100 s).
  config.distributed.heartbeat_timeout_seconds = 30
  # How long the processes wait for each other to connect at the start.
  config.distributed.initialization_timeout_seconds = 300
  # A host with a TPU or GPU but JAX only on its CPU stops the run (the
  # install command is in the message); True trains on the CPU anyway.
  config.distributed.allow_cpu = False
  # How gradients, moved statistics and metrics are averaged over devices:
  # 'all_reduce' (fast; its summation order depends on the process layout)
  # or 'ordered' (all-gather, then a sum in device order: the same bits on
  # 1 process x 8 devices as on 2 x 4, for N times the memory of one
  # gradient; for reproducibility checks, not for large models).
  config.distributed.reduction = 'all_reduce'

  # BoostNet (method 'boostnet'): the ensemble reweight r as a tuple of one
  # value for every exit, two (linspace over the exits) or one per exit,
  # e.g. --config.boostnet.reweight='(0.2,0.6)'; 0.5 in every script of the
  # original.
  config.boostnet = ml_collections.ConfigDict()
  config.boostnet.reweight = (0.5,)
  # The original's --loss_equal (ImageNet script, off in every released
  # run): stage losses divided by their moving averages (momentum 0.9),
  # times the averages' mean.
  config.boostnet.loss_equal = False

  # IMTA (method 'imta'): stage-2 distillation temperature T and weight
  # gamma, as the original's run_IMTA.sh sets them (its argparse defaults
  # are T=3, gamma=0.9). The stages split the run by train.phase_split.
  config.imta = ml_collections.ConfigDict()
  config.imta.temperature = 1.0
  config.imta.gamma = 0.1

  config.eval = ml_collections.ConfigDict()
  config.eval.batch_size = 500
  # Which images train and which set the early-exit thresholds
  # (docs/faithfulness.md, "Data protocol"):
  # 'train' (L2W-DEN's scripts): training on every training image,
  # thresholds searched on them (all of them, or eval.threshold_images drawn
  # once at random, as the original's eval_imagenet.py takes 50,000 on
  # ImageNet); 'holdout' (MSDNet's --use-valid, which the BoostNet and IMTA
  # scripts pass): dataset.holdout images held out of training, thresholds
  # searched on them.
  config.eval.protocol = 'train'
  config.eval.threshold_images = 0
  # The threshold images pass through the training augmentation, as every
  # original's do (L2W-DEN reads the training loader; MSDNet's holdout is a
  # subset of the augmented training set); False: the evaluation transform.
  config.eval.threshold_augment = True
  return config
