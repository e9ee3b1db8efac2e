"""Manifests and stores are checked against their schema as they are read (edgemeta/schema.py):
a damaged or hand-edited one is one error line naming the file and the field (exit 2 from the CLI, an
error answer from the agent), and a failed operation never rewrites the store."""

import base64
import hashlib
import json
import math
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edgemeta.errors import EdgemetaError
from edgemeta.runtime.fewshot import FewShotRuntime
from edgemeta.runtime.manifest import read_manifest
from edgemeta.runtime.store import STORE_FILE, EnrollmentStore
from tests.support.builders import drawings
from tests.support.cli import one_line_error, run

SHIPPED = Path(__file__).resolve().parents[1] / "models" / "omniglot-conv4"
IMG = drawings("Keble_character01", [1])[0]
# the keys of a manifest the runtime reads (the rest, evaluation figures and the like, is for people)
READ_KEYS = ("format", "name", "embedding_dim", "distance", "preprocess", "variants", "default_variant")
VARIANT_KEYS = ("file", "sha256", "quantization", "static_batch", "open_set_threshold")


def one_line(e: pytest.ExceptionInfo, *fragments: str) -> str:
    msg = str(e.value)
    assert msg and "\n" not in msg, msg
    for f in fragments:
        assert f in msg, msg
    return msg


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    """The shipped model without its training files (a board's copy)."""
    dst = tmp_path_factory.mktemp("model") / "m"
    shutil.copytree(SHIPPED, dst, ignore=shutil.ignore_patterns("model.keras", "*.png", "*.csv"))
    return dst


@pytest.fixture(scope="module")
def rt(model) -> FewShotRuntime:
    return FewShotRuntime(model)


@pytest.fixture(scope="module")
def good_store(tmp_path_factory, rt) -> dict[str, np.ndarray]:
    """The arrays of a valid store of two classes with an adapted head (so it has every optional key)."""
    folder = tmp_path_factory.mktemp("good") / "s"
    rt.enroll(folder, "alpha", drawings("Keble_character01", [1, 2]), adapt=(5, 0.05))
    rt.enroll(folder, "beta", drawings("Keble_character02", [1, 2]))
    with np.load(folder / STORE_FILE) as z:
        return {k: z[k] for k in z.files}


def write_store(folder: Path, arrays: dict) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    np.savez(folder / STORE_FILE, **arrays)
    return folder


def meta_change(change):
    """A store mutation that edits the meta JSON in place (`change(meta)`)."""
    def mutate(a):
        meta = json.loads(str(a["meta"]))
        change(meta)
        a["meta"] = np.array(json.dumps(meta))
    return mutate


def setitem(key, value):
    def mutate(a):
        a[key] = value(a[key]) if callable(value) else value
    return mutate


def _nan_row(e):
    e = e.copy()
    e[1, 3] = np.nan
    return e


def _inf(e):
    e = e.copy()
    e[0, 0] = np.inf
    return e


def _neg(labels):
    labels = labels.copy()
    labels[0] = -1
    return labels


