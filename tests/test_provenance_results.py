"""JSON results say where they came from: lina and torch versions, command line, commit, cores, time."""

import json

from lina.cli import main
from lina.data.routing_trace import synthetic_trace

KEYS = {"lina", "torch", "command", "git_commit", "cores", "time_utc"}


def _provenance(path) -> dict:
    prov = json.loads(path.read_text())["provenance"]
    assert KEYS <= set(prov), prov
    return prov


def test_bench_layer_json_has_provenance(tmp_path):
    out = tmp_path / "layer.json"
    assert (
        main(
            [
                "bench",
                "layer",
                "--quick",
                "--tokens",
                "64",
                "--d-model",
                "16",
                "--d-ff",
                "32",
                "--repeats",
                "1",
                "--json",
                str(out),
            ]
        )
        == 0
    )
    assert _provenance(out)["cores"] >= 1


def test_analyze_json_has_provenance(tmp_path):
    trace = synthetic_trace(200, 3, 4, tokens_per_seq=20).save(tmp_path / "t.npz")
    out = tmp_path / "analysis.json"
    assert (
        main(
            [
                "analyze",
                "trace",
                str(trace),
                "--json",
                str(out),
                "--estimators",
                "path",
                "--path-lens",
                "1,2",
                "--devices",
                "2",
            ]
        )
        == 0
    )
    _provenance(out)


def test_sim_json_has_provenance(tmp_path):
    out = tmp_path / "sim.json"
    assert main(["sim", "--scenario", "testbed-txl-e4", "--json", str(out), "--policies", "ddp-overlap,lina"]) == 0
    _provenance(out)
