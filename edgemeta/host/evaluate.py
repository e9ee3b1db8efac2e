"""The standard few-shot evaluation protocol.

For each setting (N-way K-shot), draw seeded test episodes (1000 by default, 15 queries per
class) and report the mean accuracy with its 95% confidence interval (1.96 standard errors
over episodes), as in Snell et al. (2017) and most of the literature after it.

The backbone is given as an ``embed`` function (uint8 images -> float embeddings), so the same
protocol measures the Keras model here and a TFLite model through the runtime. Because a
metric-based method classifies from per-image embeddings (batch norm uses its running
statistics at test time), every test image is embedded once and episodes only index them.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import numpy as np

from edgemeta.errors import EdgemetaError
from edgemeta.host.data import EpisodeSampler, FewShotSplit
from edgemeta.host.data.episodes import alphabets
from edgemeta.runtime.heads import PROTOTYPE
from edgemeta.runtime.heads.common import embed_support
from edgemeta.stats import mean_ci95

STANDARD_SETTINGS = ((5, 1), (5, 5), (20, 1), (20, 5))
EmbedFn = Callable[[np.ndarray], np.ndarray]
ClassifyFn = Callable[[np.ndarray, np.ndarray, np.ndarray, int], np.ndarray]


@dataclass
class SettingResult:
    way: int
    shot: int
    query: int
    episodes: int
    accuracy: float  # percent
    ci95: float      # percent, half-width
    note: str = ""
    # the most frequent errors: {"true": class, "predicted": class, "count": query errors}
    confusions: list[dict] = field(default_factory=list)
    errors: int | None = None  # wrong queries over all episodes (counted only when confusions are asked for)

    @property
    def name(self) -> str:
        return f"{self.way}-way {self.shot}-shot"


def fitting_settings(split: FewShotSplit, settings=STANDARD_SETTINGS) -> tuple[tuple[int, int], ...]:
    """`settings`, plus, when none of them fits a small split (too few classes, or images for one query),
    the largest 1-shot setting of at most 5 ways that does: a small dataset still gets a figure."""
    fits = [w <= split.num_classes and s < split.min_class_size() for w, s in settings]
    if any(fits) or split.num_classes < 2 or split.min_class_size() < 2:
        return tuple(settings)
    return (*settings, (min(5, split.num_classes), 1))


def parse_setting(text: str) -> tuple[int, int]:
    """'5w1s' or '5-way-1-shot' -> (5, 1)."""
    t = text.lower().replace("-", "").replace("way", "w").replace("shot", "s")
    try:
        way, shot = t.rstrip("s").split("w")
        return int(way), int(shot)
    except ValueError:
        raise EdgemetaError(f"cannot read setting {text!r}; write it as 5w1s (5-way 1-shot)") from None


def embed_split(embed: EmbedFn, split: FewShotSplit, batch: int = 1024) -> np.ndarray:
    return np.concatenate([embed(split.images[i:i + batch]) for i in range(0, len(split.images), batch)])


def query_and_support(embed: EmbedFn, split: FewShotSplit, shift: int, batch: int = 1024) -> tuple[np.ndarray, np.ndarray]:
    """A split's embeddings as queries (one view) and as enrolled samples (the mean over `shift`-pixel
    support views, reusing the one-view pass; the same array when `shift` is 0), as the board embeds them."""
    emb = embed_split(embed, split, batch)
    if not shift:
        return emb, emb
    return emb, np.concatenate([embed_support(embed, split.images[i:i + batch], shift, emb[i:i + batch])
                                for i in range(0, len(split.images), batch)])


def head_support_shift(method) -> int:
    """The pixel shift of the support views a method's board head enrolls with (0: one plain view)."""
    return int(method.board_head().support_shift)


def episode_inputs(method, embed: EmbedFn, split: FewShotSplit, head_only: bool = False
                   ) -> tuple[ClassifyFn, np.ndarray, np.ndarray]:
    """What a method classifies episodes from, (classify, query inputs, support inputs): the split's
    images for a method that adapts the whole network on each support set (host only), else (or with
    `head_only`: the board's path, body frozen) the split's embeddings through its numpy head, the
    support ones averaged over the head's support views as the board enrolls them."""
    if method.adapts_body and not head_only:
        return method.adapt_classify, split.images, split.images
    return method.classify, *query_and_support(embed, split, head_support_shift(method))


def choose_board_head(method, val_embeddings: np.ndarray, val_split: FewShotSplit, episodes: int = 200,
                      seed: int = 0) -> tuple[str, dict[str, float]]:
    """The board head for a method with a linear head: its own (meta-learned initialisation, test-time
    steps over the frozen body's embeddings) or the nearest prototype, whichever has the higher mean
    accuracy over the standard settings on validation episodes. A body meta-trained to be adapted
    (MAML, Meta-SGD) can leave its own head, frozen-body, near chance: Meta-SGD's one learned step."""
    from edgemeta.host.methods import get_method

    scores = {}
    for name, classify in (("own", method.classify), (PROTOTYPE, get_method("protonet").classify)):
        results = evaluate(None, classify, val_split, STANDARD_SETTINGS, episodes, seed=seed, embeddings=val_embeddings)
        scores[name] = float(np.mean([r.accuracy for r in results if r.episodes]))
    return max(scores, key=lambda k: (scores[k], k == "own")), scores


