"""TrainConfig's typed sections: TOML tables, flat settings of earlier versions (moved with a note),
problems named by their dotted field, and the command-line options mapped into the sections."""

import argparse

import pytest

from lina.cli import build_parser
from lina.commands.train import build_config
from lina.config import MOVED, SECTIONS, CommConfig, EmulationConfig, TrainConfig, load_toml, merge
from lina.errors import ConfigError, ConfigErrors

SECTIONED = """
steps = 7
policy = "tutel"

[model]
experts = 8

[comm]
bucket_mb = 10.0
chunk_mb = "0.5"
credit = 2

[packing]
mode = "2@4"
every = 3

[emulation]
emulate = "hosts=2,link=100mbit"

[output]
out = "runs/sections"
log_every = 5
"""


def _parse(argv: list[str]) -> argparse.Namespace:
    return build_parser().parse_args(["train", *argv])


def test_toml_with_sections(tmp_path, capsys):
    path = tmp_path / "run.toml"
    path.write_text(SECTIONED)
    cfg = TrainConfig.from_dict(load_toml(path))
    assert (cfg.steps, cfg.policy, cfg.model.experts) == (7, "tutel", 8)
    assert (cfg.comm.bucket_mb, cfg.comm.chunk_mb, cfg.comm.credit) == (10.0, "0.5", 2)
    assert (cfg.packing.mode, cfg.packing.every, cfg.packing.first_step) == ("2@4", 3, 10)
    assert cfg.emulation.spec().hosts == 2 and cfg.output.out == "runs/sections" and cfg.output.log_every == 5
    assert "note" not in capsys.readouterr().err  # nothing moved
    assert TrainConfig.from_dict(cfg.to_dict()) == cfg  # the dict the workers get round-trips


@pytest.mark.parametrize(
    "old, value, where",
    [
        ("bucket_mb", 10.0, ("comm", "bucket_mb")),
        ("packing", "auto", ("packing", "mode")),
        ("packing_every", 3, ("packing", "every")),
        ("dilation", 1.0, ("emulation", "dilation")),
        ("out", "runs/x", ("output", "out")),
    ],
)
def test_an_old_flat_setting_is_accepted_with_a_note_naming_its_new_place(old, value, where, capsys):
    cfg = TrainConfig.from_dict({old: value})
    assert getattr(getattr(cfg, where[0]), where[1]) == value
    err = capsys.readouterr().err
    assert f"'{old}' is now '{where[0]}.{where[1]}'" in err and f"under [{where[0]}]" in err


def test_an_old_flat_setting_and_its_new_place_together_are_an_error():
    with pytest.raises(ConfigError) as err:
        TrainConfig.from_dict({"credit": 2, "comm": {"credit": 3}})
    assert err.value.field == "credit" and "comm.credit" in err.value.problem


def test_every_moved_setting_names_a_field_of_its_section():
    for old, new in MOVED.items():
        section, name = new.split(".")
        assert name in SECTIONS[section].__dataclass_fields__, (old, new)


def test_a_sections_bad_values_are_reported_with_dotted_names_all_at_once():
    cfg = TrainConfig.from_dict(
        {
            "workers": 0,
            "comm": {"bucket_mb": -1.0, "chunk_mb": "fast"},
            "packing": {"mode": "sometimes", "every": 0},
            "emulation": {"dilation": 0.0},
            "output": {"log_every": 0},
        }
    )
    with pytest.raises(ConfigErrors) as err:
        cfg.validate()
    fields = {e.field for e in err.value.errors}
    assert {
        "workers",
        "comm.bucket_mb",
        "comm.chunk_mb",
        "packing.mode",
        "packing.every",
        "emulation.dilation",
        "output.log_every",
    } <= fields
    assert CommConfig(credit=0).problems()[0].field == "comm.credit"
    assert EmulationConfig(emulate="hosts=1").problems()[0].field == "emulation.emulate.hosts"


def test_unknown_and_mistyped_settings_in_a_section_are_named_with_it():
    problems: list[ConfigError] = []
    TrainConfig.from_dict({"comm": {"credits": 2, "bucket_mb": "big"}, "output": 3}, problems)
    by_field = {p.field: p for p in problems}
    assert "did you mean 'credit'" in by_field["comm.credits"].problem
    assert "expected float" in by_field["comm.bucket_mb"].problem
    assert "not a table" in by_field["output"].problem


def test_command_line_options_keep_their_names_and_fill_the_sections(tmp_path, capsys):
    path = tmp_path / "old.toml"
    path.write_text('packing = "auto"\nchunk_mb = "2"\n[model]\nexperts = 8\n')
    cfg = build_config(
        _parse(
            [
                "--config",
                str(path),
                "--packing",
                "4",
                "--credit",
                "3",
                "--out",
                str(tmp_path / "o"),
                "--max-expert-memory",
                "5",
                "--check-collectives",
            ]
        )
    )
    assert cfg.packing.mode == "4" and cfg.comm.chunk_mb == "2" and cfg.comm.credit == 3
    assert cfg.output.out == str(tmp_path / "o") and cfg.packing.max_expert_memory_mb == 5.0
    assert cfg.comm.check_collectives
    err = capsys.readouterr().err
    assert "'packing' is now 'packing.mode'" in err and "'chunk_mb' is now 'comm.chunk_mb'" in err
    assert "credit" not in err  # an option is not an old setting


def test_merge_overlays_dotted_options_on_a_section():
    merged = merge({"comm": {"credit": 2, "bucket_mb": 5.0}}, {"comm.credit": 4, "steps": 3, "lr": None})
    assert merged == {"comm": {"credit": 4, "bucket_mb": 5.0}, "steps": 3}
