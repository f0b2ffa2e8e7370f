"""`wuerstchen-fast sample` writes valid PNGs; --help explains the options; errors are one line."""
import subprocess
import sys

import pytest
from PIL import Image

from _pipeline_folders import tiny_repos  # noqa: F401  (fixture)
from wuerstchen_fast.cli import build_parser, main

SMALL = ["--height", "128", "--width", "256", "--prior-steps", "2", "--steps", "2", "--device", "cpu", "--no-progress"]


def test_sample_writes_png(tiny_repos, tmp_path, capsys):
    prior_dir, decoder_dir = tiny_repos
    out = tmp_path / "img" / "cat.png"
    rc = main(["sample", "a cat", "--out", str(out), "--prior", str(prior_dir), "--decoder", str(decoder_dir),
               "--seed", "3", *SMALL])
    assert rc == 0 and capsys.readouterr().out.strip() == str(out)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(out) as im:
        im.verify()
    with Image.open(out) as im:
        assert im.size == (256, 128) and im.mode == "RGB"


def test_sample_several_images_get_numbered_names(tiny_repos, tmp_path):
    prior_dir, decoder_dir = tiny_repos
    rc = main(["sample", "a", "b", "--out", str(tmp_path / "x.png"), "--prior", str(prior_dir), "--decoder",
               str(decoder_dir), "--seed", "0", "--decoder-guidance", "2", *SMALL])
    assert rc == 0 and sorted(p.name for p in tmp_path.iterdir()) == ["x_0.png", "x_1.png"]


def test_help_explains_every_option():
    help_text = build_parser()._subparsers._group_actions[0].choices["sample"].format_help()
    for opt in ["--out", "--prior", "--decoder", "--weights", "--seed", "--steps", "--prior-steps", "--prior-fast",
                "--prior-guidance", "--decoder-guidance", "--height", "--width", "--negative", "--num-images",
                "--device", "--dtype", "--compile", "--cuda-graphs", "--no-progress"]:
        assert opt in help_text
    assert "4*int(ceil(H/42.67)*10.67)" in help_text


def test_no_weights_uses_the_bundled_model_with_its_own_size(tmp_path):
    out = tmp_path / "x.png"
    assert main(["sample", "a red circle on a blue background", "--out", str(out), "--seed", "0", "--no-progress"]) == 0
    assert Image.open(out).size == (256, 256)  # the bundle's sampling.json, not the 1024 px of the released models


def test_errors_are_one_clear_line(tiny_repos, tmp_path, capsys, monkeypatch):
    from wuerstchen_fast.pipeline import loading

    monkeypatch.setattr(loading, "DEFAULT_WEIGHTS", tmp_path / "absent")  # an installation without the bundle
    rc = main(["sample", "a cat", "--out", str(tmp_path / "x.png")])
    err = capsys.readouterr().err
    assert rc == 2 and "no bundled default weights" in err and "--prior DIR --decoder DIR" in err
    rc = main(["sample", "a cat", "--prior", str(tiny_repos[0]), "--decoder", str(tiny_repos[1]), "--height", "300",
               "--width", "128", "--device", "cpu"])
    assert rc == 2 and "height=300 cannot be generated" in capsys.readouterr().err


def test_python_dash_m_entry_point():
    r = subprocess.run([sys.executable, "-m", "wuerstchen_fast.cli", "sample", "--help"], capture_output=True, text=True)
    assert r.returncode == 0 and "--prior" in r.stdout
    r = subprocess.run([sys.executable, "-m", "wuerstchen_fast.cli"], capture_output=True, text=True)
    assert r.returncode == 2 and "sample" in r.stderr
