"""Every registered method through the one protocol, and the optimization family's inner loop."""

import re
from dataclasses import replace

import numpy as np
import pytest

from edgemeta.host.config import MethodConfig
from edgemeta.host.methods import METHODS, TaskEpisode, get_method
from edgemeta.runtime.heads.linear import LinearHeadSpec, linear_scores, spec_arrays, spec_from_manifest

pytestmark = pytest.mark.tf  # every method here is TensorFlow

WAY, SHOT, QUERY = 5, 1, 3


@pytest.fixture(scope="module")
def episode(sample_dir):
    from edgemeta.host.data import DatasetSpec, EpisodeSampler, load_dataset
    from edgemeta.preprocess import Preprocess

    split = load_dataset(DatasetSpec(kind="folder", root=str(sample_dir), fractions=(0.0, 0.0, 1.0)),
                         Preprocess(28, 1, True), ("test",))["test"]
    return EpisodeSampler(split, WAY, SHOT, QUERY, seed=3).episode(0)


def tf_episode(ep, progress=0):
    import tensorflow as tf

    return TaskEpisode(tf.constant(ep.support, tf.float32) / 255.0, tf.constant(ep.support_labels),
                       tf.constant(ep.query, tf.float32) / 255.0, tf.constant(ep.query_labels), WAY, progress)


def built(name, **params):
    import keras

    from edgemeta.host.backbones import build_backbone

    keras.utils.set_random_seed(0)
    backbone = build_backbone("conv4", (28, 28, 1))
    method = get_method(name, params)
    method.build(backbone, WAY)
    return method, backbone


@pytest.mark.parametrize("name, params", [
    ("protonet", {}), ("maml", {}), ("maml", {"first_order": True}), ("anil", {}), ("metasgd", {}),
    ("maml", {"inner_steps": 2, "multi_step_loss": True, "msl_episodes": 10, "learn_inner_rates": True,
              "first_order_episodes": 5, "head_init": "zero"}),
    ("anil", {"head_init": "zero", "learn_inner_rates": True, "inner_steps": 3}),
    ("maml", {"inner_steps": 2, "multi_step_loss": True, "learn_inner_rates": True, "per_step_bn": True}),
    ("metasgd", {"per_step_bn": True}),
    ("snail", {"max_way": 5, "max_shot": 1, "filters": 8, "keys": 4, "vary": False}),
    # proto init classifies a 1-shot support set perfectly, so its inner gradients (and any learned
    # rates' gradients) underflow to zero: a known property, tested here without learned rates
    ("maml", {"head_init": "proto", "inner_steps": 2}),
])
def test_every_method_trains_through_the_protocol_and_its_board_head_runs(episode, name, params):
    import tensorflow as tf

    method, backbone = built(name, **params)
    assert method.name in METHODS and method.family in ("metric", "optimization", "model")
    variables = backbone.trainable_variables + method.variables
    before = [v.numpy().copy() for v in variables]
    opt = tf.keras.optimizers.Adam(1e-3)
    with tf.GradientTape() as tape:
        loss, acc = method.episode_loss(tf_episode(episode), training=True)
    grads = tape.gradient(loss, variables)
    assert np.isfinite(float(loss)) and 0 <= float(acc) <= 1
    assert all(g is not None for g in grads)
    opt.apply_gradients(zip(grads, variables, strict=True))
    frozen = [getattr(v, "path", v.name) for b, v in zip(before, variables, strict=True) if np.array_equal(b, v.numpy())]
    assert not frozen, f"variables that did not train: {frozen}"
    # the board's head: numpy, over embeddings, returns one score per class
    emb = backbone(np.concatenate([episode.support, episode.query]).astype(np.float32) / 255.0, training=False).numpy()
    scores = method.classify(emb[:WAY * SHOT], episode.support_labels, emb[WAY * SHOT:], WAY)
    assert scores.shape == (WAY * QUERY, WAY) and np.isfinite(scores).all()
    head = method.head_spec()
    assert head["kind"] in ("prototype", "linear", "sequence") and head["method"] == name
    if method.adapts_body:
        logits = method.adapt_classify(episode.support, episode.support_labels, episode.query, WAY)
        assert logits.shape == (WAY * QUERY, WAY) and np.isfinite(logits).all()


