"""The one-line refusals of scripts/d12_budget.py, scripts/param_table.py and scripts/wandb_offline.py: every
user mistake names the flag or path and the fix, with no traceback and nothing half-printed on stdout."""

import struct
import zlib

import pytest

import hc
from scripts import d12_budget, param_table, wandb_offline


def refused(main, argv, capsys, *needles, code=1):
    """main(argv) exits with code and one error line naming every needle; no traceback, no table. -> the line."""
    with pytest.raises(SystemExit) as e:
        main(argv)
    out, err = capsys.readouterr()
    line = err.strip().splitlines()[-1]
    assert e.value.code == code and "Traceback" not in err and out == "", err
    for n in needles:
        assert n in line, (n, err)
    return line


@pytest.mark.parametrize("argv,needle", [
    (["--batch-tokens", "0"], "argument --batch-tokens: must be >= 1, got 0"),
    (["--batch-tokens", "-524288"], "argument --batch-tokens: must be >= 1, got -524288"),
    (["--batch-tokens", "1.5"], "argument --batch-tokens: '1.5' is not an integer"),
    (["--ratio", "0"], "argument --ratio: must be a finite number > 0, got 0"),
    (["--ratio", "-20"], "argument --ratio: must be a finite number > 0, got -20"),
    (["--ratio", "inf"], "argument --ratio: must be a finite number > 0, got inf"),
    (["--ratio", "nan"], "argument --ratio: must be a finite number > 0, got nan"),
    (["--ratio", "twenty"], "argument --ratio: 'twenty' is not a number"),
    (["--schemes", "mhc2"], "argument --schemes: invalid choice: 'mhc2'"),
])
def test_d12_budget_flags(argv, needle, capsys):
    refused(d12_budget.main, ["unused", *argv], capsys, f"error: {needle}", code=2)


def test_d12_budget_data_dirs(tmp_path, capsys):
    """Every directory is read before the table starts: no half table on stdout."""
    (tmp_path / "notes.txt").write_text("")
    refused(d12_budget.main, [str(tmp_path / "notes.txt")], capsys, "notes.txt is a file; pass prepared dataset "
                                                                     "directories")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "meta.json").write_text("{")
    refused(d12_budget.main, [str(tmp_path / "bad")], capsys, "meta.json is not valid JSON", "--restart")
    refused(d12_budget.main, [str(tmp_path / "none")], capsys, "does not exist", "data/prepare.py")


@pytest.mark.parametrize("argv,needle", [
    (["--n-streams", "4", "1"], "argument --n-streams: must be >= 2, got 1 (n = 1 is the plain residual"),
    (["--n-streams", "0"], "argument --n-streams: must be >= 2, got 0"),
    (["--n-streams", "2.5"], "argument --n-streams: '2.5' is not an integer"),
    (["--dim", "0"], "argument --dim: must be >= 1, got 0"),
    (["--n-layer", "twelve"], "argument --n-layer: 'twelve' is not an integer"),
])
def test_param_table_flags(argv, needle, capsys):
    refused(param_table.main, argv, capsys, f"error: {needle}", code=2)


def test_param_table_counts_on_the_meta_device(capsys):
    """The meta device's count is the real modules' (so a large n costs no memory); each n is listed once."""
    for scheme in hc.SCHEMES[1:]:
        real = sum(p.numel() for p in hc.make_connection(scheme, 16, 3, layer_idx=0).parameters())
        assert param_table.count(scheme, 16, 3) == real
    assert param_table.head_count(16, 3) == sum(p.numel() for p in hc.HCHead(16, 3, 1e-6).parameters())
    param_table.main(["--dim", "16", "--n-layer", "1", "--n-streams", "3", "3"])
    assert capsys.readouterr().out.count("| hc_head | 3 |") == 1


def run_file(path, payload):
    """A run-*.wandb file holding one record chunk of payload (a valid checksum, as wandb writes it)."""
    path.parent.mkdir(parents=True)
    crc = zlib.crc32(bytes([1]) + payload) & 0xFFFFFFFF
    path.write_bytes(b":W&B\xe1\xbe\x00" + struct.pack("<IHB", crc, len(payload), 1) + payload)


def test_wandb_offline_paths(tmp_path, capsys):
    prog = "wandb_offline.py: error: "
    refused(wandb_offline.main, [str(tmp_path / "nowhere")], capsys, f"{prog}{tmp_path / 'nowhere'}: no such file or "
                                                                     f"directory; pass a wandb directory")
    (tmp_path / "notes.txt").write_text("hello")
    refused(wandb_offline.main, [str(tmp_path / "notes.txt")], capsys, "is not a wandb run file (it starts b'hell'")
    (tmp_path / "wandb" / "run-20260101_000000-abc").mkdir(parents=True)  # an online run's folder
    refused(wandb_offline.main, [str(tmp_path / "wandb")], capsys, "no offline run files", "online runs",
            "--wandb_mode=offline")
    # a run killed as it started: its file has no run record (here an empty history record)
    run_file(tmp_path / "wandb" / "offline-run-20260101_000000-x" / "run-x.wandb", b"")
    line = refused(wandb_offline.main, [str(tmp_path / "wandb")], capsys, "none of the 1 run file(s) holds a run record")
    assert "note:" not in line
    bad = tmp_path / "w2" / "offline-run-20260101_000000-y" / "run-y.wandb"
    run_file(bad, b"\x0a\xff\xff")  # a field longer than the record: not wandb's record layout
    refused(wandb_offline.main, [str(bad)], capsys, "a record could not be decoded", "another wandb version")
    refused(wandb_offline.main, [str(tmp_path), "--summary", "--full-summary"], capsys,
            "argument --full-summary: not allowed with argument --summary", code=2)
