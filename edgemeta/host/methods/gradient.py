"""The gradient-based engine: learn an initialisation from which gradient steps on a support set
give a classifier (MAML and its relatives: maml.py, anil.py, metasgd.py configure it).

The inner loop adapts the fast weights (the backbone's trainable variables when the method
`adapts_body`, and a linear head) with `inner_steps` gradient steps on the support loss; the
meta-gradient goes through them (second order) or treats the inner gradients as constants
(``first_order``). MAML++'s options (Antoniou et al. 2019) are read from the params: the
multi-step loss, learned per-step rates (LSLR), derivative-order annealing and per-step batch-norm
weights (BNWB). Batch norm in the inner loop and for the queries: see maml.py.
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np
import tensorflow as tf
from keras import layers

from edgemeta.host.methods.base import Method, TaskEpisode
from edgemeta.host.methods.losses import accuracy, cross_entropy
from edgemeta.host.methods.params import MAMLParams
from edgemeta.runtime.heads.linear import Linear, LinearHeadSpec, linear_scores


def _order(grads: list, second_order) -> list:
    """Inner gradients as the meta-gradient sees them: constants for first order (0), differentiable
    for second order (1); a tensor (derivative-order annealing) mixes the two, at second-order cost."""
    if isinstance(second_order, (int, float)):
        return grads if second_order else [tf.stop_gradient(g) for g in grads]
    return [second_order * g + (1.0 - second_order) * tf.stop_gradient(g) for g in grads]


def _fit_way(x, way: int, fill):
    """A head-shaped array (..., trained way) cut or padded with `fill` to `way` classes."""
    x = tf.convert_to_tensor(x)
    n = x.shape[-1]
    if n >= way:
        return x[..., :way]
    pad = tf.fill(tf.concat([tf.shape(x)[:-1], [way - n]], 0), tf.cast(fill, x.dtype))
    return tf.concat([x, pad], -1)


class GradientMethod(Method):
    """The engine: a backbone and a linear head adapted by gradient steps on the support set. Its
    configurations: `adapts_body` (MAML, Meta-SGD: every trainable variable; ANIL: the head alone)
    and `per_parameter_rates` (Meta-SGD)."""

    family = "optimization"
    Params = MAMLParams
    per_parameter_rates: ClassVar[bool] = False   # Meta-SGD: one rate per parameter instead of per variable and step

    def __init__(self, params: MAMLParams | None = None):
        super().__init__(params)
        self._predict = None      # the compiled adapt_classify, made on its first call
        self.backbone = None
        self._vars: list = []
        self.head_w = self.head_b = None
        self.rates: list = []     # per adapted variable: (steps,) learned rates (LSLR) or per-parameter (Meta-SGD)

    # ---- variables -------------------------------------------------------------------------
    def build(self, backbone, way: int) -> None:
        p = self.params
        self.backbone, self.way = backbone, way
        dim = int(backbone.output_shape[-1])
        if p.head_init == "learned":
            limit = float(np.sqrt(6.0 / (dim + way)))  # Glorot uniform, as a Keras Dense layer
            self.head_w = tf.Variable(tf.random.uniform((dim, way), -limit, limit), name="head_w")
            self.head_b = tf.Variable(tf.zeros(way), name="head_b")
        self.bn_steps = self._build_bn_steps()
        # per-step batch norm is not adapted, so its variables have no inner rate
        self.rates = [None if i in self._bn_index else r for i, r in enumerate(self._build_rates())]
        self._vars = ([v for v in (self.head_w, self.head_b) if v is not None] + [r for r in self.rates if r is not None]
                      + self.bn_steps)

    def _bn_positions(self) -> list[int]:
        """Indices, in the backbone's trainable variables, of the batch-norm scales and offsets."""
        bn = {v.path for layer in self.backbone.layers if isinstance(layer, layers.BatchNormalization)
              for v in layer.trainable_variables}
        return [i for i, v in enumerate(self.backbone.trainable_variables) if v.path in bn]

    def _build_bn_steps(self) -> list:
        """BNWB: for each batch-norm scale/offset, one copy per inner step after the first, (steps, C);
        step 0 is the backbone's own variable, so the board's frozen body is the unadapted network."""
        if not (self.params.per_step_bn and self.adapts_body):
            self._bn_index = []
            return []
        self._bn_index = self._bn_positions()
        body = self.backbone.trainable_variables
        return [tf.Variable(tf.tile(body[i][None], [self.params.inner_steps, 1]), name=f"bn_step_{j}")
                for j, i in enumerate(self._bn_index)]

    def _step_bn(self, fast: list, k: int) -> list:
        """Fast weights with the batch-norm parameters of inner step k (past the trained steps: the last)."""
        if not self.bn_steps or k == 0:
            return fast
        k = min(k, self.params.inner_steps) - 1
        out = list(fast)
        for j, i in enumerate(self._bn_index):
            out[i] = self.bn_steps[j][k]
        return out

    def _build_rates(self) -> list:
        if not self.params.learn_inner_rates:
            return []
        return [tf.Variable(tf.fill([self.params.inner_steps], self.params.inner_lr), name=f"lr_{i}")
                for i, _ in enumerate(self._adapted_shapes())]

    def _adapted_shapes(self) -> list:
        shapes = [tuple(v.shape) for v in self.backbone.trainable_variables] if self.adapts_body else []
        dim = int(self.backbone.output_shape[-1])
        return shapes + [(dim, self.way), (self.way,)]

    @property
    def variables(self) -> list:
        return self._vars

    def head_arrays(self) -> dict[str, np.ndarray]:
        out = {}
        if self.head_w is not None:
            out["w0"], out["b0"] = self.head_w.numpy(), self.head_b.numpy()
        for i, r in enumerate(self.rates):
            if r is not None:
                out[f"rate_{i}"] = r.numpy()
        for j, v in enumerate(self.bn_steps):
            out[f"bn_step_{j}"] = v.numpy()
        return out

    def load_head(self, arrays: dict[str, np.ndarray]) -> None:
        if self.head_w is not None:
            self.head_w.assign(arrays["w0"])
            self.head_b.assign(arrays["b0"])
        for i, r in enumerate(self.rates):
            if r is not None:
                r.assign(arrays[f"rate_{i}"])
        for j, v in enumerate(self.bn_steps):
            v.assign(arrays[f"bn_step_{j}"])

    # ---- the inner loop --------------------------------------------------------------------
    def _rate(self, i: int, k, way: int):
        """Learning rate of adapted variable i at step k (a tensor step index is clipped to the learned steps)."""
        if not self.rates:
            return self.params.inner_lr
        if self.per_parameter_rates:  # Meta-SGD: the same array at every step
            r = self.rates[i]
            return _fit_way(r, way, tf.reduce_mean(r)) if i >= len(self.rates) - 2 else r
        return tf.gather(self.rates[i], tf.minimum(k, self.params.inner_steps - 1))  # LSLR: one per step

    def _initial_head(self, emb_support, labels, way: int):
        init = self.params.head_init
        if init == "learned":  # another way than trained: extra classes start from zero (as the numpy head)
            return _fit_way(self.head_w, way, 0.0), _fit_way(self.head_b, way, 0.0)
        if init == "zero":
            return tf.zeros((int(self.backbone.output_shape[-1]), way)), tf.zeros(way)
        onehot = tf.one_hot(labels, way)
        protos = tf.matmul(onehot, emb_support, transpose_a=True) / tf.reduce_sum(onehot, axis=0)[:, None]
        return 2.0 * tf.transpose(protos), -tf.reduce_sum(protos**2, axis=1)

    def _body(self, weights, x, update: bool = False):
        """Embeddings with batch statistics of `x` (training mode); `update` folds them into the running ones."""
        running = self.backbone.non_trainable_variables
        emb, stats = self.backbone.stateless_call(weights, [tf.convert_to_tensor(v) for v in running], x, training=True)
        if update:
            for v, new in zip(running, stats, strict=True):
                v.assign(tf.stop_gradient(new))
        return emb

    def _support_statistics(self, weights, support):
        """The batch-norm statistics of the support set under `weights`, as a list shaped like the
        backbone's non-trainable variables (a running-average update from zeros, divided by 1 - momentum)."""
        zeros = [tf.zeros_like(v) for v in self.backbone.non_trainable_variables]
        _, stats = self.backbone.stateless_call(weights, zeros, support, training=True)
        return [s / (1.0 - m) for s, m in zip(stats, self._momenta(), strict=True)]

    def _momenta(self) -> list[float]:
        by_path = {v.path: layer.momentum for layer in self.backbone.layers if isinstance(layer, layers.BatchNormalization)
                   for v in layer.non_trainable_variables}
        return [by_path[v.path] for v in self.backbone.non_trainable_variables]

    def _query_logits(self, fast, support, query, update: bool = False):
        """Logits of the queries under fast weights. Non-transductive (default): normalised with the
        support set's statistics, so each query is answered alone; transductive: the query batch's own."""
        nb = len(fast) - 2
        if self.params.transductive:
            emb = self._body(fast[:nb], query, update)
        else:
            if update:
                self._body(fast[:nb], query, update)  # running statistics still follow the adapted network
            stats = self._support_statistics(fast[:nb], support)
            emb, _ = self.backbone.stateless_call(fast[:nb], stats, query, training=False)
        return emb @ fast[nb] + fast[nb + 1]

    def _adapt_steps(self, fast: list, support_logits, labels, way: int, steps: int, second_order) -> list:
        """Fast weights after each of `steps` gradient steps on the support loss (steps + 1 entries);
        `support_logits(fast)` gives the support set's logits. Variable i takes rate i (see `_rate`)."""
        history = [fast]
        fixed = set(self._bn_index) if self.bn_steps else set()  # per-step batch norm: set, not adapted
        for k in range(steps):
            with tf.GradientTape() as tape:
                tape.watch(fast)
                loss = cross_entropy(support_logits(fast), labels)
            grads = _order(tape.gradient(loss, fast), second_order)
            fast = [x if i in fixed else x - self._rate(i, k, way) * g
                    for i, (x, g) in enumerate(zip(fast, grads, strict=True))]
            fast = self._step_bn(fast, k + 1)
            history.append(fast)
        return history

    def _inner_loop(self, episode: TaskEpisode, steps: int, update: bool, second_order) -> list:
        """The whole network's fast weights (body + head) after each inner step."""
        body = [tf.convert_to_tensor(v) for v in self.backbone.trainable_variables]
        emb0 = self._body(body, episode.support) if self.params.head_init == "proto" else None
        w, b = self._initial_head(emb0, episode.support_labels, episode.way)
        return self._adapt_steps(body + [w, b], lambda f: self._body(f[:-2], episode.support, update) @ f[-2] + f[-1],
                                 episode.support_labels, episode.way, steps, second_order)

    def _query_loss(self, history: list, query_logits, labels, progress):
        """(loss, accuracy) of the queries after the inner loop; with the multi-step loss, the weighted
        loss after every step. `query_logits(fast, last)` gives the queries' logits."""
        n = self.params.inner_steps
        weights = self._step_weights(progress)
        losses = []
        for k in (range(1, n + 1) if self.params.multi_step_loss else [n]):
            logits = query_logits(history[k], k == n)
            losses.append(weights[k - 1] * cross_entropy(logits, labels))
        return tf.add_n(losses), accuracy(logits, labels)

    def _second_order(self, progress):
        p = self.params
        if p.first_order:
            return 0.0
        if p.first_order_episodes:
            return tf.cast(tf.cast(progress, tf.float32) >= p.first_order_episodes, tf.float32)
        return 1.0

    def _step_weights(self, progress):
        """MAML++ multi-step loss weights over the inner steps: uniform, annealed to the last step."""
        n = self.params.inner_steps
        if not self.params.multi_step_loss or n == 1:
            return tf.one_hot(n - 1, n)
        if not self.params.msl_episodes:  # no annealing: uniform over the steps throughout
            return tf.fill([n], 1.0 / n)
        t = tf.minimum(tf.cast(progress, tf.float32) / self.params.msl_episodes, 1.0)
        uniform = tf.fill([n], 1.0 / n)
        return (1.0 - t) * uniform + t * tf.one_hot(n - 1, n)

    def episode_loss(self, episode: TaskEpisode, training: bool):
        history = self._inner_loop(episode, self.params.inner_steps, training, self._second_order(episode.progress))
        return self._query_loss(history, lambda f, last: self._query_logits(f, episode.support, episode.query, training and last),
                                episode.query_labels, episode.progress)

    # ---- evaluation ------------------------------------------------------------------------
    def adapt_classify(self, support, support_labels, query, way: int) -> np.ndarray:
        """Host only: adapt the whole network on a support set (uint8 images) with the test-time
        steps and return the queries' logits. Batch norm as ``transductive`` says."""
        if self._predict is None:
            @tf.function(reduce_retracing=True)
            def predict(s, sl, q, way):
                ep = TaskEpisode(s, sl, q, None, int(way))
                fast = self._inner_loop(ep, self.params.test_steps, False, 0.0)[-1]
                return self._query_logits(fast, s, q)

            self._predict = predict
        return self._predict(tf.cast(support, tf.float32) / 255.0, tf.constant(support_labels, tf.int32),
                             tf.cast(query, tf.float32) / 255.0, way).numpy()

    def linear_head(self) -> LinearHeadSpec:
        """The board's head: the meta-learned head adapted over frozen embeddings with the test-time steps
        (and the learned rates of the head's two variables where the method has them)."""
        rates_w, rates_b = [self.params.inner_lr], [self.params.inner_lr]
        if self.rates:
            rw, rb = self.rates[-2].numpy(), self.rates[-1].numpy()
            rates_w, rates_b = ([rw], [rb]) if self.per_parameter_rates else (list(rw), list(rb))
        return LinearHeadSpec(init=self.params.head_init, steps=self.params.test_steps, rates_w=rates_w, rates_b=rates_b,
                              w0=None if self.head_w is None else self.head_w.numpy(),
                              b0=None if self.head_b is None else self.head_b.numpy())

    def classify(self, support_emb, support_labels, query_emb, way: int) -> np.ndarray:
        # read the head afresh each time: during training it changes between validations
        return linear_scores(self.linear_head(), support_emb, support_labels, query_emb, way)

    def board_head(self) -> Linear:
        """The linear head over the frozen body; "unknown" is the nearest prototype under squared Euclidean distance."""
        return Linear("squared_euclidean", self.linear_head(), bool(self.rates) and self.per_parameter_rates, self.name)

    def head_spec(self) -> dict:
        return self.board_head().to_manifest()

    def suffix_spec(self, split: int = 0):
        """The numpy inner loop's spec (`edgemeta.runtime.suffix.AdaptSpec`): the backbone's layer chain from
        layer `split` on (the caller feeds the output of the layers before it, which stay frozen), its weights
        by variable path, the adapted variables and their rates, the per-step batch norm and the head. The body
        adapts as in `adapt_classify` where the method `adapts_body`; ANIL's body is frozen, in inference mode."""
        import keras

        from edgemeta.errors import EdgemetaError
        from edgemeta.host.backbones import fused_training_forward
        from edgemeta.runtime.suffix import AdaptSpec

        model = self.backbone
        if model is None or fused_training_forward(model) is None:  # the same chain rules as the fused forward pass
            raise EdgemetaError("the numpy inner loop runs a built method over a plain float32 chain of conv (no bias), "
                                "batch norm, ReLU, max-pool and flatten layers, such as conv4")
        chain = [layer for layer in model.layers if not isinstance(layer, keras.layers.InputLayer)]
        if not 0 <= split < len(chain):
            raise EdgemetaError(f"split must be from 0 to {len(chain) - 1} (the backbone has {len(chain)} layers), got {split}")
        plan, body = [], {}

        def name(v) -> str:
            body[v.path] = np.asarray(v.numpy(), np.float32)
            return v.path

        for layer in chain[split:]:
            if isinstance(layer, layers.Conv2D):
                plan.append({"op": "conv", "w": name(layer.kernel), "padding": layer.padding})
            elif isinstance(layer, layers.BatchNormalization):
                plan.append({"op": "bn", "gamma": name(layer.gamma), "beta": name(layer.beta), "mean": name(layer.moving_mean),
                             "var": name(layer.moving_variance), "eps": float(layer.epsilon)})
            elif isinstance(layer, layers.ReLU):
                plan.append({"op": "relu"})
            elif isinstance(layer, layers.MaxPooling2D):
                size = tuple(layer.pool_size)
                if size != tuple(layer.strides) or size[0] != size[1] or layer.padding != "valid":
                    raise EdgemetaError(f"{layer.name}: the numpy inner loop pools square windows at their own stride, "
                                        f"valid padding; got pool {size}, strides {tuple(layer.strides)}, {layer.padding}")
                plan.append({"op": "pool", "size": int(size[0])})
            else:
                plan.append({"op": "flatten"})
        trainable = self.backbone.trainable_variables
        fixed = set(self._bn_index) if self.bn_steps else set()
        adapted, rates = [], {}
        for i, v in enumerate(trainable):
            if self.adapts_body and i not in fixed and v.path in body:
                adapted.append(v.path)
                r = self.rates[i].numpy() if self.rates else None
                rates[v.path] = [np.float32(self.params.inner_lr)] if r is None else [r] if self.per_parameter_rates else list(r)
        bn_steps = {trainable[i].path: v.numpy() for i, v in zip(self._bn_index, self.bn_steps, strict=True)
                    if trainable[i].path in body}
        head = self.linear_head()
        return AdaptSpec(plan, body, head, tuple(int(s) for s in chain[split].input.shape[1:]), head.steps, adapted, rates,
                         bn_steps, self.params.transductive, "batch" if self.adapts_body else "running")
