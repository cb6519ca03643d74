"""Tests for synthbandit_jax.models.classifiers."""

from __future__ import annotations

import functools

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from synthbandit_jax.models import classifiers as clf
from synthbandit_jax.models import pooling

# XLA CPU compile time dominates these tests, so the BatchNorm / freezing /
# bfloat16 tests use a narrow two-stage ResNet ("tiny_resnet": one basic block
# per stage, the second with a strided projection shortcut) and a shallow ViT.


def _images(key: jax.Array, shape: tuple[int, ...]) -> jax.Array:
  return jax.random.uniform(key, shape, jnp.float32)


def _build(name, num_classes, **kwargs):
  """Registry model, or a small variant ("tiny_resnet", "vit") for speed."""
  if name == "vit":
    return clf.ViT(num_classes, **kwargs)
  if name == "tiny_resnet":
    return clf.ResNet(num_classes, stage_sizes=(1, 1), width=8, **kwargs)
  return clf.build_classifier(name, num_classes, **kwargs)


# Small models shared by the BatchNorm / freezing / bfloat16 tests: 3 classes,
# initialised once per module for (1, 8, 8, 3) inputs (init compiles dominate).
_SHARED = {"tiny_resnet": {}, "small_cnn": {}, "vgg": {}, "vit": {"depth": 2}}
_SHARED_SHAPE = (1, 8, 8, 3)


@pytest.fixture(scope="module")
def shared_variables():
  """name -> variables of `_build(name, 3, **_SHARED[name])`."""
  keys = jax.random.split(jax.random.key(11), len(_SHARED))
  return {name: clf.init_variables(_build(name, 3, **kwargs), key,
                                   _SHARED_SHAPE)
          for (name, kwargs), key in zip(_SHARED.items(), keys)}


def _abstract_params(model, shape):
  """Param shapes via jax.eval_shape (no memory, no compute)."""
  init = functools.partial(model.init, train=False)
  return jax.eval_shape(init, jax.random.key(0),
                        jax.ShapeDtypeStruct(shape, jnp.float32))["params"]


# ---------------------------------------------------------------- shapes ---

_HAS_BATCH_NORM = {"small_cnn": False, "resnet18": True, "resnet50": True,
                   "vgg": True, "vit_tiny": False, "vit_small": False}


@pytest.mark.parametrize("name", sorted(_HAS_BATCH_NORM))
@pytest.mark.parametrize("shape,dtype", [((3, 28, 28, 1), jnp.float32),
                                         ((2, 32, 32, 3), jnp.float32),
                                         ((2, 32, 32, 3), jnp.bfloat16)])
def test_output_shape_and_dtype_abstract(name, shape, dtype):
  # Exact shapes/dtypes at the full sizes via abstract evaluation (no
  # compile); the compiled forward pass is checked below.
  model = clf.build_classifier(name, 10, dtype=dtype)

  def init_and_apply(key, x):
    variables = model.init(key, x[:1], train=False)
    logits, state = model.apply(variables, x, train=True,
                                mutable=["batch_stats"])
    return variables, logits, state, model.apply(variables, x, train=False)

  variables, logits_train, state, logits_eval = jax.eval_shape(
      init_and_apply, jax.random.key(0),
      jax.ShapeDtypeStruct(shape, jnp.float32))
  for logits in (logits_train, logits_eval):
    assert logits.shape == (shape[0], 10)
    assert logits.dtype == jnp.float32
  assert set(variables["params"]) == {"backbone", "head"}
  assert ("batch_stats" in variables) == _HAS_BATCH_NORM[name]
  assert ("batch_stats" in state) == _HAS_BATCH_NORM[name]
  for leaf in jax.tree.leaves(variables):
    assert leaf.dtype == jnp.float32  # params stay float32 in bf16 too.


# Compiled forward passes (compile time dominates on CPU). resnet50 runs on a
# smaller input and batch; vit_small shares all code with vit_tiny and is
# covered by the abstract test above.
_RUN_CASES = [
    ("small_cnn", (4, 28, 28, 1)),
    ("resnet18", (2, 32, 32, 3)),
    ("resnet50", (1, 16, 16, 1)),
    ("vgg", (4, 28, 28, 1)),
    ("vit_tiny", (2, 32, 32, 3)),
]


