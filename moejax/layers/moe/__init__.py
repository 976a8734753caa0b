"""Classic sparse Mixture-of-Experts (Switch, GShard, expert choice, hash, attention router).

Importing this package registers the FFN kind ``moe`` (config section ``config.moe``).

Modules: ``routing`` (scorers and assigners -> dispatch plans), ``dispatch`` (einsum /
sorted dropless / all-to-all expert parallel), ``experts`` (stacked expert weights),
``losses`` (aux losses and statistics), ``config`` (defaults, validation), ``layer``.
"""

from moejax.layers.moe import layer  # noqa: F401  (registers 'moe')
from moejax.layers.moe.config import MoESettings, default_config, validate  # noqa: F401
from moejax.layers.moe.layer import MoE  # noqa: F401