# (case, mutation of a valid store's arrays, what the one error line must say)
BAD_STORES = [
    ("negative label", setitem("labels", _neg), "labels must be class indices from 0 to 1, got -1"),
    ("label past the classes", setitem("labels", lambda v: v + 5), "labels must be class indices from 0 to 1"),
    ("huge label (wraps in int32)", setitem("labels", lambda v: v.astype(np.int64) + 2**32), "labels must be class indices"),
    ("float labels", setitem("labels", lambda v: v.astype(np.float32)), "labels must be an int array of shape (4,)"),
    ("labels 2-D", setitem("labels", lambda v: v[:, None]), "labels must be an int array"),
    ("fewer labels than embeddings", setitem("labels", lambda v: v[:3]), "labels must be an int array of shape (4,)"),
    ("embeddings of another dimension", setitem("embeddings", lambda e: e[:, :10]),
     "embeddings must be a float array of shape (n, 64), got float32 (4, 10)"),
    ("NaN embedding", setitem("embeddings", _nan_row), "embeddings must be finite"),
    ("infinite embedding", setitem("embeddings", _inf), "embeddings must be finite"),
    ("integer embeddings", setitem("embeddings", lambda e: e.astype(np.int32)), "embeddings must be a float array"),
    ("string embeddings", setitem("embeddings", lambda e: e.astype(str)), "embeddings must be a float array"),
    ("duplicate class", setitem("class_names", np.array(["alpha", "alpha"])), "class_names[1] repeats an earlier class"),
    ("empty class name", setitem("class_names", np.array(["alpha", " "])), "class_names[1] is not a valid label"),
    ("class without samples", setitem("class_names", np.array(["alpha", "beta", "gamma"])), "class 'gamma' has none"),
    ("class names not strings", setitem("class_names", np.array([1, 2])), "class_names must be a str array"),
    ("samples not uint8", lambda a: a.update(samples=np.zeros((4, 28, 28, 1), np.float32)), "samples must be a uint8 array"),
    ("meta not JSON", setitem("meta", np.array("{nope")), "meta is not valid JSON"),
    ("meta a list", setitem("meta", lambda t: np.array(json.dumps([json.loads(str(t))]))), "meta must be an object, got [{"),
    ("huge embedding", setitem("embeddings", lambda e: e * 1e30), "embeddings must hold values within"),
    ("meta format a string", meta_change(lambda m: m.update(format="1")), 'has store format "1"'),
    ("backbone a list", meta_change(lambda m: m.update(backbone=[1])), "meta.backbone must be an object, got [1]"),
    ("backbone without sha256", meta_change(lambda m: m["backbone"].pop("sha256")), "meta.backbone.sha256 is missing"),
    ("embedding_dim a string", meta_change(lambda m: m["backbone"].update(embedding_dim="64")),
     'meta.backbone.embedding_dim must be an integer, got "64"'),
    ("model_path a number", meta_change(lambda m: m["backbone"].update(model_path=3)), "meta.backbone.model_path must be a string"),
    ("adapt a list", meta_change(lambda m: m.update(adapt=[5])), "meta.adapt must be an object"),
    ("adapt steps a string", meta_change(lambda m: m["adapt"].update(steps="5")), "meta.adapt.steps must be an integer"),
    ("adapt steps negative", meta_change(lambda m: m["adapt"].update(steps=-5)), "meta.adapt.steps must be an integer from 0"),
    ("adapt lr NaN", meta_change(lambda m: m["adapt"].update(lr=math.nan)), "meta.adapt.lr must be a number or null (finite)"),
    ("adapt lr zero", meta_change(lambda m: m["adapt"].update(lr=0)), "meta.adapt.lr must be a positive number"),
    ("head a list", meta_change(lambda m: m.update(head=[])), "meta.head must be an object"),
    ("head steps a string", meta_change(lambda m: m["head"].update(steps="5")), "meta.head.steps must be an integer"),
    ("head key a number", meta_change(lambda m: m["head"].update(key=1)), "meta.head.key must be a string"),
    ("adapted head NaN", setitem("head_w", lambda w: w * np.nan), "head_w must be finite"),
    ("head rate NaN", setitem("head_rates_w", lambda r: r * np.nan), "head_rates_w must be finite"),
    ("head rates of another length", setitem("head_rates_b", lambda r: np.concatenate([r, r])), "one rate per step"),
    # the shipped model enrolls with support views: its stores keep one-view embeddings beside them
    ("query embeddings missing", lambda a: a.pop("query_embeddings"), "query_embeddings is missing"),
    ("query embeddings of fewer samples", setitem("query_embeddings", lambda e: e[:3]),
     "query_embeddings must be a float array of shape (4, 64)"),
    ("NaN query embedding", setitem("query_embeddings", _nan_row), "query_embeddings must be finite"),
    ("query embeddings without views", meta_change(lambda m: m["backbone"].pop("support_shift")),
     "query_embeddings is there, but the store's model enrolls without support views"),
    ("support_shift a string", meta_change(lambda m: m["backbone"].update(support_shift="3")),
     "meta.backbone.support_shift must be an integer"),
]


