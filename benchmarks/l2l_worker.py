"""The learn2learn side of the side-by-side benchmarks: run by the peer's own Python (benchmarks/peers.py),
never by edgemeta's; it imports torch, numpy, learn2learn and the peer's own example scripts, nothing of
edgemeta. It answers one JSON line per JSON command line on stdin:

    {"cmd": "setup", "data": "episodes.npz", "threads": 2, "examples": "DIR", "seed": 0}
    {"cmd": "protonet", "key": "60w5s5q", "way": 60, "shot": 5, "query": 5, "episodes": 3, "lr": 0.001}
        -> {"ms": [...per episode, sampling included], "sample_ms": [...], "loss": [...]}
    {"cmd": "embed", "key": "...", "out": "val_embeddings.npy"}      (eval mode, the model of "key")
    {"cmd": "maml", "way": 5, "shot": 1, "meta_batch": 32, "steps": 1, "first_order": false, "iterations": 2,
     "net": "cnn4" | "omniglot_cnn"}
        (the model of those settings is kept across calls)
        -> {"ms": [...per meta-batch, sampling included], "sample_ms": [...its task sampling], "peak_rss_mb": ...,
            "base_rss_mb": ..., "call_peak_mb": peak above the RSS when this call started, "rss_mb": RSS at its end}
    {"cmd": "quit"}

ProtoNet is learn2learn's `examples/vision/protonet_miniimagenet.py`: its `Convnet` (CNN4Backbone, here
with 1 input channel for Omniglot) and its `fast_adapt` episode loss, tasks drawn by learn2learn's own
`Taskset` (NWays, KShots, LoadData, RemapLabels) over the same images edgemeta trains on. MAML is
`examples/vision/maml_omniglot.py`'s `fast_adapt` with `l2l.algorithms.MAML` around learn2learn's `CNN4`
with max-pooling, 1 channel and a 64-d embedding (the Conv-4 edgemeta trains), or around its `OmniglotCNN`
(Finn et al.'s strided Conv-4; the example's default model is the fully connected OmniglotFC).
"""

from __future__ import annotations

import json
import os
import resource
import sys
import time


def rss_mb(field: str = "VmRSS") -> float:
    """This process's resident memory (VmRSS), or its peak since start or the last reset_peak (VmHWM), in MB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return 0.0


def reset_peak() -> float:
    """Restart this process's peak-RSS count (Linux: 5 into /proc/self/clear_refs); returns the RSS now."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return rss_mb()


def main() -> None:
    proto_out = os.fdopen(os.dup(1), "w", buffering=1)
    sys.stdout = sys.stderr  # anything the peer prints stays off the protocol
    state: dict = {}
    for line in sys.stdin:
        msg = json.loads(line)
        cmd = msg["cmd"]
        if cmd == "quit":
            break
        reply = COMMANDS[cmd](state, msg)
        proto_out.write(json.dumps(reply) + "\n")


def setup(state: dict, msg: dict) -> dict:
    threads = int(msg["threads"])
    os.environ.setdefault("OMP_NUM_THREADS", str(threads))
    import numpy as np
    import torch

    torch.set_num_threads(threads)
    try:
        torch.set_num_interop_threads(threads)
    except RuntimeError:  # already set in this process
        pass
    import learn2learn as l2l

    sys.path.insert(0, msg["examples"])
    import maml_omniglot
    import protonet_miniimagenet

    torch.manual_seed(msg.get("seed", 0))
    data = np.load(msg["data"], allow_pickle=False)
    state.update(np=np, torch=torch, l2l=l2l, proto=protonet_miniimagenet, maml=maml_omniglot, models={})
    # uint8 (N, H, W, C) as edgemeta preprocessed them, scaled to [0, 1] as edgemeta's step does, NCHW for torch
    for split in ("train", "val"):
        if f"{split}_images" in data:
            images = torch.from_numpy(data[f"{split}_images"]).permute(0, 3, 1, 2).float().div_(255.0).contiguous()
            state[split] = (images, torch.from_numpy(data[f"{split}_labels"].astype(np.int64)))
    images, labels = state["train"]
    dataset = l2l.data.MetaDataset(torch.utils.data.TensorDataset(images, labels))
    state["dataset"], state["tasksets"] = dataset, {}
    state["base_rss_mb"] = rss_mb()  # libraries and data loaded, nothing trained yet
    return {"torch": torch.__version__, "learn2learn": l2l.__version__, "threads": torch.get_num_threads(),
            "interop_threads": torch.get_num_interop_threads(), "train_images": int(images.shape[0]),
            "import_rss_mb": round(rss_mb(), 1)}


