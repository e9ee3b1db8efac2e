"""MAML, first-order MAML and MAML++.

Finn, Abbeel and Levine (2017), "Model-Agnostic Meta-Learning for Fast Adaptation of Deep
Networks", ICML. Learn an initialisation of the whole network (backbone + linear head) from
which a few steps of gradient descent on a task's support set give a good classifier for its
queries; the meta-gradient goes through the inner steps (second order), or, with
``first_order``, treats the inner gradients as constants (FOMAML).

Antoniou, Edwards and Storkey (2019), "How to train your MAML", ICLR (MAML++), as options:
``multi_step_loss`` (the query loss after every inner step, weights annealed towards the last
step over ``msl_episodes``), ``learn_inner_rates`` (one learned rate per layer per step, LSLR),
``first_order_episodes`` (derivative-order annealing: first order for that many episodes,
then second order), ``per_step_bn`` (batch-norm scale and offset meta-learned per inner step and
not adapted in the inner loop, BNWB); cosine annealing of the outer rate is
``[train] lr_schedule = "cosine"``. MAML++'s per-step running statistics (BNRS) have no separate
switch here: adaptation never uses running statistics (see below), and the statistics it does use,
the support set's under each step's weights, are per step by construction.

Defaults are the paper's Omniglot 5-way ones (the authors' code, cbfinn/maml: inner rate 0.4, one
inner step in training, meta-batch 32 tasks (``[train] meta_batch``), outer Adam 1e-3, 10 steps
at test); 20-way: inner rate 0.1, 5 steps, meta-batch 16.

Batch norm: the inner loop normalises with the support set's batch statistics (the support set
is given, so this leaks nothing). Queries, in training and at evaluation alike, are by default
normalised with the *support* set's statistics under the adapted weights (non-transductive, the
"MetaBN" of Bronskill et al. 2020): a query's answer never depends on the other queries.
``transductive = true`` normalises the query batch with its own statistics, as the papers' code
does; every figure says which was used. Running statistics are not used by MAML itself (in
inference mode the adapted network drifts: a 5-way model after 6400 episodes scored 21% with
running statistics, 78% with support statistics, 80% transductive, on 100 val episodes); they
are kept up to date for the board path, whose frozen int8 body folds them in.
"""

from __future__ import annotations

from edgemeta.host.methods.gradient import GradientMethod
from edgemeta.host.methods.params import MAMLParams


class MAML(GradientMethod):
    """Adapts every trainable variable of the backbone and the head in the inner loop."""

    name = "maml"
    Params = MAMLParams
    adapts_body = True