@pytest.mark.parametrize("case,mutate,fragment", BAD_STORES, ids=[c[0] for c in BAD_STORES])
def test_damaged_stores_are_one_line_errors_and_never_rewritten(rt, good_store, tmp_path, case, mutate, fragment):
    arrays = dict(good_store)
    mutate(arrays)
    folder = write_store(tmp_path / "s", arrays)
    before = (folder / STORE_FILE).read_bytes()
    with pytest.raises(EdgemetaError) as e:
        EnrollmentStore.open(folder)
    one_line(e, str(folder / STORE_FILE), fragment)
    # every operation refuses it the same way, and none writes
    for op in (lambda: rt.enroll(folder, "gamma", drawings("Keble_character03", [1])),
               lambda: rt.classify(folder, [IMG]), lambda: rt.adapt(folder, 3),
               lambda: EnrollmentStore.update(folder, lambda s: s.forget("alpha"))):
        with pytest.raises(EdgemetaError) as e:
            op()
        one_line(e, fragment)
    assert (folder / STORE_FILE).read_bytes() == before
    assert sorted(p.name for p in folder.iterdir()) in ([STORE_FILE], [".lock", STORE_FILE])


def test_the_good_store_and_optional_keys_still_load(good_store, tmp_path):
    s = EnrollmentStore.open(write_store(tmp_path / "s", good_store))
    assert s.counts() == {"alpha": 2, "beta": 2} and s.head_spec is not None and s.adapt == {"steps": 5, "lr": 0.05}
    older = {k: v for k, v in good_store.items() if not k.startswith("head_") and k != "sample_ids"}  # an older writer's
    meta = json.loads(str(older["meta"]))
    meta.pop("adapt")
    meta["adapt"] = None
    older["meta"] = np.array(json.dumps(meta))
    s = EnrollmentStore.open(write_store(tmp_path / "old", older))
    assert s.head_spec is None and s.adapt is None
    empty = dict(older, embeddings=np.zeros((0, 64), np.float32), labels=np.zeros(0, np.int32),
                 class_names=np.zeros(0, "<U1"), query_embeddings=np.zeros((0, 64), np.float32),
                 **{k: older[k][:0] for k in ("samples", "sample_ids") if k in older})  # (stores keep samples by default)
    assert EnrollmentStore.open(write_store(tmp_path / "empty", empty)).counts() == {}


def test_a_store_whose_dimension_disagrees_with_its_model_is_refused(rt, good_store, tmp_path):
    # consistent in itself (32-dimensional embeddings, embedding_dim 32) but the model's are 64
    arrays = {k: v for k, v in good_store.items() if not k.startswith("head_")}
    meta = json.loads(str(arrays["meta"]))
    meta["backbone"]["embedding_dim"] = 32
    meta.pop("adapt")
    meta.pop("head")
    arrays.update(meta=np.array(json.dumps(meta)), embeddings=arrays["embeddings"][:, :32],
                  query_embeddings=arrays["query_embeddings"][:, :32])
    folder = write_store(tmp_path / "s", arrays)
    with pytest.raises(EdgemetaError) as e:
        rt.classify(folder, [IMG])
    one_line(e, "its embeddings have 32 dimensions", "gives 64")