@pytest.mark.parametrize("name, params", [
    ("anil", {"inner_steps": 3, "test_steps": 3}),
    ("anil", {"inner_steps": 2, "test_steps": 2, "learn_inner_rates": True, "head_init": "proto"}),
    ("metasgd", {}),
])
def test_the_numpy_head_adapts_as_the_tensorflow_inner_loop_does(episode, name, params):
    """ANIL's training inner loop (TensorFlow) and the board's numpy head give the same logits."""
    import tensorflow as tf

    method, backbone = built(name, **params)
    for r in method.rates:  # make the learned rates differ per parameter/step, as after training
        r.assign(r * tf.random.uniform(r.shape, 0.5, 1.5, seed=1))
    emb = backbone(np.concatenate([episode.support, episode.query]).astype(np.float32) / 255.0, training=False).numpy()
    es, eq = emb[:WAY * SHOT], emb[WAY * SHOT:]
    if name == "anil":
        w, b = method._head_loop(tf.constant(es), tf.constant(episode.support_labels), WAY, params["test_steps"], 1.0)[-1]
        host = eq @ w.numpy() + b.numpy()
    else:  # Meta-SGD adapts the body too; on the board only the head: compare with its head rates in TF
        w0, b0 = method.head_w.numpy(), method.head_b.numpy()
        lw, lb = method.rates[-2].numpy(), method.rates[-1].numpy()
        with tf.GradientTape() as t:
            w, b = tf.constant(w0), tf.constant(b0)
            t.watch([w, b])
            loss = tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(episode.support_labels, es @ w + b))
        gw, gb = t.gradient(loss, [w, b])
        host = eq @ (w0 - lw * gw.numpy()) + (b0 - lb * gb.numpy())
    board = method.classify(es, episode.support_labels, eq, WAY)
    np.testing.assert_allclose(board, host, rtol=1e-4, atol=1e-4)
    # and what export writes gives the same head back
    spec = method.linear_head()
    again = spec_from_manifest({"init": spec.init, "steps": spec.steps}, spec_arrays(spec), emb.shape[1])
    np.testing.assert_allclose(linear_scores(again, es, episode.support_labels, eq, WAY), board, rtol=1e-6)


def test_second_order_gradients_differ_from_first_order(episode):
    """FOMAML's meta-gradient drops the second-order terms: the two must not coincide."""
    import tensorflow as tf

    grads = {}
    for fo in (False, True):
        method, backbone = built("maml", first_order=fo)
        with tf.GradientTape() as tape:
            loss, _ = method.episode_loss(tf_episode(episode), training=False)
        grads[fo] = [g.numpy() for g in tape.gradient(loss, backbone.trainable_variables)]
    diff = max(float(np.abs(a - b).max()) for a, b in zip(grads[False], grads[True], strict=True))
    assert diff > 1e-6


def test_per_step_batch_norm_uses_each_steps_own_scale_and_is_not_adapted(episode):
    """MAML++ BNWB: step k's forward passes use step k's batch-norm scale and offset (the backbone's
    own at step 0), the inner loop leaves them alone, and with the per-step copies equal to the
    backbone's the result is plain MAML's whose batch norm is frozen in the inner loop."""
    import tensorflow as tf

    method, backbone = built("maml", inner_steps=2, per_step_bn=True)
    assert len(method.bn_steps) == len(method._bn_index) == 8  # conv4: 4 x (scale, offset)
    history = method._inner_loop(tf_episode(episode), 2, False, 0.0)
    for k, fast in enumerate(history):
        for j, i in enumerate(method._bn_index):
            want = backbone.trainable_variables[i] if k == 0 else method.bn_steps[j][k - 1]
            np.testing.assert_array_equal(fast[i].numpy(), tf.convert_to_tensor(want).numpy())
    # a changed per-step copy changes the query loss: the copies are in the computation
    before, _ = method.episode_loss(tf_episode(episode), training=False)
    method.bn_steps[0].assign(method.bn_steps[0] * 2.0)
    after, _ = method.episode_loss(tf_episode(episode), training=False)
    assert abs(float(after) - float(before)) > 1e-6
    # and they travel in method.npz's arrays
    arrays = method.head_arrays()
    again, _ = built("maml", inner_steps=2, per_step_bn=True)
    again.load_head(arrays)
    np.testing.assert_array_equal(again.bn_steps[0].numpy(), method.bn_steps[0].numpy())