def _numpy_variables(model, shape):
  """Variables with init's structure, filled by numpy (skips the slow XLA CPU
  compile of the initialisers; `init_variables` is exercised elsewhere)."""
  abstract = jax.eval_shape(functools.partial(model.init, train=False),
                            jax.random.key(0),
                            jax.ShapeDtypeStruct(shape, jnp.float32))
  rng = np.random.default_rng(0)

  def fill(path, leaf):
    name = path[-1].key
    if name in ("scale", "var"):
      return jnp.ones(leaf.shape, leaf.dtype)
    if name in ("bias", "mean"):
      return jnp.zeros(leaf.shape, leaf.dtype)
    fan_in = max(1, int(np.prod(leaf.shape[:-1])))
    return jnp.asarray(rng.normal(0, fan_in**-0.5, leaf.shape), leaf.dtype)

  return jax.tree_util.tree_map_with_path(fill, abstract)


@pytest.mark.parametrize("name,shape", _RUN_CASES)
def test_forward_pass_runs(name, shape):
  model = clf.build_classifier(name, 10)
  variables = _numpy_variables(model, (1,) + shape[1:])
  x = _images(jax.random.key(0), shape)
  logits = jax.jit(functools.partial(model.apply, train=False))(variables, x)
  assert logits.shape == (shape[0], 10)
  assert logits.dtype == jnp.float32
  assert np.all(np.isfinite(np.asarray(logits)))
  assert float(jnp.std(logits)) > 0.0  # not a constant / dead network.


def test_head_is_dense_on_pooled_features():
  # ResNet-18 features are 512-d, ResNet-50 2048-d, ViT-S 384-d.
  for name, dim in [("resnet18", 512), ("resnet50", 2048), ("vit_small", 384),
                    ("vit_tiny", 192), ("small_cnn", 128)]:
    params = _abstract_params(clf.build_classifier(name, 7), (1, 32, 32, 3))
    assert params["head"]["kernel"].shape == (dim, 7), name
    assert params["head"]["bias"].shape == (7,), name


# ------------------------------------------------------ architecture/size ---


def test_resnet_param_counts_match_torchvision():
  # torchvision resnet18 / resnet50 with 1000 classes.
  r18 = clf.build_classifier("resnet18", 1000, small_input=False)
  r50 = clf.build_classifier("resnet50", 1000, small_input=False)
  assert clf.count_params(_abstract_params(r18, (1, 224, 224, 3))) == 11_689_512
  assert clf.count_params(_abstract_params(r50, (1, 224, 224, 3))) == 25_557_032


def test_vit_param_counts_match_timm():
  # timm vit_tiny_patch16_224 / vit_small_patch16_224 with 1000 classes.
  ti = clf.build_classifier("vit_tiny", 1000)  # "auto" -> patch 16 at 224.
  s = clf.build_classifier("vit_small", 1000, patch_size=16)
  assert clf.count_params(_abstract_params(ti, (1, 224, 224, 3))) == 5_717_416
  assert clf.count_params(_abstract_params(s, (1, 224, 224, 3))) == 22_050_664


def test_resnet_small_input_auto_picks_stem():
  model = clf.build_classifier("resnet18", 10)
  small = _abstract_params(model, (1, 32, 32, 3))
  large = _abstract_params(model, (1, 224, 224, 3))
  assert small["backbone"]["conv_init"]["kernel"].shape == (3, 3, 3, 64)
  assert large["backbone"]["conv_init"]["kernel"].shape == (7, 7, 3, 64)
  forced = _abstract_params(
      clf.build_classifier("resnet18", 10, small_input=False), (1, 32, 32, 3))
  assert forced["backbone"]["conv_init"]["kernel"].shape == (7, 7, 3, 64)


@pytest.mark.parametrize("size,patch", [(8, 2), (28, 4), (32, 4), (64, 8),
                                        (224, 16)])