def test_an_operation_never_writes_a_store_it_could_not_read_back(rt, good_store, tmp_path):
    folder = write_store(tmp_path / "s", good_store)
    before = (folder / STORE_FILE).read_bytes()
    s = EnrollmentStore.open(folder)
    with pytest.raises(EdgemetaError, match="NaN, infinite or huge"):
        s.add("gamma", np.full((1, 64), np.nan, np.float32))
    with pytest.raises(EdgemetaError, match="no samples to enroll"):
        s.add("gamma", np.zeros((0, 64), np.float32))
    s.set_head(None)
    s.class_names.append("gamma")  # a bug that left a class without samples: save refuses to write it
    with pytest.raises(EdgemetaError) as e:
        s.save()
    one_line(e, "(not written)", "class 'gamma' has none")
    assert (folder / STORE_FILE).read_bytes() == before


# --- manifests ----------------------------------------------------------------------------------


def _variant(key, value):
    return lambda m: m["variants"]["int8_static"].update({key: value})


BAD_MANIFESTS = [
    ("invert a string", lambda m: m["preprocess"].update(invert="false"), 'preprocess.invert must be a boolean, got "false"'),
    ("invert a number", lambda m: m["preprocess"].update(invert=0), "preprocess.invert must be a boolean, got 0"),
    ("preprocess a list", lambda m: m.update(preprocess=[28, 1]), "preprocess must be an object, got [28, 1]"),
    ("image_size a string", lambda m: m["preprocess"].update(image_size="28"), 'preprocess.image_size must be an integer'),
    ("image_size a float", lambda m: m["preprocess"].update(image_size=28.5), "preprocess.image_size must be an integer"),
    ("image_size too small", lambda m: m["preprocess"].update(image_size=2), "preprocess.image_size must be an integer from 8"),
    ("channels 2", lambda m: m["preprocess"].update(channels=2), "preprocess.channels must be one of 1, 3, got 2"),
    ("channels missing", lambda m: m["preprocess"].pop("channels"), "preprocess.channels is missing"),
    ("embedding_dim a string", lambda m: m.update(embedding_dim="64"), 'embedding_dim must be an integer, got "64"'),
    ("embedding_dim negative", lambda m: m.update(embedding_dim=-64), "embedding_dim must be an integer from 1"),
    ("embedding_dim a boolean", lambda m: m.update(embedding_dim=True), "embedding_dim must be an integer, got true"),
    ("distance unknown", lambda m: m.update(distance="manhattan"), 'distance must be one of "squared_euclidean", "cosine"'),
    ("distance a list", lambda m: m.update(distance=["cosine"]), "distance must be one of"),
    ("name a number", lambda m: m.update(name=7), "name must be a string, got 7"),
    ("variants a list", lambda m: m.update(variants=list(m["variants"].values())), "variants must be an object"),
    ("no variants", lambda m: m.update(variants={}), "variants must name at least one variant"),
    ("a variant a string", lambda m: m["variants"].update(int8="int8.tflite"), 'variants.int8 must be an object, got "int8.tflite"'),
    ("a variant named with a newline", lambda m: m["variants"].update({"a\nb": 1}), 'variants."a\\nb" must be an object'),
    ("threshold NaN", _variant("open_set_threshold", math.nan),
     "variants.int8_static.open_set_threshold must be a number or null (finite), got NaN"),
    ("threshold infinite", _variant("open_set_threshold", math.inf), "open_set_threshold must be a number or null (finite)"),
    ("threshold a string", _variant("open_set_threshold", "22.6"), 'open_set_threshold must be a number or null, got "22.6"'),
    ("threshold negative", _variant("open_set_threshold", -1), "open_set_threshold must be a number at least 0, got -1"),
    ("static_batch a string", _variant("static_batch", "1"), "variants.int8_static.static_batch must be an integer or null"),
    ("static_batch zero", _variant("static_batch", 0), "static_batch must be an integer at least 1"),
    ("file a path", _variant("file", "../../etc/passwd"), "variants.int8_static.file must be a file name beside the manifest"),
    ("file a number", _variant("file", 3), "variants.int8_static.file must be a string"),
    ("sha256 missing", lambda m: m["variants"]["int8_static"].pop("sha256"), "variants.int8_static.sha256 is missing"),
    ("default variant a number", lambda m: m.update(default_variant=0), "default_variant must be one of"),
    ("default variant missing", lambda m: m.pop("default_variant"), "default_variant is missing"),
    ("format true", lambda m: m.update(format=True), "has manifest format true"),
    ("format 1.0", lambda m: m.update(format=1.0), "has manifest format 1.0"),
]