def test_per_step_batch_norm_is_refused_where_the_body_does_not_adapt():
    from edgemeta.errors import EdgemetaError

    with pytest.raises(EdgemetaError, match=r"\[method\] for anil: per_step_bn needs"):
        get_method("anil", {"per_step_bn": True})


def test_derivative_order_annealing_switches_at_the_configured_episode(episode):
    import tensorflow as tf

    def body_grads(progress, **params):
        method, backbone = built("maml", **params)
        with tf.GradientTape() as tape:
            loss, _ = method.episode_loss(tf_episode(episode, progress), training=False)
        return [g.numpy() for g in tape.gradient(loss, backbone.trainable_variables)]

    early, late = body_grads(10, first_order_episodes=100), body_grads(100, first_order_episodes=100)
    fo, so = body_grads(0, first_order=True), body_grads(0)
    for a, b in zip(early, fo, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
    for a, b in zip(late, so, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("transductive", [False, True])
def test_batch_norm_mode_decides_whether_queries_see_each_other(episode, transductive):
    """Non-transductive: a query's logits do not depend on the other queries of the batch."""
    method, _ = built("maml", transductive=transductive, test_steps=2)
    full = method.adapt_classify(episode.support, episode.support_labels, episode.query, WAY)
    alone = method.adapt_classify(episode.support, episode.support_labels, episode.query[:1], WAY)
    same = np.allclose(full[:1], alone, rtol=1e-4, atol=1e-4)
    assert same != transductive


def test_linear_head_with_zero_steps_and_proto_init_is_the_prototype_classifier():
    rng = np.random.default_rng(0)
    emb = rng.normal(size=(40, 16)).astype(np.float32)
    labels = np.repeat(np.arange(8), 5)
    queries = rng.normal(size=(30, 16)).astype(np.float32)
    proto = get_method("protonet").classify(emb, labels, queries, 8)
    linear = linear_scores(LinearHeadSpec(init="proto", steps=0, rates_w=[0.1], rates_b=[0.1]), emb, labels, queries, 8)
    np.testing.assert_array_equal(proto.argmax(1), linear.argmax(1))


@pytest.mark.parametrize("name, params", [("anil", {}), ("maml", {"learn_inner_rates": True})])
def test_an_exported_optimization_model_answers_on_the_board_as_on_the_host(tmp_path, sample_dir, name, params):
    """Train a few episodes, export (format 2, linear head in head.npz), enroll on the board runtime
    and classify: the board's answers are the host's numpy head over the same int8 embeddings."""
    from edgemeta.host.data import DatasetSpec, EpisodeSampler, load_dataset
    from edgemeta.host.export import export_model
    from edgemeta.host.modeldir import load_keras, read_info
    from edgemeta.host.training import train
    from edgemeta.runtime.fewshot import FewShotRuntime
    from edgemeta.runtime.manifest import read_manifest
    from tests.support.builders import tiny_config

    cfg = tiny_config(sample_dir, episodes=8, meta_batch=4)
    cfg = type(cfg)(**{**cfg.__dict__, "method": type(cfg.method)(name, {"test_steps": 3, **params})})
    out = tmp_path / "m"
    train(cfg, out, progress=False)
    export_model(out, folder=str(sample_dir), episodes=10, log=lambda m: None, board_head="own")
    manifest = read_manifest(out)
    assert manifest.raw["format"] == 2 and manifest.head.kind == "linear" and manifest.head.linear.steps == 3
    selection = manifest.raw["head"]["selection"]  # both heads scored on validation, the forced one kept
    assert selection["chosen"] == "own" and set(selection["val_accuracy"]) == {"own", "prototype"}
    if name == "maml":
        assert "keras_float32_whole_network" in manifest.raw["evaluation"]

    rt = FewShotRuntime(out, variant="int8_static")
    split = load_dataset(DatasetSpec(kind="folder", root=str(sample_dir), fractions=(0.0, 0.0, 1.0)),
                         read_info(out).preprocess, ("test",))["test"]
    ep = EpisodeSampler(split, WAY, 2, 4, seed=5).episode(0)
    store = tmp_path / "store"
    names = [f"c{i}" for i in range(WAY)]
    for i, label in enumerate(names):
        rt.enroll_images(store, label, ep.support[ep.support_labels == i])
    # the best class (the open-set "unknown" is a separate, distance-based decision)
    board = [r["top"][0]["label"] for r in rt.classify_embeddings(rt.open_store(store), rt.embedder(ep.query))]

    host_method = read_info(out).make_method(out, load_keras(out / "model.keras"))
    scores = host_method.classify(rt.embedder(ep.support), ep.support_labels, rt.embedder(ep.query), WAY)
    assert board == [names[i] for i in scores.argmax(1)]


def test_the_numpy_head_follows_the_variables_as_they_train(episode):
    """Validation during training calls classify between optimizer steps: it must see the current head."""
    method, backbone = built("anil")
    emb = backbone(np.concatenate([episode.support, episode.query]).astype(np.float32) / 255.0, training=False).numpy()
    before = method.classify(emb[:WAY * SHOT], episode.support_labels, emb[WAY * SHOT:], WAY)
    method.head_b.assign(method.head_b + np.arange(WAY, dtype=np.float32) * 100)
    after = method.classify(emb[:WAY * SHOT], episode.support_labels, emb[WAY * SHOT:], WAY)
    assert not np.allclose(before, after)


def test_multi_step_loss_weights_anneal_to_the_last_step_and_stay_uniform_without_annealing():
    method, _ = built("maml", inner_steps=4, multi_step_loss=True, msl_episodes=100)
    np.testing.assert_allclose(method._step_weights(0).numpy(), [0.25] * 4)
    np.testing.assert_allclose(method._step_weights(100).numpy(), [0, 0, 0, 1])
    flat, _ = built("maml", inner_steps=4, multi_step_loss=True)
    np.testing.assert_allclose(flat._step_weights(10**6).numpy(), [0.25] * 4)


def test_the_board_head_is_chosen_on_validation_by_accuracy(sample_dir):
    """choose_board_head keeps the method's own head only when it scores at least the prototype's:
    a head that always answers class 0 (chance) loses to nearest prototype on real embeddings."""
    from edgemeta.host.data import DatasetSpec, load_dataset
    from edgemeta.host.evaluate import choose_board_head, embed_split
    from edgemeta.host.model_eval import keras_embedder
    from edgemeta.preprocess import Preprocess

    split = load_dataset(DatasetSpec(kind="folder", root=str(sample_dir), fractions=(0.0, 0.0, 1.0)),
                         Preprocess(28, 1, True), ("test",))["test"]
    _, backbone = built("protonet")
    emb = embed_split(keras_embedder(backbone), split)

    class Chance:
        def classify(self, support_emb, support_labels, query_emb, way):
            return np.zeros((len(query_emb), way))

    chosen, scores = choose_board_head(Chance(), emb, split, episodes=20)
    assert chosen == "prototype" and scores["prototype"] > scores["own"]
    assert scores["own"] == pytest.approx(np.mean([100 / w for w, _ in ((5, 1), (5, 5), (20, 1), (20, 5)) if w <= split.num_classes]))
    chosen, _ = choose_board_head(get_method("protonet"), emb, split, episodes=20)
    assert chosen == "own"  # a tie keeps the method's own head


def test_distillation_loss_is_the_weighted_labels_and_softened_teacher_terms(episode, exported):
    """ProtoNet's distillation: (1 - w) * cross-entropy + w * T^2 * KL(teacher_T || student_T), the
    teacher frozen and in inference mode, checked against the same formula in numpy."""
    import tensorflow as tf

    w, t = 0.3, 2.5
    method, backbone = built("protonet", teacher=str(exported), distill=w, temperature=t)
    method.start_training()
    teacher_before = [v.numpy().copy() for v in method.teacher.variables]
    ep = tf_episode(episode)
    images = tf.concat([ep.support, ep.query], axis=0)

    def logits(emb):
        protos = np.stack([emb[:WAY * SHOT][episode.support_labels == c].mean(axis=0) for c in range(WAY)])
        return -((emb[WAY * SHOT:, None, :] - protos[None]) ** 2).sum(axis=2)

    def log_softmax(x):
        x = x - x.max(axis=1, keepdims=True)
        return x - np.log(np.exp(x).sum(axis=1, keepdims=True))

    with tf.GradientTape() as tape:
        loss, _ = method.episode_loss(ep, training=True)
    student = logits(method.training_forward(images).numpy().astype(np.float64))
    teacher = logits(method.teacher(images, training=False).numpy().astype(np.float64))
    ce = -log_softmax(student)[np.arange(WAY * QUERY), episode.query_labels].mean()
    p = np.exp(log_softmax(teacher / t))
    kl = (p * (log_softmax(teacher / t) - log_softmax(student / t))).sum(axis=1).mean()
    assert kl > 1e-4  # a real second term: the student is not the teacher
    assert float(loss) == pytest.approx((1 - w) * ce + w * t * t * kl, rel=1e-4)
    grads = tape.gradient(loss, backbone.trainable_variables + method.teacher.trainable_variables)
    assert all(g is not None for g in grads) and not method.teacher.trainable_variables
    assert all(np.array_equal(a, b.numpy()) for a, b in zip(teacher_before, method.teacher.variables, strict=True))


def test_a_distilled_model_trains_and_loads_without_its_teacher(tmp_path, sample_dir, exported):
    import shutil

    from edgemeta.host.modeldir import load_backbone
    from edgemeta.host.training import train
    from tests.support.builders import tiny_config

    teacher = tmp_path / "teacher"
    shutil.copytree(exported, teacher)
    cfg = replace(tiny_config(sample_dir, episodes=20), method=MethodConfig("protonet", {"teacher": str(teacher), "distill": 0.5}))
    out = tmp_path / "student"
    result = train(cfg, out, progress=False)
    assert result.episodes == 20
    shutil.rmtree(teacher)  # evaluating, exporting or deploying the student never reads its teacher
    backbone, info = load_backbone(out)
    assert info.method["teacher"] == str(teacher) and info.method["distill"] == 0.5
    method = info.make_method(out, backbone, 5)
    assert method.teacher is None


@pytest.mark.parametrize("params, message", [
    ({"teacher": "no/such/model"}, "is not a folder"),
    ({"distill": 1.5}, "distill must be in [0, 1]"),
    ({"temperature": 0}, "temperature must be above 0"),
    ({"teacher": 3}, "must be a string"),
])
def test_bad_distillation_settings_are_refused_with_one_line_and_nothing_written(tmp_path, sample_dir, params, message):
    from edgemeta.errors import EdgemetaError
    from edgemeta.host.training import train
    from tests.support.builders import tiny_config

    out = tmp_path / "run"
    with pytest.raises(EdgemetaError, match=re.escape(message)) as e:
        train(replace(tiny_config(sample_dir, episodes=5), method=MethodConfig("protonet", params)), out, progress=False)
    assert "\n" not in str(e.value)
    assert not out.exists()


def test_a_teacher_that_reads_other_images_is_refused(tmp_path, sample_dir, exported):
    from edgemeta.errors import EdgemetaError
    from edgemeta.host.training import train
    from tests.support.builders import tiny_config

    cfg = tiny_config(sample_dir, episodes=5)
    cfg = replace(cfg, model=replace(cfg.model, image_size=32), method=MethodConfig("protonet", {"teacher": str(exported)}))
    with pytest.raises(EdgemetaError, match="reads images of shape"):
        train(cfg, tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()
