"""Optimizers from config: frozen backbone trains only the head; schedules; errors."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from synthbandit_jax.models import classifiers
from synthbandit_jax.training import optim


def _cfg(**kw):
  c = ml_collections.ConfigDict(dict(name="sgd", learning_rate=0.1, momentum=0.9,
                                     weight_decay=0.0, schedule="constant"))
  c.update(kw)
  return c


def test_frozen_backbone_updates_only_the_head():
  model = classifiers.build_classifier("small_cnn", 3, frozen_backbone=True)
  params = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 8, 8, 1)))["params"]
  tx = optim.make_optimizer(_cfg(weight_decay=1e-2), params, 10, trainable="head")
  grads = jax.tree.map(jnp.ones_like, params)  # nonzero everywhere, backbone included
  updates, _ = tx.update(grads, tx.init(params), params)
  new = optax.apply_updates(params, updates)
  for a, b in zip(jax.tree.leaves(params["backbone"]), jax.tree.leaves(new["backbone"])):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert all(not np.array_equal(np.asarray(a), np.asarray(b))
             for a, b in zip(jax.tree.leaves(params["head"]), jax.tree.leaves(new["head"])))


def test_cosine_schedule_and_errors():
  p = {"w": jnp.ones(2)}
  tx = optim.make_optimizer(_cfg(schedule="cosine", momentum=0.0), p, total_steps=4)
  state = tx.init(p)
  steps = []
  for _ in range(4):
    u, state = tx.update({"w": jnp.ones(2)}, state, p)
    steps.append(float(-u["w"][0]))
  want = [0.1 * 0.5 * (1 + np.cos(np.pi * k / 4)) for k in range(4)]
  np.testing.assert_allclose(steps, want, rtol=1e-5)
  with pytest.raises(ValueError, match="optim.name"):
    optim.make_optimizer(_cfg(name="lion"), p, 1)
  with pytest.raises(ValueError, match="optim.schedule"):
    optim.make_optimizer(_cfg(schedule="step"), p, 1)