def episode_accuracies(classify: ClassifyFn, embeddings: np.ndarray, sampler: EpisodeSampler, episodes: int,
                       confusions: Counter | None = None, support_embeddings: np.ndarray | None = None) -> np.ndarray:
    """Per-episode accuracy (fraction) of `episodes` seeded episodes over precomputed embeddings
    (`support_embeddings`, if given, for the support samples: see `episode_inputs`).

    With a `confusions` counter, every wrong query adds one to (true class, predicted class),
    both as indices into the split's classes."""
    support = embeddings if support_embeddings is None else support_embeddings
    way, shot, query = sampler.way, sampler.shot, sampler.query
    support_labels = np.repeat(np.arange(way), shot)
    query_labels = np.repeat(np.arange(way), query)
    accs = np.empty(episodes)
    for i in range(episodes):
        classes, s, q = sampler.indices(i)
        pred = np.argmax(classify(support[s], support_labels, embeddings[q], way), axis=1)
        accs[i] = np.mean(pred == query_labels)
        if confusions is not None:
            wrong = pred != query_labels
            confusions.update(zip(classes[query_labels[wrong]].tolist(), classes[pred[wrong]].tolist(), strict=True))
    return accs


def evaluate(embed: EmbedFn, classify: ClassifyFn, split: FewShotSplit,
             settings=STANDARD_SETTINGS, episodes: int = 1000, query: int = 15, seed: int = 0,
             embeddings: np.ndarray | None = None, confusions: int = 0, within_groups: bool = False,
             limits: tuple[int, int] | None = None, support_embeddings: np.ndarray | None = None) -> list[SettingResult]:
    """Run the protocol on one split. A setting whose way exceeds the split's classes is skipped
    with a note; when classes have fewer than shot + query images, fewer queries are used and
    the note says so. `confusions` > 0 also lists that many most frequent (true -> predicted)
    class pairs among the wrong queries: which classes the embedding cannot tell apart. With
    `within_groups`, every episode's classes come from one alphabet (see EpisodeSampler). `limits`
    (most ways, most shots) of a head that reads a bounded support set skips the settings beyond it.
    `support_embeddings`: the support samples' own embeddings (support views), else `embeddings`."""
    if embeddings is None:
        embeddings = embed_split(embed, split)
    groups = alphabets(split) if within_groups else None
    largest = split.num_classes if groups is None else max(len(g) for g in groups)
    results = []
    for way, shot in settings:
        if limits and (way > limits[0] or shot > limits[1]):
            results.append(SettingResult(way, shot, 0, 0, float("nan"), float("nan"),
                                         f"skipped: the model reads at most {limits[0]} classes x {limits[1]} shots"))
            continue
        if way > largest:
            where = "the split has" if groups is None else "the largest alphabet has"
            results.append(SettingResult(way, shot, 0, 0, float("nan"), float("nan"),
                                         f"skipped: {where} only {largest} classes"))
            continue
        q, note = query, ""
        if split.min_class_size() < shot + query:
            q = split.min_class_size() - shot
            if q < 1:
                results.append(SettingResult(way, shot, 0, 0, float("nan"), float("nan"),
                                             f"skipped: a class has only {split.min_class_size()} images"))
                continue
            note = f"{q} queries per class instead of {query}: the smallest class has {split.min_class_size()} images"
        sampler = EpisodeSampler(split, way, shot, q, seed=seed, within_groups=within_groups)
        counts = Counter() if confusions > 0 else None
        mean, ci = mean_ci95(episode_accuracies(classify, embeddings, sampler, episodes, counts, support_embeddings))
        result = SettingResult(way, shot, q, episodes, 100 * mean, 100 * ci, note)
        if counts is not None:
            result.errors = sum(counts.values())
            result.confusions = [{"true": split.class_names[t], "predicted": split.class_names[p], "count": n}
                                 for (t, p), n in counts.most_common(confusions)]
        results.append(result)
    return results


def queries_used(results: list[SettingResult], asked: int = 15, smallest: int | None = None) -> str:
    """The queries per class the evaluated settings really used, in words ("15 queries per class", or
    each setting's when a small split gave fewer; `smallest`: its smallest class's images, to say why)."""
    used = [r for r in results if r.episodes]
    if not used:
        return "no setting fits the split"
    if all(r.query == asked for r in used):
        return f"{asked} queries per class"
    why = f"fewer than {asked}: " + (f"the smallest class has {smallest} images" if smallest else "a class is too small")
    per = sorted({r.query for r in used})
    if len(per) == 1:
        return f"{per[0]} queries per class ({why})"
    return "queries per class: " + ", ".join(f"{r.query} at {r.way}-way {r.shot}-shot" for r in used) + f" ({why})"


