"""FIARSE on scikit-learn's digits (real data shipped in the wheel; no internet needed).

50 clients with Dirichlet(0.5) label skew, capacity levels {1, 1/4, 1/16} in equal
contiguous groups, 10 clients per round, K = 20 local SGD steps (lr 0.1, batch 20),
global magnitude thresholds and the paper's Eq. 3 gradient.

At round 0 the 1/16 level keeps only first-layer weights (global θ above every output
weight at initialisation), so its first updates are 0 and its output ignores the input
until the shared weights grow into its budget: the method, not a bug; the run prints a
note and summary.json records it (disconnected_at_start; fiarse_jax/core/connectivity.py).

Run:
  fiarse-jax --config configs/default.py --workdir runs/default
Override any field, e.g.:
  fiarse-jax --config configs/default.py --workdir runs/masked --config.fiarse.gradient=masked
"""
import ml_collections
from ml_collections import config_dict


def get_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.seed = 0
    # fiarse | fiarse_neuron | heterofl | fedrolex | fed_dropout | fedavg_full | fedavg_smallest
    # | scalefl (needs model.early_exits = True and ≥ 2 hidden layers; configs/digits_scalefl.py)
    config.method = "fiarse"
    # Capacity ratios r: level i keeps ⌈r·N⌉ of the N maskable parameters.
    config.capacities = (1.0, 0.25, 0.0625)

    config.data = ml_collections.ConfigDict()
    config.data.name = "digits"
    config.data.num_clients = 50
    config.data.alpha = 0.5            # Dirichlet label skew
    config.data.test_fraction = 0.2    # of each client's samples, its local test split
    config.data.min_client_size = 10
    # Used by the datasets read from files (and the TFDS ones); digits ignores them. Your
    # own images: --config.data.name=image_folder --config.data.data_dir=DIR (DIR/train/
    # <class>/*.png|jpg, DIR/test/<class>/...), or name=arrays with data_dir=FILE.npz
    # (x_train, y_train, x_test, y_test); see fiarse_jax/data/files.py.
    config.data.data_dir = config_dict.placeholder(str)
    # Per-channel normalisation and crop-pad-4 + flip augmentation; None = the data's
    # default: 32×32 RGB gets CIFAR-10's mean, the authors' std and augmentation, other
    # images their training split's own mean/std and no augmentation.
    config.data.mean = config_dict.placeholder(tuple)    # e.g. '(0.5, 0.5, 0.5)'
    config.data.std = config_dict.placeholder(tuple)
    config.data.augment = config_dict.placeholder(bool)

    config.model = ml_collections.ConfigDict()
    config.model.name = "mlp"
    config.model.hidden_sizes = (128,)

    # Options of the method named by config.method.
    config.fiarse = ml_collections.ConfigDict()
    config.fiarse.scope = "global"     # "global" | "layer"
    config.fiarse.gradient = "tcb"     # "tcb" (paper Eq. 3) | "masked" (authors' runs)

    # Options of the other methods (used when config.method names them).
    config.fiarse_neuron = ml_collections.ConfigDict()
    config.fiarse_neuron.scope = "layer"   # "layer" | "global"
    # "params": a capacity r is a fraction of the maskable parameters (≈ ⌈r·N⌉ held, as
    # for FIARSE; width ≈ √r on deep models) | "width": ⌈r·C⌉ units of every layer (≈ r²).
    config.fiarse_neuron.budget = "params"
    config.heterofl = ml_collections.ConfigDict()
    # HeteroFL's 1/rate output scaler (rate: the kept width) relies on a BatchNorm after
    # each layer to absorb the scale; these models have none, and units shared by levels
    # with different scales then conflict (1/16 sub-model ~23% with it, ~93% without).
    # Off here; on in HeteroFL.
    config.heterofl.scaler = False
    config.heterofl.budget = "params"     # "params" | "width", as for fiarse_neuron
    config.fedrolex = ml_collections.ConfigDict({"budget": "params"})
    config.fed_dropout = ml_collections.ConfigDict({"budget": "params"})
    config.fedavg_smallest = ml_collections.ConfigDict({"budget": "params"})
    config.scalefl = ml_collections.ConfigDict()
    config.scalefl.depth_exponent = 0.5   # depth d_r = ⌈r^a·L⌉; width fills the r·N budget
    config.scalefl.kd_weight = 1.0        # self-distillation from the deepest kept exit
    config.scalefl.temperature = 3.0

    config.num_rounds = 200
    config.clients_per_round = 10

    config.client = ml_collections.ConfigDict()
    config.client.optimizer = "sgd"         # "sgd" (plain, the paper's CIFAR) | "adamw"
    config.client.learning_rate = 0.1
    config.client.betas = (0.9, 0.999)      # adamw only
    config.client.weight_decay = 1e-4       # adamw only (decoupled)
    config.client.local_steps = 20          # K, for every client
    config.client.local_epochs = 0.0        # > 0: each client ⌈E·n/batch⌉ steps instead
    config.client.batch_size = 20

    config.server = ml_collections.ConfigDict()
    config.server.learning_rate = 1.0
    # How accepted updates are combined, per coordinate over the clients holding it:
    # mean | median | trimmed_mean | norm_bounded | multi_krum (options below).
    config.server.aggregator = "mean"
    config.server.trimmed_mean = ml_collections.ConfigDict({"beta": 0.2})
    config.server.norm_bounded = ml_collections.ConfigDict({"max_norm": 1.0})
    config.server.multi_krum = ml_collections.ConfigDict({"num_byzantine": 2})
    # Non-finite updates are always rejected; with validate, also norm outliers (robust
    # z-score among same-capacity clients > z_threshold) and updates whose cosine with
    # the coordinate-wise median is < cosine_threshold.
    config.server.validate = False
    config.server.z_threshold = 3.5
    config.server.cosine_threshold = 0.0
    # Where those two tests look: "held" (each client's coordinates, norms per level) or
    # "core" (the coordinates every client of the round holds: robust with partial models).
    config.server.screen = "held"
    # What a direction verdict does: "reject" the update, or only "flag" the client (the
    # update is used; reputation below excludes clients flagged persistently).
    config.server.direction_action = "reject"
    # Reputation: exclude a client flagged (rejected) in at least this many rounds and in
    # most of the rounds it was screened in (0: never).
    config.server.exclude_after_flags = 0

    # Attack simulation: kind none | sign_flip | scale | gaussian | free_rider | nan |
    # label_flip | alie | adaptive (the last two coordinated: fiarse_jax/robust/attacks.py); a
    # seeded `fraction` of clients, at any capacity level (or only at the level indices in
    # `levels`).
    config.attack = ml_collections.ConfigDict()
    config.attack.kind = "none"
    config.attack.fraction = 0.0
    config.attack.scale = 10.0         # λ of `scale`
    config.attack.noise_std = 1.0      # of `gaussian`
    config.attack.levels = ()

    # Client-level DP-FedAvg (off while noise_multiplier = 0 and target_epsilon = 0):
    # clip each delta to clip_norm, Gaussian noise σ·C on the holders' sum. ε spent so far
    # (dp-accounting, sampling rate clients_per_round / num_clients) goes to rounds.jsonl.
    config.dp = ml_collections.ConfigDict()
    config.dp.noise_multiplier = 0.0   # σ
    config.dp.target_epsilon = 0.0     # > 0: σ calibrated so that num_rounds spend this ε
    config.dp.clip_norm = 1.0
    config.dp.delta = 1e-5
    config.dp.accountant = "rdp"       # rdp | pld

    config.engine = ml_collections.ConfigDict()
    # "auto" (vmap on GPU/TPU, loop on CPU) | "loop" | "vmap" | "sharded" (client axis
    # over all devices, every process's under jax.distributed)
    config.engine.strategy = "auto"
    # vmap/sharded: clients trained at once per device (0 = all; "auto" = the most that fit
    # memory_budget_gb by XLA's compiled peak, 0 = 90 % of the free device memory)
    config.engine.clients_per_chunk = config_dict.FieldReference(0, field_type=object)  # int | "auto"
    config.engine.memory_budget_gb = 0.0
    config.engine.dtype = "float32"       # "bfloat16": mixed-precision local training
    # XLA options: "auto" = the per-backend choices of xla.compiler_options (CPU:
    # convolutions on Eigen, not YNNPACK) | "default" = XLA's own defaults
    config.engine.xla = "auto"
    # "stream": the server's sums accumulate while clients train (its inputs take O(params),
    # not O(clients × params)); needs the mean, norm_bounded or DP-FedAvg rule, no
    # validation and no attack on the updates.
    # "stack": every client's delta and mask kept until the server step. "auto": stream
    # when allowed.
    config.engine.reduce = "auto"
    # Rounds compiled into one program (no host sync between them) where the round allows
    # it (streamed server inputs, loop or vmap, one process): 0 = every round up to the next
    # evaluation or checkpoint; n = at most n; 1 = one program per round.
    config.engine.rounds_per_program = 0
    config.profile = False                # a jax.profiler trace of round 2 under WORKDIR/profile

    config.eval_every = 20
    # `fiarse-jax reproduce`: the paper's cells to stand beside ours ('' = none; the
    # paper configs set cifar10_four / cifar100_four / ag_news).
    config.paper = ""
    config.eval = ml_collections.ConfigDict()
    # Test sets are scored in batches of this size (0: client.batch_size, as the authors'
    # loaders), unshuffled: the global test set in its order, each client's split alone.
    config.eval.batch_size = 0
    # The global test set: "clients" (the authors': every client's test split concatenated
    # in client order; with static BN a batch then lies inside one client's skewed split)
    # | "dataset" (the dataset's test split in its own order: i.i.d.-looking batches).
    config.eval.global_order = "clients"
    # The capacity levels' sub-models scored side by side ('vmap') or one after another
    # ('map') in one program; 'auto': 'map' on CPU, 'vmap' elsewhere.
    config.eval.levels = "auto"
    # Orbax checkpoints under WORKDIR/checkpoints; rerunning on the same workdir resumes.
    config.checkpoint_every = 50       # rounds; 0 = no checkpoints
    config.keep_checkpoints = 2
    config.tensorboard = True          # event files under WORKDIR/tensorboard
    return config