def taskset(state: dict, way: int, samples: int):
    key = (way, samples)
    if key not in state["tasksets"]:
        l2l, ds = state["l2l"], state["dataset"]
        from learn2learn.data.transforms import KShots, LoadData, NWays, RemapLabels

        state["tasksets"][key] = l2l.data.Taskset(ds, task_transforms=[NWays(ds, way), KShots(ds, samples),
                                                                       LoadData(ds), RemapLabels(ds)], num_tasks=-1)
    return state["tasksets"][key]


def protonet(state: dict, msg: dict) -> dict:
    torch, proto = state["torch"], state["proto"]
    way, shot, query = msg["way"], msg["shot"], msg["query"]
    if msg["key"] not in state["models"]:
        torch.manual_seed(msg.get("seed", 0))
        model = proto.Convnet(x_dim=1)
        state["models"][msg["key"]] = (model, torch.optim.Adam(model.parameters(), lr=msg.get("lr", 1e-3)))
    model, optimizer = state["models"][msg["key"]]
    tasks = taskset(state, way, shot + query)
    device = torch.device("cpu")
    model.train()
    ms, sample_ms, losses = [], [], []
    deadline = time.perf_counter() + msg["seconds"] if msg.get("seconds") else None
    n = msg.get("episodes", 0)
    while (deadline is None and len(ms) < n) or (deadline is not None and time.perf_counter() < deadline):
        t0 = time.perf_counter()
        data, labels = tasks.sample()
        batch = (data.unsqueeze(0), labels.unsqueeze(0))  # as the example's DataLoader hands it over
        t1 = time.perf_counter()
        loss, _ = proto.fast_adapt(model, batch, way, shot, query, metric=proto.pairwise_distances_logits, device=device)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss.item()))
        t2 = time.perf_counter()
        ms.append(1000 * (t2 - t0))
        sample_ms.append(1000 * (t1 - t0))
    return {"ms": ms, "sample_ms": sample_ms, "loss": losses}


def embed(state: dict, msg: dict) -> dict:
    torch, np = state["torch"], state["np"]
    model, _ = state["models"][msg["key"]]
    model.eval()
    images = state[msg.get("split", "val")][0]
    with torch.no_grad():
        out = torch.cat([model(images[i:i + 1000]) for i in range(0, len(images), 1000)])
    np.save(msg["out"], out.numpy().astype(np.float32))
    model.train()
    return {"shape": list(out.shape)}


def maml(state: dict, msg: dict) -> dict:
    torch, l2l, example = state["torch"], state["l2l"], state["maml"]
    way, shot, meta_batch = msg["way"], msg["shot"], msg["meta_batch"]
    net = msg.get("net", "cnn4")
    key = ("maml", way, shot, msg["first_order"], msg["steps"], net)
    if key not in state["models"]:
        torch.manual_seed(msg.get("seed", 0))
        if net == "cnn4":  # the max-pooled Conv-4 (28 -> 14 -> 7 -> 3 -> 1, 64-d), the network edgemeta trains
            model = l2l.vision.models.CNN4(way, hidden_size=64, layers=4, channels=1, max_pool=True, embedding_size=64)
        else:  # "omniglot_cnn": the example's, Finn et al.'s strided convolutions (about 4x fewer multiply-adds)
            model = l2l.vision.models.OmniglotCNN(way)
        wrapped = l2l.algorithms.MAML(model, lr=msg.get("fast_lr", 0.4), first_order=msg["first_order"])
        state["models"][key] = (wrapped, torch.optim.Adam(wrapped.parameters(), msg.get("meta_lr", 0.001)))
    wrapped, opt = state["models"][key]
    loss = torch.nn.CrossEntropyLoss(reduction="mean")
    tasks = taskset(state, way, 2 * shot)  # the example: 2 * shots samples per class, half to adapt
    device = torch.device("cpu")
    ms, sample_ms = [], []
    start_rss = reset_peak()
    for _ in range(msg["iterations"]):
        t0 = time.perf_counter()
        sampling = 0.0
        opt.zero_grad()
        for _task in range(meta_batch):
            learner = wrapped.clone()
            ts = time.perf_counter()
            data, labels = tasks.sample()
            sampling += time.perf_counter() - ts
            error, _ = example.fast_adapt((data, labels), learner, loss, msg["steps"], shot, way, device)
            error.backward()
        for p in wrapped.parameters():
            p.grad.data.mul_(1.0 / meta_batch)
        opt.step()
        ms.append(1000 * (time.perf_counter() - t0))
        sample_ms.append(1000 * sampling)
    return {"ms": ms, "sample_ms": sample_ms, "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
            "base_rss_mb": round(state["base_rss_mb"], 1), "call_peak_mb": round(rss_mb("VmHWM") - start_rss, 1),
            "rss_mb": round(rss_mb(), 1)}


COMMANDS = {"setup": setup, "protonet": protonet, "embed": embed, "maml": maml}

if __name__ == "__main__":
    main()
