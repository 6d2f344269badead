"""Defaults shared by every experiment config (CIFAR L2W settings)."""

import ml_collections
from ml_collections import config_dict


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
  # Training images held out for the early-exit thresholds (MSDNet's
  # --use-valid: 5000 on CIFAR); 0 trains on everything.
  config.dataset.holdout = 5000
  config.dataset.augment = 'crop_flip'  # crop_flip | crop | imagenet | none

  config.model = ml_collections.ConfigDict()
  config.model.name = 'msdnet'
  config.model.n_blocks = 5
  config.model.step_mode = 'lin_grow'
  config.model.step = 1
  config.model.base = 1
  config.model.n_channels = 16
  config.model.growth_rate = 6
  config.model.gr_factor = (1, 2, 4)
  config.model.bn_factor = (1, 2, 4)
  config.model.prune = 'max'
  config.model.bottleneck = True
  config.model.reduction = 0.5
  config.model.stem = 'cifar'
  # RANet only (model.name='ranet'; configs/ranet_*.py): flows of
  # n_blocks + block_step * i blocks per scale, the stem's resolution steps,
  # the share of the fused low-resolution features, BN after the convs.
  config.model.block_step = 2
  config.model.scale_list = (1, 2, 3)
  config.model.compress_factor = 0.25
  config.model.bn_after = True
  # 'torch_default': what the original effectively initialises (its
  # _init_weights never reaches a conv); 'msdnet': what it intended.
  config.model.init = 'torch_default'

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

  config.train = ml_collections.ConfigDict()
  config.train.batch_size = 1024
  config.train.epochs = 300
  config.train.num_steps = -1  # > 0 overrides epochs
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
  # 'holdout': thresholds from dataset.holdout; 'train': from the augmented
  # training set, as the original L2W-DEN scripts do.
  config.eval.threshold_source = 'holdout'
  return config
