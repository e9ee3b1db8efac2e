"""The agent's op table: one handler per operation, `handler(agent, args, attachments) -> result`.

Agent.handle checks the op name and that args is an object, counts the request, then calls the
handler from HANDLERS. Each handler validates its own args and takes `agent.lock` itself, so that
images are decoded outside the lock (Agent.images) and the interpreter and the store are used by
one request at a time. A new operation is one function here and one entry in HANDLERS.
"""

from __future__ import annotations

import json
import time
from typing import Any

from edgemeta.errors import EdgemetaError
from edgemeta.limits import MAX_TOP_K
from edgemeta.runtime.fewshot import UNKNOWN
from edgemeta.runtime.store import EnrollmentStore, check_adapt

OPEN_SET_MODES = ("calibrated", "manual", "off", "model", "show")


def show(value: Any) -> str:
    """A short rendering of a JSON value for an error message."""
    try:
        text = json.dumps(value)
    except (TypeError, ValueError):
        text = type(value).__name__
    return text if len(text) <= 40 else text[:37] + "..."


def _text(args: dict, key: str) -> str:
    value = args.get(key, "")
    if not isinstance(value, str):
        raise EdgemetaError(f"bad request: {key} must be a string, got {show(value)}")
    return value


def _no_classes(agent) -> EdgemetaError:
    return EdgemetaError(f"store {agent.store_dir} has no classes; enroll some first")


def enroll(agent, args: dict, attachments: list) -> dict:
    """One class ({label}), several in one change ({labels, counts}: the attachments in that order, as
    `enroll --from-folders` sends them), or {negative: true} samples for calibration."""
    flags = {k: args.get(k, d) for k, d in (("allow_duplicates", False), ("negative", False), ("keep_samples", True))}
    for k, v in flags.items():
        if not isinstance(v, bool):
            raise EdgemetaError(f"bad request: {k} must be true or false, got {show(v)}")
    adapt = (args["adapt"], args.get("lr")) if args.get("adapt") is not None else None
    if adapt is not None:
        check_adapt(*adapt)  # before the images are decoded
    if flags["negative"]:
        if adapt is not None or "label" in args or "labels" in args:
            raise EdgemetaError("bad request: negative samples take no label and no adapt")
        images = agent.images(attachments)
        with agent.lock:
            return {"negatives": agent.rt.enroll_negatives(agent.store_dir, images), "added": len(images)}
    if "labels" in args:
        labels, counts = args.get("labels"), args.get("counts")
        if (not isinstance(labels, list) or not labels or not all(isinstance(x, str) for x in labels)
                or not isinstance(counts, list) or len(counts) != len(labels)
                or any(isinstance(n, bool) or not isinstance(n, int) or n < 1 for n in counts)
                or not isinstance(attachments, (list, tuple)) or sum(counts) != len(attachments)):
            raise EdgemetaError("bad request: labels (names) and counts (images of each, in attachment order) must "
                                "be lists of the same length whose counts add up to the attachments")
    else:
        labels, counts = [_text(args, "label")], [len(attachments) if isinstance(attachments, (list, tuple)) else 0]
    images = agent.images(attachments)
    classes, at = [], 0
    for label, n in zip(labels, counts, strict=True):
        classes.append((label, images[at:at + n], None))
        at += n
    with agent.lock:
        done = agent.rt.enroll_classes(agent.store_dir, classes, keep_samples=flags["keep_samples"], adapt=adapt,
                                       allow_duplicates=flags["allow_duplicates"])
    out = [{"label": c[0].strip(), "samples": d.samples, "added": d.added, "duplicates": d.duplicates}
           for c, d in zip(classes, done, strict=True)]
    return {"classes": out} if "labels" in args else out[0]