@pytest.mark.parametrize("case,mutate,fragment", BAD_MANIFESTS, ids=[c[0] for c in BAD_MANIFESTS])
def test_damaged_manifests_are_one_line_errors(tmp_path, case, mutate, fragment):
    m = json.loads((SHIPPED / "manifest.json").read_text())
    mutate(m)
    path = tmp_path / "manifest.json"
    path.write_text(json.dumps(m))
    with pytest.raises(EdgemetaError) as e:
        read_manifest(tmp_path)
    one_line(e, str(path), fragment)


def linear_model(dst: Path, arrays: dict, **section) -> Path:
    """A format-2 copy of the shipped manifest (no .tflite: read_manifest does not open them) with a
    linear head in head.npz."""
    dst.mkdir(parents=True, exist_ok=True)
    np.savez(dst / "head.npz", **arrays)
    m = json.loads((SHIPPED / "manifest.json").read_text())
    m["format"] = 2
    m["head"] = {"kind": "linear", "init": "learned", "steps": 3, "file": "head.npz",
                 "sha256": hashlib.sha256((dst / "head.npz").read_bytes()).hexdigest(), **section}
    (dst / "manifest.json").write_text(json.dumps(m))
    return dst


HEAD = {"rates_w": np.array([0.01], np.float32), "rates_b": np.array([0.01], np.float32),
        "w0": np.zeros((64, 5), np.float32), "b0": np.zeros(5, np.float32)}
BAD_HEADS = [
    ("w0 of another dimension", {"w0": np.zeros((32, 5), np.float32)}, {}, "w0 must be a float array of shape (64, n)"),
    ("b0 of another way", {"b0": np.zeros(4, np.float32)}, {}, "b0 must be a float array of shape (5,)"),
    ("w0 integers", {"w0": np.zeros((64, 5), np.int64)}, {}, "w0 must be a float array"),
    ("b0 NaN", {"b0": np.full(5, np.nan, np.float32)}, {}, "b0 must be finite"),
    ("rates strings", {"rates_w": np.array(["0.1"])}, {}, "rates_w must be a float array"),
    ("rates a scalar", {"rates_w": np.array(0.1, np.float32)}, {}, "rates_w must be a float array of shape (n,)"),
    ("per-parameter rates of another shape", {"rates_w": np.zeros((1, 64, 4), np.float32)}, {},
     "rates_w must be a float array of shape (n, 64, 5)"),
    ("no rates", {"rates_b": np.zeros(0, np.float32), "rates_w": np.zeros(0, np.float32)}, {}, "one rate per step"),
    ("steps negative", {}, {"steps": -1}, "head.steps must be an integer from 0 to 1000, got -1"),
    ("per_parameter_rates a string", {}, {"per_parameter_rates": "false"}, "head.per_parameter_rates must be a boolean"),
    ("head file a path", {}, {"file": "a/head.npz"}, "head.file must be a file name beside the manifest"),
    ("sha256 a list", {}, {"sha256": ["x"]}, "head.sha256 must be a string"),
]


@pytest.mark.parametrize("case,arrays,section,fragment", BAD_HEADS, ids=[c[0] for c in BAD_HEADS])
def test_damaged_linear_heads_are_one_line_errors(tmp_path, case, arrays, section, fragment):
    linear_model(tmp_path, {**HEAD, **arrays}, **section)
    with pytest.raises(EdgemetaError) as e:
        read_manifest(tmp_path)
    one_line(e, str(tmp_path), fragment)


