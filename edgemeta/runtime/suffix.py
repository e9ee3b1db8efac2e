"""The optimisation family's inner loop in numpy: a network adapted by gradient steps on a support set, on the board.

MAML, Meta-SGD and MAML++ adapt the whole network (body and linear head) to each support set; the board's
usual path (heads/linear.py) adapts the head alone over a frozen body. This module runs the host's inner
loop (host/methods/gradient.py, `GradientMethod._inner_loop`) without TensorFlow: a forward and a backward
pass through a plain layer chain (Conv-4's conv 3x3, batch norm, ReLU, max-pool, flatten; NHWC, as Keras),
then a linear head. `GradientMethod.suffix_spec` reads a trained method into an `AdaptSpec`.

The plan is a list of JSON-ready dicts naming arrays in a dict of parameters:

    {"op": "conv", "w": name, "padding": "same" | "valid"}     kernel (kh, kw, c_in, c_out), stride 1, no bias
    {"op": "bn", "gamma": name, "beta": name, "mean": name, "var": name, "eps": float}
    {"op": "relu"}
    {"op": "pool", "size": s}                                   max-pool s x s, stride s, valid (floor)
    {"op": "flatten"}                                           row-major over H, W, C (Keras Flatten)

Batch norm runs in one of two modes: "batch" normalises with the batch's own mean and biased variance, the
gradient flowing through them (Keras's training mode, what the inner loop uses on the support set); "given"
with supplied (mean, var) per bn layer, or the plan's running statistics when none are supplied.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from numpy.lib.stride_tricks import as_strided

from edgemeta.errors import EdgemetaError
from edgemeta.runtime.heads.linear import LinearHeadSpec, _slice_rate, adapt_linear, initial_head, softmax
from edgemeta.schema import MAX_ABS_VALUE

Layer = dict  # one step of a plan (see the module's docstring)
Stats = list  # per bn layer of a plan, (mean, var)
HEAD_W, HEAD_B = "head_w", "head_b"  # the adapted head's keys among the adapted parameters
BODY_BN = ("batch", "running")  # AdaptSpec.body_bn


@dataclass
class AdaptSpec:
    """What the inner loop needs: the body's plan and initial parameters (float32, by name), which of them adapt
    and at what rates, MAML++'s per-step batch norm, and the head (`LinearHeadSpec`: init, W0/b0, rates).

    - `rates`: per adapted name, one rate per step (the last reused past them), each a scalar (inner_lr; LSLR)
      or an array shaped like the parameter (Meta-SGD: one entry, the same at every step).
    - `bn_steps`: per batch-norm scale/offset name, a (steps, C) array: after step k the network uses row
      min(k + 1, steps) - 1 (step 0 uses the body's own); those parameters are set, not adapted.
    - `body_bn`: "batch", the inner loop's support statistics and, for the queries, the support set's statistics
      under the adapted weights (or, `transductive`, the query batch's own); "running", a frozen body in inference
      mode (ANIL's evaluation): the plan's running statistics throughout.
    - `input_shape`: (H, W, C) of one input (the backbone's image, or a prefix's output).
    """

    plan: list[Layer]
    body: dict[str, np.ndarray]
    head: LinearHeadSpec
    input_shape: tuple[int, int, int]
    steps: int = 0
    adapted: list[str] = field(default_factory=list)
    rates: dict[str, list] = field(default_factory=dict)
    bn_steps: dict[str, np.ndarray] = field(default_factory=dict)
    transductive: bool = False
    body_bn: str = "batch"

    def rate(self, name: str, k: int) -> np.ndarray:
        r = self.rates[name]
        return np.asarray(r[min(k, len(r) - 1)], np.float32)


# --- layers --------------------------------------------------------------------------------------------

def _pads(k: int, padding: str) -> tuple[int, int]:
    """(before, after) padding of one axis: TensorFlow's "same" puts the odd pixel after."""
    return ((k - 1) // 2, k // 2) if padding == "same" else (0, 0)


def _conv(x: np.ndarray, w: np.ndarray, ph: tuple[int, int], pw: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """(output, im2col matrix): the columns are (kh, kw, c) windows, Keras's kernel layout, so one matmul does it."""
    n, h, wd, c = x.shape
    kh, kw, _, co = w.shape
    if any(ph) or any(pw):
        xp = np.zeros((n, h + ph[0] + ph[1], wd + pw[0] + pw[1], c), x.dtype)
        xp[:, ph[0]:ph[0] + h, pw[0]:pw[0] + wd] = x
    else:
        xp = np.ascontiguousarray(x)
    ho, wo = xp.shape[1] - kh + 1, xp.shape[2] - kw + 1
    s = xp.strides
    windows = as_strided(xp, (n, ho, wo, kh, kw, c), (s[0], s[1], s[2], s[1], s[2], s[3]), writeable=False)
    cols = windows.reshape(n * ho * wo, kh * kw * c)  # the copy: contiguous runs of c
    return (cols @ w.reshape(kh * kw * c, co)).reshape(n, ho, wo, co), cols


def _bn_arrays(layer: Layer, params: dict) -> tuple[np.ndarray, np.ndarray]:
    return params[layer["gamma"]], params[layer["beta"]]


def forward(plan: list[Layer], params: dict[str, np.ndarray], x: np.ndarray, bn: str = "batch", stats: Stats | None = None,
            grad: bool = True) -> tuple[np.ndarray, dict]:
    """The plan's output for a batch `x` (N, H, W, C) and a cache: {"stats": the batch norm (mean, var) used per bn
    layer, "layers": what `backward` needs (kept only with `grad`)}. Keeps the dtype of `x` and `params`."""
    cache: dict = {"stats": [], "layers": [], "bn": bn}
    j = 0
    for layer in plan:
        op, saved = layer["op"], None
        if op == "conv":
            w = params[layer["w"]]
            ph, pw = _pads(w.shape[0], layer["padding"]), _pads(w.shape[1], layer["padding"])
            x, cols = _conv(x, w, ph, pw)
            saved = (cols, ph, pw)
        elif op == "bn":
            gamma, beta = _bn_arrays(layer, params)
            shape = x.shape
            x2 = x.reshape(-1, shape[-1])
            if bn == "batch":
                # sums as matmuls: BLAS's blocked float32 sums are faster than numpy's reductions, and closer
                ones = np.full(len(x2), 1.0 / len(x2), x.dtype)
                mean = ones @ x2
                xc = x2 - mean
                var = ones @ (xc * xc)  # biased, as Keras normalises (and updates its moving variance)
            else:
                mean, var = stats[j] if stats is not None else (params[layer["mean"]], params[layer["var"]])
                xc = x2 - mean
            inv = (1.0 / np.sqrt(var + layer["eps"])).astype(x.dtype)
            xhat = xc
            xhat *= inv  # in place: fewer fresh arrays (page faults) per pass
            y = xhat * gamma
            y += beta
            x = y.reshape(shape)
            cache["stats"].append((mean, var))
            saved = (xhat, inv)
            j += 1
        elif op == "relu":
            saved = x > 0
            x = np.maximum(x, 0)
        elif op == "pool":
            s = layer["size"]
            n, h, wd, c = x.shape
            ho, wo = h // s, wd // s
            xv = x[:, :ho * s, :wo * s].reshape(n, ho, s, wo, s, c)
            out = xv.max(axis=(2, 4))
            saved = (xv, out, x.shape)
            x = out
        elif op == "flatten":
            saved = x.shape
            x = x.reshape(len(x), -1)
        else:
            raise EdgemetaError(f"unknown layer op {op!r} in the network's plan; re-export the model")
        if grad:
            cache["layers"].append(saved)
    return x, cache


def backward(plan: list[Layer], params: dict[str, np.ndarray], cache: dict, dout: np.ndarray,
             wanted: set[str] | None = None) -> dict[str, np.ndarray]:
    """Gradients (by parameter name) of a loss whose gradient at the plan's output is `dout`, for the parameters
    in `wanted` (default: every conv kernel and bn scale/offset). Stops at the first layer with a wanted one."""
    if wanted is None:
        wanted = {layer[k] for layer in plan for k in ("w", "gamma", "beta") if k in layer}
    first = next((i for i, layer in enumerate(plan) if wanted & {layer.get(k) for k in ("w", "gamma", "beta")}), len(plan))
    grads: dict[str, np.ndarray] = {}
    d = dout
    for i in range(len(plan) - 1, first - 1, -1):
        layer, saved, op = plan[i], cache["layers"][i], plan[i]["op"]
        last = i == first  # no gradient needed below this layer
        if op == "conv":
            cols, ph, pw = saved
            w = params[layer["w"]]
            kh, kw, c, co = w.shape
            d2 = d.reshape(-1, co)
            if layer["w"] in wanted:
                grads[layer["w"]] = (cols.T @ d2).reshape(w.shape)
            if not last:  # the input's gradient: a correlation of d with the flipped, transposed kernel
                flipped = w[::-1, ::-1].transpose(0, 1, 3, 2)
                d = _conv(d, flipped, (kh - 1 - ph[0], kh - 1 - ph[1]), (kw - 1 - pw[0], kw - 1 - pw[1]))[0]
        elif op == "bn":
            xhat, inv = saved
            gamma = params[layer["gamma"]]
            shape = d.shape
            d2 = d.reshape(-1, shape[-1])
            ones = np.ones(len(d2), d2.dtype)  # column sums as matmuls, as in `forward`
            dbeta = ones @ d2
            dgamma = ones @ (d2 * xhat)
            if layer["gamma"] in wanted:
                grads[layer["gamma"]] = dgamma
            if layer["beta"] in wanted:
                grads[layer["beta"]] = dbeta
            if not last:
                if cache["bn"] == "batch":  # through the batch's mean and variance too
                    m = len(d2)
                    dx = d2 * np.asarray(m, d2.dtype)
                    dx -= dbeta
                    dx -= xhat * dgamma
                    dx *= gamma * inv / np.asarray(m, d2.dtype)
                    d = dx.reshape(shape)
                else:
                    d = (d2 * (gamma * inv)).reshape(shape)
        elif op == "relu":
            d = d * saved
        elif op == "pool":
            xv, out, shape = saved
            s = layer["size"]
            dv = np.zeros(xv.shape, d.dtype)
            taken = np.zeros(out.shape, bool)
            for a in range(s):  # each window's first maximum takes the gradient, as TensorFlow's MaxPoolGrad
                for b in range(s):
                    hit = (xv[:, :, a, :, b] == out) & ~taken
                    taken |= hit
                    dv[:, :, a, :, b] = np.where(hit, d, 0)
            n, ho, _, wo, _, c = xv.shape
            if shape[1:3] == (ho * s, wo * s):
                d = dv.reshape(shape)
            else:  # the rows and columns the floor dropped get none
                d = np.zeros(shape, d.dtype)
                d[:, :ho * s, :wo * s] = dv.reshape(n, ho * s, wo * s, c)
        elif op == "flatten":
            d = d.reshape(saved)
    return grads


def support_stats(plan: list[Layer], params: dict[str, np.ndarray], x: np.ndarray) -> Stats:
    """Per bn layer, the batch (mean, biased variance) of `x` under `params`: what `_support_statistics` gives
    (Keras's momentum update from zeros divided by 1 - momentum is the batch's own biased variance)."""
    return forward(plan, params, x, "batch", grad=False)[1]["stats"]


# --- shapes and checks ---------------------------------------------------------------------------------

def _fail(what: str) -> EdgemetaError:
    return EdgemetaError(f"the network's arrays do not chain: {what}; re-export the model")


def shapes(plan: list[Layer], params: dict[str, np.ndarray], input_shape: tuple[int, ...]) -> list[tuple[int, ...]]:
    """Each layer's output shape for one input of `input_shape` (H, W, C), checking that the arrays chain."""
    shape, out = tuple(int(s) for s in input_shape), []
    if len(shape) != 3 or min(shape) < 1:
        raise _fail(f"an input of shape {shape}, not (height, width, channels)")
    for i, layer in enumerate(plan):
        op = layer.get("op")
        names = [layer.get(k) for k in {"conv": ("w",), "bn": ("gamma", "beta", "mean", "var")}.get(op, ())]
        missing = [n for n in names if n not in params]
        if missing:
            raise _fail(f"layer {i} ({op}) names {missing[0]!r}, which is not among the arrays")
        if op in ("conv", "bn", "pool", "flatten") and len(shape) != 3:
            raise _fail(f"layer {i} ({op}) follows a layer of output shape {shape}, not a feature map")
        if op == "conv":
            w = params[layer["w"]]
            if w.ndim != 4 or w.shape[2] != shape[2] or layer.get("padding") not in ("same", "valid"):
                raise _fail(f"layer {i}'s kernel {layer['w']!r} has shape {w.shape}, padding {layer.get('padding')!r}: "
                            f"it needs (kh, kw, {shape[2]}, out) to read a {shape} input, same or valid")
            h, wd = (shape[0], shape[1]) if layer["padding"] == "same" else (shape[0] - w.shape[0] + 1, shape[1] - w.shape[1] + 1)
            if h < 1 or wd < 1:
                raise _fail(f"layer {i}'s kernel {w.shape[:2]} is larger than its {shape[:2]} input")
            shape = (h, wd, w.shape[3])
        elif op == "bn":
            bad = [n for n in names if params[n].shape != (shape[2],)]
            if bad or not float(layer.get("eps", -1)) > 0:
                raise _fail(f"layer {i}'s batch norm {(bad or names)[0]!r} needs shape ({shape[2]},) and eps > 0")
        elif op == "pool":
            s = layer.get("size")
            if not isinstance(s, int) or s < 1 or shape[0] < s or shape[1] < s:
                raise _fail(f"layer {i} pools {s!r} x {s!r} over a {shape[:2]} map")
            shape = (shape[0] // s, shape[1] // s, shape[2])
        elif op == "flatten":
            shape = (shape[0] * shape[1] * shape[2],)
        elif op != "relu":
            raise _fail(f"layer {i} has an unknown op {op!r}")
        out.append(shape)
    if len(shape) != 1:
        raise _fail(f"the plan ends with shape {shape}, not a flattened embedding")
    return out


def check(spec: AdaptSpec) -> int:
    """The embedding size of a spec whose arrays all fit together; EdgemetaError (one line) when they do not."""
    dim = shapes(spec.plan, spec.body, spec.input_shape)[-1][0]
    trainable = {layer[k] for layer in spec.plan for k in ("w", "gamma", "beta") if k in layer}
    for name in spec.adapted:
        if name not in trainable:
            raise _fail(f"the adapted parameter {name!r} is no conv kernel or batch-norm scale/offset of the plan")
        rates = spec.rates.get(name)
        if not rates or any(np.ndim(r) and np.shape(r) != spec.body[name].shape for r in rates):
            raise _fail(f"{name!r} needs one rate per step, each a scalar or an array of shape {spec.body[name].shape}")
    for name, table in spec.bn_steps.items():
        if name not in trainable or table.ndim != 2 or table.shape[1:] != spec.body[name].shape or not len(table):
            raise _fail(f"per-step batch norm {name!r} of shape {table.shape} needs (steps, {spec.body.get(name, ()).shape})")
    if spec.head.init == "learned" and (spec.head.w0 is None or spec.head.w0.shape[0] != dim):
        rows = None if spec.head.w0 is None else spec.head.w0.shape[0]
        raise _fail(f"the head's W has {rows} rows, the body's flattened output {dim} values")
    if spec.body_bn not in BODY_BN:
        raise _fail(f"body_bn {spec.body_bn!r} is none of {', '.join(BODY_BN)}")
    return dim


def _inputs(spec: AdaptSpec, x: np.ndarray, what: str) -> np.ndarray:
    x = np.asarray(x)
    if x.ndim != 4 or tuple(x.shape[1:]) != tuple(spec.input_shape) or not len(x):
        raise EdgemetaError(f"the {what} are of shape {x.shape}; the network reads (n, {', '.join(map(str, spec.input_shape))})")
    return x.astype(np.float32, copy=False)


def macs(plan: list[Layer], params: dict[str, np.ndarray], input_shape: tuple[int, ...], batch: int = 1, way: int = 0) -> int:
    """Multiply-accumulates of one forward pass of `batch` inputs: the convolutions, one per element for each batch
    norm (its scale and shift) and, with `way`, the head. A backward pass costs about twice its forward (each conv:
    the kernel's gradient and the input's, one matmul each), so a gradient step about three forwards."""
    total, shape = 0, tuple(input_shape)
    for layer, out in zip(plan, shapes(plan, params, input_shape), strict=True):
        if layer["op"] == "conv":
            kh, kw, c, co = params[layer["w"]].shape
            total += out[0] * out[1] * kh * kw * c * co
        elif layer["op"] == "bn":
            total += int(np.prod(out))
        shape = out
    return batch * (total + shape[0] * way)


# --- the inner loop ------------------------------------------------------------------------------------

def _embed(spec: AdaptSpec, params: dict, x: np.ndarray, stats: Stats | None = None, batch: bool = True) -> np.ndarray:
    bn = "batch" if spec.body_bn == "batch" and batch and stats is None else "given"
    return forward(spec.plan, params, x, bn, stats, grad=False)[0]


def adapt(spec: AdaptSpec, support_x: np.ndarray, labels: np.ndarray, way: int, steps: int | None = None) -> dict[str, np.ndarray]:
    """The body and head parameters (HEAD_W, HEAD_B) after `steps` (default: the spec's) gradient steps of the mean
    softmax cross-entropy of the support set, as `GradientMethod._adapt_steps`: the body in its batch norm mode,
    every adapted parameter stepped from the same gradients, then per-step batch norm set. Raises EdgemetaError
    when the rates make it diverge."""
    dim = check(spec)
    x, labels = _inputs(spec, support_x, "support images"), np.asarray(labels)
    steps = spec.steps if steps is None else steps
    fast = dict(spec.body)
    with np.errstate(over="ignore", invalid="ignore"):
        if not spec.adapted and not spec.bn_steps:  # a frozen body: the head alone adapts over its embeddings
            w, b = adapt_linear(spec.head, _embed(spec, fast, x), labels, way, steps)
        else:
            w, b = _adapt_body(spec, fast, x, labels, way, steps, dim)
    fast[HEAD_W], fast[HEAD_B] = w, b
    for name in [*spec.adapted, HEAD_W, HEAD_B]:
        a = fast[name]
        if not np.isfinite(a).all() or np.abs(a).max() > MAX_ABS_VALUE:
            raise EdgemetaError(f"adapting the network ({steps} step(s)) diverged to NaN or huge weights ({name}); use smaller "
                                "inner rates or fewer steps")
    return fast


def _adapt_body(spec: AdaptSpec, fast: dict, x: np.ndarray, labels: np.ndarray, way: int, steps: int, dim: int
                ) -> tuple[np.ndarray, np.ndarray]:
    """Updates `fast` (the body) in place; returns the head."""
    emb0 = _embed(spec, fast, x) if spec.head.init == "proto" else np.zeros((1, dim), np.float32)
    w, b = initial_head(spec.head, emb0, labels, way)
    onehot = np.eye(way, dtype=np.float32)[labels]
    wanted, mode = set(spec.adapted), "batch" if spec.body_bn == "batch" else "given"
    for k in range(steps):
        emb, cache = forward(spec.plan, fast, x, mode)
        d = (softmax(emb @ w + b) - onehot) / np.float32(len(x))  # d loss / d logits
        grads = backward(spec.plan, fast, cache, d @ w.T, wanted) if wanted else {}
        for name in spec.adapted:
            fast[name] = fast[name] - spec.rate(name, k) * grads[name]
        rw, rb = spec.head.rate(k)
        w, b = w - _slice_rate(rw, way) * (emb.T @ d), b - _slice_rate(rb, way) * d.sum(axis=0)
        for name, table in spec.bn_steps.items():
            fast[name] = np.asarray(table[min(k + 1, len(table)) - 1], np.float32)
    return w, b


def query_stats(spec: AdaptSpec, adapted: dict[str, np.ndarray], support_x: np.ndarray) -> Stats | None:
    """The batch norm statistics the queries are normalised with: the support set's under the adapted weights
    (non-transductive), None where the queries use their own batch's or the running ones. Compute once, pass to
    `logits` for each query."""
    if spec.body_bn != "batch" or spec.transductive:
        return None
    return support_stats(spec.plan, adapted, _inputs(spec, support_x, "support images"))


def logits(spec: AdaptSpec, adapted: dict[str, np.ndarray], support_x: np.ndarray | None, query_x: np.ndarray,
           stats: Stats | None = None) -> np.ndarray:
    """The queries' logits under the adapted parameters (`GradientMethod._query_logits`): normalised with the
    support set's statistics (`stats`, else computed from `support_x`), each query alone; transductive: with the
    query batch's own; a "running" body: with the running statistics."""
    q = _inputs(spec, query_x, "queries")
    if spec.body_bn == "batch" and not spec.transductive and stats is None:
        stats = query_stats(spec, adapted, support_x)
    emb = _embed(spec, adapted, q, stats, batch=spec.transductive)
    return emb @ adapted[HEAD_W] + adapted[HEAD_B]