def classify(agent, args: dict, attachments: list) -> dict:
    top_k = args.get("top_k", 1)
    if isinstance(top_k, bool) or not isinstance(top_k, int) or not 1 <= top_k <= MAX_TOP_K:
        raise EdgemetaError(f"bad request: top_k must be a whole number from 1 to {MAX_TOP_K}, got {show(top_k)}")
    images = agent.images(attachments)
    with agent.lock:
        if agent.load() is None or agent._head is None:
            raise _no_classes(agent)
        return {"results": agent._head.classify(agent.rt.embedder(images), top_k, unknown=UNKNOWN)}


def forget(agent, args: dict, attachments: list) -> dict:
    label = _text(args, "label")
    with agent.lock, EnrollmentStore.locked(agent.store_dir):
        store = agent.rt.open_store(agent.store_dir)
        out = {"label": label, "removed": store.forget(label)}
        agent.rt.save(store)
    return out


def rename(agent, args: dict, attachments: list) -> dict:
    old, new = _text(args, "old"), _text(args, "new")
    with agent.lock, EnrollmentStore.locked(agent.store_dir):
        store = agent.rt.open_store(agent.store_dir)
        store.rename(old, new)
        agent.rt.save(store)
    return {"old": old, "new": new.strip()}


def adapt(agent, args: dict, attachments: list) -> dict:
    with agent.lock:
        return agent.rt.adapt(agent.store_dir, args.get("steps"), args.get("lr"))


def calibrate(agent, args: dict, attachments: list) -> dict:
    """{mode: calibrated (accept | false_accept) | manual (threshold) | off | model | show}, as `edgemeta calibrate`."""
    mode = args.get("mode", "calibrated")
    if mode not in OPEN_SET_MODES:
        raise EdgemetaError(f"bad request: mode must be one of {', '.join(OPEN_SET_MODES)}, got {show(mode)}")
    with agent.lock:
        if mode == "show":
            store = agent.load()
            if store is None:
                raise _no_classes(agent)
            return agent.rt.describe_open_set(store)
        numbers = {}
        for key, lo, hi in (("accept", 0, 1), ("false_accept", 0, 1), ("threshold", 0, float("inf"))):
            v = args.get(key)
            if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or not lo <= v < hi
                                  or (key != "threshold" and v == 0)):
                raise EdgemetaError(f"bad request: {key} out of range, got {show(v)}")
            numbers[key] = v
        if mode == "calibrated" and numbers["accept"] is None and numbers["false_accept"] is None:
            numbers["accept"] = 0.95
        if mode == "manual" and numbers["threshold"] is None:
            raise EdgemetaError("bad request: mode manual needs a threshold")
        return agent.rt.set_open_set(agent.store_dir, mode, **numbers)


def reenroll(agent, args: dict, attachments: list) -> dict:
    with agent.lock:
        return {"samples": agent.rt.reenroll(agent.store_dir), "model": agent.rt.manifest.name}


def new_store(agent, args: dict, attachments: list) -> dict:
    with agent.lock:
        kept = EnrollmentStore.archive(agent.store_dir)
        return {"archived": str(kept) if kept else None}


def classes(agent, args: dict, attachments: list) -> dict:
    with agent.lock:
        store = agent.load()
        return {"classes": store.counts() if store else {}, "backbone": agent.rt.backbone,
                "head": agent.rt.describe_head(store) if store else None}


def status(agent, args: dict, attachments: list) -> dict:
    with agent.lock:
        store = agent.load()
        return {"model": agent.rt.manifest.name, "variant": agent.rt.variant.name, "runtime": agent.rt.embedder.runtime,
                "classes": len(store.class_names) if store else 0, "requests": agent.requests,
                "uptime_s": round(time.monotonic() - agent.started, 1)}


def auth(agent, args: dict, attachments: list) -> dict:
    """Only reaches here where no token is needed (serve_lines checks a token before any request)."""
    return {"token": "not needed"}


# In the order error messages list them; `auth` last, since it is not listed.
HANDLERS = {"enroll": enroll, "classify": classify, "classes": classes, "forget": forget, "rename": rename,
            "adapt": adapt, "calibrate": calibrate, "reenroll": reenroll, "new_store": new_store, "status": status,
            "auth": auth}
OPS = tuple(HANDLERS)