def test_good_manifests_still_load(tmp_path):
    m = read_manifest(SHIPPED)
    assert m.preprocess.invert is True and m.variant().open_set_threshold > 0
    lin = read_manifest(linear_model(tmp_path, HEAD))
    assert lin.head.linear.w0.shape == (64, 5)
    per = {**HEAD, "rates_w": np.full((2, 64, 5), 0.1, np.float32), "rates_b": np.full((2, 5), 0.1, np.float32)}
    assert read_manifest(linear_model(tmp_path / "per", per, per_parameter_rates=True)).head.linear.steps == 3


# --- through the CLI (exit 2, one line) and the agent (an error answer) ---------------------------


def test_cli_exit_2_on_a_bad_manifest_and_a_bad_store(model, good_store, tmp_path):
    bad = tmp_path / "m"
    shutil.copytree(model, bad)
    m = json.loads((bad / "manifest.json").read_text())
    m["preprocess"]["invert"] = "false"  # was read as true: every input silently inverted
    (bad / "manifest.json").write_text(json.dumps(m))
    store = tmp_path / "s"
    one_line_error(run("enroll", "--store", str(store), "--model", str(bad), "--label", "a", IMG),
                   f'error: {bad / "manifest.json"}: preprocess.invert must be a boolean, got "false"; re-export the model')
    m["preprocess"]["invert"], m["variants"] = True, []
    (bad / "manifest.json").write_text(json.dumps(m))
    one_line_error(run("classify", "--store", str(store), "--model", str(bad), IMG), "variants must be an object")
    assert not store.exists()

    arrays = dict(good_store)
    setitem("labels", _neg)(arrays)  # was: exit 1 for classes, and enroll rewrote it still broken
    write_store(store, arrays)
    before = (store / STORE_FILE).read_bytes()
    one_line_error(run("classes", "--store", str(store)), "labels must be class indices from 0 to 1, got -1")
    one_line_error(run("enroll", "--store", str(store), "--model", str(model), "--label", "b", IMG), "labels must be class")
    assert (store / STORE_FILE).read_bytes() == before
    arrays = dict(good_store)
    setitem("embeddings", _nan_row)(arrays)  # was: "unknown (distance nan; ...)" printed as an answer
    write_store(store, arrays)
    one_line_error(run("classify", "--store", str(store), "--model", str(model), IMG), "embeddings must be finite")


def test_the_agent_answers_a_damaged_store_with_an_error(model, good_store, tmp_path):
    from edgemeta.runtime.agent import Agent

    store = tmp_path / "s"
    agent = Agent(model, store)

    def ask(op, args=None, files=()):
        line = json.dumps({"id": 1, "op": op, "args": args or {},
                           "attachments": [base64.b64encode(Path(f).read_bytes()).decode() for f in files]})
        return json.loads(agent.answer_line(line.encode()))

    for mutate, fragment in ((setitem("labels", _neg), "labels must be class indices"),
                             (setitem("embeddings", _nan_row), "embeddings must be finite"),
                             (meta_change(lambda m: m.update(backbone=[])), "meta.backbone must be an object")):
        arrays = dict(good_store)
        mutate(arrays)
        write_store(store, arrays)
        before = (store / STORE_FILE).read_bytes()
        for op, args, files in (("classify", {}, [IMG]), ("enroll", {"label": "c"}, [IMG]), ("forget", {"label": "alpha"}, ()),
                                ("rename", {"old": "alpha", "new": "x"}, ()), ("classes", {}, ()), ("adapt", {"steps": 2}, ())):
            a = ask(op, args, files)
            assert not a["ok"] and fragment in a["error"] and str(store / STORE_FILE) in a["error"], (op, a)
            assert "\n" not in a["error"] and "internal error" not in a["error"]
        assert (store / STORE_FILE).read_bytes() == before
    # and once the store is good again, the agent serves it
    write_store(store, good_store)
    assert ask("classify", {}, [IMG])["ok"]


# --- properties: random damage is loaded or refused in one line, never anything else -----------------

