"""Every command checks its input before it starts work: a message with the fix, exit code 2."""

import os
import pickle

import numpy as np
import pytest

from lina.cli import main
from lina.config import TrainConfig
from lina.errors import ConfigError, ConfigErrors


class _RunsCode:
    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_bench_layer_rejects_zero_experts(capsys):
    assert main(["bench", "layer", "--experts", "0"]) == 2
    err = capsys.readouterr().err
    assert "--experts" in err and "Fix:" in err and "Traceback" not in err


def test_bench_layer_reports_every_bad_option(capsys):
    assert main(["bench", "layer", "--tokens", "0", "--experts", "2", "--top-k", "3"]) == 2
    err = capsys.readouterr().err
    assert "--tokens" in err and "--top-k" in err


@pytest.mark.parametrize("content", ["text", "pickle", "foreign-npz"])
def test_analyze_trace_refuses_files_that_are_not_traces(tmp_path, capsys, content):
    path = tmp_path / "t.npz"
    marker = tmp_path / "code-ran"
    if content == "text":
        path.write_text("hello\n")
    elif content == "pickle":
        path.write_bytes(pickle.dumps(_RunsCode(str(marker))))
    else:
        np.savez(path, experts=np.zeros(3))
    assert main(["analyze", "trace", str(path)]) == 2
    err = capsys.readouterr().err
    assert "Fix:" in err and "allow_pickle" not in err and "Traceback" not in err
    assert not marker.exists(), "loading the file ran its code"


def test_analyze_trace_refuses_a_pickled_npz_member(tmp_path, capsys):
    path = tmp_path / "objects.npz"
    np.savez(path, meta=np.array([{"format": "x"}], dtype=object))
    assert main(["analyze", "trace", str(path)]) == 2
    err = capsys.readouterr().err
    assert "pickled" in err and "allow_pickle" not in err


def test_analyze_trace_missing_file_says_what_to_pass(tmp_path, capsys):
    assert main(["analyze", "trace", str(tmp_path / "missing.npz")]) == 2
    err = capsys.readouterr().err
    assert "not found" in err and "--record-trace" in err


@pytest.mark.parametrize(
    "argv,usage",
    [
        (["train", "--no-such-option"], "usage: lina train"),
        (["bench", "layer", "--no-such-option"], "usage: lina bench layer"),
        (["analyze", "trace", "x.npz", "--no-such-option"], "usage: lina analyze trace"),
    ],
)
def test_unknown_option_prints_the_subcommands_usage(argv, usage, capsys):
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert usage in err and "--no-such-option" in err


def test_config_problems_are_all_reported_with_suggestions():
    problems: list[ConfigError] = []
    cfg = TrainConfig.from_dict(
        {"stpes": 3, "schedule": "lina", "batch_size": "x", "workers": 0, "model": {"n_layer": 4, "top_k": 9}}, problems
    )
    problems += cfg.problems()
    fields = {p.field for p in problems}
    assert {"stpes", "batch_size", "workers", "model.n_layer", "model.top_k"} <= fields
    by_field = {p.field: p for p in problems}
    assert "did you mean 'steps'" in by_field["stpes"].problem
    assert "did you mean 'n_layers'" in by_field["model.n_layer"].problem


def test_several_config_errors_keep_the_one_error_interface():
    with pytest.raises(ConfigErrors) as info:
        TrainConfig.from_dict({"workers": 0, "steps": 0, "schedule": "fastest"}).validate()
    err = info.value
    assert isinstance(err, ConfigError) and err.exit_code == 2
    assert err.field == err.errors[0].field and err.problem and err.fix
    assert len(err.errors) == 3 and "3 invalid settings" in str(err)


def test_train_cli_prints_every_config_error_at_once(tmp_path, capsys):
    cfg = tmp_path / "bad.toml"
    cfg.write_text('steps = 0\npolcy = "lina"\n[model]\nn_layer = 3\n')
    assert main(["train", "--config", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert "steps" in err and "did you mean 'policy'" in err and "did you mean 'n_layers'" in err