def test_vit_auto_patch_size(size, patch):
  model = clf.ViT(10, depth=1)
  params = _abstract_params(model, (1, size, size, 3))
  tokens = (size // patch) ** 2 + 1
  assert params["backbone"]["pos_embedding"].shape == (1, tokens, 192)
  assert params["backbone"]["patch_embed"]["kernel"].shape == (patch, patch,
                                                               3, 192)


# ------------------------------------------------------------ BatchNorm ---


@pytest.mark.parametrize("name", ["tiny_resnet", "vgg"])
def test_batch_stats_update_only_in_train(name, shared_variables):
  model = _build(name, 3, **_SHARED[name])
  variables = shared_variables[name]
  x = _images(jax.random.key(1), (8, 8, 8, 3))

  apply = jax.jit(model.apply, static_argnames=("train", "mutable"))
  _, train_state = apply(variables, x, train=True, mutable=("batch_stats",))
  changed = jax.tree.map(lambda a, b: bool(jnp.any(a != b)),
                         variables["batch_stats"], train_state["batch_stats"])
  assert all(jax.tree.leaves(changed))  # every mean/var moved.

  out1, eval_state = apply(variables, x, train=False,
                           mutable=("batch_stats",))
  same = jax.tree.map(lambda a, b: bool(jnp.all(a == b)),
                      variables["batch_stats"], eval_state["batch_stats"])
  assert all(jax.tree.leaves(same))

  out2, _ = apply(variables, x, train=False, mutable=("batch_stats",))
  np.testing.assert_array_equal(np.asarray(out1), np.asarray(out2))
  # Eval uses running averages: a sample's logits do not depend on the batch.
  single, _ = apply(variables, x[:1], train=False, mutable=("batch_stats",))
  np.testing.assert_allclose(np.asarray(single[0]), np.asarray(out1[0]),
                             rtol=1e-5, atol=1e-5)


def test_batch_norm_running_average_momentum(shared_variables):
  # Independent check of momentum 0.9: new_mean = 0.9 * old + 0.1 * batch_mean
  # on the stem BN of a small-input ResNet (input to that BN = stem conv out).
  model = _build("tiny_resnet", 3)
  variables = shared_variables["tiny_resnet"]
  x = _images(jax.random.key(2), (4, 8, 8, 3))
  _, state = jax.jit(functools.partial(model.apply, train=True,
                                       mutable=["batch_stats"]))(variables, x)
  kernel = variables["params"]["backbone"]["conv_init"]["kernel"]
  conv_out = jax.lax.conv_general_dilated(
      (x - 0.5) / 0.5, kernel, (1, 1), ((1, 1), (1, 1)),
      dimension_numbers=("NHWC", "HWIO", "NHWC"))
  expected = 0.1 * np.asarray(conv_out).mean(axis=(0, 1, 2))  # old mean = 0.
  got = state["batch_stats"]["backbone"]["bn_init"]["mean"]
  np.testing.assert_allclose(np.asarray(got), expected, rtol=1e-4, atol=1e-6)


# ------------------------------------------------------- frozen backbone ---


def _xent(logits, labels):
  return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def test_trainable_mask_values():
  model = _build("tiny_resnet", 3)
  params = _abstract_params(model, (1, 8, 8, 3))
  head_mask = clf.trainable_mask(params, "head")
  flat = jax.tree_util.tree_flatten_with_path(head_mask)[0]
  for path, value in flat:
    assert value == (path[0].key == "head"), path
  assert sum(v for _, v in flat) == 2  # head kernel + bias.
  assert all(jax.tree.leaves(clf.trainable_mask(params, "all")))
  assert jax.tree.structure(head_mask) == jax.tree.structure(params)
  frozen = flax.core.freeze(params)  # container type is preserved.
  assert (jax.tree.structure(clf.trainable_mask(frozen, "head")) ==
          jax.tree.structure(frozen))
  with pytest.raises(ValueError, match="'all' or 'head'"):
    clf.trainable_mask(params, "backbone")
  with pytest.raises(ValueError, match="head"):
    clf.trainable_mask({"params": params}, "head")


def test_frozen_backbone_sgd_changes_only_head(shared_variables):
  model = _build("tiny_resnet", 3, frozen_backbone=True)
  variables = shared_variables["tiny_resnet"]
  params, stats = variables["params"], variables["batch_stats"]
  k_x, k_y = jax.random.split(jax.random.key(3))
  x = _images(k_x, (8, 8, 8, 3))
  y = jax.random.randint(k_y, (8,), 0, 3)

  labels = jax.tree.map(lambda m: "train" if m else "freeze",
                        clf.trainable_mask(params, "head"))
  tx = optax.multi_transform(
      {"train": optax.sgd(0.1, momentum=0.9), "freeze": optax.set_to_zero()},
      labels)
  opt_state = tx.init(params)

  @jax.jit
  def step(params, stats, opt_state):
    def loss_fn(p):
      logits, new_state = model.apply({"params": p, "batch_stats": stats}, x,
                                      train=True, mutable=["batch_stats"])
      return _xent(logits, y), new_state["batch_stats"]
    (loss, new_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), new_stats, opt_state, loss

  new_params, new_stats = params, stats
  for _ in range(3):
    new_params, new_stats, opt_state, _ = step(new_params, new_stats, opt_state)

  same = jax.tree.map(lambda a, b: bool(jnp.array_equal(a, b)),
                      params["backbone"], new_params["backbone"])
  assert all(jax.tree.leaves(same))
  same_stats = jax.tree.map(lambda a, b: bool(jnp.array_equal(a, b)),
                            stats, new_stats)
  assert all(jax.tree.leaves(same_stats))
  assert not np.array_equal(params["head"]["kernel"],
                            new_params["head"]["kernel"])
  assert not np.array_equal(params["head"]["bias"], new_params["head"]["bias"])


@pytest.mark.parametrize("name", ["tiny_resnet", "small_cnn", "vit"])
def test_frozen_backbone_gradients_are_zero(name, shared_variables):
  k_x, k_y = jax.random.split(jax.random.key(4))
  x = _images(k_x, (4, 8, 8, 3))
  y = jax.random.randint(k_y, (4,), 0, 3)
  # Frozen and trainable variants share the same variable structure.
  variables = shared_variables[name]

  def grads_for(frozen):
    model = _build(name, 3, frozen_backbone=frozen, **_SHARED[name])
    rest = {k: v for k, v in variables.items() if k != "params"}

    def loss_fn(p):
      logits, _ = model.apply({"params": p, **rest}, x, train=True,
                              mutable=list(rest))
      return _xent(logits, y)
    return jax.jit(jax.grad(loss_fn))(variables["params"])

  frozen = grads_for(True)
  for g in jax.tree.leaves(frozen["backbone"]):
    assert np.all(np.asarray(g) == 0.0)
  assert np.any(np.asarray(frozen["head"]["kernel"]) != 0.0)
  # Control: without freezing the backbone does receive gradient.
  free = grads_for(False)
  assert any(np.any(np.asarray(g) != 0.0)
             for g in jax.tree.leaves(free["backbone"]))


# ------------------------------------------------------------- training ---


def test_small_cnn_overfits_tiny_batch():
  model = clf.build_classifier("small_cnn", 10)
  k_init, k_x = jax.random.split(jax.random.key(5))
  params = clf.init_variables(model, k_init, (1, 28, 28, 1))["params"]
  x = _images(k_x, (16, 28, 28, 1))
  y = jnp.arange(16) % 10  # arbitrary labels: only memorisation can fit them.
  tx = optax.adam(1e-3)
  opt_state = tx.init(params)

  @jax.jit
  def step(params, opt_state):
    loss, grads = jax.value_and_grad(
        lambda p: _xent(model.apply({"params": p}, x, train=True), y))(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  losses = []
  for _ in range(50):
    params, opt_state, loss = step(params, opt_state)
    losses.append(float(loss))
  assert losses[0] > 1.5  # ~ln(10) at init.
  assert losses[-1] < 0.2 * losses[0], losses[::10]
  logits = model.apply({"params": params}, x, train=False)
  assert float(jnp.mean(jnp.argmax(logits, -1) == y)) == 1.0


# ------------------------------------------------------------- bfloat16 ---


@pytest.mark.parametrize("name", sorted(_SHARED))
def test_bfloat16_compute_close_to_float32(name, shared_variables):
  x = _images(jax.random.key(6), (4, 8, 8, 3))
  m32 = _build(name, 3, **_SHARED[name])
  m16 = _build(name, 3, dtype=jnp.bfloat16, **_SHARED[name])
  variables = shared_variables[name]
  out32 = jax.jit(functools.partial(m32.apply, train=False))(variables, x)
  out16 = jax.jit(functools.partial(m16.apply, train=False))(variables, x)
  assert out16.dtype == jnp.float32
  # Tolerance: bfloat16 keeps 8 mantissa bits (rel. step 2**-8 ~ 0.4%);
  # errors accumulate over layers, so allow 3% of the largest |logit|
  # (observed: 0.4-0.9%).
  scale = float(jnp.max(jnp.abs(out32)))
  np.testing.assert_allclose(np.asarray(out16), np.asarray(out32),
                             atol=0.03 * scale + 1e-3, rtol=0)
  assert not np.array_equal(np.asarray(out16), np.asarray(out32))


# ------------------------------------------------------- registry/errors ---


def test_build_classifier_registry_and_errors():
  assert set(clf.CLASSIFIER_NAMES) == {"small_cnn", "resnet18", "resnet50",
                                       "vgg", "vit_tiny", "vit_small",
                                       "linear_head", "mlp_head"}
  head = clf.build_classifier("mlp_head", 4)
  v = head.init(jax.random.PRNGKey(0), jnp.zeros((2, 16)))
  assert set(v["params"]) == {"head_hidden", "head"}
  assert v["params"]["head_hidden"]["kernel"].shape == (16, 256)
  assert head.apply(v, jnp.ones((2, 16))).shape == (2, 4)
  m = clf.build_classifier("resnet50", 3, dtype=jnp.bfloat16,
                           frozen_backbone=True)
  assert isinstance(m, clf.ResNet)
  assert (m.block, tuple(m.stage_sizes)) == ("bottleneck", (3, 4, 6, 3))
  assert m.dtype == jnp.bfloat16 and m.frozen_backbone
  assert clf.ResNet18(3).stage_sizes == (2, 2, 2, 2)
  assert clf.ResNet50(3).block == "bottleneck"
  assert (clf.vit_small(3).hidden_dim, clf.vit_small(3).num_heads) == (384, 6)
  assert (clf.vit_tiny(3).hidden_dim, clf.vit_tiny(3).num_heads) == (192, 3)

  with pytest.raises(ValueError, match="resnet18.*vit_small"):
    clf.build_classifier("resnet34", 10)
  with pytest.raises(ValueError, match="widht"):
    clf.build_classifier("resnet18", 10, widht=16)
  with pytest.raises(ValueError, match="stage_sizes"):  # fixed by the name.
    clf.build_classifier("resnet18", 10, stage_sizes=(1, 1))
  with pytest.raises(ValueError, match="num_classes"):
    clf.build_classifier("vgg", 0)


def test_bad_inputs_raise():
  model = clf.build_classifier("small_cnn", 2)
  with pytest.raises(ValueError, match="rank 4"):
    model.init(jax.random.key(0), jnp.zeros((28, 28, 1)))
  with pytest.raises(ValueError, match="small_input"):
    _abstract_params(clf.build_classifier("resnet18", 2, small_input="yes"),
                     (1, 32, 32, 3))
  with pytest.raises(ValueError, match="patch_size"):
    _abstract_params(clf.build_classifier("vit_tiny", 2, patch_size=64),
                     (1, 32, 32, 3))


def test_count_params_matches_manual_sum():
  params = {"a": jnp.zeros((3, 4)), "b": {"c": jnp.zeros((5,))}}
  assert clf.count_params(params) == 17
  model = clf.build_classifier("small_cnn", 10)
  p = _abstract_params(model, (1, 28, 28, 1))
  # conv 3*3*1*32+32, conv 3*3*32*64+64, dense 7*7*64*128+128, head 128*10+10.
  expected = (9 * 32 + 32) + (9 * 32 * 64 + 64) + (49 * 64 * 128 + 128) + 1290
  assert clf.count_params(p) == expected


def test_init_variables_rng_modes_are_deterministic():
  model = clf.build_classifier("small_cnn", 3, conv_features=(4,),
                               dense_features=8)
  key = jax.random.key(7)
  a = clf.init_variables(model, key, (1, 8, 8, 1))
  b = clf.init_variables(model, key, (1, 8, 8, 1))
  c = clf.init_variables(model, key, (1, 8, 8, 1), partitionable_rng=True)
  assert jax.tree.structure(a) == jax.tree.structure(c)
  for x, y, z in zip(jax.tree.leaves(a), jax.tree.leaves(b),
                     jax.tree.leaves(c)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    assert x.shape == z.shape
  with pytest.raises(ValueError, match="input_shape"):
    clf.init_variables(model, key, (8, 8, 1))


@pytest.mark.parametrize("scale,mode,dist", [(1.0, "fan_in", "truncated_normal"),
                                             (2.0, "fan_out", "normal"),
                                             (1.0, "fan_avg", "uniform")])
def test_flat_draw_initializers_equal_jax(scale, mode, dist):
  """The classifiers' initializers draw flat and reshape (fast to compile on CPU); with
  jax's default threefry_partitionable the values are bit-identical to jax's own."""
  assert jax.config.jax_threefry_partitionable
  ours = clf.variance_scaling(scale, mode, dist)
  ref = jax.nn.initializers.variance_scaling(scale, mode, dist)
  for i, shape in enumerate([(3, 3, 1, 32), (3, 3, 32, 64), (7, 7, 3, 16), (3136, 128),
                             (128, 10)]):
    key = jax.random.PRNGKey(i)
    np.testing.assert_array_equal(np.asarray(ours(key, shape)), np.asarray(ref(key, shape)))


# ---------------------------------------------------------------- max-pool ---


@pytest.mark.parametrize("shape", [(2, 6, 8, 3), (1, 7, 5, 2), (1, 1, 4, 2)])
def test_max_pool_2x2_matches_nn_max_pool_values_and_gradients_with_ties(shape):
  """Our reshape + custom-VJP pool equals flax's nn.max_pool (select-and-scatter gradient)
  exactly, on inputs full of ties (few distinct values, runs of zeros as after a ReLU),
  odd sizes (last row / column dropped) and a map too small to pool (identity)."""
  rng = np.random.default_rng(sum(shape))
  x = jnp.asarray(rng.integers(-1, 3, shape).astype(np.float32))  # values -1, 0, 1, 2
  x = jnp.maximum(x, 0.0)  # ReLU-like: many all-zero and tied windows
  dy_shape = jax.eval_shape(pooling.max_pool_2x2, x).shape
  dy = jnp.asarray(rng.standard_normal(dy_shape).astype(np.float32))

  def ref(v):
    if v.shape[1] < 2 or v.shape[2] < 2:
      return v
    return flax.linen.max_pool(v, (2, 2), strides=(2, 2), padding="VALID")

  ours_y, ours_vjp = jax.vjp(jax.jit(pooling.max_pool_2x2), x)
  ref_y, ref_vjp = jax.vjp(ref, x)
  np.testing.assert_array_equal(np.asarray(ours_y), np.asarray(ref_y))
  np.testing.assert_array_equal(np.asarray(ours_vjp(dy)[0]), np.asarray(ref_vjp(dy)[0]))
  if shape[1] >= 2:  # the gradient of a tied window goes to one element, not split
    g = np.asarray(ours_vjp(jnp.ones_like(dy))[0])
    assert set(np.unique(g)) <= {0.0, 1.0}
    assert g.sum() == dy.size