_VALUES = st.one_of(st.none(), st.booleans(), st.integers(-3, 70), st.integers(-2**40, 2**40),
                    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=6),
                    st.sampled_from(["false", "true", "64", "1", "", "../x", "cosine", "int8_static"]),
                    st.lists(st.integers(0, 3), max_size=2), st.dictionaries(st.text(max_size=3), st.integers(), max_size=2))
_DELETE = object()


def _paths(doc, prefix=()):
    """Every (container, key) path inside a JSON document."""
    items = doc.items() if isinstance(doc, dict) else enumerate(doc) if isinstance(doc, list) else ()
    for k, v in items:
        yield (*prefix, k)
        yield from _paths(v, (*prefix, k))


@st.composite
def mutated(draw, doc):
    """A deep copy of `doc` with 1-3 values replaced by other JSON values, or deleted."""
    doc = json.loads(json.dumps(doc))
    for _ in range(draw(st.integers(1, 3))):
        paths = list(_paths(doc))
        if not paths:
            break
        path = draw(st.sampled_from(paths))
        parent = doc
        for k in path[:-1]:
            parent = parent[k]
        value = draw(st.one_of(_VALUES, st.just(_DELETE)))
        if value is _DELETE:
            del parent[path[-1]]
        else:
            parent[path[-1]] = value
    return doc


def _read_keys_only(m: dict) -> dict:
    out = {k: m[k] for k in READ_KEYS}
    out["variants"] = {n: {k: v.get(k) for k in VARIANT_KEYS} for n, v in list(m["variants"].items())[:2]}
    out["default_variant"] = next(iter(out["variants"]))
    return out


FORMAT1 = _read_keys_only(json.loads((SHIPPED / "manifest.json").read_text()))


def _loads_or_refuses_in_one_line(load):
    try:
        return load()
    except EdgemetaError as e:
        assert str(e) and "\n" not in str(e), str(e)
        return None


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(doc=st.one_of(mutated(FORMAT1), mutated(dict(FORMAT1, format=2, head={
    "kind": "linear", "init": "learned", "steps": 3, "file": "head.npz", "per_parameter_rates": False}))))
def test_random_manifest_damage_loads_or_is_one_line(tmp_path_factory, doc):
    folder = tmp_path_factory.mktemp("pm", numbered=True)
    np.savez(folder / "head.npz", **HEAD)
    if isinstance(doc, dict) and isinstance(doc.get("head"), dict):
        doc["head"].setdefault("sha256", hashlib.sha256((folder / "head.npz").read_bytes()).hexdigest())
    (folder / "manifest.json").write_text(json.dumps(doc))
    m = _loads_or_refuses_in_one_line(lambda: read_manifest(folder))
    if m is not None:  # what loads is what the runtime expects
        assert type(m.preprocess.invert) is bool and type(m.embedding_dim) is int and m.embedding_dim >= 1
        for v in m.variants.values():
            assert v.open_set_threshold is None or (math.isfinite(v.open_set_threshold) and v.open_set_threshold >= 0)
        assert m.default_variant in m.variants
    shutil.rmtree(folder)


def _array_damage(a: np.ndarray, how: str, rng: np.random.Generator) -> np.ndarray | None:
    try:
        with warnings.catch_warnings(), np.errstate(all="ignore"):  # lossy casts are the point
            warnings.simplefilter("ignore")
            return _damage(a, how, rng)
    except (ValueError, TypeError, OverflowError):  # e.g. text that is no number: left as it was
        return a


