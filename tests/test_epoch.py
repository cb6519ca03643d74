"""The jitted bandit epoch: trace counts, arm planning, equivalence with a step-by-step
reference, host streaming, and data parallelism over 8 forced CPU devices."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from synthbandit_jax import arms as arms_lib
from synthbandit_jax import bandits
from synthbandit_jax.models import classifiers
from synthbandit_jax.training import epoch as E
from tests import xla_flags

ROOT = Path(__file__).resolve().parent.parent


def _problem(seed=0, n=120, num_classes=3, size=8):
  """A tiny learnable problem: class c has a bright square at a class-specific place."""
  rng = np.random.default_rng(seed)
  labels = rng.integers(0, num_classes, n).astype(np.int32)
  images = rng.integers(0, 60, (n, size, size, 1)).astype(np.uint8)
  for i, c in enumerate(labels):
    images[i, 2 * c:2 * c + 3, 1:4, 0] = 250
  return images, labels


def _setup(batch_size=8, bandit=None, arm_sizes=(40, 12, 25), mesh=None, model="small_cnn",
           **model_kwargs):
  images, labels = _problem()
  named = []
  start = 0
  for a, size in enumerate(arm_sizes):
    named.append((f"arm{a}", np.arange(start, start + size)))
    start += size
  arms = arms_lib.pad_arms(named)
  net = classifiers.build_classifier(model, 3, **model_kwargs)
  tx = optax.sgd(0.05, momentum=0.9)
  bandit = bandit or bandits.ucb1(c=1.0)
  state = E.create_train_state(net, tx, bandit, arms.num_arms, jax.random.PRNGKey(0),
                               (1, 8, 8, 1))
  spec = E.EpochSpec(net, tx, bandit, bandits.reward_fn("accuracy"), batch_size, mesh)
  bank = E.Bank(jnp.asarray(images), jnp.asarray(labels))
  val_img, val_lab = _problem(seed=1, n=37)
  val = E.make_eval_set(val_img, val_lab, 16)
  arm_arrays = E.ArmArrays(jnp.asarray(arms.indices), jnp.asarray(arms.mask))
  return dict(net=net, tx=tx, bandit=bandit, state=state, spec=spec, bank=bank, val=val,
              arms=arms, arm_arrays=arm_arrays, images=images, labels=labels,
              val_np=(val_img, val_lab))


def test_switching_arms_never_retraces():
  s = _setup()
  epoch = E.make_epoch_fn(s["spec"], donate=False)
  state = s["state"]
  chosen = []
  for _ in range(6):
    state, m = epoch(state, s["bank"], s["arm_arrays"], s["val"])
    chosen.append(int(m["arm"]))
  # UCB1 plays each arm once first, in order, then exploits: several distinct arms seen.
  assert chosen[:3] == [0, 1, 2]
  # New arm contents of the same shape: still no retrace.
  other = E.ArmArrays(s["arm_arrays"].indices[::-1], s["arm_arrays"].mask[::-1])
  state, _ = epoch(state, s["bank"], other, s["val"])
  assert epoch.trace_counter.count == 1
  assert int(state.epoch) == 7


def test_plan_covers_each_valid_image_once():
  s = _setup(batch_size=8, bandit=bandits.fixed(1))
  state, arm, batch_idx, loss_mask, n_steps, n_images = jax.jit(
      lambda st, a: E.plan_epoch(s["bandit"], st, a, 8))(s["state"], s["arm_arrays"])
  assert int(arm) == 1 and int(n_images) == 12 and int(n_steps) == 2
  assert batch_idx.shape == (5, 8)  # K = 40 -> 5 static batches
  used = np.asarray(batch_idx)[np.asarray(loss_mask)]
  assert sorted(used.tolist()) == list(range(40, 52))  # arm1 = bank rows 40..51, once each
  # Padding positions only repeat valid images (so BatchNorm never sees garbage rows).
  assert set(np.asarray(batch_idx)[:2].ravel().tolist()) <= set(range(40, 52))
  assert not np.array_equal(np.asarray(state.rng), np.asarray(s["state"].rng))


def test_epoch_matches_stepwise_reference():
  """The scanned/conditioned epoch equals plain Python calls of its pieces."""
  s = _setup(batch_size=8)
  epoch = E.make_epoch_fn(s["spec"], donate=False)
  state_a = s["state"]
  state_b = s["state"]
  step = jax.jit(lambda st, x, y, m: E.train_step(s["net"], s["tx"], st, x, y, m))
  # Each piece jitted on its own (op-by-op dispatch compiles every primitive separately).
  plan = jax.jit(lambda st, a: E.plan_epoch(s["bandit"], st, a, 8))
  evaluate = jax.jit(lambda p, bs, v: E.evaluate(s["net"], p, bs, v))
  finish = jax.jit(lambda st, arm, acc, n: E.finish_epoch(
      s["bandit"], bandits.reward_fn("accuracy"), st, arm, acc, n))
  for _ in range(4):
    state_a, metrics = epoch(state_a, s["bank"], s["arm_arrays"], s["val"])
    # Reference: plan, then train only the active batches, then eval + finish.
    state_b, arm, bidx, lmask, n_steps, n_img = plan(state_b, s["arm_arrays"])
    losses = []
    for i in range(int(n_steps)):
      state_b, (l, c, n) = step(state_b, s["bank"].images[bidx[i]], s["bank"].labels[bidx[i]],
                                lmask[i])
      losses.append(float(l))
    acc = evaluate(state_b.params, state_b.batch_stats, s["val"])
    state_b, reward = finish(state_b, arm, acc, n_img)
    assert int(metrics["arm"]) == int(arm)
    assert int(metrics["steps"]) == int(n_steps)
    np.testing.assert_allclose(float(metrics["val_accuracy"]), float(acc), atol=1e-6)
    np.testing.assert_allclose(float(metrics["reward"]), float(reward), atol=1e-6)
  for a, b in zip(jax.tree.leaves(state_a.params), jax.tree.leaves(state_b.params)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
  assert int(state_a.images_seen) == int(state_b.images_seen) == 40 + 12 + 25 + \
      int(s["arms"].sizes[int(metrics["arm"])])
  assert int(state_a.step) == int(state_b.step)


def test_epoch_learns_and_tracks_best():
  s = _setup(batch_size=8, bandit=bandits.fixed(0))
  epoch = E.make_epoch_fn(s["spec"], donate=False)
  state = s["state"]
  accs = []
  for _ in range(8):
    state, m = epoch(state, s["bank"], s["arm_arrays"], s["val"])
    accs.append(float(m["val_accuracy"]))
  assert max(accs) > 0.9  # the problem is easy: a learning loop must solve it
  assert float(state.best_val_accuracy) == pytest.approx(max(accs))
  assert int(state.best_epoch) == int(np.argmax(accs)) + 1
  best_acc = E.evaluate(s["net"], state.best_params, state.best_batch_stats, s["val"])
  assert float(best_acc) == pytest.approx(max(accs))


def test_masked_batch_entries_carry_no_gradient():
  s = _setup()
  st = s["state"]
  x = s["bank"].images[:8]
  y = s["bank"].labels[:8]
  mask = jnp.array([True] * 5 + [False] * 3)
  # Replace the masked entries by garbage: the update must not change.
  x2 = x.at[5:].set(255)
  y2 = y.at[5:].set(0)
  step = jax.jit(lambda st, x, y, m: E.train_step(s["net"], s["tx"], st, x, y, m))  # 1 compile
  a, (la, _, na) = step(st, x, y, mask)
  b, (lb, _, nb) = step(st, x2, y2, mask)
  assert float(na) == float(nb) == 5.0
  np.testing.assert_allclose(float(la), float(lb), rtol=1e-6)
  for u, v in zip(jax.tree.leaves(a.params), jax.tree.leaves(b.params)):
    np.testing.assert_allclose(np.asarray(u), np.asarray(v), rtol=1e-6, atol=1e-7)


def test_host_streaming_matches_on_device():
  s = _setup(batch_size=8)
  on_dev = E.make_epoch_fn(s["spec"], donate=False)
  stream = E.HostStreamingEpoch(s["spec"], prefetch=2)
  a, b = s["state"], s["state"]
  for _ in range(4):
    a, ma = on_dev(a, s["bank"], s["arm_arrays"], s["val"])
    b, mb = stream(b, s["images"], s["labels"], s["arm_arrays"], *s["val_np"], 16)
    assert int(ma["arm"]) == int(mb["arm"])
    np.testing.assert_allclose(float(ma["val_accuracy"]), float(mb["val_accuracy"]),
                               atol=1e-6)
    np.testing.assert_allclose(float(ma["train_loss"]), float(mb["train_loss"]), rtol=1e-4)
  for u, v in zip(jax.tree.leaves(a.params), jax.tree.leaves(b.params)):
    np.testing.assert_allclose(np.asarray(u), np.asarray(v), rtol=1e-4, atol=1e-5)


# The 8-device checks run in one subprocess (8 forced CPU devices), shared by the tests below:
# one interpreter start and one JAX import instead of three.
_EIGHT_DEVICES = textwrap.dedent("""
    import os, sys, json
    sys.path.insert(0, {root!r})
    import jax, numpy as np
    assert len(jax.devices()) == 8, jax.devices()
    from synthbandit_jax import parallel
    from tests import test_epoch as T
    from synthbandit_jax.training import epoch as E
    results = {{}}

    def one_vs_eight(model):
      out = {{}}
      for n in (1, 8):
        mesh = parallel.make_mesh(n)
        s = T._setup(batch_size=16, mesh=mesh, **model)
        repl = parallel.replicated(mesh)
        fn = E.make_epoch_fn(s["spec"], donate=False)
        st = jax.device_put(s["state"], repl)
        bank, arms, val = jax.device_put((s["bank"], s["arm_arrays"], s["val"]), repl)
        accs, losses, arms_played = [], [], []
        for _ in range(4):
          st, m = fn(st, bank, arms, val)
          accs.append(float(m["val_accuracy"])); losses.append(float(m["train_loss"]))
          arms_played.append(int(m["arm"]))
        leaves = [np.asarray(l).ravel() for l in jax.tree.leaves(st.params)]
        out[n] = dict(accs=accs, losses=losses, arms=arms_played,
                      params=np.concatenate(leaves).tolist(),
                      sharding=str(jax.tree.leaves(st.params)[0].sharding))
      return out

    for name, model in {models!r}.items():
      results[name] = one_vs_eight(model)

    # A model axis: (8) vs (4 data x 2 model), on both input paths.
    parallel.MIN_SHARDED_SIZE = 64  # the test model is tiny: split every leaf that can be
    out = {{}}
    for model_axis in (1, 2):
      mesh = parallel.make_global_mesh(0, model_axis=model_axis)
      s = T._setup(batch_size=16, mesh=mesh)
      st = parallel.place_state(s["state"], mesh)
      shardings = parallel.state_shardings(st, mesh)
      spec = E.EpochSpec(**{{**s["spec"].__dict__, "state_sharding": shardings}})
      repl = parallel.replicated(mesh)
      bank, arms, val = jax.device_put((s["bank"], s["arm_arrays"], s["val"]), repl)
      fn = E.make_epoch_fn(spec)
      stream = E.HostStreamingEpoch(spec)
      accs, arms_played = [], []
      for k in range(4):
        if k < 2:
          st, m = fn(st, bank, arms, val)
        else:  # the host-streaming path on the same mesh and state
          st, m = stream(st, s["images"], s["labels"], arms, *s["val_np"], 16)
        accs.append(float(m["val_accuracy"])); arms_played.append(int(m["arm"]))
      specs = sorted({{str(x.sharding.spec) for x in jax.tree.leaves(st.params)}})
      same = all(a.sharding == b for a, b in zip(jax.tree.leaves(st), jax.tree.leaves(shardings)))
      params = np.concatenate([np.asarray(l).ravel() for l in jax.tree.leaves(st.params)])
      out[model_axis] = dict(accs=accs, arms=arms_played, specs=specs, same=same,
                             traces=fn.trace_counter.count, params=params.tolist())
    results["model_axis"] = out
    print("RESULT" + json.dumps(results))
