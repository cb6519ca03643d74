"""Optimizers from config (optax), with the frozen-backbone mask."""
from __future__ import annotations

import jax
import optax

from synthbandit_jax.models import classifiers


def make_optimizer(optim_cfg, params, total_steps: int,
                   trainable: str = "all") -> optax.GradientTransformation:
  """SGD (with momentum) / Adam / AdamW, constant or cosine learning rate.

  `trainable="head"` trains only the classifier head (frozen backbone); the rest of the
  params get zero updates.
  """
  lr = float(optim_cfg.learning_rate)
  if optim_cfg.schedule == "cosine":
    lr = optax.cosine_decay_schedule(lr, max(1, int(total_steps)))
  elif optim_cfg.schedule != "constant":
    raise ValueError(f"config optim.schedule must be 'constant' or 'cosine', got "
                     f"{optim_cfg.schedule!r}")
  name = optim_cfg.name
  wd = float(optim_cfg.weight_decay)
  if name == "sgd":
    mom = float(optim_cfg.momentum) or None
    tx = optax.sgd(lr, momentum=mom)
    if wd:
      tx = optax.chain(optax.add_decayed_weights(wd), tx)
  elif name == "adam":
    tx = optax.adam(lr)
    if wd:
      tx = optax.chain(optax.add_decayed_weights(wd), tx)
  elif name == "adamw":
    tx = optax.adamw(lr, weight_decay=wd)
  else:
    raise ValueError(f"config optim.name must be 'sgd', 'adam' or 'adamw', got {name!r}")
  if trainable == "all":
    return tx
  mask = classifiers.trainable_mask(params, trainable)
  labels = jax.tree.map(lambda m: "train" if m else "frozen", mask)
  return optax.multi_transform({"train": tx, "frozen": optax.set_to_zero()}, labels)