def _confusion_lines(r: SettingResult) -> list[str]:
    total = max(r.errors or 0, 1)
    return [f"{c['count']:>6} ({100 * c['count'] / total:4.1f}% of errors)  {c['true']} -> {c['predicted']}" for c in r.confusions]


def results_table(results: list[SettingResult]) -> str:
    lines = [f"{'setting':<18} {'queries':>7} {'episodes':>8}  accuracy (95% CI)"]
    for r in results:
        acc = "-" if r.episodes == 0 else f"{r.accuracy:6.2f} +/- {r.ci95:.2f} %"
        lines.append(f"{r.name:<18} {r.query:>7} {r.episodes:>8}  {acc}" + (f"  ({r.note})" if r.note else ""))
    for r in results:
        if r.confusions:
            lines += ["", f"{r.name}: most confused classes ({r.errors} wrong queries in all), true -> predicted"]
            lines += ["  " + line for line in _confusion_lines(r)]
    return "\n".join(lines)


def results_markdown(results: list[SettingResult], title: str, context: dict) -> str:
    lines = [f"# {title}", ""]
    lines += [f"- {k}: {v}" for k, v in context.items()]
    lines += ["", "| setting | queries/class | episodes | accuracy (%) | 95% CI (+/-) | note |", "|---|---|---|---|---|---|"]
    for r in results:
        acc = "-" if r.episodes == 0 else f"{r.accuracy:.2f}"
        ci = "-" if r.episodes == 0 else f"{r.ci95:.2f}"
        lines.append(f"| {r.name} | {r.query} | {r.episodes} | {acc} | {ci} | {r.note} |")
    for r in results:
        if r.confusions:
            lines += ["", f"## {r.name}: most confused classes", "", f"{r.errors} wrong queries in all; true -> predicted:", ""]
            lines += [f"    {line}" for line in _confusion_lines(r)]
    return "\n".join(lines) + "\n"


def results_json(results: list[SettingResult]) -> list[dict]:
    def clean(v):
        return None if isinstance(v, float) and math.isnan(v) else v

    def row(r: SettingResult) -> dict:
        d = {k: clean(v) for k, v in asdict(r).items()}
        if r.errors is None:  # not counted: keep the plain protocol's keys only
            del d["errors"], d["confusions"]
        return {**d, "setting": f"{r.way}w{r.shot}s"}

    return [row(r) for r in results]


def calibrate_open_set(embeddings: np.ndarray, split: FewShotSplit, distance: str, way: int = 5, shot: int = 1,
                       query: int = 5, episodes: int = 500, accept_rate: float = 0.95, seed: int = 0,
                       support_embeddings: np.ndarray | None = None) -> dict:
    """Choose the open-set threshold on a (validation) split.

    Each episode enrolls `way` classes from `shot` samples and asks queries from those classes
    (known) and from `way` other classes (unknown). The threshold is the `accept_rate` quantile of
    the known queries' distance to their nearest prototype, so that share of known queries is
    still answered; the share of unknown queries wrongly accepted at that threshold is reported.
    `support_embeddings`: the enrolled samples' embeddings (support views), else `embeddings`.
    """
    from edgemeta.runtime.heads.common import DISTANCES, prototypes

    dist_fn = DISTANCES[distance]
    # a small dataset's val split: fewer enrolled classes and queries, said in the calibration's text
    asked = (way, query)
    way, query = min(way, split.num_classes // 2), min(query, split.min_class_size() - shot)
    if way < 1 or query < 1:
        raise EdgemetaError(f"open-set calibration needs at least 2 validation classes of at least {shot + 1} images; "
                            f"the val split has {split.num_classes} (raise the val share of [data] fractions)")
    sampler = EpisodeSampler(split, 2 * way, shot, query, seed=seed)
    known, unknown = [], []
    for i in range(episodes):
        _, s, q = sampler.indices(i)
        s, q = s.reshape(2 * way, shot)[:way].ravel(), q.reshape(2 * way, query)
        protos = prototypes((embeddings if support_embeddings is None else support_embeddings)[s],
                            np.repeat(np.arange(way), shot), way)
        known.append(dist_fn(embeddings[q[:way].ravel()], protos).min(axis=1))
        unknown.append(dist_fn(embeddings[q[way:].ravel()], protos).min(axis=1))
    known, unknown = np.concatenate(known), np.concatenate(unknown)
    threshold = float(np.quantile(known, accept_rate))
    return {"threshold": threshold, "known_accept_rate": float(np.mean(known <= threshold)),
            "unknown_accept_rate": float(np.mean(unknown <= threshold)),
            "known_median": float(np.median(known)), "unknown_median": float(np.median(unknown)),
            "calibration": f"{episodes} validation episodes, {way} enrolled classes x {shot} shot, "
                           f"{query} queries from each enrolled and each of {way} unknown classes"
                           + (f" (fewer than {asked[0]} classes x {asked[1]} queries: the val split is small)"
                              if (way, query) != asked else "")}
