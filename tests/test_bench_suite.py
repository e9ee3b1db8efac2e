"""The benchmark suite runs end to end on tiny settings, so that it cannot rot (no timing is asserted).

`python -m benchmarks --smoke`: every script of the suite on the shipped sample characters and the
shipped model, edgemeta's side alone (no peer, no network). The peer's side runs in the same scripts
when learn2learn is installed (benchmarks/peers.py); that path is checked by
`test_the_peer_worker_answers` only where the peer is already set up, since setting it up needs the
package registry.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks import peers, sidebyside

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.tf
def test_the_suite_runs_every_script_on_tiny_settings(tmp_path):
    p = subprocess.run([sys.executable, "-m", "benchmarks", "--smoke", "--out", str(tmp_path)], cwd=REPO,
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    names = ["protonet_side_by_side", "maml_side_by_side", "protonet_budget", "runtime_latency", "runtime_latency_keras",
             "accuracy_plots", "head_scale", "mac_peak"]
    for name in names:
        assert f"{name}: ok" in p.stdout, name
        assert (tmp_path / f"{name}.txt").read_text().strip(), name
    text = {n: (tmp_path / f"{n}.txt").read_text() for n in names}
    assert "| 5w1s2q |" in text["protonet_side_by_side"] and "numerics" in text["protonet_side_by_side"]
    assert "| first order | edgemeta |" in text["maml_side_by_side"] and "left resident by the first" in text["maml_side_by_side"]
    assert "| edgemeta |" in text["protonet_budget"]
    assert "model.predict" in text["runtime_latency_keras"] and "peak RSS" in text["runtime_latency_keras"]
    assert "| 100 |" in text["head_scale"] and "| conv4 | 28x28x1 |" in text["mac_peak"]
    for png in ("accuracy_vs_shots.png", "accuracy_vs_ways.png", "protonet_budget.png"):
        assert (tmp_path / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", png


def test_the_peer_worker_answers(tmp_path):
    root = peers.peers_dir()
    if not peers.l2l_versions(root):
        pytest.skip(f"learn2learn is not set up under {root} (python -m benchmarks.peers needs the package registry)")
    _, splits = sidebyside.load_splits("", ("train",), str(REPO / "samples" / "omniglot"))
    worker = sidebyside.PeerWorker(root, sidebyside.write_arrays(tmp_path / "d.npz", train=splits["train"]), 1)
    try:
        r = worker.ask({"cmd": "protonet", "key": "t", "way": 5, "shot": 1, "query": 2, "episodes": 2})
        assert len(r["ms"]) == 2 and all(x > 0 for x in r["loss"])
        m = worker.ask({"cmd": "maml", "way": 5, "shot": 1, "meta_batch": 2, "steps": 1, "first_order": True,
                        "iterations": 1})
        assert len(m["ms"]) == 1 and m["peak_rss_mb"] > 0 and 0 <= m["call_peak_mb"] <= m["peak_rss_mb"]
    finally:
        worker.close()
    assert json.dumps(worker.info) and os.path.isdir(peers.l2l_examples(root))


@pytest.mark.tf
def test_paired_eval_of_a_model_against_itself_is_a_zero_difference(omniglot_dir):
    p = subprocess.run([sys.executable, "-m", "benchmarks.paired_eval", "models/omniglot-conv4", "models/omniglot-conv4",
                        "--data", str(omniglot_dir), "--episodes", "20", "--settings", "5w1s,20w1s",
                        # one view each: the model's support views (five passes per test image) are tested elsewhere
                        "--support-shift-a", "0", "--support-shift-b", "0"], cwd=REPO,
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    rows = [line.split(" | ") for line in p.stdout.splitlines() if line.startswith(("| 5w1s", "| 20w1s"))]
    assert len(rows) == 2
    for _, acc_a, acc_b, diff in rows:
        assert acc_a == acc_b and 50 < float(acc_a.split()[0]) <= 100
        assert diff.strip(" |") == "+0.00 +/- 0.00"