def _damage(a: np.ndarray, how: str, rng: np.random.Generator) -> np.ndarray | None:
    if how == "delete":
        return None
    if how in ("int", "float16", "str", "bool", "complex", "uint8", "int64"):
        return a.astype({"int": np.int32, "str": str}.get(how, how))
    if how == "nan" and a.dtype.kind == "f" and a.size:
        a = a.copy()
        a.flat[rng.integers(a.size)] = rng.choice([np.nan, np.inf, -np.inf])
        return a
    if how == "negative" and a.dtype.kind in "iuf" and a.size:
        a = a.astype(np.int64) if a.dtype.kind == "u" else a.copy()
        a.flat[rng.integers(a.size)] = -rng.integers(1, 2**40)
        return a
    if how == "big" and a.dtype.kind in "iuf" and a.size:
        a = a.copy()
        a.flat[rng.integers(a.size)] = 2**31 - 1 if a.dtype.kind != "f" else 3e38
        return a
    if how == "shorter" and a.ndim and len(a):
        return a[:-1]
    if how == "transpose":
        return a.T
    if how == "scalar":
        return np.asarray(a.flat[0] if a.size else 0)
    if how == "flat":
        return a.reshape(-1)
    return a


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_random_store_damage_loads_or_is_one_line(good_store, tmp_path_factory, data):
    arrays = dict(good_store)
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1)))
    for _ in range(data.draw(st.integers(1, 3))):
        key = data.draw(st.sampled_from(sorted(arrays)))
        how = data.draw(st.sampled_from(["delete", "int", "float16", "str", "bool", "complex", "uint8", "int64", "nan",
                                         "negative", "big", "shorter", "transpose", "scalar", "flat", "meta"]))
        if how == "meta" or key == "meta" and data.draw(st.booleans()):
            meta = json.loads(str(good_store["meta"]))
            arrays["meta"] = np.array(json.dumps(data.draw(mutated(meta))))
            continue
        damaged = _array_damage(arrays[key], how, rng)
        if damaged is None:
            del arrays[key]
        else:
            arrays[key] = damaged
    folder = write_store(tmp_path_factory.mktemp("ps", numbered=True) / "s", arrays)
    s = _loads_or_refuses_in_one_line(lambda: EnrollmentStore.open(folder))
    if s is not None:  # what loads can be used and written back
        assert np.isfinite(s.embeddings).all() and s.labels.dtype == np.int32
        assert len(s.labels) == len(s.embeddings) and (len(s.labels) == 0 or 0 <= s.labels.min() <= s.labels.max() < len(s.class_names))
        assert sum(s.counts().values()) == len(s.labels)
        if _loads_or_refuses_in_one_line(lambda: s.save() or True):  # refused: a head that diverges
            assert EnrollmentStore.open(folder).class_names == s.class_names
    shutil.rmtree(folder.parent)


def test_schema_helpers():
    from edgemeta.schema import Doc, Obj, array

    doc = Doc("f.json", "fix it")
    o = Obj(doc, {"n": 2, "x": 1.5, "b": False, "s": "a", "z": None})
    assert o.get("n", int, min=0) == 2 and o.get("n", float) == 2.0 and type(o.get("n", float)) is float
    assert o.get("b", bool) is False and o.get("z", int, nullable=True) is None and o.get("q", int, default=7) == 7
    for key, kind, fragment in (("n", bool, "n must be a boolean, got 2"), ("b", int, "b must be an integer, got false"),
                                ("s", int, 'got "a"'), ("q", int, "q is missing"), ("z", int, "got null")):
        with pytest.raises(EdgemetaError) as e:
            o.get(key, kind)
        assert str(e.value).startswith("f.json: ") and fragment in str(e.value) and str(e.value).endswith("; fix it")
    with pytest.raises(EdgemetaError, match="x must be a number from 0 to 1, got 1.5"):
        o.get("x", float, min=0, max=1)
    with pytest.raises(EdgemetaError, match="top must be an object"):
        Obj(doc, [1], "top")
    with pytest.raises(EdgemetaError, match=r"a must be a float array of shape \(n, 3\), got float32 \(2, 4\)"):
        array(doc, "a", np.zeros((2, 4), np.float32), "float", (None, 3))
    with pytest.raises(EdgemetaError, match="a is missing"):
        array(doc, "a", None, "float", (None,))