""")

_EIGHT_DEVICE_MODELS = {
    "small_cnn": dict(model="small_cnn"),
    # BatchNorm (statistics over the sharded batch), in a net small enough to compile in
    # seconds
    "vgg": dict(model="vgg", stages=((8,), (8, 8)), fc_features=(16,)),
}


@pytest.fixture(scope="module")
def eight_devices():
  import json  # pylint: disable=import-outside-toplevel
  env = dict(os.environ, XLA_FLAGS=xla_flags("--xla_force_host_platform_device_count=8"),
             JAX_PLATFORMS="cpu")
  script = _EIGHT_DEVICES.format(root=str(ROOT), models=_EIGHT_DEVICE_MODELS)
  proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                        env=env, cwd=ROOT, timeout=900)
  assert proc.returncode == 0, proc.stderr[-3000:]
  line = [l for l in proc.stdout.splitlines() if l.startswith("RESULT")][0]
  return json.loads(line[len("RESULT"):])


@pytest.mark.parametrize("model", sorted(_EIGHT_DEVICE_MODELS))
def test_eight_devices_match_one(model, eight_devices):
  """Data parallel over 8 devices = 1 device up to float reassociation.

  Tolerance: the same arms, val accuracies to 1e-6, losses to rtol 2e-4, and the final
  parameters within 1e-4 in relative L2 norm (sums over 8 shards reassociate, BatchNorm
  statistics included, and 4 epochs of SGD with momentum carry that forward).
  """
  out = eight_devices[model]
  one, eight = out["1"], out["8"]
  assert one["arms"] == eight["arms"]
  np.testing.assert_allclose(one["losses"], eight["losses"], rtol=2e-4, atol=1e-5)
  np.testing.assert_allclose(one["accs"], eight["accs"], atol=1e-6)
  p1, p8 = np.asarray(one["params"]), np.asarray(eight["params"])
  assert np.linalg.norm(p8 - p1) / np.linalg.norm(p1) < 1e-4
  assert "'data': 8" in eight["sharding"], eight["sharding"]  # really ran on the 8-device mesh


def test_model_axis_matches_pure_data_parallel(eight_devices):
  """On 8 devices as (8) and (4 data x 2 model): the state split over the model
  axis trains to the same result (up to float reassociation), keeps its shardings from
  epoch to epoch (no retrace), on both input paths."""
  out = eight_devices["model_axis"]
  base = out["1"]
  assert base["specs"] == ["P()"]  # nothing split without a model axis
  for m in ("2",):
    o = out[m]
    assert any("'model'" in sp for sp in o["specs"]), o["specs"]  # really split
    assert o["same"] and o["traces"] == 1
    assert o["arms"] == base["arms"]
    np.testing.assert_allclose(o["accs"], base["accs"], atol=1e-6)
    p, q = np.asarray(base["params"]), np.asarray(o["params"])
    assert np.linalg.norm(q - p) / np.linalg.norm(p) < 1e-4


def test_create_train_state_is_model_init_and_every_leaf_has_its_own_buffer():
  """The jitted init gives the same params as the model's own init, and no two state leaves
  share a buffer (the epoch donates the whole state; a shared one would be donated twice)."""
  net = classifiers.ResNet(3, stage_sizes=(1, 1), width=8)  # has batch_stats
  tx = optax.sgd(0.05, momentum=0.9)
  rng = jax.random.PRNGKey(3)
  state = E.create_train_state(net, tx, bandits.ucb1(), 2, rng, (1, 8, 8, 1))
  want = net.init(jax.random.split(rng)[1], jnp.zeros((1, 8, 8, 1)), train=False)
  # Same key, same threefry bits; the initializers' float ops may round differently when
  # fused under jit than run op by op (observed: up to 1.2e-7 absolute for this ResNet).
  for got, ref in zip(jax.tree.leaves((state.params, state.batch_stats)),
                      jax.tree.leaves((want["params"], want["batch_stats"]))):
    np.testing.assert_allclose(np.asarray(got), np.asarray(ref), rtol=1e-6, atol=1e-7)
  pointers = [x.unsafe_buffer_pointer() for x in jax.tree.leaves(state)]
  assert len(set(pointers)) == len(pointers)
  np.testing.assert_array_equal(np.asarray(state.rng), np.asarray(jax.random.split(rng)[0]))
