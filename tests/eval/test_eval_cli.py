"""``swa-rewrite eval`` and ``swa-rewrite calibrate`` (docs/design.md §15): schedule specs, JSON keys, the plot,
the schedule file calibrate writes and eval reads; small random-weight models, a few seconds each."""

import json

import pytest

from swa_rewrite import Schedule
from swa_rewrite.cli import CLIError, main, parse_schedule_spec

SMALL = ["--config", "tiny", "--layers", "2", "--seq-len", "96", "--no-progress"]


def run(argv, capsys):
    code = main(argv)
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.fixture
def data(tmp_path):
    folder = tmp_path / "heldout"
    folder.mkdir()
    for i in range(3):
        (folder / f"m{i}.py").write_text("".join(f"def f_{i}_{j}(x):\n    return x * {j}\n" for j in range(12)))
    return str(folder)


def test_schedule_specs(tmp_path):
    assert parse_schedule_spec("skip-freq=2@512", 6) == ("skip-freq 2 W512", Schedule.from_skip_freq(2, 6, 512))
    name, s = parse_schedule_spec("skip-freq=3@256+4", 6)
    assert name == "skip-freq 3 W256 + 4 sinks" and s == Schedule(256, [0, 1, 3, 4], 6, sinks=4)
    assert parse_schedule_spec("skip-freq-list=1,0,1@64", 3)[1] == Schedule(64, [0, 2], 3)
    assert parse_schedule_spec("swa-layers=1,2@64+2", 3)[1] == Schedule(64, [1, 2], 3, sinks=2)
    assert parse_schedule_spec("per-layer=0@32+4,2@64", 3)[1] == Schedule.per_layer({0: (32, 4), 2: 64}, 3)
    path = tmp_path / "cal.json"
    path.write_text(Schedule.per_layer({1: (128, 4)}, 3).to_json())
    assert parse_schedule_spec(str(path), 3) == ("cal SWA 1 W128 s4", Schedule.per_layer({1: (128, 4)}, 3))
    for bad, why in (("skip-freq=2", "expected skip-freq=N@W"), ("swa-layers=7@64", "out of range"),
                     ("per-layer=0:64", "LAYER@WINDOW"), (str(tmp_path / "none.json"), "cannot read"),
                     (str(path), "3 layers")):
        with pytest.raises(CLIError, match=why):
            parse_schedule_spec(bad, 4 if bad == str(path) else 3)


def test_eval_json_and_plot(capsys, tmp_path, data):
    png = tmp_path / "eval.png"
    code, out, err = run(["eval", *SMALL, "--data", data, "--sequences", "2", "--schedule", "skip-freq=2@32",
                          "--schedule", "per-layer=0@16+2", "--buckets", "0,32,64", "--distances", "32",
                          "--retrieval-samples", "1", "--page-size", "16", "--json", "--plot", str(png)], capsys)
    assert code == 0, err
    d = json.loads(out)
    assert {"model", "context", "page_size", "sequences", "variants", "data", "seq_len", "plot"} <= set(d)
    assert d["data"] == "3 files from --data" and d["seq_len"] == 96 and d["sequences"] == 2
    assert [v["name"] for v in d["variants"]] == ["original", "skip-freq 2 W32", "SWA 0 W16 s2"]
    v = d["variants"][1]
    assert [(b["start"], b["end"]) for b in v["buckets"]] == [(0, 32), (32, 64), (64, 96)]
    assert [r["distance"] for r in v["retrieval"]] == [32] and v["retrieval"][0]["samples"] == 1
    assert 0 < v["kv_saving"] < 1 and v["schedule"] == Schedule.from_skip_freq(2, 2, 32).to_dict()
    assert png.read_bytes()[:4] == b"\x89PNG"
    code, out, err = run(["eval", *SMALL, "--sequences", "1", "--schedule", "skip-freq=2@32", "--retrieval-samples",
                          "0", "--buckets", "0,48"], capsys)
    assert code == 0, err
    assert "perplexity by position" in out and "skip-freq 2 W32" in out and "retrieval:" not in out


def test_calibrate_writes_a_schedule_eval_reads(capsys, tmp_path, data):
    sched = tmp_path / "calibrated.json"
    code, out, err = run(["calibrate", *SMALL, "--data", data, "--calibration-sequences", "1", "--windows", "16,32",
                          "--sinks", "0,2", "--saving", "0.3", "--page-size", "16", "--out", str(sched), "--compare",
                          "--sequences", "1", "--distances", "32", "--retrieval-samples", "1", "--json"], capsys)
    assert code == 0, err
    d = json.loads(out)
    assert {"model", "data", "seq_len", "calibration", "proposal", "schedule_file", "comparison", "plot"} <= set(d)
    assert set(d["calibration"]) == {"windows", "sinks", "sequences", "tokens", "costs"}
    assert len(d["calibration"]["costs"]) == 2 * 2 * 2
    assert set(d["calibration"]["costs"][0]) == {"layer", "window", "sinks", "mass_outside", "mass_outside_max_head",
                                                 "output_error"}
    assert d["proposal"]["saving"] >= 0.3 and d["proposal"]["context"] == 96
    schedule = Schedule.from_json(sched.read_text())
    assert Schedule.from_dict(d["proposal"]["schedule"]) == schedule
    names = [v["name"] for v in d["comparison"]["variants"]]
    assert names[0] == "original" and names[1].startswith("calibrated") and any("skip-freq" in n for n in names)
    code, out, err = run(["eval", *SMALL, "--data", data, "--sequences", "1", "--schedule", str(sched),
                          "--retrieval-samples", "0"], capsys)
    assert code == 0, err
    assert "calibrated SWA" in out


def test_errors(capsys, tmp_path):
    code, _, err = run(["eval", *SMALL, "--schedule", "every-other"], capsys)
    assert code == 2 and "--schedule every-other" in err
    code, _, err = run(["eval", "--model", str(tmp_path / "missing"), "--no-progress"], capsys)
    assert code == 2 and "--model" in err and "cannot read the checkpoint" in err
    code, _, err = run(["eval", *SMALL, "--distances", "90"], capsys)
    assert code == 2 and "--distances" in err
    code, _, err = run(["calibrate", *SMALL, "--saving", "0.999", "--windows", "64"], capsys)
    assert code == 2 and "saves 99.9%" in err
    code, _, err = run(["calibrate", *SMALL, "--plot", str(tmp_path / "p.png")], capsys)
    assert code == 2 and "--compare" in err
